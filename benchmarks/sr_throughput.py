"""End-to-end TSD-SR super-resolution, files in and out, every way side by side in one run.

Workloads: a folder of LQ images (RealSR's 100 test_LR images, 128 px, to 512 px, where
``../shared/data/realsr/test_LR`` exists, else generated images of that size): images/s; one
1024 px image to 4096 px and one 2048 px image to 8192 px: seconds and peak GPU memory. Ways:
the release's (``benchmarks/release_style.py``: fp16, LoRA unmerged, latent tiles one at a
time, its tiled VAE tile by tile, ``empty_cache`` per image), and this project's pipeline eager,
compiled, and compiled + FP8. Each way runs one warm-up image first (its time, compile included,
shown apart), then the workload; stage columns split the wall time (VAE encode, transformer, VAE
decode, I/O, other) where the way reports them. Seams: the pipeline's tiled output against its
untiled output on the large images, where both fit. Weights are RANDOM (SD3-medium-shaped on a
GPU): times and memory are real, images are not.

    python -m benchmarks.sr_throughput --quick            # CPU, tiny model, seconds
    python -m benchmarks.sr_throughput                    # GPU: SD3-medium shapes, all rows
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.inference import build
from benchmarks.release_style import ReleaseSettings, release_upscale_file
from benchmarks.report import (
    RESULTS,
    command_line,
    markdown_table,
    write_pending,
    write_report,
)
from benchmarks.stages import STAGES, StageClock
from scoredistill.sr.loading import DTYPES, SRModel, merge_lora
from scoredistill.sr.tiling import TileConfig
from scoredistill.sr.upscale import sr_forward, upscale_file

REALSR = Path("../shared/data/realsr/test_LR")
"""RealSR's test LQ images, relative to the repository root (the project's shared data)."""
COLUMNS = ["way", "workload", "images", "s", "images/s", "s/image", "peak GiB", "warm-up s",
           *(f"{s} s" for s in STAGES), "note"]
QUICK_RELEASE = ReleaseSettings(latent_tile=8, latent_overlap=2, encoder_tile=64, encoder_pad=8,
                                decoder_tile=8, decoder_pad=2, process_size=128)
"""The release's tiling scaled to the tiny model (so --quick tiles its large images too)."""
QUICK_TILES = TileConfig(latent=8, latent_overlap=2, encoder=64, encoder_overlap=8, decoder=8,
                         decoder_overlap=2)
"""The pipeline's tiling scaled to the tiny model in the same way."""
WAYS = ("release", "eager", "compiled", "compiled+fp8")
TITLE = "TSD-SR super-resolution end to end"
Runner = Callable[[list[Path], Path, StageClock], None]


