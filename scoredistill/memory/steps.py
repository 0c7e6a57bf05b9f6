"""The steps the planner traces, written with the code the recipe and the SR CLI run.

``train``: one iteration of TSD-SR's Alg. 1 as ``examples/tsdsr/training/step.py`` runs it
(student = VAE encoder with its LoRA + denoiser LoRA, one step at the noisiest level, decode,
LPIPS, latent MSE, TSD with DASM and CFG through the shared backbone's fused calls, AdamW with
clipping; then the fake-score loss and its AdamW step), written once over the ScoreModel
protocol: any family of `FAMILIES` through its adapter (`families`). ``sr``:
:class:`~scoredistill.sr.TSDSRPipeline` (SD3 only) on a batch of images with the given tiles.
Each builds either fake tensors (the plan) or real ones (the validation run), then runs the same
function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from unittest import mock

import numpy
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .backbones import Backbone, BackboneSpec, build_meta, build_real, make_fake
from .families import decode, encode, guidance_embedded, latent_size, prompt, score_model
from .trace import Allocated, Phase, Placeholders, Plan, allocated_peak, run_phases, trace

if TYPE_CHECKING:
    from scoredistill.adapters import LoraRoles
    from scoredistill.sr.tiling import TileConfig

Step = list[Phase]


@dataclass(frozen=True)
class TrainOptions:
    """The recipe's knobs that change memory (defaults: TSD-SR's paper settings)."""

    size: int = 512  # LQ (upsampled) and HQ crop side, px
    batch: int = 1
    dtype: torch.dtype = torch.bfloat16  # the frozen weights'; LoRA weights stay fp32
    student_rank: int = 64
    fake_rank: int = 64
    vae_rank: int = 64
    dasm: bool = True
    cfg_scale: float = 7.5
    lpips: bool = True
    checkpointing: bool = False
    optimizer: str = "adamw"  # or "adamw8bit" (scoredistill.optim: 8-bit moments)
    # The VAE encoder's and decoder's saved activations held in host memory until the backward
    # (the recipe's --offload-vae-activations, torch's save_on_cpu).
    offload_vae_activations: bool = False


@dataclass(frozen=True)
class SRRun:
    """What the SR CLI runs: ``images`` inputs of ``height`` x ``width`` px, upscaled."""

    height: int = 256
    width: int = 256
    upscale: float = 4.0
    images: int = 1
    batch: int = 8  # transformer tiles per call (the pipeline's batch_size)
    tiles: bool | TileConfig = True  # True: today's TileConfig defaults; False: stages whole
    vae_batch: int | None = None  # VAE tiles or images per call (None: batch, as the pipeline)
    process_size: int | None = None  # the short side the model works at (None: SROptions')
    dtype: torch.dtype = torch.bfloat16
    channels_last: bool = False  # the pipeline's channels-last VAE


def _lpips() -> nn.Module:
    from scoredistill.perceptual import alexnet_lpips

    # Random AlexNet: the same shapes (and memory) as the published weights.
    return alexnet_lpips().eval().requires_grad_(False)


def train_models(parts: Backbone, spec: BackboneSpec, opts: TrainOptions) -> LoraRoles:
    """The recipe's LoRA roles on the backbone (models.build_models), on meta or real weights:
    the student and fake-score adapters on the family's `LoraTargets`, the VAE encoder's LoRA."""
    from scoredistill.adapters import add_vae_lora, lora_config, lora_roles

    if opts.checkpointing:
        parts.transformer.enable_gradient_checkpointing()
        parts.vae.enable_gradient_checkpointing()
    model = score_model(spec, parts.transformer, latent_size(spec, opts.size, opts.size))
    targets = model.lora_targets  # type: ignore[attr-defined]
    roles = lora_roles(model, student=lora_config(targets.student, opts.student_rank,
                                                  exclude=targets.exclude),
                       fake=lora_config(targets.fake, opts.fake_rank, exclude=targets.exclude))
    add_vae_lora(parts.vae, opts.vae_rank, "default")
    for p in (*roles.student.parameters(), *roles.fake.parameters(), *_vae_lora(parts.vae)):
        p.data = p.data.float()  # fp32 LoRA weights (models.build_models, the release)
    return roles


def _vae_lora(vae: nn.Module) -> list[nn.Parameter]:
    from scoredistill.adapters import lora_state_dict

    return list(lora_state_dict(vae, "default").values())


def train_step(roles: LoraRoles, parts: Backbone, spec: BackboneSpec, opts: TrainOptions,
               device: str, traffic: list[int] | None = None
               ) -> tuple[list[nn.Module], Step, list[Any]]:
    """The iteration over the family's adapters, and what exists before it (optimisers, the
    batch). FLUX.1-dev and FLUX.2-dev embed the guidance scale: their teacher and fake score take
    it in the condition (no real CFG, no null prompt), as benchmarks/train_step_flux.py does."""
    from scoredistill import CFG, DASMSampler, DiffusionLoss, TSDLoss
    from scoredistill.conditioning import expand_cond
    from scoredistill.optim import adamw, warm
    from scoredistill.sr.latents import one_step

    vae = parts.vae
    lpips = _lpips() if opts.lpips else None
    student = [*roles.student.parameters(), *_vae_lora(vae)]
    fake = roles.fake.parameters()
    optimisers = [adamw(opts.optimizer, params, lr=5e-6) for params in (student, fake)]
    for optimiser in optimisers:
        warm(optimiser)  # the state every step after the first holds (the plan's steady state)
    b, s = opts.batch, opts.size
    lq, hq = (torch.rand(b, 3, s, s, device=device) * 2 - 1 for _ in range(2))
    cond, default = (prompt(spec, n, device, opts.dtype) for n in (b, 1))
    null = None if guidance_embedded(spec) else prompt(spec, 1, device, opts.dtype)

    def guided(role: Any) -> Any:  # real CFG with the null prompt, unless embedded
        return role if null is None else CFG(role, opts.cfg_scale, null)

    tsd = TSDLoss(lam=0.7, dasm=DASMSampler() if opts.dasm else None, check_finite=False)
    fake_loss = DiffusionLoss(check_finite=False)

    def update(loss: torch.Tensor, params: list[nn.Parameter], opt: Any) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    z_hat_box: list[torch.Tensor] = []

    def offload() -> contextlib.AbstractContextManager:
        return (HostOffload(traffic) if opts.offload_vae_activations
                else contextlib.nullcontext())

    def generator_step() -> Callable[[], None]:
        with _autocast(device, opts.dtype):
            with offload():
                z_lq = encode(spec, vae, lq, "sample")
            z_hat = one_step(roles.student, z_lq, expand_cond(default, b))
            with offload():
                x_hat = decode(spec, vae, z_hat)
            with torch.no_grad(), _adapters_off(vae):
                z = encode(spec, vae, hq, "mode")
            loss = F.mse_loss(z_hat, z) + tsd(z_hat, cond, teacher=guided(roles.teacher),
                                               fake=guided(roles.fake), z=z).loss
            if lpips is not None:
                loss = loss + lpips(x_hat, hq).mean()
        z_hat_box.append(z_hat.detach())
        return lambda: update(loss, student, optimisers[0])

    def fake_step() -> Callable[[], None]:
        with _autocast(device, opts.dtype):
            out = fake_loss(z_hat_box.pop(), cond, model=roles.fake).loss
        return lambda: update(out, fake, optimisers[1])

    modules = [parts.transformer, vae, *([lpips] if lpips is not None else [])]
    batch = [lq, hq, *tree_leaves([cond, default, null])]
    return modules, [generator_step, fake_step], [*optimisers, *batch]


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """``torch.autograd.graph.save_on_cpu`` (the recipe's ``--offload-vae-activations``), in the
    planner's three kinds of run; ``traffic`` collects the bytes of each tensor offloaded.

    A CUDA tensor saved for the backward goes through save_on_cpu's own hooks (a pinned host
    copy, copied back when the backward unpacks it). A fake tensor (the plan) moves to the
    stand-in for host memory ("meta": :attr:`Plan.host` counts it) and comes back as a fresh
    device tensor: the trace frees what the offload frees, for as long as it frees it. A real
    CPU tensor (the validation run, where the CPU stands for the device) is held outside torch's
    allocator (:func:`_outside_torch`) and unpacked into a new tensor: so the allocator measures
    what the plan predicts, independently of the trace."""

    def __init__(self, traffic: list[int] | None = None) -> None:
        from torch._subclasses.fake_tensor import is_fake

        cuda = torch.autograd.graph.save_on_cpu(pin_memory=True)

        def pack(t: torch.Tensor) -> tuple[str, Any]:
            if traffic is not None:  # the bytes copied to the host (and back)
                traffic.append(t.numel() * t.element_size())
            if is_fake(t):
                return "fake", (t.to("meta"), t.device)
            if t.device.type == "cpu":
                return "numpy", _outside_torch(t.detach())
            return "cuda", cuda.pack_hook(t)

        # Unpacked contiguous, as save_on_cpu's copy back is.
        def unpack(packed: tuple[str, Any]) -> torch.Tensor:
            kind, saved = packed
            if kind == "fake":
                held, device = saved
                return held.to(device)
            if kind == "numpy":
                return saved.clone()
            return cuda.unpack_hook(saved)

        super().__init__(pack, unpack)


def _outside_torch(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of the CPU tensor ``t`` in a NumPy buffer: memory that torch's allocator,
    and the profiler reading it, never sees (the validation runs' stand-in for host memory)."""
    buffer = numpy.empty(t.numel() * t.element_size(), numpy.uint8)  # bytes: bf16 too
    return torch.from_numpy(buffer).view(t.dtype).view(t.shape).copy_(t)


