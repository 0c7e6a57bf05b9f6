"""Per-sample schedule-index samplers: uniform over a range, logit-normal, mode (SD3 Sec. 3.1)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..messages import brief


class IndexSampler(Protocol):
    """Draws one schedule index per sample: ``sampler(batch, num_steps) -> (B,) int64``."""

    def __call__(self, batch: int, num_steps: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor: ...


def check_number(value: object, what: str, *, integer: bool = False) -> None:
    """A ``ValueError`` naming ``what`` unless ``value`` is a finite number (an int if
    ``integer``); bools are refused, as ``True`` is rarely meant as 1."""
    kinds = numbers.Integral if integer else numbers.Real  # numpy scalars included
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite {'integer' if integer else 'number'}, got "
                         f"{brief(value)}")


def _gen_device(generator: torch.Generator | None, device: torch.device | str | None):
    return generator.device if generator is not None else device


@dataclass(frozen=True)
class UniformIndex:
    """Index ``~ U{low, ..., high - 1}``; TSD-SR samples 50..949 (Alg. 1, line 11).

    Attributes:
        low: The first index drawn, an integer >= 0.
        high: One past the last index drawn (half-open ``[low, high)``), at most the schedule's
            ``num_steps``.
    """

    low: int = 50
    high: int = 950

    def __post_init__(self) -> None:
        check_number(self.low, "UniformIndex low", integer=True)
        check_number(self.high, "UniformIndex high", integer=True)
        if not 0 <= self.low < self.high:
            raise ValueError(f"UniformIndex range [{self.low}, {self.high}) is empty or starts "
                             "below 0 (half-open [low, high))")

    def __call__(self, batch: int, num_steps: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        if not 0 <= self.low < self.high <= num_steps:
            raise ValueError(f"index range [{self.low}, {self.high}) is not inside the schedule's "
                             f"[0, {num_steps})")
        idx = torch.randint(self.low, self.high, (batch,), generator=generator,
                            device=_gen_device(generator, device))
        return idx.to(device)


MODE_SCALE_MAX = 2 / (math.pi - 2)
"""The largest scale for which SD3's mode map ``f(u)`` stays monotone on [0, 1]."""


def _to_index(u: Tensor, num_steps: int, device) -> Tensor:
    # diffusers' SD3 training: indices = (u * num_train_timesteps).long() into the table.
    return (u * num_steps).long().clamp(0, num_steps - 1).to(device)


@dataclass(frozen=True)
class LogitNormalIndex:
    """``u = sigmoid(N(mean, std))`` mapped to the table (SD3, Eq. 19 "lognorm").

    A field outside its range below is a ``ValueError`` at construction (a NaN ``mean`` would
    draw index 0 for every sample).

    Attributes:
        mean: The normal's mean, finite.
        std: The normal's standard deviation, finite and > 0.
    """

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        check_number(self.mean, "LogitNormalIndex mean")
        check_number(self.std, "LogitNormalIndex std")
        if self.std <= 0:
            raise ValueError(f"LogitNormalIndex std must be > 0, got {self.std!r}")

    def __call__(self, batch: int, num_steps: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        n = torch.randn(batch, generator=generator, device=_gen_device(generator, device))
        return _to_index(torch.sigmoid(self.mean + self.std * n), num_steps, device)


@dataclass(frozen=True)
class ModeIndex:
    """Mode sampling with heavy tails, ``u - s (cos^2(pi u / 2) - 1 + u)`` (SD3, Eq. 20).

    Attributes:
        scale: ``s``; the map is a density on [0, 1] only for ``-1 <= scale <= 2 / (pi - 2)``
            (SD3, Sec. 3.1); outside it (or NaN, which drew index 0 for every sample) it is a
            ``ValueError``.
    """

    scale: float = 1.29

    def __post_init__(self) -> None:
        check_number(self.scale, "ModeIndex scale")
        if not -1.0 <= self.scale <= MODE_SCALE_MAX:
            raise ValueError(f"ModeIndex scale must be in [-1, 2 / (pi - 2) = "
                             f"{MODE_SCALE_MAX:.4f}] (SD3 Eq. 20 is monotone only there), got "
                             f"{self.scale!r}")

    def __call__(self, batch: int, num_steps: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        u = torch.rand(batch, generator=generator, device=_gen_device(generator, device))
        u = 1 - u - self.scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return _to_index(u, num_steps, device)
