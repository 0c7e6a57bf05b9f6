"""SD3 VAE latents and TSD-SR's one-step student forward, shared by training and inference.

SD3's latents are ``(E(x) - shift_factor) * scaling_factor`` and decode as
``D(z / scaling_factor + shift_factor)``, as diffusers' SD3 pipelines and training scripts do
(the shift is subtracted BEFORE scaling). TSD-SR's student (paper Sec 3.2, one step at
``t = 1000``) is ``z_hat = z_L - sigma(1000) * v(z_L, 1000, c)`` with ``sigma = 1``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from scoredistill.adapters.module import weights_dtype
from scoredistill.protocols import Cond, ScoreModel
from scoredistill.schedules import index_alpha_sigma

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

Posterior = Literal["sample", "mode"]


def encode(vae: AutoencoderKL, image: Tensor, *, posterior: Posterior = "sample",
           generator: torch.Generator | None = None) -> Tensor:
    """SD3 latent (B, 16, H/8, W/8) float32 of ``image`` (B, 3, H, W) in [-1, 1].

    ``posterior="sample"`` draws from the VAE's Gaussian posterior (the student's input during
    training, TSD-SR Sec 3.2) with ``generator``; ``"mode"`` takes its mean (deterministic).

    Example:
        >>> z = encode(vae, x * 2 - 1, posterior="mode")  # doctest: +SKIP
    """
    check_posterior(posterior)
    dist = vae.encode(image.to(weights_dtype(vae))).latent_dist
    return posterior_latent(vae, dist, posterior, generator)


def check_posterior(posterior: str) -> None:
    """ValueError unless ``posterior`` is "sample" or "mode"."""
    if posterior not in ("sample", "mode"):
        raise ValueError(f"posterior must be 'sample' or 'mode', got {posterior!r}")


def posterior_latent(vae: AutoencoderKL, dist: DiagonalGaussianDistribution,
                     posterior: Posterior, generator: torch.Generator | None = None) -> Tensor:
    """SD3 latent (B, 16, h, w) float32 from the VAE's posterior ``dist``: its sample or mode,
    shifted and scaled."""
    sample = dist.sample(generator) if posterior == "sample" else dist.mode()
    config = vae.config
    return (sample.float() - (config.shift_factor or 0.0)) * config.scaling_factor


def decoder_input(vae: AutoencoderKL, latent: Tensor) -> Tensor:
    """What the VAE's decoder takes for an SD3 latent (B, 16, h, w): unscaled, unshifted, in the
    VAE's dtype (inverse of :func:`posterior_latent`)."""
    config = vae.config
    raw = latent.float() / config.scaling_factor + (config.shift_factor or 0.0)
    return raw.to(weights_dtype(vae))


def decode(vae: AutoencoderKL, latent: Tensor) -> Tensor:
    """Image (B, 3, 8h, 8w) float32 in [-1, 1] from an SD3 latent (B, 16, h, w) (inverse of
    :func:`encode`)."""
    return vae.decode(decoder_input(vae, latent)).sample.float().clamp(-1.0, 1.0)


def one_step(student: ScoreModel, z_lq: Tensor, cond: Cond) -> Tensor:
    """TSD-SR's generator G_theta: ``z_hat = z_L - sigma_0 v(z_L, t_0, c)`` (B, C, h, w) float32.

    ``t_0``, ``sigma_0`` are the student's schedule at index 0 (SD3: ``t = 1000``, ``sigma = 1``),
    so this is the flow's clean-sample estimate ``x0 = x_t - sigma v`` from pure "noise" ``z_L``.

    Example:
        >>> z_hat = one_step(SD3ScoreModel(transformer), z_lq, cond)  # doctest: +SKIP
    """
    if student.prediction != "flow":
        raise ValueError(f"one_step needs a flow-velocity student, got {student.prediction!r}")
    # The schedule is read on the CPU and enters as Python scalars: no device-to-host sync, so
    # the forward can be captured in a CUDA graph.
    t, _, sigma = index_alpha_sigma(student.schedule, torch.zeros(1, dtype=torch.long))
    t_batch = torch.full((z_lq.shape[0],), float(t), device=z_lq.device)
    return z_lq.float() - float(sigma) * student(z_lq, t_batch, cond)