@contextlib.contextmanager
def _adapters_off(module: nn.Module) -> Iterator[None]:
    module.disable_adapters()
    try:
        yield
    finally:
        module.enable_adapters()


def _autocast(device: str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    # The recipe's accelerate mixed precision: autocast to the weights' half dtype.
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype)


def _sr_models(parts: Backbone, opts: SRRun) -> None:
    """Frozen and QKV-fused, as ``load_model`` leaves them (the LoRA merged: no extra weights);
    the VAE's weights in channels-last here, where the pipeline would (fake weights cannot be
    converted in place)."""
    from scoredistill.sr import fast

    for module in (parts.transformer, parts.vae):
        module.requires_grad_(False)
        fast.fuse_qkv(module)
    if opts.channels_last:
        fast.to_channels_last(parts.vae)


def _sr_step(parts: Backbone, spec: BackboneSpec, opts: SRRun, device: str
             ) -> tuple[list[nn.Module], Step, list[Any]]:
    from scoredistill.adapters import SD3ScoreModel
    from scoredistill.sr.loading import SRModel
    from scoredistill.sr.pipeline import DEFAULT_TILES, TSDSRPipeline
    from scoredistill.sr.pipeline import SROptions as PipelineOptions

    cond = prompt(spec, 1, device, opts.dtype)
    tiles = DEFAULT_TILES if opts.tiles is True else opts.tiles or None
    pipe = TSDSRPipeline(SRModel(SD3ScoreModel(parts.transformer), parts.vae, cond),
                         tiles=tiles, batch_size=opts.batch, vae_batch_size=opts.vae_batch)
    pipe.channels_last = opts.channels_last  # inputs too; the weights were done by _sr_models
    images = [torch.rand(3, opts.height, opts.width, device=device) for _ in range(opts.images)]
    options = PipelineOptions(upscale=opts.upscale, process_size=opts.process_size
                              or PipelineOptions.process_size)

    def step() -> None:
        with torch.no_grad():
            pipe._super_resolve(images, options)  # run() minus the value checks
        return None

    return [parts.transformer, parts.vae], [step], [*cond.values(), *images]


