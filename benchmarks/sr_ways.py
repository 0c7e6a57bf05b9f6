"""The ways of running TSD-SR that the end-to-end benchmark compares, and its inputs: the
release's way (``benchmarks/release_style.py``) and this project's pipeline eager, compiled and
compiled + FP8, each over a fresh random model (one backbone in memory at a time)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.release_style import ReleaseSettings, release_upscale_file
from benchmarks.sr_model import build
from scoredistill.sr.files import super_resolve_files
from scoredistill.sr.loading import SRModel, merge_lora
from scoredistill.sr.pipeline import SROptions, TSDSRPipeline
from scoredistill.sr.tiling import TileConfig
from scoredistill.sr.timing import StageTimer

REALSR = Path("../shared/data/realsr/test_LR")
"""RealSR's test LQ images, relative to the repository root (the project's shared data)."""
QUICK_RELEASE = ReleaseSettings(latent_tile=8, latent_overlap=2, encoder_tile=64, encoder_pad=8,
                                decoder_tile=8, decoder_pad=2, process_size=128)
"""The release's tiling scaled to the tiny model (so --quick tiles its large images too)."""
QUICK_TILES = TileConfig(latent=8, latent_overlap=2, encoder=64, encoder_overlap=8, decoder=8,
                         decoder_overlap=2)
"""The pipeline's tiling scaled to the tiny model in the same way."""
WAYS = ("release", "eager", "compiled", "compiled+fp8")
Runner = Callable[[list[Path], Path], dict[str, str]]
"""Super-resolves files into a folder; returns ``{file: reason}`` for those that failed."""


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
    path.parent.mkdir(parents=True, exist_ok=True)  # the folder workload may not have made it
    Image.fromarray(skimage.data.astronaut()).resize((side, side), Image.Resampling.BICUBIC
                                                     ).save(path)
    return path


def release_runner(model: SRModel, settings: ReleaseSettings, timer: StageTimer) -> Runner:
    """The release's way over a list of files (one at a time; the release stops at a bad file,
    the benchmark's inputs have none)."""
    generator = torch.Generator(model.cond["prompt_embeds"].device).manual_seed(42)

    def run(inputs: list[Path], out_dir: Path) -> dict[str, str]:
        for src in inputs:
            release_upscale_file(model, src, out_dir / f"{src.stem}.png", timer, settings,
                                 generator)
        return {}

    return run


def pipeline_runner(pipe: TSDSRPipeline, options: SROptions) -> Runner:
    """The pipeline's file loop (reader threads, batched tiles, writer thread)."""

    def run(inputs: list[Path], out_dir: Path) -> dict[str, str]:
        jobs = [(src, out_dir / f"{src.stem}.png") for src in inputs]
        return super_resolve_files(pipe, jobs, options, progress=False)

    return run


def way_labels(args: argparse.Namespace) -> dict[str, str]:
    """The rows' names of the ways run."""
    release = ("release (fp16, LoRA unmerged, tiles one by one, empty_cache)"
               if args.release_dtype == torch.float16 else f"release way ({args.release_dtype})")
    labels = {"release": release, "eager": "pipeline eager", "compiled": "pipeline compiled",
              "compiled+fp8": "pipeline compiled + FP8"}
    return {w: labels[w] for w in args.ways}


def make_runner(way: str, args: argparse.Namespace, release: ReleaseSettings,
                tiles: TileConfig) -> tuple[Runner, StageTimer]:
    """A fresh model (one backbone in memory at a time) and the runner of ``way`` over it."""
    timer = StageTimer(enabled=True)
    if way == "release":
        model = build(args.config, args.release_dtype, args.device)
        for module in (model.vae, model.student.module):  # the release: LoRA in fp16 too
            torch.nn.Module.to(module, args.release_dtype)
        return release_runner(model, release, timer), timer
    model = merged_model(args)
    pipe = TSDSRPipeline(model, tiles=tiles, batch_size=args.batch_size,
                         compile=way != "eager", fp8=way == "compiled+fp8", timer=timer)
    # The same work as the release: its upscale and process size (no colour-fix difference).
    options = SROptions(upscale=release.upscale, process_size=release.process_size)
    return pipeline_runner(pipe, options), timer


def merged_model(args: argparse.Namespace) -> SRModel:
    """The random model as the pipeline loads one: LoRA merged, QKV fused."""
    model = build(args.config, args.dtype, args.device)
    for module in (model.student.module, model.vae):
        merge_lora(module)
        module.fuse_qkv_projections()
    return model
