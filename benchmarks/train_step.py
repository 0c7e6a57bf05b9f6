"""One TSD-SR train step: LoRA roles on one shared backbone vs the release's two copies.

(a) Parameter bytes resident for SD3-medium (counted on the meta device, nothing allocated).
(b) Backbone calls, wall time (median of repeats after warm-up) and peak memory of one generator
step (TSD + DASM, N = 4, plus the latent MSE) and the fake-score update, each with AdamW:
the library's batched shared-backbone path (N + 2 calls) vs the call pattern of the release's
``train/train.py`` (a second transformer copy, adapters switched with ``disable_adapters`` /
``enable_adapters``, null and conditional CFG inputs batched: 3N + 2 calls). Before anything is
timed, both paths are compared term by term in fp32 (directions and per-term gradients).

    python -m benchmarks.train_step                    # tiny SD3 on CPU
    python -m benchmarks.train_step --quick            # CI smoke run, into a temporary folder
    python -m benchmarks.train_step --config sd3-medium --device cuda --dtype bf16 --checkpointing
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import options
from benchmarks.report import command_line, markdown_table, write_report
from benchmarks.train_step_paths import (
    CONFIGS,
    DASM,
    DTYPES,
    GUIDANCE,
    RANK,
    SHAPES,
    Batch,
    library_fake,
    library_generator,
    library_step,
    make_batch,
    release_fake,
    release_generator,
    release_step,
)
from scoredistill.adapters import (
    ATTENTION_TARGETS,
    STUDENT_TARGETS,
    SD3ScoreModel,
    add_lora,
    lora_config,
    lora_roles,
    lora_state_dict,
)

PROG = "benchmarks.train_step"

def build_transformer(config: str, dtype: torch.dtype, device: str) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    with torch.device(device):  # random init where the weights live: fast for SD3-medium on GPU
        return SD3Transformer2DModel(**CONFIGS[config]).to(dtype=dtype)


def resident_bytes(config: str, param_dtype: torch.dtype) -> tuple[list[dict[str, Any]],
                                                                    dict[str, int]]:
    """(a) Parameter bytes: the base once plus each role's LoRA vs two base copies (meta device)."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        module = SD3Transformer2DModel(**CONFIGS[config])
        base = sum(p.numel() for p in module.parameters())
        add_lora(module, lora_config(STUDENT_TARGETS, RANK), "student")
        add_lora(module, lora_config(ATTENTION_TARGETS, RANK), "fake")
    lora = {a: sum(p.numel() for p in lora_state_dict(module, a).values())
            for a in ("student", "fake")}
    lora_bytes = 4 * sum(lora.values())  # LoRA weights stay fp32
    base_bytes = base * param_dtype.itemsize
    gib = 2**30
    return [
        {"design": "shared backbone (this library)", "base copies": 1,
         "base GiB": base_bytes / gib, "LoRA GiB": lora_bytes / gib,
         "total GiB": (base_bytes + lora_bytes) / gib},
        {"design": "two copies (release)", "base copies": 2, "base GiB": 2 * base_bytes / gib,
         "LoRA GiB": lora_bytes / gib, "total GiB": (2 * base_bytes + lora_bytes) / gib},
    ], {"base params": base, "student LoRA params": lora["student"],
        "fake LoRA params": lora["fake"]}


def setup(config: str, dtype: torch.dtype, device: str, checkpointing: bool):
    """Shared roles and the release's two copies, with identical (nonzero) LoRA weights."""
    base = build_transformer(config, dtype, device)
    copies = [copy.deepcopy(base), copy.deepcopy(base)]
    roles = lora_roles(SD3ScoreModel(base))
    for module, adapter in ((copies[0], "student"), (copies[1], "fake")):
        module.requires_grad_(False)
        add_lora(module, lora_config(STUDENT_TARGETS if adapter == "student"
                                     else ATTENTION_TARGETS, RANK), adapter)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter, other in (("student", copies[0]), ("fake", copies[1])):
            mine, theirs = lora_state_dict(base, adapter), lora_state_dict(other, adapter)
            for key, p in mine.items():
                p.data = p.data.float()  # fp32 LoRA on a half-precision base (the release)
                # The fake score well away from the teacher, so that VSD = teacher - fake is not
                # a difference of nearly equal predictions (fp32 cancellation in the check).
                if ".lora_B." in key:
                    p.copy_(torch.randn(p.shape, generator=g) * (1e-3 if adapter == "student"
                                                                 else 1e-1))
                theirs[key].data = p.data.clone()
    for m in (base, *copies):
        if checkpointing:
            m.enable_gradient_checkpointing()
    return roles, copies