def plan_train(spec: BackboneSpec, opts: TrainOptions, device: str = "cpu") -> Plan:
    """The train iteration traced on fake ``device`` tensors."""
    meta = _meta(spec, opts.dtype)
    roles = train_models(meta, spec, opts)
    traffic: list[int] = []
    plan = _trace_fake(meta, device, lambda: train_step(roles, meta, spec, opts, device, traffic))
    return dataclasses.replace(plan, offloaded=sum(traffic))


def check_sr(spec: BackboneSpec) -> None:
    """ValueError unless the SR pipeline runs ``spec``'s family (SD3's only)."""
    if spec.family != "sd3":
        raise ValueError(f"the SR pipeline (scoredistill.sr) runs SD3-family backbones only; "
                         f"this is a {spec.family} backbone: plan its training (train), or SR "
                         "with an SD3 model (sd3-medium, sd3.5-medium, sd3.5-large)")


def plan_sr(spec: BackboneSpec, opts: SRRun, device: str = "cpu") -> Plan:
    """The SR pipeline's run traced on fake ``device`` tensors, as it runs on an accelerator:
    the tiled VAE's waiting tiles are host memory (:attr:`Plan.host`), not ``device``'s."""
    from scoredistill.sr import vae_tiling

    check_sr(spec)
    meta = _meta(spec, opts.dtype)
    _sr_models(meta, opts)
    with mock.patch.object(vae_tiling, "HOST", torch.device("meta")):
        return _trace_fake(meta, device, lambda: _sr_step(meta, spec, opts, device))