def folder_inputs(work: Path, count: int, side: int, source: Path | None) -> tuple[list[Path], str]:
    """The folder workload: the first ``count`` PNGs of ``source`` if it has that many, else
    ``count`` generated ``side`` px images (smooth random colour fields); and where they came
    from."""
    if source is not None and source.is_dir():
        found = sorted(source.glob("*.png"))[:count]
        if len(found) == count:
            return found, f"{count} images of {source}"
    paths = []
    g = np.random.default_rng(0)
    for i in range(count):
        coarse = (g.random((side // 8, side // 8, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC)
        paths.append(work / "folder" / f"{i:03d}.png")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        image.save(paths[-1])
    return paths, f"{count} generated {side} px images"


def large_input(work: Path, side: int) -> Path:
    """One ``side`` px photo (scikit-image's astronaut, bicubic-resized) as a PNG."""
    import skimage.data

    path = work / f"large_{side}.png"
    Image.fromarray(skimage.data.astronaut()).resize((side, side), Image.Resampling.BICUBIC
                                                     ).save(path)
    return path


def release_runner(model: SRModel, settings: ReleaseSettings) -> Runner:
    """The release's way over a list of files (one at a time)."""
    generator = torch.Generator(model.cond["prompt_embeds"].device).manual_seed(42)

    def run(inputs: list[Path], out_dir: Path, clock: StageClock) -> None:
        for src in inputs:
            release_upscale_file(model, src, out_dir / f"{src.stem}.png", clock, settings,
                                 generator)

    return run


def measure(way: str, workload: str, run: Runner, inputs: list[Path], out_dir: Path,
            device: str, warm_up: bool) -> dict[str, Any]:
    """One row: a warm-up image first if ``warm_up`` (its time apart), then the workload, timed
    end to end."""
    cuda = device.startswith("cuda")
    row: dict[str, Any] = {"way": way, "workload": workload, "images": len(inputs)}
    try:
        if warm_up:
            warm = out_dir / "warm-up"
            warm.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            run(inputs[:1], warm, StageClock(device))
            if cuda:
                torch.cuda.synchronize()
            row["warm-up s"] = time.perf_counter() - t0
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        out_dir.mkdir(parents=True, exist_ok=True)
        clock = StageClock(device)
        t0 = time.perf_counter()
        run(inputs, out_dir, clock)
        stages = clock.seconds()  # synchronises
        seconds = time.perf_counter() - t0
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**row, "note": "out of memory"}
    written = sum(1 for p in inputs if (out_dir / f"{p.stem}.png").is_file())
    if written != len(inputs):
        row["note"] = f"only {written} of {len(inputs)} outputs written"
    row.update({"s": seconds, "images/s": len(inputs) / seconds, "s/image": seconds / len(inputs),
                "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else "n/a",
                **{f"{s} s": stages[s] for s in STAGES if s in stages}})
    return row


@torch.no_grad()
def seam_row(model: SRModel, side: int, tiles: Any, device: str,
              dtype: torch.dtype) -> dict[str, Any]:
    """The pipeline's tiled forward against its untiled forward on a ``side`` px photo."""
    from benchmarks.tiled_vae import photo

    x = photo(side, device, dtype)
    try:
        tiled = sr_forward(model, x, tiles).float()
        untiled = sr_forward(model, x, None).float()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"size": side, "note": "untiled run out of memory"}
    diff = (tiled - untiled).abs()
    return {"size": side, "max abs diff": diff.max().item(), "mean abs diff": diff.mean().item(),
            "PSNR dB": (10 * torch.log10(4 / diff.square().mean())).item()}


def _report(rows: list[dict[str, Any]], seams: list[dict[str, Any]], notes: list[str],
            meta: dict[str, Any], out_dir: Path, command: str, final: bool) -> Path:
    text = [*notes]
    if seams:
        text.append("**Seams** (pipeline eager, tiled against untiled on the same input, output "
                    "in [-1, 1]):\n\n" + markdown_table(seams, ["size", "max abs diff",
                                                                 "mean abs diff", "PSNR dB",
                                                                 "note"]))
    if not final:
        text.append("Partial: the run stopped before all rows were measured.")
    return write_report("sr_throughput", TITLE, rows,
                        meta={**meta, "seams": seams, "complete": final},
                        notes="\n\n".join(text), columns=COLUMNS, out_dir=out_dir,
                        command=command, echo=final)


def pipeline_runner(model: SRModel, tiles: TileConfig, process_size: int) -> Runner:
    """This project's inference over a list of files."""

    def run(inputs: list[Path], out_dir: Path, clock: StageClock) -> None:
        for src in inputs:
            upscale_file(model, src, out_dir / f"{src.stem}.png", tiles=tiles,
                         process_size=process_size)

    return run


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=("tiny", "sd3-medium"), default=None,
                        help="default: sd3-medium on CUDA, tiny on the CPU")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="the pipeline's dtype: default bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--release-dtype", choices=sorted(DTYPES), default=None,
                        help="the release way's dtype: default fp16 (its default) on CUDA, fp32 "
                             "on the CPU")
    parser.add_argument("--folder", type=Path, default=REALSR,
                        help="LQ folder (default: RealSR test_LR, else generated images)")
    parser.add_argument("--count", type=int, default=None, help="images of the folder (100)")
    parser.add_argument("--folder-side", type=int, default=None,
                        help="side of generated folder images (128)")
    parser.add_argument("--large", type=int, nargs="*", default=None,
                        help="LQ sides of the single large images (1024 2048)")
    parser.add_argument("--upscale", type=int, default=4)
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument("--seams", type=int, nargs="*", default=None,
                        help="LQ sides whose upscaled image is run tiled and untiled "
                             "(default: the first of --large)")
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run: tiny model, 4 images of 32 px, one of 64 px, tiles "
                             "scaled down so the large image is tiled")
    parser.add_argument("--plan", action="store_true",
                        help="measure nothing: write the GPU table's rows marked as awaiting a "
                             "GPU run, for the docs to include until one fills it")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda") or args.plan
    args.config = args.config or ("sd3-medium" if cuda and not args.quick else "tiny")
    args.dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    args.release_dtype = DTYPES[args.release_dtype or ("fp16" if cuda else "fp32")]
    args.count = args.count or (4 if args.quick else 100)
    args.folder_side = args.folder_side or (32 if args.quick else 128)
    if args.large is None:
        args.large = [64] if args.quick else [1024, 2048]
    return args