def count_calls(modules: list[nn.Module]) -> Callable[[], int]:
    counter = [0]
    for m in modules:
        m.register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return lambda: counter[0]


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def term_errors(roles, copies, data: Batch) -> dict[str, float]:
    """Relative L2 error, library vs release, of each term on its own: the VSD, TSM and mixed
    TSD directions; the student's LoRA gradient of the TSD surrogate and of the MSE; the fake
    score's LoRA gradient."""
    student = [p for _, p in sorted(lora_state_dict(roles.backbone.module, "student").items())]
    fake = [p for _, p in sorted(lora_state_dict(roles.backbone.module, "fake").items())]
    copy_student = [p for _, p in sorted(lora_state_dict(copies[0], "student").items())]
    copy_fake = [p for _, p in sorted(lora_state_dict(copies[1], "fake").items())]
    results = []
    for generator, fake_loss, s_params, f_params in (
            (lambda: library_generator(roles, data), lambda z: library_fake(roles, data, z),
             student, fake),
            (lambda: release_generator(*copies, data), lambda z: release_fake(copies[1], data, z),
             copy_student, copy_fake)):
        terms = generator()
        grads = {"student grad of TSD": torch.autograd.grad(terms.tsd, s_params,
                                                            retain_graph=True),
                 "student grad of MSE": torch.autograd.grad(terms.mse, s_params),
                 "fake grad": torch.autograd.grad(fake_loss(terms.z_hat), f_params)}
        flat = {k: torch.cat([g.flatten() for g in v]) for k, v in grads.items()}
        results.append({**{f"{k} direction": v for k, v in terms.directions.items()}, **flat})
    lib, rel = results
    return {k: _rel(lib[k], rel[k]) for k in rel}


