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


