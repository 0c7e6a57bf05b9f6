"""One TSD-SR training iteration (Alg. 1 lines 4-31): generator update, then fake-score update.

All losses come from scoredistill (the regulariser: TSDLoss with DASM or another in its place,
see regularisers.py; DiffusionLoss) plus LPIPS and the latent MSE; a non-finite loss skips its
update (no optimizer step, gradients zeroed) and is counted.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from examples.tsdsr.training.config import TrainConfig
from examples.tsdsr.training.models import TSDSRModels, hq_latent
from examples.tsdsr.training.regularisers import HEAD_WEIGHT, Regulariser
from examples.tsdsr.training.sharding import clip_grad_norm, is_sharded
from scoredistill import DiffusionLoss, UniformIndex
from scoredistill.conditioning import expand_cond
from scoredistill.sr.latents import Posterior, decode, encode, one_step


@dataclass(frozen=True)
class Losses:
    """The regulariser L_reg (L_TSD: Eq. 5, DASM of Sec. 3.4) and the fake-score loss (Eq. 9)."""

    regulariser: Regulariser
    fake: DiffusionLoss

    @classmethod
    def from_config(cls, config: TrainConfig) -> Losses:
        index = UniformIndex(config.index_low, config.index_high)
        # check_finite=False: the step checks the total loss itself and skips, not raises.
        return cls(Regulariser.from_config(config),
                   DiffusionLoss(loss_weighting=config.fake_weighting, index_sampler=index,
                                 check_finite=False))


@dataclass
class Optimisation:
    """An optimizer, its scheduler and parameters (one per trained role)."""

    optimizer: Any
    scheduler: Any
    params: list[torch.nn.Parameter]


def student_forward(models: TSDSRModels, lq: Tensor, default: dict[str, Tensor],
                    generator: torch.Generator | None = None, posterior: Posterior = "sample",
                    offload: bool = False) -> tuple[Tensor, Tensor]:
    """``G_theta``: LQ (B, 3, H, W) in [-1, 1] -> (z_hat (B, 16, H/8, W/8), x_hat (B, 3, H, W)).

    ``offload``: the VAE's saved activations in host memory until the backward
    (``--offload-vae-activations``)."""
    z_hat = student_latent(models, lq, default, generator, posterior, offload)
    with saved_on_host(offload):
        return z_hat, decode(models.vae, z_hat)


def student_latent(models: TSDSRModels, lq: Tensor, default: dict[str, Tensor],
                   generator: torch.Generator | None = None, posterior: Posterior = "sample",
                   offload: bool = False) -> Tensor:
    """The student's latent ``z_hat`` (B, 16, H/8, W/8) of LQ (B, 3, H, W) in [-1, 1]."""
    with saved_on_host(offload):
        z_lq = encode(models.vae, lq, posterior=posterior, generator=generator)
    return one_step(models.roles.student, z_lq, expand_cond(default, lq.shape[0]))


def saved_on_host(offload: bool) -> contextlib.AbstractContextManager:
    """Autograd's saved tensors in host memory (pinned where CUDA is) while ``offload``."""
    if not offload:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


def target_latent(models: TSDSRModels, batch: dict) -> Tensor:
    """``z = E_psi(x_H)`` (B, 16, h, w): precomputed (``--use-latents``) or encoded now."""
    return batch["latent"].float() if "latent" in batch else hq_latent(models.vae,
                                                                       batch["hq"] * 2 - 1)


