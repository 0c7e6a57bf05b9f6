"""A FLUX.1-dev-shaped train step: LoRA roles on one shared backbone vs a second backbone copy.

The two-copy design is the one most distillation code uses (the release's, NVlabs FastGen's): the
student on one copy of the base, the teacher and the fake score on another. Both designs run the
same step, built from the library (TSD + DASM, N = 4, plus the latent MSE, then the fake-score
update, each with AdamW), so they differ only in where the weights live: gradients are checked
equal before anything is timed. Reported: resident parameter bytes of FLUX.1-dev (counted on the
meta device), backbone calls, median step time and the step's peak memory on CUDA.

    python -m benchmarks.train_step_flux              # tiny FLUX on CPU: results/train_step_flux
    python -m benchmarks.train_step_flux --quick      # CI smoke run, into a temporary folder
    python -m benchmarks.train_step_flux --config flux-dev --device cuda --dtype bf16 \\
        --checkpointing      # FLUX.1-dev size, 1024 px latents: train_step_flux_flux-dev_...
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import options
from benchmarks.report import command_line, markdown_table, write_report
from benchmarks.train_step import (
    count_calls,
    module_bytes,
    parse_train_step,
    time_path,
    train_step_parser,
)
from benchmarks.train_step_paths import DTYPES
from scoredistill import DASMSampler, DiffusionLoss, TSDLoss
from scoredistill.adapters import (
    FLUX_TARGETS,
    FluxScoreModel,
    SharedBackbone,
    add_lora,
    lora_config,
    lora_roles,
    lora_state_dict,
)

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                 pooled_projection_dim=32, axes_dims_rope=(4, 6, 6), guidance_embeds=True),
    # black-forest-labs/FLUX.1-dev, transformer/config.json
    "flux-dev": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                     attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                     pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
                     guidance_embeds=True),
}
# (latent side before 2x2 packing, T5 tokens): FLUX.1-dev at 1024 px has 128x128x16 latents.
PROG = "benchmarks.train_step_flux"
SHAPES = {"tiny": (8, 5), "flux-dev": (128, 512)}
# FLUX.1-dev is guidance-distilled: the teacher takes its embedded guidance (3.5), not real CFG.
RANK, GUIDANCE_EMBED, DASM = 64, 3.5, DASMSampler()


def build(config: str, dtype: torch.dtype, device: str) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):  # random init where the weights live: fast for 12 B on GPU
        return FluxTransformer2DModel(**CONFIGS[config]).to(dtype=dtype)


def lora_params(module: nn.Module, targets: tuple[str, ...], rank: int) -> int:
    """LoRA parameters ``rank * (in + out)`` over the Linears peft's target rule selects.

    Counted, not injected: peft's injection into a 12 B model takes minutes even on meta.
    """
    return sum(rank * (m.in_features + m.out_features) for name, m in module.named_modules()
               if isinstance(m, nn.Linear)
               and any(name == t or name.endswith("." + t) for t in targets))


def resident_bytes(param_dtype: torch.dtype) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Parameter bytes of FLUX.1-dev: the base once plus both LoRAs vs two base copies."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        module = FluxTransformer2DModel(**CONFIGS["flux-dev"])
    base = sum(p.numel() for p in module.parameters())
    lora = {a: lora_params(module, getattr(FLUX_TARGETS, a), RANK) for a in ("student", "fake")}
    base_gib, lora_gib = base * param_dtype.itemsize / 2**30, 4 * sum(lora.values()) / 2**30
    return [{"design": design, "base copies": n, "base GiB": n * base_gib, "LoRA GiB": lora_gib,
             "total GiB": n * base_gib + lora_gib}
            for design, n in (("shared backbone (this library)", 1), ("two copies", 2))], {
        "base params": base, "student LoRA params": lora["student"],
        "fake LoRA params": lora["fake"]}


@dataclass
class Batch:
    z_lq: Tensor
    z: Tensor
    cond: dict[str, Tensor]
    index: Tensor
    bias: Tensor
    noise: Tensor
    fake_index: Tensor
    fake_noise: Tensor


def make_batch(config: str, batch: int, side: int, device: str) -> Batch:
    cfg, tokens = CONFIGS[config], SHAPES[config][1]
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device)

    latent = (batch, cfg["in_channels"] // 4, side, side)
    cond = {"prompt_embeds": randn(batch, tokens, cfg["joint_attention_dim"]),
            "pooled_projections": randn(batch, cfg["pooled_projection_dim"]),
            "guidance": torch.full((batch,), GUIDANCE_EMBED, device=device)}
    return Batch(randn(*latent), randn(*latent), cond,
                 torch.randint(50, 950, (batch,), generator=g).to(device),
                 DASM.draw_bias(batch, generator=g).to(device), randn(*latent),
                 torch.randint(50, 950, (batch,), generator=g).to(device), randn(*latent))


def step(student, teacher, fake, data: Batch) -> None:
    """Generator step (TSD + DASM + latent MSE), then the fake-score step."""
    t = student.schedule.timesteps(torch.zeros_like(data.index))  # sigma = 1
    z_hat = data.z_lq - student(data.z_lq, t, data.cond)
    # No real CFG: guidance-distilled FLUX.1-dev takes its guidance in the condition.
    tsd = TSDLoss(dasm=DASM)(z_hat, data.cond, teacher=teacher, fake=fake, z=data.z,
                             index=data.index, noise=data.noise, dasm_bias=data.bias)
    (tsd.loss + F.mse_loss(z_hat.float(), data.z)).backward()
    DiffusionLoss()(z_hat, data.cond, model=fake, index=data.fake_index,
                    noise=data.fake_noise).loss.backward()


def setup(config: str, dtype: torch.dtype, device: str, side: int, checkpointing: bool):
    """The shared roles and the two-copy roles, with identical nonzero fp32 LoRA weights."""
    base = build(config, dtype, device)
    copies = [copy.deepcopy(base), copy.deepcopy(base)]
    wrap = lambda m: FluxScoreModel.for_resolution(m, side, side)  # noqa: E731
    shared = lora_roles(wrap(base), student=lora_config(FLUX_TARGETS.student, RANK),
                        fake=lora_config(FLUX_TARGETS.fake, RANK))
    for module, adapter in zip(copies, ("student", "fake"), strict=True):
        module.requires_grad_(False)
        add_lora(module, lora_config(getattr(FLUX_TARGETS, adapter), RANK), adapter)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module, adapter in zip(copies, ("student", "fake"), strict=True):
            mine, theirs = lora_state_dict(base, adapter), lora_state_dict(module, adapter)
            for key, p in mine.items():
                p.data = p.data.float()  # fp32 LoRA on a half-precision base
                if ".lora_B." in key:  # the fake score away from the teacher: VSD is not noise
                    p.copy_(torch.randn(p.shape, generator=g) * (1e-3 if adapter == "student"
                                                                 else 1e-2))
                theirs[key].data = p.data.clone()
    for m in (base, *copies):
        if checkpointing:
            m.enable_gradient_checkpointing()
    first = SharedBackbone(wrap(copies[0]), trainable=("student",))
    second = SharedBackbone(wrap(copies[1]), trainable=("fake",))
    two = (first.role("student"), second.role(None), second.role("fake"))
    return (shared.student, shared.teacher, shared.fake), two, copies


def grad_errors(shared, two) -> dict[str, float]:
    """Relative L2 error of the LoRA gradients, shared vs two copies, per trained role."""
    out = {}
    for name, a, b in (("student", shared[0], two[0]), ("fake", shared[2], two[2])):
        ga = torch.cat([p.grad.float().flatten() for p in a.parameters()])
        gb = torch.cat([p.grad.float().flatten() for p in b.parameters()])
        out[name] = float((ga - gb).norm() / gb.norm())
    return out


def run(config: str, device: str, dtype: torch.dtype, batch: int, side: int, warmup: int,
        repeats: int, checkpointing: bool, grad_tol: float, out_dir: Path,
        command: str | None = None) -> Path:
    resident, counts = resident_bytes(torch.bfloat16 if dtype == torch.float32 else dtype)
    shared, two, copies = setup(config, dtype, device, side, checkpointing)
    data = make_batch(config, batch, side, device)
    step(*shared, data)
    step(*two, data)
    errors = grad_errors(shared, two)
    if max(errors.values()) > grad_tol:
        raise AssertionError(f"gradients of the two designs differ: {errors}")
    paths = (("shared backbone (this library)", shared, [shared[0].backbone.module]),
             ("two copies (student; teacher + fake)", two, copies))
    rows = []
    for name, roles, modules in paths:
        calls = count_calls(modules)
        step(*roles, data)
        n_calls = calls()
        params = [*roles[0].parameters(), *roles[2].parameters()]
        seconds, peak = time_path(lambda r=roles: step(*r, data), params, device, warmup, repeats)
        rows.append({"design": name, "backbone calls": n_calls, "median s": seconds,
                     "peak step MiB": "n/a (CPU)" if peak is None else peak,
                     "params MiB": module_bytes(modules)})
    notes = (f"Config `{config}`, {device}, weights {str(dtype).removeprefix('torch.')}, LoRA "
             f"rank {RANK} fp32 on FLUX_TARGETS, batch {batch}, latent {side}x{side} "
             f"({(side // 2) ** 2} image tokens, {SHAPES[config][1]} text tokens), embedded "
             f"guidance {GUIDANCE_EMBED}, DASM N=4, gradient checkpointing "
             f"{'on' if checkpointing else 'off'}; {warmup} warm-up + {repeats} timed steps "
             f"(median), AdamW included. Gradients agree to a relative L2 error of "
             f"{errors['student']:.1e} (student) and {errors['fake']:.1e} (fake score).\n\n"
             f"Resident parameters for FLUX.1-dev ({counts['base params'] / 1e9:.2f} B base, "
             f"{counts['student LoRA params'] / 1e6:.0f} M student and "
             f"{counts['fake LoRA params'] / 1e6:.0f} M fake-score LoRA parameters):\n\n")
    # The config in the name: a GPU run never replaces the tiny CPU table.
    name = ("train_step_flux" + ("" if config == "tiny" else f"_{config}")
            + ("_checkpointing" if checkpointing else ""))
    return write_report(name, "FLUX train step: shared backbone vs two copies", rows,
                        meta={"config": config, "device_arg": device, "dtype": str(dtype),
                              "batch": batch, "latent": side, "checkpointing": checkpointing,
                              "grad_rel_error": errors, "resident_flux_dev": resident,
                              "param_counts": counts},
                        notes=notes + markdown_table(resident), out_dir=out_dir, command=command)


def main(argv: list[str] | None = None) -> Path:
    parser = train_step_parser(PROG, __doc__, sorted(CONFIGS), batch=1, grad_tol=None,
                               grad_tol_help="max relative L2 gradient error (default 1e-3 fp32, "
                                             "5e-2 half)")
    args = parse_train_step(parser, argv)
    from diffusers.utils import logging

    logging.set_verbosity_error()
    dtype = DTYPES[args.dtype or ("fp32" if args.device == "cpu" else "bf16")]
    side = args.latent or SHAPES[args.config][0]
    tol = args.grad_tol or (1e-3 if dtype == torch.float32 else 5e-2)
    return run(args.config, args.device, dtype, args.batch, side, args.warmup, args.repeats,
               args.checkpointing, tol, args.out, command_line("benchmarks.train_step_flux", argv))


if __name__ == "__main__":
    raise SystemExit(options.entry(main, PROG)())
