"""Small, nonlinear, conditional score models for tests (not an adapter: a test double)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from scoredistill.protocols import NoiseSchedule, Prediction


@dataclass(eq=False)
class TinyNet:
    """``tanh(x W1 + (t / T) u + c V) W2`` with random weights: a smooth stand-in backbone.

    ``x`` (B, D), ``t`` (B,), ``cond`` (B, C). Counts its calls.
    """

    prediction: Prediction
    schedule: NoiseSchedule
    dim: int = 6
    cond_dim: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.w1 = torch.randn(self.dim, 16, generator=g) / self.dim**0.5
        self.u = torch.randn(16, generator=g)
        self.v = torch.randn(self.cond_dim, 16, generator=g)
        self.w2 = torch.randn(16, self.dim, generator=g) / 4
        self.calls = 0
        self.batch_sizes: list[int] = []

    def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        self.calls += 1
        self.batch_sizes.append(x_t.shape[0])
        time = (t[:, None] / self.schedule.num_steps) * self.u
        h = x_t.reshape(x_t.shape[0], -1) @ self.w1 + time
        if cond is not None:
            h = h + cond @ self.v
        return (torch.tanh(h) @ self.w2).reshape(x_t.shape)


def check_denoiser_against_monte_carlo(gm, schedule: NoiseSchedule, prediction: Prediction,
                                       index: int, dim: int) -> None:
    """``gm.denoise`` and ``gm(x_t, t)`` equal E[x0 | x_t] estimated by self-normalised
    importance sampling from the prior (6 standard errors of the effective sample size)."""
    from scoredistill.parametrization import expand_like, to_x0_eps
    from scoredistill.schedules import index_alpha_sigma

    g = torch.Generator().manual_seed(index)
    t, a, s = index_alpha_sigma(schedule, torch.tensor([index]))
    a, s = a.double(), s.double()
    x_t = a * gm.sample(4, g) + s * torch.randn(4, dim, generator=g, dtype=torch.float64)
    prior = gm.sample(400_000, g)
    exact = gm.denoise(x_t, a.repeat(4), s.repeat(4))
    for b in range(4):
        logw = -0.5 * ((x_t[b] - a * prior) ** 2).sum(1) / s**2
        w = (logw - logw.max()).exp()
        mc = (w[:, None] * prior).sum(0) / w.sum()
        ess = w.sum() ** 2 / (w**2).sum()
        tol = 6 * prior.std(0).max() / ess.sqrt() + 1e-3
        assert (mc - exact[b]).abs().max() < tol, (b, mc, exact[b], float(ess))
    # The ScoreModel output is the same denoiser in the model's own parametrisation.
    pred = gm(x_t, t.repeat(4))
    ex, ey = expand_like(a.repeat(4), x_t), expand_like(s.repeat(4), x_t)
    torch.testing.assert_close(to_x0_eps(pred, prediction, x_t, ex, ey)[0], exact)