def check_terms(config: str, device: str, tol: float) -> dict[str, float]:
    """:func:`term_errors` in fp32 (no TF32) on ``config`` at a small latent; raise past ``tol``."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        roles, copies = setup(config, torch.float32, device, checkpointing=False)
        errors = term_errors(roles, copies, make_batch(config, 2, 8, device, seed=1))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    del roles, copies  # free the fp32 copies before the timed ones are built
    bad = {k: v for k, v in errors.items() if not v <= tol}
    if bad:
        raise AssertionError(f"library and release paths differ (relative L2 > {tol:g}): {bad}")
    return errors


def time_path(step: Callable[[], None], params: list[Tensor], device: str, warmup: int,
              repeats: int) -> tuple[float, float | None]:
    """Median seconds of ``step`` + AdamW, and the CUDA peak memory (MiB) above the start."""
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=1e-4)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def once() -> None:
        opt.zero_grad(set_to_none=True)
        step()
        opt.step()

    for _ in range(warmup):
        once()
    sync()
    peak = None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - t0)
    if device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - start) / 2**20
    return statistics.median(times), peak


def module_bytes(modules: list[nn.Module]) -> float:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / 2**20


def expected_calls(points: int) -> dict[str, int]:
    """Backbone calls per step: the library fuses each DASM point's three CFG evaluations into
    one call (N + 2); the release makes three batched-CFG calls per point (3N + 2)."""
    return {"library": points + 2, "release": 3 * points + 2}


def run(config: str, device: str, dtype: torch.dtype, batch: int, side: int, warmup: int,
        repeats: int, checkpointing: bool, grad_tol: float, out_dir: Path,
        command: str | None = None) -> Path:
    resident, counts = resident_bytes("sd3-medium", torch.float16 if dtype == torch.float32
                                      else dtype)
    errors = check_terms(config, device, grad_tol)  # fp32, before anything is timed
    roles, copies = setup(config, dtype, device, checkpointing)
    data = make_batch(config, batch, side, device)
    lib_calls = count_calls([roles.backbone.module])
    rel_calls = count_calls(copies)
    params = {"library": [*roles.student.parameters(), *roles.fake.parameters()],
              "release": [*lora_state_dict(copies[0], "student").values(),
                          *lora_state_dict(copies[1], "fake").values()]}
    before = lib_calls(), rel_calls()
    library_step(roles, data)
    release_step(*copies, data)
    calls = {"library": lib_calls() - before[0], "release": rel_calls() - before[1]}
    want = expected_calls(DASM.num_points)
    if calls != want:
        raise AssertionError(f"backbone calls per step {calls}, expected {want}")
    rows = []
    for name, step, modules in (
            ("library: shared backbone, fused calls", lambda: library_step(roles, data),
             [roles.backbone.module]),
            ("release: two copies, batched-CFG calls", lambda: release_step(*copies, data),
             copies)):
        key = name.split(":")[0]
        seconds, peak = time_path(step, params[key], device, warmup, repeats)
        rows.append({"path": name, "backbone calls": calls[key], "median s": seconds,
                     "peak step MiB": "n/a (CPU)" if peak is None else peak,
                     "params MiB": module_bytes(modules)})
    speedup = rows[1]["median s"] / rows[0]["median s"]
    weights = str(dtype).removeprefix("torch.")
    worst = max(errors, key=errors.get)
    notes = (f"Config `{config}`, {device}, weights {weights}, LoRA fp32, "
             f"batch {batch}, latent {side}x{side}, DASM N={DASM.num_points}, CFG "
             f"{GUIDANCE}, gradient checkpointing {'on' if checkpointing else 'off'}; "
             f"{warmup} warm-up + {repeats} timed steps (median), AdamW included. Time ratio "
             f"release / library {speedup:.2f}x. The release path is `train/train.py`'s loop: "
             "a second transformer copy, adapters switched with `disable_adapters` / "
             "`enable_adapters`, the null and conditional CFG inputs batched in one call "
             f"(3N + 2 = {want['release']} calls per step). Checked term by term in fp32 before "
             "timing (VSD, TSM and TSD directions; the student's gradient of the TSD surrogate "
             "and of the MSE; the fake score's gradient): largest relative L2 error "
             f"{errors[worst]:.1e} ({worst}).\n\n"
             "Resident parameters for SD3-medium (meta device, base in "
             f"{'fp16' if dtype == torch.float32 else str(dtype).removeprefix('torch.')}, "
             f"LoRA rank {RANK} fp32; {counts['base params'] / 1e9:.3f} B base parameters, "
             f"{counts['student LoRA params'] / 1e6:.1f} M student and "
             f"{counts['fake LoRA params'] / 1e6:.1f} M fake-score LoRA parameters):\n\n")
    notes += markdown_table(resident)
    name = "train_step" + ("" if config == "tiny" else f"_{config}") + (
        "_checkpointing" if checkpointing else "")
    return write_report(name, "TSD-SR train step: shared backbone vs the release's two copies",
                        rows, meta={"config": config, "device_arg": device, "dtype": str(dtype),
                                    "batch": batch, "latent": side,
                                    "checkpointing": checkpointing, "calls": calls,
                                    "term_rel_error_fp32": errors, "speedup": speedup,
                                    "resident_sd3_medium": resident, "param_counts": counts},
                        notes=notes, out_dir=out_dir, command=command)


def train_step_parser(prog: str, description: str | None, configs: list[str], batch: int,
                      grad_tol: float | None, grad_tol_help: str) -> argparse.ArgumentParser:
    """The command line the train-step benchmarks share (SD3 here, FLUX in train_step_flux)."""
    parser = options.parser(prog, description)
    parser.add_argument("--config", choices=configs, default="tiny")
    options.add_device(parser, "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights' dtype (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--batch", type=options.COUNT, default=batch)
    parser.add_argument("--latent", type=options.multiple_of(2, "the patch size"), default=None,
                        help="latent side (default per config)")
    options.add_timing(parser, warmup=2, repeats=10)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--grad-tol", type=options.POSITIVE, default=grad_tol, help=grad_tol_help)
    options.add_quick(parser, "CI smoke run: 1 warm-up, 3 timed steps")
    return parser


def parse_train_step(parser: argparse.ArgumentParser, argv: list[str] | None
                     ) -> argparse.Namespace:
    """Parse, refuse what --quick overrides, check --out, and set the quick timing."""
    args = options.parse(parser, argv)
    options.refuse_with_quick(args, {"warmup": "--warmup", "repeats": "--repeats"},
                              "1 warm-up and 3 timed steps")
    args.out = options.out_dir(args)
    if args.quick:
        args.warmup, args.repeats = 1, 3
    return args


def main(argv: list[str] | None = None) -> Path:
    parser = train_step_parser(PROG, __doc__, sorted(CONFIGS), batch=2, grad_tol=1e-4,
                               grad_tol_help="max relative L2 error of each term, fp32 check "
                                             "(default 1e-4); --quick also uses 8x8 latents")
    args = parse_train_step(parser, argv)
    from diffusers.utils import logging

    logging.set_verbosity_error()  # the "keep modules in float32" notice for random weights
    dtype = DTYPES[args.dtype or ("fp32" if args.device == "cpu" else "bf16")]
    side = args.latent or (8 if args.quick else SHAPES[args.config][0])
    return run(args.config, args.device, dtype, args.batch, side, args.warmup, args.repeats,
               args.checkpointing, args.grad_tol, args.out,
               command_line("benchmarks.train_step", argv))


if __name__ == "__main__":
    raise SystemExit(options.entry(main, PROG)())
