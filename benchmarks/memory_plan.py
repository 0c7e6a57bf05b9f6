"""Memory plans at real backbone sizes, and the planner checked against real CPU runs.

The check: each row traces a step with :mod:`scoredistill.memory` and then runs it for real on
the CPU, reading the peak from torch.profiler's allocator records (with and without kernel
scratch: memory an operator allocates and frees before returning, which the trace cannot see).
The plans: the recipe's train step (shared backbone) against the release's (two transformer
copies), with and without checkpointing, batch 1/2/4 at 512 and 1024 px; the precompute stage;
SR inference at 512 px batch 8, 1024 -> 4096 and 2048 -> 8192 px with today's tile defaults.
Each plan row: the peak by category, FLOPs per sample and the compute floor on named GPUs.

    python -m benchmarks.memory_plan            # SD3-medium (FLUX.1-dev, SDXL when built in)
    python -m benchmarks.memory_plan --quick    # the tiny preset only, into a temporary folder
    python -m benchmarks.memory_plan --cuda     # on a GPU: predicted vs max_memory_allocated
    python -m benchmarks.memory_plan --only SR  # the SR rows again, the others from the report

The full run traces ~55 real-size steps (hours on one CPU core; ``--jobs N`` traces N rows at
once): each traced row is kept in ``memory_plan.partial.json`` beside the report as soon as it
is done, so a run that is stopped goes on where it was when started again. A kept row is used
only while the project's source files it ran (and torch's, diffusers' and peft's versions) are
unchanged; the file goes once the report is written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks import options
from benchmarks.report import (
    command_line,
    machine,
    markdown_table,
    write_json,
    write_pending,
    write_report,
)
from scoredistill.cli import UserError
from scoredistill.memory import (
    GPUS,
    SPECS,
    Plan,
    SRRun,
    TrainOptions,
    floor_seconds,
    measure_sr,
    measure_train,
    plan_sr,
    plan_train,
)
from scoredistill.memory.precompute import PrecomputeRun, plan_precompute
from scoredistill.memory.release import plan_release
from scoredistill.memory.trace import GIB
from scoredistill.sr.tiling import TileConfig

PROG = "benchmarks.memory_plan"
MIB = 2**20
F32 = torch.float32
CASES: list[tuple[str, str, Any]] = [
    ("tiny", "train", TrainOptions(size=64, dtype=F32)),
    ("tiny", "train", TrainOptions(size=64, dtype=F32, checkpointing=True)),
    ("tiny", "train", TrainOptions(size=64, dtype=F32, offload_vae_activations=True)),
    ("tiny", "sr", SRRun(height=32, width=48, images=2, batch=2, dtype=F32)),
    ("sd3-100m", "train", TrainOptions(size=256, dtype=F32)),
    ("sd3-100m", "train", TrainOptions(size=256, dtype=F32, checkpointing=True)),
    ("sd3-100m", "train", TrainOptions(size=256, dtype=F32, offload_vae_activations=True)),
    ("sd3-100m", "sr", SRRun(height=64, width=64, images=1, batch=2, dtype=F32)),
]
# Tiles small enough that 64 -> 256 px tiles the VAE: tiles waiting between its GroupNorms are
# host memory, held outside torch's allocator in the real run (scoredistill.memory.measure_sr).
SMALL_TILES = TileConfig(latent=16, latent_overlap=4, encoder=128, encoder_overlap=8,
                         decoder=16, decoder_overlap=2)
CASES += [(model, "sr", SRRun(height=64, width=64, images=1, batch=2, dtype=F32,
                              tiles=SMALL_TILES)) for model in ("tiny", "sd3-100m")]


BF16 = torch.bfloat16
TRAIN_MODELS = ("sd3-medium", "flux.1-dev", "sdxl")  # issue 24's rows; the release: SD3 only
FLOOR_GPUS = ("H100 SXM", "H200", "A100-80GB", "L40S", "RTX 4090")
# The tiny text encoders of --quick (CLIP-L, CLIP-G, T5 shapes, a few hundred parameters).
TINY_CLIP = dict(vocab_size=1000, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                 num_attention_heads=2, projection_dim=32, max_position_embeddings=6,
                 hidden_act="gelu")
TINY_ENCODERS = (TINY_CLIP, TINY_CLIP, dict(vocab_size=1000, d_model=32, d_kv=8, d_ff=64,
                                            num_layers=1, num_heads=2))


def plans(quick: bool) -> list[tuple[str, int, Callable[[], Plan]]]:
    """(setup, samples per step, traced plan) of every plan row."""
    out: list[tuple[str, int, Callable[[], Plan]]] = []
    if quick:
        tiny, opts = SPECS["tiny"], TrainOptions(size=64)
        run = PrecomputeRun(batch=2, latents=True, image=64)
        return [("tiny: ours, 64 px, b1", 1, lambda: plan_train(tiny, opts)),
                ("tiny: release, 64 px, b1", 1, lambda: plan_release(tiny, opts)),
                ("tiny: precompute, b2, latents 64 px", 2,
                 lambda: plan_precompute(tiny, run, encoders=TINY_ENCODERS, t5_tokens=6)),
                ("tiny: SR 2 x 32 -> 128 px", 2,
                 lambda: plan_sr(tiny, SRRun(height=32, width=32, images=2)))]
    for model in (m for m in TRAIN_MODELS if m in SPECS):
        spec = SPECS[model]
        for size in (512, 1024):
            for batch in (1, 2, 4):
                for ckpt in (False, True):
                    opts = TrainOptions(size=size, batch=batch, checkpointing=ckpt)
                    for design, plan in (("ours", plan_train), ("release", plan_release)):
                        if design == "release" and model != "sd3-medium":
                            continue
                        out.append((f"{model}: {design}, {size} px, b{batch}, checkpointing "
                                    f"{'on' if ckpt else 'off'}", batch,
                                    functools.partial(plan, spec, opts)))
                if model == "sd3-medium":
                    opts = TrainOptions(size=size, batch=batch, offload_vae_activations=True)
                    out.append((f"{model}: ours, {size} px, b{batch}, checkpointing off, VAE "
                                "offload", batch, functools.partial(plan_train, spec, opts)))
    sd3 = SPECS["sd3-medium"]
    for dtype, latents, image in ((BF16, False, 512), (BF16, True, 1024),
                                  (torch.float32, False, 512), (torch.float32, True, 1024)):
        run = PrecomputeRun(batch=8, dtype=dtype, latents=latents, image=image)
        out.append((f"sd3-medium: precompute, {str(dtype)[6:]}, b8"
                    + (f", latents {image} px" if latents else ""), 8,
                    functools.partial(plan_precompute, sd3, run)))
    for name, sr in (("SR 8 x 128 -> 512 px", SRRun(height=128, width=128, images=8)),
                     ("SR 1024 -> 4096 px", SRRun(height=1024, width=1024)),
                     ("SR 2048 -> 8192 px", SRRun(height=2048, width=2048))):
        out.append((f"sd3-medium: {name}", sr.images, functools.partial(plan_sr, sd3, sr)))
    return out


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scoredistill", "benchmarks", "examples")  # the project's code a trace can run
PARTIAL = "memory_plan.partial.json"
STARTED = time.time()


def project_sources() -> list[str]:
    """The project's source files imported so far (relative paths): the code a row has run."""
    files = set()
    for module in list(sys.modules.values()):
        path = Path(getattr(module, "__file__", None) or "/").resolve()
        if path.is_relative_to(ROOT) and path.relative_to(ROOT).parts[0] in PACKAGES:
            files.add(str(path.relative_to(ROOT)))
    return sorted(files)


