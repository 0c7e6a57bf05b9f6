"""Time weightings w(t) of score-distillation gradients and SD3's diffusion-loss weightings."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
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


F_DIVERGENCES: dict[str, Callable[[Tensor], Tensor]] = {
    # h(r) = f''(r) r^2 up to a constant factor, which the batch-mean normalisation removes.
    "reverse_kl": torch.ones_like,  # f = -log r: DMD
    "kl": lambda r: r,  # f = r log r
    "js": lambda r: r / (1 + r),  # Jensen-Shannon
    "squared_hellinger": torch.sqrt,  # f = (sqrt(r) - 1)^2: h = sqrt(r) / 2
}
"""f-distill's weightings ``h(r)`` by divergence (Xu et al. 2025, arXiv 2502.15681, Table 1)."""


def f_distill_weight(divergence: str, logit: Tensor, low: float = 0.1,
                     high: float = 20.0, bins: Tensor | None = None) -> Tensor:
    """f-distill's per-sample weight ``h(r) / mean h(r)`` (B,) from a discriminator's logit (B,).

    ``r = clip(exp(clamp(logit, -10, 10)), low, high)``, detached: the density ratio
    ``p_data / p_student`` a discriminator ``sigmoid(logit)`` trained to tell data (1) from
    student samples (0) estimates. With ``bins`` (B,) integer time-bin ids, ``r`` is first
    divided by the batch mean of ``r`` in its sample's bin (FastGen's ``ratio_normalization``
    with its default EMA rate 0). Then ``h`` of `F_DIVERGENCES`, normalised by its batch mean,
    as NVlabs FastGen's ``_get_f_div_weighting_h`` (whose defaults these are) does.
    """
    if divergence not in F_DIVERGENCES:
        raise ValueError(f"unknown f-divergence {divergence!r}; expected one of "
                         f"{sorted(F_DIVERGENCES)}")
    if logit.ndim != 1 or not logit.is_floating_point():
        raise ValueError(f"logit must be a floating (B,) tensor (one discriminator logit per "
                         f"sample), got {logit.dtype} {tuple(logit.shape)}")
    ratio = logit.detach().float().clamp(-10.0, 10.0).exp().clamp(low, high)
    if bins is not None:
        if bins.shape != logit.shape or bins.is_floating_point():
            raise ValueError(f"bins must be integer bin ids of shape {tuple(logit.shape)}, got "
                             f"{bins.dtype} {tuple(bins.shape)}")
        bins = bins.to(ratio.device)
        count = torch.zeros(int(bins.max()) + 1, device=ratio.device).index_add_(
            0, bins, torch.ones_like(ratio))
        total = torch.zeros_like(count).index_add_(0, bins, ratio)
        ratio = ratio / (total / count)[bins]
    h = F_DIVERGENCES[divergence](ratio)
    return h / h.mean()


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
