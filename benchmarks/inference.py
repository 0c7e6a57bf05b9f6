"""TSD-SR one-step SR forward (VAE encode, transformer at t = 1000, decode): eager vs merged.

Variants, each checked against eager (max |diff| of the output in [-1, 1]): eager with the
student and VAE-encoder LoRAs unmerged (as the release runs), LoRA merged + fused QKV, that
captured in a CUDA graph (static buffers, no host syncs), and that under torch.compile (compile
time reported apart, bounded by --compile-budget-s). ms per image (median of CUDA-event timed
repeats after warm-up), images/s, and the fraction of the compute floor: TFLOP per image
(5.74 at 512 x 512, scaled by pixels) over the GPU's dense bf16 peak.

    python -m benchmarks.inference --quick                        # CPU smoke run, < 60 s
    python -m benchmarks.inference                                 # tiny config on the CPU
    python -m benchmarks.inference --config sd3-medium --dtype bf16 --warmup 2 --repeats 6
        # on a GPU: ~6 min on an H200, of which ~5 min compiling the four shapes
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.report import RESULTS, command_line, write_report
from benchmarks.timing import time_ms
from examples.tsdsr.tiny import random_backbone
from scoredistill.adapters import (
    STUDENT_TARGETS,
    SD3ScoreModel,
    add_lora,
    add_vae_lora,
    lora_config,
    lora_state_dict,
)
from scoredistill.sr.loading import DTYPES, SRModel, merge_lora
from scoredistill.sr.upscale import sr_forward

RANKS = {"tiny": 4, "sd3-medium": 64}
"""LoRA rank per config: TSD-SR's 64 for SD3-medium; 4 keeps the tiny model's ratio of rank to
width (its layers are 4-32 wide) and so the relative cost of unmerged adapters."""
TFLOP_512 = 5.74
"""TFLOP per 512 x 512 image, SD3-medium (transformer 2.11, VAE encoder 1.12, decoder 2.52);
scaled by pixel count for other sizes."""
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0,
               "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
"""Dense bf16 tensor-core peak (TFLOP/s) by device-name substring (longest match wins)."""


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """The dense bf16 peak of ``device_name`` from :data:`PEAK_TFLOPS`, or ``override``."""
    if override is not None:
        return override
    hits = [k for k in PEAK_TFLOPS if k.lower() in device_name.lower()]
    return PEAK_TFLOPS[max(hits, key=len)] if hits else None


def build(config: str, dtype: torch.dtype, device: str) -> SRModel:
    """Random backbone with student and VAE-encoder LoRAs (nonzero B, so merging changes the
    weights), unmerged."""
    parts = random_backbone(config, dtype=dtype, device=device)
    add_lora(parts.transformer, lora_config(STUDENT_TARGETS, RANKS[config]), "student")
    add_vae_lora(parts.vae, RANKS[config])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module, adapter in ((parts.transformer, "student"), (parts.vae, "default")):
            for key, p in lora_state_dict(module, adapter).items():
                if ".lora_B." in key:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            module.requires_grad_(False)
    return SRModel(SD3ScoreModel(parts.transformer), parts.vae, parts.cond)


def merge_and_fuse(model: SRModel) -> None:
    """What inference does: LoRA folded into the weights, Q/K/V projections fused."""
    for module in (model.student.module, model.vae):
        merge_lora(module)
        module.fuse_qkv_projections()


def compiled(model: SRModel, mode: str) -> SRModel:
    """The three networks under torch.compile (the VAE's encoder and decoder in place)."""
    vae = model.vae
    # Static shapes: one specialised compile per (size, batch), as a deployment would warm up.
    vae.encoder, vae.decoder = (torch.compile(m, mode=mode, dynamic=False)
                                for m in (vae.encoder, vae.decoder))
    return SRModel(SD3ScoreModel(torch.compile(model.student.module, mode=mode, dynamic=False)),
                   vae, model.cond)


def cuda_graphed(fn: Callable[[Tensor], Tensor], example: Tensor) -> Callable[[Tensor], Tensor]:
    """``fn`` captured in a CUDA graph: static input/output buffers, replayed per call."""
    static_in = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: cuDNN/cuBLAS choices, allocator
        for _ in range(2):
            fn(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_in)

    def replay(x: Tensor) -> Tensor:
        static_in.copy_(x)
        graph.replay()
        return static_out

    replay.graph = graph  # type: ignore[attr-defined]  # keeps the graph (and its pool) alive
    return replay


def measured_tflop(model: SRModel, x: Tensor) -> float:
    """TFLOP per image of one forward, counted by torch's FlopCounterMode (matmuls, convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        sr_forward(model, x)
    return counter.get_total_flops() / 1e12 / x.shape[0]


def run_row(variant: str, fn: Callable[[Tensor], Tensor], x: Tensor, reference: Tensor | None,
            args: argparse.Namespace, peak: float | None) -> tuple[dict[str, Any], Tensor | None]:
    """Time one (variant, size, batch), compare with eager (None: this is eager); return the row
    and the output (float32). OOM and errors become the row's note."""
    size, batch = x.shape[-1], x.shape[0]
    row: dict[str, Any] = {"variant": variant, "size": size, "batch": batch}
    try:
        if x.is_cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn(x).float()  # a copy: a CUDA graph's output buffer is overwritten
        if x.is_cuda:
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        ms = time_ms(fn, x, args.warmup, args.repeats) / batch
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**row, "note": "out of memory"}, None
    except Exception as exc:  # a variant failing (e.g. no compiler) must not stop the others
        return {**row, "note": f"failed: {type(exc).__name__}: {str(exc)[:160]}"}, None
    floor_ms = TFLOP_512 * (size / 512) ** 2 / peak * 1e3 if peak else None
    row.update({"ms/img": ms, "img/s": 1e3 / ms, "floor ms/img": floor_ms or "n/a",
                "of floor": floor_ms / ms if floor_ms else "n/a", "first call s": first_s,
                "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if x.is_cuda else "n/a"})
    if reference is None:
        label = "reference" if variant.startswith("eager") else "n/a: eager failed"
        return {**row, "max abs diff": label}, out
    diff = (out - reference).abs()
    return {**row, "max abs diff": diff.max().item(), "mean abs diff": diff.mean().item(),
            "ok": bool(diff.max().item() <= args.tol)}, out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("tiny", "sd3-medium"), default=None,
                        help="default: sd3-medium on CUDA, tiny on the CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides (px)")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile-mode", default="default",
                        choices=("default", "reduce-overhead", "max-autotune",
                                 "max-autotune-no-cudagraphs"))
    parser.add_argument("--compile-budget-s", type=float, default=600.0,
                        help="skip the remaining compile rows once compiling took this long")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak TFLOP/s (default: by device name)")
    parser.add_argument("--tol", type=float, default=None,
                        help="max |diff| vs eager (default 1e-3 fp32, 0.25 half: random weights "
                             "through 24 blocks amplify one rounding of W + BA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's; --quick: 1, robust on a busy CPU)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: 64 px, batch 1")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from diffusers.utils import logging

    logging.set_verbosity_error()
    cuda = args.device.startswith("cuda")
    config = args.config or ("sd3-medium" if cuda else "tiny")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    args.tol = args.tol or (1e-3 if dtype == torch.float32 else 0.25)
    sizes = args.sizes or ([512, 1024] if cuda else [64] if args.quick else [128])
    batches = args.batches or ([1, 8] if cuda else [1] if args.quick else [1, 4])
    if args.quick:
        args.warmup, args.repeats = 1, 3
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    name = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    peak = peak_tflops(name, args.peak_tflops)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    model = build(config, dtype, args.device)
    g = torch.Generator().manual_seed(0)
    inputs = {(s, b): (torch.rand(b, 3, s, s, generator=g) * 2 - 1).to(args.device, dtype)
              for s in sizes for b in batches}
    rows, refs, notes = [], {}, []
    columns = ["variant", "size", "batch", "ms/img", "img/s", "floor ms/img", "of floor",
               "max abs diff", "mean abs diff", "ok", "compile s", "peak GiB", "note"]
    tflop: dict[int, float] = {}

    def report(final: bool) -> Path:
        # Rewritten after every phase, so a run stopped early (e.g. by a time limit) keeps the
        # rows it measured, marked as partial.
        counted = ", ".join(f"{v:.3g} at {s} px" for s, v in tflop.items())
        head = (f"Config `{config}`, {dtype}, LoRA rank {RANKS[config]} on the student "
                f"modules and the VAE encoder; {args.warmup} warm-up + {args.repeats} timed "
                f"calls, median. Floor: {TFLOP_512} TFLOP per 512 px image (SD3-medium) "
                f"scaled by pixels, at a {peak or 'unknown'} TFLOP/s dense bf16 peak. "
                f"FlopCounterMode counts {counted} TFLOP per image for this config. "
                f"Tolerance {args.tol} (max |diff| vs eager).")
        partial = [] if final else ["Partial: the run stopped before all variants were timed."]
        return write_report("inference", "TSD-SR one-step inference forward", rows,
                            meta={"config": config, "dtype": str(dtype), "peak_tflops": peak,
                                  "tflop_512": TFLOP_512, "counted_tflop": tflop,
                                  "tol": args.tol, "complete": final},
                            notes="\n\n".join([head, *notes, *partial]), columns=columns,
                            out_dir=args.out, command=command_line("benchmarks.inference", argv),
                            echo=final)

    def forward(m: SRModel) -> Callable[[Tensor], Tensor]:
        return lambda x: sr_forward(m, x)

    for key, x in inputs.items():
        row, refs[key] = run_row("eager, LoRA unmerged", forward(model), x, None, args, peak)
        rows.append(row)
    report(final=False)
    merge_and_fuse(model)
    tflop.update({s: measured_tflop(model, inputs[(s, batches[0])][:1]) for s in sizes})
    for key, x in inputs.items():
        rows.append(run_row("LoRA merged + fused QKV", forward(model), x, refs[key], args,
                            peak)[0])
    report(final=False)
    if cuda:
        for key, x in inputs.items():
            try:
                fn = cuda_graphed(forward(model), x)
            except Exception as exc:
                rows.append({"variant": "CUDA graph", "size": key[0], "batch": key[1],
                             "note": f"capture failed: {type(exc).__name__}: {str(exc)[:160]}"})
                continue
            rows.append(run_row("CUDA graph (merged + fused)", fn, x, refs[key], args, peak)[0])
            del fn
            torch.cuda.empty_cache()
        report(final=False)
    else:
        notes.append("CUDA graphs skipped: they need a CUDA device.")
    if args.compile and not args.quick:
        fast, spent = compiled(model, args.compile_mode), 0.0
        for key, x in inputs.items():
            label = f"torch.compile {args.compile_mode} (merged + fused)"
            if spent > args.compile_budget_s:
                rows.append({"variant": label, "size": key[0], "batch": key[1], "note":
                             f"skipped: compile budget {args.compile_budget_s:.0f} s spent"})
                continue
            rows.append(run_row(label, forward(fast), x, refs[key], args, peak)[0])
            if "ms/img" in rows[-1]:  # first call minus a steady call: the compile time
                rows[-1]["compile s"] = rows[-1]["first call s"] - rows[-1]["ms/img"] * key[1] / 1e3
                spent += rows[-1]["compile s"]
            report(final=False)
    else:
        notes.append("torch.compile skipped (--quick or --no-compile): compiling takes longer "
                     "than the smoke run's budget.")
    for note in notes:
        print(note)
    path = report(final=True)
    bad = [r for r in rows if r.get("ok") is False]
    if bad:
        raise SystemExit(f"{len(bad)} variant(s) differ from eager beyond {args.tol}: "
                         + ", ".join(f"{r['variant']} @ {r['size']}x{r['batch']}" for r in bad))
    return path


if __name__ == "__main__":
    main()