def digest(files: Sequence[str]) -> str:
    """A hash of ``files``' contents and the versions of the libraries a trace runs through."""
    versions = machine()
    h = hashlib.sha256(json.dumps([versions[k] for k in ("torch", "diffusers", "peft")]).encode())
    for name in files:
        path = ROOT / name
        h.update(name.encode() + (path.read_bytes() if path.is_file() else b"<gone>"))
    return h.hexdigest()


class KeptRows:
    """Traced plan rows kept in ``out/memory_plan.partial.json`` (written atomically after each
    row), each with the source files it ran and their hash; a row whose files changed since is
    traced again."""

    def __init__(self, out: Path) -> None:
        self.path = out / PARTIAL
        kept = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.rows = {setup: row for setup, row in kept.items()
                     if "date" in row and row["digest"] == digest(row["sources"])}
        self.unkept: set[str] = set()
        self.date = machine()["date"]  # this run's start: the date of the rows it traces
        if kept:
            print(f"{self.path}: {len(self.rows)} of {len(kept)} traced rows kept (the others "
                  "ran code that has changed since)", flush=True)

    def add(self, setup: str, traced: Traced) -> None:
        """Keep ``traced``, the row of ``setup``, and write the file (not if a file it ran
        changed after this run started: it is hashed as it is now, not as it ran)."""
        peak, floor, files, seconds = traced
        self.rows[setup] = {"peak": peak, "floor": floor, "sources": files,
                            "digest": digest(files), "seconds": seconds,
                            "date": self.date}
        edited = [f for f in files
                  if not (ROOT / f).is_file() or (ROOT / f).stat().st_mtime > STARTED]
        if edited:
            self.unkept.add(setup)
            tqdm.write(f"{setup} is not kept for a later run: {edited[0]} changed during this "
                       "one")
        write_json(self.path, {k: v for k, v in self.rows.items() if k not in self.unkept})

    def done(self) -> None:
        """The report is written: the kept rows are in it."""
        self.path.unlink(missing_ok=True)