def way_labels(args: argparse.Namespace) -> dict[str, str]:
    """The rows' names of the ways run."""
    release = ("release (fp16, LoRA unmerged, tiles one by one, empty_cache)"
               if args.release_dtype == torch.float16 else f"release way ({args.release_dtype})")
    labels = {"release": release, "eager": "pipeline eager", "compiled": "pipeline compiled",
              "compiled+fp8": "pipeline compiled + FP8"}
    return {w: labels[w] for w in args.ways}


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    from diffusers.utils import logging

    logging.set_verbosity_error()
    up, side = args.upscale, args.folder_side
    names = [f"folder {side} -> {side * up} px", *(f"{s} -> {s * up} px" for s in args.large)]
    labels = way_labels(args)
    command = command_line("benchmarks.sr_throughput", argv)
    if args.plan:
        return write_pending(
            "sr_throughput", TITLE, [{"way": w, "workload": n} for w in labels.values()
                                     for n in names], columns=COLUMNS, out_dir=args.out,
            awaiting="a GPU", fill="bash benchmarks/gpu_session.sh")
    release = QUICK_RELEASE if args.quick else ReleaseSettings()
    tiles = QUICK_TILES if args.quick else TileConfig()
    if args.quick:
        torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rows: list[dict[str, Any]] = []
    seams: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="sr_throughput_"))
    try:
        folder, source = folder_inputs(work / "in", args.count, side, args.folder)
        workloads = dict(zip(names, [folder, *(large_input(work / "in", s) for s in args.large)],
                             strict=True))
        workloads = {k: v if isinstance(v, list) else [v] for k, v in workloads.items()}
        notes = [f"Config `{args.config}` with RANDOM weights; the pipeline in {args.dtype}, the "
                 f"release way in {args.release_dtype}; folder: {source}. Times are wall clock, "
                 "files read and written included; warm-up s is the first image's (compiling "
                 "included), measured before the first workload of each way and before every "
                 "workload of a compiled way. Stage columns: CUDA events at the stage "
                 "boundaries, read once per row; empty where the way does not report them."]
        meta = {"config": args.config, "dtype": str(args.dtype), "folder": source,
                "release_dtype": str(args.release_dtype), "upscale": up}

        def report(final: bool) -> Path:
            return _report(rows, seams, notes, meta, args.out, command, final)

        def run_way(way: str, runner: Runner) -> None:
            # Eager ways warm up once (on a folder image); compiled ways on every workload, whose
            # tile shapes each compile.
            for i, (name, inputs) in enumerate(workloads.items()):
                out = work / "out" / way / name.split()[0]
                rows.append(measure(labels[way], name, runner, inputs, out, args.device,
                                    warm_up=i == 0 or "compiled" in way))
                shutil.rmtree(out, ignore_errors=True)
                report(final=False)

        if "release" in labels:
            model = build(args.config, args.release_dtype, args.device)
            for module in (model.vae, model.student.module):  # the release: LoRA in fp16 too
                torch.nn.Module.to(module, args.release_dtype)
            run_way("release", release_runner(model, release))
            del model
        model = build(args.config, args.dtype, args.device)
        for module in (model.student.module, model.vae):
            merge_lora(module)
            module.fuse_qkv_projections()
        if "eager" in labels:
            run_way("eager", pipeline_runner(model, tiles, release.process_size))
        seams.extend(seam_row(model, s * up, tiles, args.device, args.dtype)
                     for s in (args.large[:1] if args.seams is None else args.seams))
        for way in ("compiled", "compiled+fp8"):
            if way in labels:
                rows.append({"way": labels[way], "note": "awaiting the pipeline's API"})
        report(final=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report(final=True)


if __name__ == "__main__":
    main()
