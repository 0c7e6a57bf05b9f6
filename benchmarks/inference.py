"""TSD-SR's one-step SR forward (VAE encode, transformer at t = 1000, decode), timed through
the pipeline itself (``scoredistill.sr.TSDSRPipeline.forward``, untiled) in each of its modes.

Correctness first, in fp32 with TF32 off (``benchmarks/correctness.py``): each mode's output
before the decoder's clamp against the pipeline's eager fp32 forward with the LoRA unmerged, by
relative L2, next to two planted mistakes (LoRA dropped in half the blocks, LoRA scaled by
1.05) that the check must reject; the CUDA-graph mode must equal, bit for bit, the compiled
code it captures. Then timing in the working dtype: eager with the LoRA unmerged (as the
release runs), LoRA merged + fused QKV, compiled, compiled + CUDA graphs (peak memory counted
from before capture, so the graphs' pool is in it; the pool's size also apart) and compiled +
FP8 (its error against compiled bf16 shown). ms per image (median of CUDA-event timed repeats
after warm-up), images/s, and the fraction of the compute floor: FLOPs per image counted by
FlopCounterMode at each shape over the GPU's dense bf16 peak. Compiled modes run shape by
shape until --compile-budget-s is spent.

    python -m benchmarks.inference --quick                        # CPU smoke run, < 60 s
    python -m benchmarks.inference                                 # tiny config on the CPU
    python -m benchmarks.inference --config sd3-medium --dtype bf16 --warmup 2 --repeats 6
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks import options
from benchmarks.correctness import REL_L2_TOL, bit_identical, fp32_check, relative_l2
from benchmarks.report import command_line, markdown_table, write_report
from benchmarks.sr_model import MODES, RANKS, Forward, build, merge_and_fuse, pipeline_forward
from benchmarks.timing import time_ms
from scoredistill import cli
from scoredistill.sr.loading import DTYPES, SRModel

PROG = "benchmarks.inference"
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0,
               "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
"""Dense bf16 tensor-core peak (TFLOP/s) by device-name substring (longest match wins)."""


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """The dense bf16 peak of ``device_name`` from :data:`PEAK_TFLOPS`, or ``override``."""
    if override is not None:
        return override
    hits = [k for k in PEAK_TFLOPS if k.lower() in device_name.lower()]
    return PEAK_TFLOPS[max(hits, key=len)] if hits else None


def counted_tflop(model: SRModel, x: Tensor) -> float:
    """TFLOP per image of one forward on ``x``'s shape, counted by torch's FlopCounterMode
    (matmuls, convolutions, attention) rather than scaled from another size."""
    from torch.utils.flop_counter import FlopCounterMode

    forward = pipeline_forward(model, x.shape[0])
    with FlopCounterMode(display=False) as counter:
        forward(x)
    return counter.get_total_flops() / 1e12 / x.shape[0]


def run_row(variant: str, make: Callable[[], Forward], x: Tensor, reference: Tensor | None,
            args: argparse.Namespace, floor_ms: float | None
            ) -> tuple[dict[str, Any], Tensor | None]:
    """Time one (variant, size, batch) whose forward ``make()`` builds; return the row and the
    output of a steady call (for CUDA graphs: a replay). Peak memory counts from before the
    first call, so compiling and graph capture (in the warm-up calls) are in it; "graph pool
    GiB" is what the device memory reserved grew by over the row (the graphs' private pool)."""
    size, batch, cuda = x.shape[-1], x.shape[0], x.is_cuda
    row: dict[str, Any] = {"variant": variant, "size": size, "batch": batch}
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            reserved = torch.cuda.memory_reserved()
        t0 = time.perf_counter()
        fn = make()
        fn(x)
        if cuda:
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        ms = time_ms(fn, x, args.warmup, args.repeats) / batch
        out = fn(x).clone()  # a copy: a CUDA graph's output buffer is overwritten
        if cuda and "graph" in variant:
            row["graph pool GiB"] = (torch.cuda.memory_reserved() - reserved) / 2**30
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**row, "note": "out of memory"}, None
    except Exception as exc:  # a variant failing (e.g. no compiler) must not stop the others
        return {**row, "note": f"failed: {type(exc).__name__}: {str(exc)[:160]}"}, None
    row.update({"ms/img": ms, "img/s": 1e3 / ms, "floor ms/img": floor_ms or "n/a",
                "of floor": floor_ms / ms if floor_ms else "n/a", "first call s": first_s,
                "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else "n/a"})
    if reference is not None:
        diff = (out.float() - reference.float()).abs()
        row.update({"max abs diff": diff.max().item(), "mean abs diff": diff.mean().item()})
    return row, out


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = options.parser(PROG, __doc__)
    parser.add_argument("--config", choices=("tiny", "sd3-medium"), default=None,
                        help="default: sd3-medium on CUDA, tiny on the CPU")
    options.add_device(parser, "cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="timing dtype: default bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--sizes", type=options.multiple_of(16, "VAE factor x patch size"),
                        nargs="+", default=None, help="image sides (px)")
    parser.add_argument("--batches", type=options.COUNT, nargs="+", default=None)
    options.add_timing(parser, warmup=3, repeats=10)
    parser.add_argument("--compile-mode", default="default",
                        choices=("default", "reduce-overhead", "max-autotune",
                                 "max-autotune-no-cudagraphs"))
    parser.add_argument("--compile-budget-s", type=cli.number(float, low=0), default=600.0,
                        help="skip the remaining compile rows once compiling took this long")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--peak-tflops", type=options.POSITIVE, default=None,
                        help="dense bf16 peak TFLOP/s (default: by device name)")
    parser.add_argument("--tol", type=options.POSITIVE, default=REL_L2_TOL,
                        help="largest relative L2 vs fp32 eager, before the clamp, in the check")
    parser.add_argument("--threads", type=options.COUNT, default=None,
                        help="CPU threads (default: torch's; --quick: 1, robust on a busy CPU)")
    options.add_quick(parser, "CPU smoke run: 64 px, batch 1, 1 warm-up + 3 timed calls, "
                              "nothing compiled")
    args = options.parse(parser, argv)
    options.refuse_with_quick(args, {"warmup": "--warmup", "repeats": "--repeats",
                                     "compile_mode": "--compile-mode",
                                     "compile_budget_s": "--compile-budget-s"},
                              "1 warm-up + 3 timed calls and compiles nothing")
    unused = sorted({"compile_mode", "compile_budget_s"} & args.given)
    if not args.compile and unused:
        named = " and ".join(f"--{d.replace('_', '-')}" for d in unused)
        raise cli.UserError(f"{named} set up the compiled rows, which --no-compile skips: drop "
                            f"--no-compile or {named}")
    args.out = options.out_dir(args)
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    from diffusers.utils import logging

    logging.set_verbosity_error()
    cuda = args.device.startswith("cuda")
    config = args.config or ("sd3-medium" if cuda else "tiny")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    sizes = args.sizes or ([512, 1024] if cuda else [64] if args.quick else [128])
    batches = args.batches or ([1, 8] if cuda else [1] if args.quick else [1, 4])
    if args.quick:
        args.warmup, args.repeats = 1, 3  # refuse_with_quick: neither was given
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    name = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    peak = peak_tflops(name, args.peak_tflops)
    g = torch.Generator().manual_seed(0)
    inputs = {(s, b): (torch.rand(b, 3, s, s, generator=g) * 2 - 1).to(args.device)
              for s in sizes for b in batches}

    checks = fp32_check(config, inputs[(sizes[0], 1 if 1 in batches else batches[0])], args)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    inputs = {k: x.to(dtype) for k, x in inputs.items()}
    model = build(config, dtype, args.device)
    rows, refs, notes = [], {}, []
    columns = ["variant", "size", "batch", "ms/img", "img/s", "floor ms/img", "of floor",
               "max abs diff", "mean abs diff", "bit-identical to eager", "compile s",
               "peak GiB", "graph pool GiB", "note"]
    check_columns = ["variant", "rel L2 vs fp32 eager", "accepted", "expected", "as expected",
                     "bit-identical to eager"]
    tflop: dict[int, float] = {}

    def report(final: bool) -> Path:
        # Rewritten after every phase, so a run stopped early (e.g. by a time limit) keeps the
        # rows it measured, marked as partial.
        counted = ", ".join(f"{v:.4g} at {s} px" for s, v in tflop.items()) or "not yet"
        head = (f"Config `{config}` with RANDOM weights, timed in {dtype}, LoRA rank "
                f"{RANKS[config]} on the student modules and the VAE encoder; {args.warmup} "
                f"warm-up + {args.repeats} timed calls, median. Floor: TFLOP per image counted "
                f"by FlopCounterMode at each size ({counted}) over the dense bf16 peak "
                f"({peak or 'unknown'} TFLOP/s). Diffs: against eager with the LoRA unmerged "
                "in the same dtype (information only; correctness is the fp32 check below). "
                "CUDA-graph rows: peak memory from before the first call (capture and the "
                "graphs' pool included), and the pool's reserved size apart.")
        check = (f"**Correctness, fp32, TF32 off, {tuple(checks_x.shape)} input:** the "
                 "pipeline's output before the decoder's clamp against its eager fp32 forward "
                 "with the LoRA unmerged; a "
                 f"variant is accepted at relative L2 <= {args.tol:g}. The planted mistakes "
                 "must be rejected.\n\n" + markdown_table(checks, check_columns))
        partial = [] if final else ["Partial: the run stopped before all variants were timed."]
        return write_report("inference", "TSD-SR one-step inference forward", rows,
                            meta={"config": config, "dtype": str(dtype), "peak_tflops": peak,
                                  "counted_tflop": tflop, "tol": args.tol, "checks": checks,
                                  "complete": final},
                            notes="\n\n".join([head, check, *notes, *partial]), columns=columns,
                            out_dir=args.out, command=command_line("benchmarks.inference", argv),
                            echo=final)

    checks_x = inputs[(sizes[0], 1 if 1 in batches else batches[0])]
    report(final=False)

    def floor(size: int) -> float | None:
        return tflop[size] / peak * 1e3 if peak else None

    for key, x in inputs.items():
        row, refs[key] = run_row("eager, LoRA unmerged",
                                 lambda b=key[1]: pipeline_forward(model, b), x, None, args, None)
        rows.append(row)
    report(final=False)
    merge_and_fuse(model)
    tflop.update({s: counted_tflop(model, inputs[(s, batches[0])][:1]) for s in sizes})
    for row in rows:
        row["floor ms/img"] = floor(row["size"]) or "n/a"
        if "ms/img" in row and peak:
            row["of floor"] = row["floor ms/img"] / row["ms/img"]
    for key, x in inputs.items():
        rows.append(run_row("LoRA merged + fused QKV", lambda b=key[1]: pipeline_forward(model, b),
                            x, refs[key], args, floor(key[0]))[0])
    report(final=False)
    modes = {k: m for k, m in MODES.items()
             if (cuda or not (m["cuda_graphs"] or m.get("fp8"))) and args.compile}
    if not cuda:
        notes.append("CUDA graphs and FP8 skipped: they need a CUDA device.")
    if args.quick or not args.compile:
        modes = {}
        notes.append("torch.compile skipped (--quick or --no-compile): compiling takes longer "
                     "than the smoke run's budget.")
    # Shape by shape, FP8 last within a shape (it quantizes the transformer in place, so the
    # next shape needs the bf16 weights back: a copy of the merged model per FP8 row).
    spent = 0.0
    for key, x in inputs.items():
        outs: dict[str, Tensor | None] = {}
        for name, mode in modes.items():
            if spent > args.compile_budget_s:
                rows.append({"variant": name, "size": key[0], "batch": key[1], "note":
                             f"skipped: compile budget {args.compile_budget_s:.0f} s spent"})
                continue
            target = copy.deepcopy(model) if mode.get("fp8") else model
            row, outs[name] = run_row(name, lambda m=target, b=key[1], o=mode:
                                      pipeline_forward(m, b, **o), x, refs[key], args,
                                      floor(key[0]))
            if "ms/img" in row:  # first call minus a steady call: the compile time
                row["compile s"] = row["first call s"] - row["ms/img"] * key[1] / 1e3
                spent += row["compile s"]
            graphs, plain = outs.get(name), outs.get("compiled")
            if mode["cuda_graphs"] and graphs is not None and plain is not None:
                row["bit-identical to eager"] = bit_identical(graphs, plain)
            if mode.get("fp8") and graphs is not None and plain is not None:
                row["note"] = f"rel L2 vs compiled {dtype}: {relative_l2(graphs, plain):.3g}"
            rows.append(row)
            del target
            report(final=False)
    for note in notes:
        print(note)
    path = report(final=True)
    wrong = [r["variant"] for r in checks if not r["as expected"]]
    wrong += [f"{r['variant']} @ {r['size']}x{r['batch']} (not bit-identical)" for r in rows
              if r.get("bit-identical to eager") is False]
    wrong += [r["variant"] + " (not bit-identical)" for r in checks
              if r.get("bit-identical to eager") is False]
    if wrong:
        raise SystemExit("correctness check failed: " + "; ".join(wrong))
    return path


if __name__ == "__main__":
    raise SystemExit(options.entry(main, PROG)())