# A traced row: (peak row, floor row, the project's source files it ran, seconds).
Traced = tuple[dict[str, Any], dict[str, Any], list[str], float]


def trace(index: int, quick: bool) -> Traced:
    """Trace row ``index`` of ``plans(quick)`` (in a worker process with ``--jobs``)."""
    setup, samples, plan = plans(quick)[index]
    start = time.perf_counter()
    peak, floor = plan_rows(setup, samples, plan())
    return peak, floor, project_sources(), time.perf_counter() - start


def quiet_diffusers() -> None:
    from diffusers.utils import logging

    logging.set_verbosity_error()  # the "keep modules in float32" notice for random weights


def start_worker(run: int) -> None:
    """A ``--jobs`` worker of the process ``run``: diffusers quiet, and (on Linux) ended with
    that run, so that a run killed with SIGTERM or SIGKILL leaves no worker tracing on."""
    quiet_diffusers()
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != run:  # the run ended before the line above
            os._exit(1)


def trace_all(kept: KeptRows, quick: bool, jobs: int, skip: Collection[str] = ()) -> None:
    """Trace the rows ``kept`` lacks (but those in ``skip``), ``jobs`` at a time, keeping each
    as it finishes."""
    setups = [setup for setup, _, _ in plans(quick)]
    todo = [i for i, setup in enumerate(setups) if setup not in kept.rows and setup not in skip]
    bar = tqdm(total=len(todo), desc="tracing plans", unit="row", dynamic_ncols=True)
    if jobs == 1:
        for i in todo:
            bar.set_postfix_str(setups[i])
            kept.add(setups[i], trace(i, quick))
            bar.update()
        return bar.close()
    # Spawned, not forked: each worker imports torch afresh, as a separate run would.
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"),
                             initializer=start_worker, initargs=(os.getpid(),)) as pool:
        running = {pool.submit(trace, i, quick): i for i in todo}
        for done in as_completed(running):
            kept.add(setups[running[done]], done.result())
            bar.set_postfix_str(setups[running[done]])
            bar.update()
    bar.close()