def generator_loss(models: TSDSRModels, losses: Losses, config: TrainConfig, batch: dict,
                   prompts: dict[str, dict[str, Tensor]], generator: torch.Generator,
                   z: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``L_G = LPIPS(x_hat, x_H) + MSE(z_hat, z) + gamma L_reg`` (Alg. 1 lines 6-24).

    ``z``: the HQ latent (B, 16, h, w) if already at hand (`target_latent`). Returns the scalar
    loss, ``z_hat`` (B, 16, h, w) and the pieces to log.
    """
    lq, hq = batch["lq"] * 2 - 1, batch["hq"] * 2 - 1
    cond = {k: batch[k] for k in ("prompt_embeds", "pooled_projections")}
    z_hat, x_hat = student_forward(models, lq, prompts["default"], generator,
                                   offload=config.offload_vae_activations)
    z = target_latent(models, batch) if z is None else z
    zero = z_hat.new_zeros(())
    rec = models.lpips(x_hat, hq).mean() if config.lpips_weight else zero
    mse = F.mse_loss(z_hat, z) if config.mse_weight else zero
    logs: dict[str, Any] = {"loss/lpips": rec, "loss/latent_mse": mse}
    reg_loss = zero
    if config.gamma:
        reg = losses.regulariser(z_hat, cond, z, teacher=models.roles.teacher,
                                 fake=models.roles.fake, cfg_scale=config.cfg_scale,
                                 null=prompts["null"], generator=generator,
                                 head=models.head)
        reg_loss = reg.loss
        if getattr(reg, "gan_loss", None) is not None:  # DMD2's term, before its weight
            logs["reg/gan"] = reg.gan_loss
        for term, norms in reg.norms.items():  # (B, N): per term and point (DASM, level)
            for k in range(norms.shape[1]):
                logs[f"reg_norm/{term}_p{k}"] = norms[:, k].mean()
        logs["reg/grad_norm"] = reg.grad.flatten(1).norm(dim=1).mean()
        logs["reg/timestep"] = reg.timesteps[:, 0].mean()
    logs["loss/reg"] = reg_loss
    loss = config.lpips_weight * rec + config.mse_weight * mse + config.gamma * reg_loss
    logs["loss/generator"] = loss
    return loss, z_hat, logs


def all_finite(accelerator: Any, value: Tensor) -> bool:
    """Whether ``value`` is finite on every process (all must skip together)."""
    flag = torch.isfinite(value.detach()).all().float().reshape(1)
    return bool(accelerator.gather(flag).min() > 0)


def apply_update(accelerator: Any, opt: Optimisation, loss: Tensor, max_grad_norm: float) -> bool:
    """Backward, average gradients over processes, clip, step; False (and no step) if non-finite."""
    if not all_finite(accelerator, loss):
        opt.optimizer.zero_grad(set_to_none=True)
        return False
    accelerator.backward(loss)
    # FSDP has averaged the gradients of sharded parameters over processes (reduce-scatter).
    grads = [p.grad for p in opt.params if p.grad is not None and not is_sharded(p.grad)]
    if accelerator.num_processes > 1 and grads:
        # The shared backbone is called through role views, not a DDP wrapper: sync by hand.
        flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), "mean")
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))
    if any(is_sharded(p) for p in opt.params):
        norm = clip_grad_norm(opt.params, max_grad_norm)  # no GradScaler: fp16 is refused
    else:
        norm = accelerator.clip_grad_norm_(opt.params, max_grad_norm)
    if accelerator.scaler is None and not all_finite(accelerator, torch.as_tensor(norm)):
        opt.optimizer.zero_grad(set_to_none=True)  # fp16's GradScaler skips such steps itself
        return False
    opt.optimizer.step()
    opt.scheduler.step()
    opt.optimizer.zero_grad(set_to_none=True)
    return True


def train_step(accelerator: Any, models: TSDSRModels, losses: Losses, config: TrainConfig,
               batch: dict, prompts: dict[str, dict[str, Tensor]], student: Optimisation,
               fake: Optimisation, generator: torch.Generator, update_generator: bool = True
               ) -> dict[str, Any]:
    """Alg. 1 lines 4-31 on one batch; returns the logs with ``skipped/*`` flags (0 or 1).

    ``update_generator=False`` is a fake-score-only step of DMD2's two-time-scale rule: the
    student only generates ``z_hat`` (no gradient, no decode) for the fake score to fit. A
    discriminator head (``models.head``) is trained with the fake score, in its update.
    """
    z = None
    if update_generator or models.head is not None:
        with accelerator.autocast():
            z = target_latent(models, batch)
    if update_generator:
        with accelerator.autocast():
            loss, z_hat, logs = generator_loss(models, losses, config, batch, prompts, generator,
                                               z)
        logs["skipped/generator"] = float(not apply_update(accelerator, student, loss,
                                                           config.max_grad_norm))
    else:
        with torch.no_grad(), accelerator.autocast():
            z_hat = student_latent(models, batch["lq"] * 2 - 1, prompts["default"], generator)
        logs = {"skipped/generator": 0.0}
    cond = {k: batch[k] for k in ("prompt_embeds", "pooled_projections")}
    with accelerator.autocast():
        out = losses.fake(z_hat.detach(), cond, model=models.roles.fake, generator=generator)
        fake_loss = out.loss
        if models.head is not None:
            head = losses.regulariser.head_loss(z, z_hat, cond, models.roles, models.head,
                                                generator)
            fake_loss = fake_loss + HEAD_WEIGHT * head.loss
            logs.update({"loss/head": head.loss, "head/real_logit": head.real_logit.mean(),
                         "head/fake_logit": head.fake_logit.mean()})
    logs["loss/fake"] = out.loss
    logs["fake/timestep"] = out.timesteps.float().mean()
    logs["skipped/fake"] = float(not apply_update(accelerator, fake, fake_loss,
                                                  config.max_grad_norm))
    return to_floats(logs)


def to_floats(logs: dict[str, Any]) -> dict[str, Any]:
    """Scalar tensors to Python floats with ONE device-to-host copy instead of one per entry."""
    keys = [k for k, v in logs.items() if isinstance(v, Tensor)]
    if not keys:
        return logs
    values = torch.stack([logs[k].detach().float().reshape(()) for k in keys]).tolist()
    return {**logs, **dict(zip(keys, values, strict=True))}
