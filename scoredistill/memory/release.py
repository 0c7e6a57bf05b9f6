"""The TSD-SR release's train step, two transformer copies, traced like the recipe's.

The transformer part is the train-step benchmark's release path, run as it is
(``benchmarks/train_step_paths.py``: ``release_generator`` and ``release_fake``, the call
pattern of the release's ``train/train.py``): a student copy with its LoRA and an auxiliary copy
whose adapters are switched off for the teacher and on for the fake score; each DASM point makes
three batched-CFG calls (null and conditional inputs in one call) under ``torch.no_grad()``.
Around it, the recipe's parts, identical in both designs: the VAE encoder with its LoRA, the
decode, LPIPS, and one optimiser (AdamW by default) with clipping per role. So
``plan_release`` against :func:`~scoredistill.memory.steps.plan_train` differs by the design
only.
"""

from __future__ import annotations

import copy
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .backbones import Backbone, BackboneSpec, build_real, make_fake
from .families import decode, encode, prompt
from .steps import (
    Step,
    TrainOptions,
    _adapters_off,
    _autocast,
    _lpips,
    _meta,
    _trace_fake,
    _vae_lora,
)
from .trace import Allocated, Plan, allocated_peak, run_phases

CHECKOUT = Path(__file__).resolve().parents[2]