def earlier_rows(out: Path, only: str, setups: Sequence[str]) -> dict[str, Any]:
    """The rows of ``setups`` that the report in ``out`` holds and whose setup lacks ``only``,
    with the dates they were traced (a run with ``--only`` traces the others)."""
    path = out / "memory_plan.json"
    if not path.is_file():
        raise UserError(f"--only traces some rows again and takes the others from {path}, "
                        "which is not there: run without --only first")
    report = json.loads(path.read_text())
    dates = report.get("traced", {})
    rows = {p["setup"]: {"peak": p, "floor": f, "seconds": report["trace_seconds"][p["setup"]],
                         "date": dates.get(p["setup"], report["machine"]["date"])}
            for p, f in zip(report["plans"], report["floors"], strict=True)}
    return {s: rows[s] for s in setups if only not in s and s in rows}


def host_table(peaks: Sequence[dict[str, Any]]) -> str:
    """The rows that hold host memory (the tiled VAE's waiting tiles, the VAE's offloaded
    activations), as a markdown section."""
    held = [{"setup": p["setup"], "peak GiB (card)": p["peak GiB"], "host GiB": p["host GiB"]}
            for p in peaks if "host GiB" in p]
    if not held:
        return ""
    return ("\n\n#### Host memory beside the card's\n\n"
            "The most host memory (RAM, not the card's) the step holds: the tiles the SR "
            "pipeline's tiled VAE keeps waiting between its GroupNorms, or (`VAE offload`) what "
            "the VAE saves for the backward. The host needs this much free besides the "
            "process's own.\n\n" + markdown_table(held))


