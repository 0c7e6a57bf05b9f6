"""Per-sample schedule-index samplers: uniform over a range, logit-normal, mode (SD3 Sec. 3.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class IndexSampler(Protocol):
    """Draws one schedule index per sample: ``sampler(batch, num_steps) -> (B,) int64``."""

    def __call__(self, batch: int, num_steps: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor: ...


def _gen_device(generator: torch.Generator | None, device: torch.device | str | None):
    return generator.device if generator is not None else device


@dataclass(frozen=True)
class UniformIndex:
    """Index ``~ U{low, ..., high - 1}``; TSD-SR samples 50..949 (Alg. 1, line 11)."""

    low: int = 50
    high: int = 950

    def __call__(self, batch: int, num_steps: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        if not 0 <= self.low < self.high <= num_steps:
            raise ValueError(f"index range [{self.low}, {self.high}) is not inside the schedule's "
                             f"[0, {num_steps})")
        idx = torch.randint(self.low, self.high, (batch,), generator=generator,
                            device=_gen_device(generator, device))
        return idx.to(device)


def _to_index(u: Tensor, num_steps: int, device) -> Tensor:
    # diffusers' SD3 training: indices = (u * num_train_timesteps).long() into the table.
    return (u * num_steps).long().clamp(0, num_steps - 1).to(device)


@dataclass(frozen=True)
class LogitNormalIndex:
    """``u = sigmoid(N(mean, std))`` mapped to the table (SD3, Eq. 19 "lognorm")."""

    mean: float = 0.0
    std: float = 1.0

    def __call__(self, batch: int, num_steps: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        n = torch.randn(batch, generator=generator, device=_gen_device(generator, device))
        return _to_index(torch.sigmoid(self.mean + self.std * n), num_steps, device)


@dataclass(frozen=True)
class ModeIndex:
    """Mode sampling with heavy tails, ``u - s (cos^2(pi u / 2) - 1 + u)`` (SD3, Eq. 20)."""

    scale: float = 1.29

    def __call__(self, batch: int, num_steps: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        u = torch.rand(batch, generator=generator, device=_gen_device(generator, device))
        u = 1 - u - self.scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return _to_index(u, num_steps, device)