def source_module(name: str) -> ModuleType:
    """A module of the source checkout (``benchmarks.*``, ``examples.*``), which a wheel does not
    ship: imported with the checkout's root on ``sys.path``; ImportError naming it if absent."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        pass
    file = CHECKOUT.joinpath(*name.split(".")).with_suffix(".py")
    if not file.is_file():
        raise ImportError(f"{name} ({file}) is not here: this plan traces the project's own "
                          "code from a source checkout (git clone, then pip install -e .)")
    sys.path.insert(0, str(CHECKOUT))  # as examples/tsdsr/precompute.py run as a file does
    return importlib.import_module(name)


def _copies(parts: Backbone, opts: TrainOptions) -> tuple[nn.Module, nn.Module]:
    """The student copy (``parts.transformer``) and the auxiliary copy, frozen, each with its
    LoRA (the benchmark's ``setup``: student targets and attention targets, fp32)."""
    from scoredistill.adapters import (
        ATTENTION_TARGETS,
        STUDENT_TARGETS,
        add_lora,
        add_vae_lora,
        lora_config,
    )

    student = parts.transformer
    aux = copy.deepcopy(student)
    # A class of its own: MemTracker names modules by class, and two "SD3Transformer2DModel"
    # roots would share one row.
    aux.__class__ = type("AuxiliaryCopy", (type(student),), {})
    for module, adapter, targets, rank in ((student, "student", STUDENT_TARGETS,
                                            opts.student_rank),
                                           (aux, "fake", ATTENTION_TARGETS, opts.fake_rank)):
        module.requires_grad_(False)
        add_lora(module, lora_config(targets, rank), adapter)
        if opts.checkpointing:
            module.enable_gradient_checkpointing()
    if opts.checkpointing:
        parts.vae.enable_gradient_checkpointing()
    add_vae_lora(parts.vae, opts.vae_rank, "default")
    for p in (*_lora(student, "student"), *_lora(aux, "fake"), *_vae_lora(parts.vae)):
        p.data = p.data.float()  # fp32 LoRA weights, as the release and the recipe
    return student, aux


def _lora(module: nn.Module, adapter: str) -> list[nn.Parameter]:
    from scoredistill.adapters import lora_state_dict

    return list(lora_state_dict(module, adapter).values())


def _paths(spec: BackboneSpec, opts: TrainOptions) -> ModuleType:
    """The benchmark's release path; ValueError for what it does not run (SD3 only, its DASM
    and CFG scale fixed, as in the release)."""
    if spec.family != "sd3":
        raise ValueError(f"the release's step is SD3's (benchmarks/train_step_paths.py), got a "
                         f"{spec.family} backbone: plan it with the shared backbone")
    paths = source_module("benchmarks.train_step_paths")
    if not opts.dasm or opts.cfg_scale != paths.GUIDANCE:
        raise ValueError(f"the release's step runs DASM (N = {paths.DASM.num_points}) and CFG "
                         f"{paths.GUIDANCE:g}, got DASM {'on' if opts.dasm else 'off'} and CFG "
                         f"{opts.cfg_scale:g}: plan that setting with the shared backbone")
    if opts.offload_vae_activations:
        raise ValueError("the release's step keeps the VAE's activations on the GPU: plan the "
                         "offload (--offload-vae-activations) with the shared backbone")
    return paths


def _release_step(student: nn.Module, aux: nn.Module, parts: Backbone, spec: BackboneSpec,
                  opts: TrainOptions, device: str) -> tuple[list[nn.Module], Step, list[Any]]:
    """The iteration and what exists before it (optimisers, the batch)."""
    from scoredistill.optim import adamw, warm

    paths = _paths(spec, opts)
    vae = parts.vae
    lpips = _lpips() if opts.lpips else None
    trained = [*_lora(student, "student"), *_vae_lora(vae)]
    fake = _lora(aux, "fake")
    optimisers = [adamw(opts.optimizer, params, lr=5e-6) for params in (trained, fake)]
    for optimiser in optimisers:
        warm(optimiser)  # the state every step after the first holds, as the recipe's plan
    b, s = opts.batch, opts.size
    lq, hq = (torch.rand(b, 3, s, s, device=device) * 2 - 1 for _ in range(2))
    cond, null = prompt(spec, b, device, opts.dtype), prompt(spec, 1, device, opts.dtype)
    box: list[Any] = []

    def update(loss: torch.Tensor, params: list[nn.Parameter], opt: Any) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def generator_step() -> Callable[[], None]:
        with _autocast(device, opts.dtype):
            z_lq = encode(spec, vae, lq, "sample")
            with torch.no_grad(), _adapters_off(vae):
                z = encode(spec, vae, hq, "mode")
            latent = z_lq.shape
            data = paths.Batch(
                z_lq, z.float(), cond, null, torch.randint(50, 950, (b,), device=device),
                paths.DASM.draw_bias(b).to(device), torch.randn(latent, device=device),
                torch.randint(50, 950, (b,), device=device), torch.randn(latent, device=device))
            terms = paths.release_generator(student, aux, data)
            loss = terms.tsd + terms.mse
            if lpips is not None:
                loss = loss + lpips(decode(spec, vae, terms.z_hat), hq).mean()
        box.append((data, terms.z_hat.detach()))
        return lambda: update(loss, trained, optimisers[0])

    def fake_step() -> Callable[[], None]:
        with _autocast(device, opts.dtype):
            out = paths.release_fake(aux, *box.pop())
        return lambda: update(out, fake, optimisers[1])

    modules = [student, aux, vae, *([lpips] if lpips is not None else [])]
    return modules, [generator_step, fake_step], [*optimisers, lq, hq, *cond.values(),
                                                  *null.values()]


def plan_release(spec: BackboneSpec, opts: TrainOptions, device: str = "cpu") -> Plan:
    """The release's train iteration (two transformer copies) traced on fake ``device``
    tensors."""
    _paths(spec, opts)  # refuse what the release does not run before anything is built
    meta = _meta(spec, opts.dtype)
    student, aux = _copies(meta, opts)

    def setup() -> tuple[list[nn.Module], Step, list[Any]]:
        make_fake(aux, device)  # _trace_fake makes the backbone's own modules fake
        return _release_step(student, aux, meta, spec, opts, device)

    return _trace_fake(meta, device, setup)


def measure_release(spec: BackboneSpec, opts: TrainOptions) -> Allocated:
    """Peak bytes allocated during a REAL CPU run of the release's iteration."""
    def setup() -> Callable[[], None]:
        parts = build_real(spec, opts.dtype)
        student, aux = _copies(parts, opts)
        phases = _release_step(student, aux, parts, spec, opts, "cpu")[1]
        return lambda: run_phases(phases)

    return allocated_peak(setup)