def plan_rows(setup: str, samples: int, plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    """The peak-by-category row and the compute-floor row of one plan."""
    gib = {k: v / GIB for k, v in plan.peak.items()}
    peak = {"setup": setup, "peak GiB": gib["Total"],
            "weights GiB": gib.get("Parameter", 0) + gib.get("Buffer", 0),
            "grads + optimiser GiB": gib.get("Gradient", 0) + gib.get("Optstate", 0),
            "activations + temp GiB": gib["Total"] - sum(
                gib.get(k, 0) for k in ("Parameter", "Buffer", "Gradient", "Optstate")),
            "TFLOP / sample": plan.flops / samples / 1e12}
    if plan.host:
        peak["host GiB"] = plan.host / GIB
    floor = {"setup": setup, **{
        f"{gpu} ms >=": 1e3 * floor_seconds(plan.flops, plan.min_bytes, GPUS[gpu]) / samples
        for gpu in FLOOR_GPUS}}
    return peak, floor


CUDA_CASES: list[tuple[str, str, Any]] = [
    ("SD3-medium train 512 px b1, checkpointing off", "train", TrainOptions()),
    ("SD3-medium train 512 px b1, checkpointing on", "train", TrainOptions(checkpointing=True)),
    ("SD3-medium SR 1024 -> 4096 px", "sr", SRRun(height=1024, width=1024)),
    # Last: gpu_session.sh gives part 3 a time limit, and each row is written as it finishes.
    ("SD3-medium train 512 px b1, VAE offload", "train",
     TrainOptions(offload_vae_activations=True)),
]
CUDA_TITLE = "Predicted peak vs torch.cuda.max_memory_allocated"


def cuda_peak(kind: str, opts: Any) -> int:
    """Peak bytes ``torch.cuda.max_memory_allocated`` reports for one real step on the GPU
    (random bf16 SD3-medium weights; the same functions the plan traces)."""
    from scoredistill.memory import steps
    from scoredistill.memory.backbones import build_real
    from scoredistill.memory.trace import run_phases

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    spec = SPECS["sd3-medium"]
    parts = build_real(spec, opts.dtype, "cuda")
    if kind == "train":
        modules, phases, _ = steps.train_step(steps.train_models(parts, spec, opts), parts,
                                              spec, opts, "cuda")
    else:
        steps._sr_models(parts, opts)
        modules, phases, _ = steps._sr_step(parts, spec, opts, "cuda")
    for module in modules:
        module.to("cuda")  # LPIPS is built on the CPU (the trace runs CPU kernels)
    run_phases(phases)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def cuda_check(out: Path, command: str) -> Path:
    """Issue 24's GPU rows: the plan against the real CUDA peak (target: within 10%)."""
    if not torch.cuda.is_available():
        raise UserError("--cuda measures on a CUDA GPU, and torch sees none here")
    rows = []
    for name, kind, opts in CUDA_CASES:
        plan = (plan_train if kind == "train" else plan_sr)(SPECS["sd3-medium"], opts)
        real = cuda_peak(kind, opts)
        rows.append({"case": name, "predicted GiB": plan.total / GIB,
                     "max_memory_allocated GiB": real / GIB,
                     "error %": 100 * (plan.total / real - 1)})
        write_report("memory_plan_gpu", CUDA_TITLE, rows, notes=CUDA_NOTES, out_dir=out,
                     command=command)  # after every row: a time limit keeps what was measured
    return out / "memory_plan_gpu.md"


CUDA_NOTES = ("bf16 weights, random init; the plan traced with CPU kernels on fake tensors, the "
              "real run on the GPU read by `torch.cuda.max_memory_allocated` (the CUDA context "
              "and the allocator's reserve are outside both). Issue 24's target: within 10%.")


def row(model: str, kind: str, opts: Any) -> dict[str, Any]:
    spec = SPECS[model]
    plan = (plan_train if kind == "train" else plan_sr)(spec, opts)
    real = (measure_train if kind == "train" else measure_sr)(spec, opts)
    what = (f"train {opts.size} px, batch {opts.batch}"
            + (", checkpointing" if opts.checkpointing else "")
            + (", VAE offload" if opts.offload_vae_activations else "") if kind == "train" else
            f"SR {opts.images} x {opts.height}x{opts.width} px x{opts.upscale:g}"
            + (", VAE tiled" if isinstance(opts.tiles, TileConfig) else ""))
    return {"case": f"{model}: {what}", "predicted MiB": plan.total / MIB,
            "real MiB (no scratch)": real.without_scratch / MIB,
            "error %": 100 * (plan.total / real.without_scratch - 1),
            "real MiB (all)": real.peak / MIB,
            "scratch MiB": (real.peak - real.without_scratch) / MIB}


def pending(out: Path) -> Path:
    """memory_plan_gpu.{md,json} before a GPU measures them: the planned rows, unmeasured."""
    return write_pending("memory_plan_gpu", CUDA_TITLE, [{"case": c[0]} for c in CUDA_CASES],
                         awaiting="a GPU", fill="bash benchmarks/gpu_session.sh", out_dir=out)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = options.parser(PROG, __doc__)
    options.add_quick(parser, "the tiny preset's rows only (and tiny text encoders)")
    parser.add_argument("--cuda", action="store_true",
                        help="only the GPU rows: predicted vs torch.cuda.max_memory_allocated "
                             "(memory_plan_gpu.md)")
    parser.add_argument("--plan", action="store_true",
                        help="with --cuda: write the GPU table's rows unmeasured (no GPU needed)")
    parser.add_argument("--jobs", type=options.COUNT, default=1,
                        help="trace this many plan rows at once, each in a process of its own "
                             "(one CPU core and a few GiB of RAM each)")
    parser.add_argument("--only", metavar="TEXT",
                        help="trace again only the plan rows whose setup contains TEXT (e.g. "
                             "'SR'), after a change that only they run, and the rows new since "
                             "the report already in the output folder; the others are taken "
                             "from that report")
    args = options.parse(parser, argv)
    out = options.out_dir(args)
    if args.plan:
        if not args.cuda:
            raise UserError("--plan writes the GPU table's planned rows: give it with --cuda")
        return pending(out)
    quiet_diffusers()
    if args.cuda:
        return cuda_check(out, command_line(PROG, argv))
    setups = [setup for setup, _, _ in plans(args.quick)]
    earlier = earlier_rows(out, args.only, setups) if args.only else {}
    if args.only and not any(args.only in s for s in setups):
        raise UserError(f"--only {args.only!r} matches no plan row: give part of a setup's "
                        f"name, e.g. 'SR' or '{setups[0]}'")
    torch.manual_seed(0)
    rows = [row(*case) for case in CASES if not args.quick or case[0] == "tiny"]
    kept = KeptRows(out)
    trace_all(kept, args.quick, args.jobs, skip=earlier)
    rows_of = {**kept.rows, **earlier}
    peaks = [rows_of[setup]["peak"] for setup in setups]
    floors = [rows_of[setup]["floor"] for setup in setups]
    missing = [m for m in TRAIN_MODELS if m not in SPECS]
    notes = ("fp32 weights, the paper's LoRA ranks (64), DASM, CFG 7.5, LPIPS, AdamW for both "
             "roles; SR with today's tile defaults, or (`VAE tiled`) tiles small enough that the "
             "VAE tiles, its waiting tiles held in NumPy buffers, outside torch's allocator, "
             "as an accelerator's run holds them in host memory. `real` is the peak the CPU "
             "allocator held during the step (torch.profiler, `profile_memory=True`); "
             "`no scratch` leaves out "
             "blocks an operator allocates and frees before it returns (CPU oneDNN's reordered "
             "convolution inputs, im2col buffers), which the trace, seeing tensors between "
             "operators, cannot predict; on a GPU their counterparts are cuDNN workspaces. "
             "`VAE offload` (`--offload-vae-activations`): the tensors the VAE saves for the "
             "backward held as NumPy arrays, outside torch's allocator as host memory is "
             "outside the GPU's. Issue 24's target: within 5%.\n\n"
             "#### Planned peaks at real sizes (fake tensors, no GPU)\n\n"
             "bf16 weights, fp32 LoRA (ranks 64), DASM, CFG 7.5, LPIPS, AdamW for both roles. "
             "`ours`: one shared backbone with LoRA roles (`scoredistill.memory.steps`); "
             "`release`: TSD-SR's two transformer copies, run through the train-step "
             "benchmark's release path (`benchmarks/train_step_paths.py`, "
             "`scoredistill.memory.release`). Precompute: SD3's CLIP-L, CLIP-G and T5-XXL "
             "(256 tokens) with 8 captions per call, and with `--latents` the VAE encoder on "
             "one image (`scoredistill.memory.precompute`). SR: 4x with today's tile "
             "defaults. Not counted: the CUDA context (0.3-0.6 GiB), cuDNN/cuBLAS workspaces "
             "and allocator fragmentation.\n\n"
             + markdown_table([{k: v for k, v in p.items() if k != "host GiB"} for p in peaks])
             + host_table(peaks) +
             "\n\n#### Compute floor per sample, a LOWER BOUND\n\n"
             "max(FLOPs / datasheet dense BF16 peak, weights read once / bandwidth) per "
             "sample (`scoredistill/memory/gpus.py` cites each datasheet); real steps take "
             "longer.\n\n" + markdown_table(floors))
    if missing and not args.quick:
        notes += (f"\n\nNot built in yet, so not planned: {', '.join(missing)} (issue 24 "
                  "asks for their rows).")
    if len(dates := {rows_of[s]["date"] for s in setups}) > 1:
        notes += ("\n\nTraced over several runs (`--only` traces again the rows a change "
                  "runs): " + "; ".join(
                      f"{count} row{'s' * (count > 1)} on {d}" for d in sorted(dates)
                      if (count := sum(rows_of[s]["date"] == d for s in setups)))
                  + " (`traced` in the JSON gives each row's).")
    md = write_report("memory_plan", "Predicted peak vs a real CPU run", rows,
                      meta={"plans": peaks, "floors": floors, "missing": missing,
                            "trace_seconds": {s: rows_of[s]["seconds"] for s in setups},
                            "traced": {s: rows_of[s]["date"] for s in setups}},
                      notes=notes, out_dir=out, command=command_line(PROG, argv))
    kept.done()
    return md


if __name__ == "__main__":
    raise SystemExit(options.entry(main, PROG)())
