"""Time weightings w(t) of score-distillation gradients and SD3's diffusion-loss weightings."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

Weighting = Callable[[Tensor, Tensor], Tensor]
"""``w(alpha, sigma) -> (B,)`` multiplying a per-sample prediction difference."""

DISTILL_WEIGHTINGS: dict[str, Weighting] = {
    # TSD-SR release: sigma^2 on velocity differences; DreamFusion/ProlificDreamer: sigma^2 on eps.
    "sigma2": lambda alpha, sigma: sigma**2,
    "sigma": lambda alpha, sigma: sigma,
    "uniform": lambda alpha, sigma: sigma.new_ones(sigma.shape),
}


def distill_weighting(name: str | Weighting) -> Weighting:
    """Look up a score-distillation time weighting by name, or pass a callable through."""
    if callable(name):
        return name
    if name not in DISTILL_WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; expected one of "
                         f"{sorted(DISTILL_WEIGHTINGS)} or a callable (alpha, sigma) -> (B,)")
    return DISTILL_WEIGHTINGS[name]


SampleWeighting = Callable[[Tensor, Tensor], Tensor]
"""``(z_hat (B, ...), teacher_x0 (B, ...)) -> (B,)``: a weight that needs the sample itself."""


def dmd_normalizer(z_hat: Tensor, teacher_x0: Tensor) -> Tensor:
    """``1 / mean |z_hat - teacher_x0|`` per sample (DMD, Yin et al. CVPR 2024, Eq. 8).

    Eq. 8's ``w_t = sigma_t^2 / alpha_t * CS / ||mu_real(x_t, t) - x||_1`` cancels the score's
    ``alpha_t / sigma_t^2``, leaving this factor on the x0-space difference. ``teacher_x0`` is the
    (guided) teacher's x0 at the noisy sample. Shapes: (B, ...) -> (B,).
    """
    return 1.0 / (z_hat - teacher_x0).abs().flatten(1).mean(dim=1)


SAMPLE_WEIGHTINGS: dict[str, SampleWeighting] = {"dmd": dmd_normalizer}


def sample_weighting(name: str | SampleWeighting) -> SampleWeighting:
    """Look up a per-sample weighting by name ("dmd"), or pass a callable through."""
    if callable(name):
        return name
    if name not in SAMPLE_WEIGHTINGS:
        raise ValueError(f"unknown sample weighting {name!r}; expected one of "
                         f"{sorted(SAMPLE_WEIGHTINGS)} or a callable (z_hat, teacher_x0) -> (B,)")
    return SAMPLE_WEIGHTINGS[name]


def sd3_loss_weight(scheme: str, sigma: Tensor) -> Tensor:
    """SD3's diffusion-loss weighting (Esser et al. 2024, Sec. 3.1): none, sigma_sqrt, cosmap.

    ``sigma`` (B,) -> (B,). These are loss weights; SD3's logit-normal and mode schemes are
    timestep densities (see ``scoredistill.samplers.timesteps``), never weights.
    """
    if scheme == "none":
        return sigma.new_ones(sigma.shape)
    if scheme == "sigma_sqrt":
        return sigma**-2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    raise ValueError(f"unknown loss weighting {scheme!r}; expected none, sigma_sqrt or cosmap")
