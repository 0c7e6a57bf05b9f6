"""The two paths the train-step benchmark compares: the library's and the release's call pattern.

Each path is a generator step (student forward, TSD with DASM, latent MSE) returning its loss
terms and directions separately, so they can be compared term by term, and a fake-score update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scoredistill import CFG, DASMSampler, DiffusionLoss, RectifiedFlow, TSDLoss

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(sample_size=32, patch_size=1, in_channels=16, num_layers=1, attention_head_dim=8,
                 num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                 pooled_projection_dim=64, out_channels=16),
    # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    "sd3-medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                       attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                       pos_embed_max_size=192),
}
# (latent side, prompt tokens) per config; SD3-medium: 512 px images, TSD-SR's 333 tokens.
SHAPES = {"tiny": (16, 8), "sd3-medium": (64, 333)}
RANK, GUIDANCE, LAM, DASM = 64, 7.5, 0.7, DASMSampler()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Batch:
    z_lq: Tensor
    z: Tensor
    cond: dict[str, Tensor]
    null: dict[str, Tensor]
    index: Tensor  # (B,) TSD start index
    bias: Tensor  # (B,) DASM bias
    noise: Tensor
    fake_index: Tensor  # (B,) fake-score update index
    fake_noise: Tensor


def make_batch(config: str, batch: int, side: int, device: str, seed: int = 0) -> Batch:
    tokens = SHAPES[config][1]
    cfg = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device)

    def cond(b: int) -> dict[str, Tensor]:
        return {"prompt_embeds": randn(b, tokens, cfg["joint_attention_dim"]),
                "pooled_projections": randn(b, cfg["pooled_projection_dim"])}

    latent = (batch, cfg["in_channels"], side, side)
    return Batch(randn(*latent), randn(*latent), cond(batch), cond(1),
                 torch.randint(50, 950, (batch,), generator=g).to(device),
                 DASM.draw_bias(batch, generator=g).to(device), randn(*latent),
                 torch.randint(50, 950, (batch,), generator=g).to(device), randn(*latent))


@dataclass
class GeneratorTerms:
    """One generator step's loss terms (graphs to the student) and its directions (B, C, h, w)."""

    z_hat: Tensor
    tsd: Tensor  # the TSD surrogate 0.5 |z_hat - sg(z_hat - g)|^2
    mse: Tensor  # the latent MSE against z
    directions: dict[str, Tensor]  # "vsd", "tsm" and their mix "tsd" (= g), detached


def library_generator(roles, data: Batch) -> GeneratorTerms:
    """The library: TSDLoss(dasm=...) on CFG-wrapped roles, one fused backbone call per point."""
    t = torch.full((data.z_lq.shape[0],), 1000.0, device=data.z_lq.device)
    z_hat = data.z_lq - roles.student(data.z_lq, t, data.cond)
    tsd = TSDLoss(lam=LAM, dasm=DASM)(
        z_hat, data.cond, teacher=CFG(roles.teacher, GUIDANCE, data.null),
        fake=CFG(roles.fake, GUIDANCE, data.null), z=data.z, index=data.index, noise=data.noise,
        dasm_bias=data.bias)
    return GeneratorTerms(z_hat, tsd.loss, F.mse_loss(z_hat.float(), data.z),
                          {**tsd.grads, "tsd": tsd.grad})


def library_fake(roles, data: Batch, z_hat: Tensor) -> Tensor:
    return DiffusionLoss()(z_hat.detach(), data.cond, model=roles.fake, index=data.fake_index,
                           noise=data.fake_noise).loss


def _transformer(module: nn.Module, x: Tensor, t: Tensor, prompt: Tensor,
                 pooled: Tensor) -> Tensor:
    """A diffusers SD3 transformer called as the release calls it; output as fp32."""
    dtype = next(module.parameters()).dtype
    return module(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=prompt.to(dtype),
                  pooled_projections=pooled.to(dtype), return_dict=False)[0].float()


