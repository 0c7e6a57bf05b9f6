"""A Gaussian-mixture ScoreModel with the exact denoiser, for tests and benchmarks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .parametrization import check_prediction, expand_like, from_x0_eps
from .protocols import Cond, NoiseSchedule, Prediction
from .schedules import RectifiedFlow


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """Data ``x0 ~ sum_k pi_k N(mu_k, s_k^2 I)`` in D dimensions with its exact posterior mean.

    Under ``x_t = alpha x0 + sigma eps`` the marginal is ``sum_k pi_k N(alpha mu_k,
    (alpha^2 s_k^2 + sigma^2) I)`` and ``E[x0 | x_t]`` is the responsibility-weighted sum of the
    per-component Wiener estimates, so the network every score-distillation loss assumes is known
    exactly. ``means`` (K, D), ``stds`` (K,), ``weights`` (K,) summing to 1. Inputs are
    (B, *event_shape) with ``prod(event_shape) == D``; ``cond`` is ignored.
    """

    means: Tensor
    stds: Tensor
    weights: Tensor
    schedule: NoiseSchedule = field(default_factory=RectifiedFlow)
    prediction: Prediction = "flow"

    def __post_init__(self) -> None:
        check_prediction(self.prediction)
        k = self.means.shape[0]
        if self.means.ndim != 2 or self.stds.shape != (k,) or self.weights.shape != (k,):
            raise ValueError("expected means (K, D), stds (K,), weights (K,); got "
                             f"{tuple(self.means.shape)}, {tuple(self.stds.shape)}, "
                             f"{tuple(self.weights.shape)}")
        if not torch.isclose(self.weights.sum(), torch.tensor(1.0, dtype=self.weights.dtype)):
            raise ValueError(f"mixture weights must sum to 1, got {float(self.weights.sum())}")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _flat(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1).to(self.means.dtype)
        if flat.shape[1] != self.dim:
            raise ValueError(f"input has {flat.shape[1]} features; the mixture has {self.dim}")
        return flat

    def _log_joint(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Per-component ``log pi_k N(x; alpha mu_k, var_k I)`` (B, K) and variances (B, K)."""
        var = alpha[:, None] ** 2 * self.stds[None] ** 2 + sigma[:, None] ** 2
        d2 = (x[:, None] - alpha[:, None, None] * self.means[None]).square().sum(-1)
        log_n = -0.5 * (d2 / var + self.dim * torch.log(2 * math.pi * var))
        return self.weights.log()[None] + log_n, var

    def denoise(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Exact ``E[x0 | x_t]`` for per-sample ``alpha``, ``sigma`` (B,). Shape of ``x_t``."""
        x = self._flat(x_t)
        alpha, sigma = alpha.to(x.dtype), sigma.to(x.dtype)
        log_joint, var = self._log_joint(x, alpha, sigma)
        resp = log_joint.softmax(dim=1)  # (B, K)
        gain = alpha[:, None] * self.stds[None] ** 2 / var  # (B, K)
        resid = x[:, None] - alpha[:, None, None] * self.means[None]  # (B, K, D)
        x0_k = self.means[None] + gain[..., None] * resid
        return (resp[..., None] * x0_k).sum(1).reshape(x_t.shape).to(x_t.dtype)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """The exact prediction of kind ``self.prediction`` at ``(x_t, t)``."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        x0 = self.denoise(x_t, alpha, sigma)
        a, s = expand_like(alpha, x_t).to(x_t.dtype), expand_like(sigma, x_t).to(x_t.dtype)
        return from_x0_eps(x0, (x_t - a * x0) / s, self.prediction, a, s)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log p(x0)`` (B,) of clean samples."""
        one = torch.ones(x.shape[0], dtype=self.means.dtype, device=x.device)
        return self._log_joint(self._flat(x), one, 0 * one)[0].logsumexp(dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` clean samples (n, D)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype,
                            device=self.means.device)
        return self.means[comp] + self.stds[comp, None] * noise
