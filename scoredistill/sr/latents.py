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

# TSD-SR's G_theta, z_L - v(z_L, 1000, c), is the library's one_step (any parametrisation).
from scoredistill.one_step import one_step as one_step

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