def release_generator(student: nn.Module, aux: nn.Module, data: Batch) -> GeneratorTerms:
    """The release's ``train/train.py`` generator step: 3N + 1 transformer calls.

    Two copies: ``student`` and ``aux`` (teacher = ``aux`` with adapters disabled, fake score =
    enabled; the release's default without a teacher LoRA). Each DASM point makes three calls of
    its ``compute_with_cfg``, which batches the null and conditional inputs into one call.
    Kept from the library rather than the release, so that gradients can be compared: DASM
    indices per sample (the release uses the first sample's for the whole batch) and the TSD
    surrogate's gradient (the release builds it under ``torch.no_grad()``; its time is the same).
    """
    sched = RectifiedFlow()
    b = data.z_lq.shape[0]
    prompt, pooled = data.cond["prompt_embeds"], data.cond["pooled_projections"]
    null_prompt, null_pooled = (data.null[k].expand(b, *data.null[k].shape[1:])
                                for k in ("prompt_embeds", "pooled_projections"))

    def compute_with_cfg(x: Tensor, t: Tensor) -> Tensor:
        out = _transformer(aux, torch.cat([x, x]), torch.cat([t, t]),
                           torch.cat([null_prompt, prompt]), torch.cat([null_pooled, pooled]))
        uncond, cond = out.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    t_student = torch.full((b,), 1000.0, device=data.z_lq.device)
    z_hat = data.z_lq - _transformer(student, data.z_lq, t_student, prompt, pooled)
    points = DASM.indices(data.index, sched.num_steps, data.bias)
    sig = sched.sigmas(points)  # (B, N)
    weights = DASM.point_weights(z_hat.device)
    with torch.no_grad():
        s0 = sig[:, 0, None, None, None]
        zh_t = s0 * data.noise + (1 - s0) * z_hat.detach().float()
        z_t = s0 * data.noise + (1 - s0) * data.z
        g_vsd, g_tsm = torch.zeros_like(zh_t), torch.zeros_like(zh_t)
        for k in range(points.shape[1]):
            s = sig[:, k, None, None, None]
            t = sched.timesteps(points[:, k])
            aux.disable_adapters()  # the teacher
            psi_hat, psi = compute_with_cfg(zh_t, t), compute_with_cfg(z_t, t)
            aux.enable_adapters()  # the fake score
            phi_hat = compute_with_cfg(zh_t, t)
            g_vsd += weights[k] * s**2 * (psi_hat - phi_hat)
            g_tsm += weights[k] * s**2 * (psi_hat - psi)
            if k + 1 < points.shape[1]:
                step = s - sig[:, k + 1, None, None, None]
                zh_t, z_t = zh_t - step * phi_hat, z_t - step * psi
        g = LAM * g_vsd + (1 - LAM) * g_tsm
    z_f = z_hat.float()
    return GeneratorTerms(z_hat, 0.5 * F.mse_loss(z_f, (z_f - g).detach()),
                          F.mse_loss(z_f, data.z), {"vsd": g_vsd, "tsm": g_tsm, "tsd": g})


def release_fake(aux: nn.Module, data: Batch, z_hat: Tensor) -> Tensor:
    """The release's fake-score update: one call, x0 = x_t - sigma v, no CFG."""
    sched = RectifiedFlow()
    s = sched.sigmas(data.fake_index)[:, None, None, None]
    x0 = z_hat.detach().float()
    x_t = s * data.fake_noise + (1 - s) * x0
    pred = _transformer(aux, x_t, sched.timesteps(data.fake_index),
                        data.cond["prompt_embeds"], data.cond["pooled_projections"])
    return 0.5 * F.mse_loss(x_t - s * pred, x0)


def library_step(roles, data: Batch) -> None:
    terms = library_generator(roles, data)
    (terms.tsd + terms.mse).backward()
    library_fake(roles, data, terms.z_hat).backward()


def release_step(student: nn.Module, aux: nn.Module, data: Batch) -> None:
    # As the release: the generator's backward before the fake score's forward.
    terms = release_generator(student, aux, data)
    (terms.tsd + terms.mse).backward()
    release_fake(aux, data, terms.z_hat).backward()