def _meta(spec: BackboneSpec, dtype: torch.dtype) -> Backbone:
    meta = build_meta(spec)
    meta.transformer.to(dtype)
    meta.vae.to(dtype)
    return meta


def _trace_fake(meta: Backbone, device: str,
                setup: Callable[[], tuple[list[nn.Module], Step, list[Any]]]) -> Plan:
    # LoRA layers are added on the meta modules (peft moves them with .to(), which fake
    # parameters refuse), then every weight becomes a fake tensor and the step is set up.
    from torch._subclasses.fake_tensor import FakeTensorMode

    # Real tensors the adapters hold (a VP schedule's alpha-bar table, 1000 floats) enter the
    # trace as constants.
    with FakeTensorMode(allow_non_fake_inputs=True), Placeholders():
        for module in (meta.transformer, meta.vae):
            make_fake(module, device)
        modules, step, external = setup()
        return trace(step, modules, external, device=device)


def measure_train(spec: BackboneSpec, opts: TrainOptions) -> Allocated:
    """Peak bytes allocated during a REAL CPU run of the train iteration (weights included)."""
    def setup() -> Callable[[], None]:
        parts = build_real(spec, opts.dtype)
        phases = train_step(train_models(parts, spec, opts), parts, spec, opts, "cpu")[1]
        return lambda: run_phases(phases)

    return allocated_peak(setup)


def measure_sr(spec: BackboneSpec, opts: SRRun) -> Allocated:
    """Peak bytes allocated during a REAL CPU run of the SR pipeline (weights included), with
    the tiled VAE's waiting tiles held outside torch's allocator, as an accelerator's run holds
    them in host memory (:class:`_HostOutsideTorch`)."""
    from scoredistill.sr import vae_tiling

    check_sr(spec)

    def setup() -> Callable[[], None]:
        parts = build_real(spec, opts.dtype)
        _sr_models(parts, opts)
        phases = _sr_step(parts, spec, opts, "cpu")[1]
        return lambda: run_phases(phases)

    with mock.patch.object(vae_tiling, "HOST", torch.device("meta")), _HostOutsideTorch():
        return allocated_peak(setup)


class _HostOutsideTorch(TorchFunctionMode):
    """A CPU run's stand-in for host memory: a tensor sent to "meta" is copied into a NumPy
    buffer instead (torch's allocator, which the profiler reads, never sees it), and one sent
    back to the CPU is copied into a new torch tensor, as an upload allocates on the device."""

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[int, weakref.ref[torch.Tensor]] = {}  # by id: == is elementwise

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.to and len(args) == 2 and isinstance(args[1], torch.device):
            tensor, device = args
            if device.type == "meta":
                held = _outside_torch(tensor)
                self.held[id(held)] = weakref.ref(held)
                return held
            if device.type == "cpu" and (ref := self.held.get(id(tensor))) and ref() is tensor:
                return tensor.clone()
        return func(*args, **kwargs)
