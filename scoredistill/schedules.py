"""Stateless noise schedules: rectified flow with SD3's shift, and variance-preserving DDPM."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def _check_index(index: Tensor, num_steps: int) -> Tensor:
    if index.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"schedule indices must be integers, got dtype {index.dtype}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_steps):
        raise ValueError(f"schedule index out of range [0, {num_steps - 1}]: "
                         f"min {int(index.min())}, max {int(index.max())}")
    return index


@dataclass(frozen=True)
class RectifiedFlow:
    """Rectified flow ``x_t = (1 - sigma) x0 + sigma eps`` with SD3's timestep shift.

    The discrete table equals diffusers' ``FlowMatchEulerDiscreteScheduler(shift)``:
    ``s_i = (N - i) / N``, ``sigma_i = shift s_i / (1 + (shift - 1) s_i)``, ``t_i = N sigma_i``
    (Esser et al. 2024, SD3, Eq. 23). Index 0 is ``t = N`` (pure noise).
    """

    shift: float = 3.0
    num_steps: int = 1000

    def sigmas(self, index: Tensor) -> Tensor:
        """Shifted sigma at schedule indices (float32, shape of ``index``)."""
        s = (self.num_steps - _check_index(index, self.num_steps).double()) / self.num_steps
        return (self.shift * s / (1 + (self.shift - 1) * s)).float()

    def timesteps(self, index: Tensor) -> Tensor:
        """Network timestep ``t = N * sigma`` at schedule indices."""
        return self.sigmas(index) * self.num_steps

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(1 - sigma, sigma)`` with ``sigma = t / N``."""
        sigma = t.float() / self.num_steps
        return 1.0 - sigma, sigma


def resolution_shift(image_seq_len: int, *, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift ``exp(mu)``, ``mu`` linear in the image token count.

    ``mu`` interpolates ``base_shift`` at ``base_seq_len`` tokens and ``max_shift`` at
    ``max_seq_len`` (diffusers' ``FluxPipeline``: ``calculate_shift``; the defaults are FLUX.1's
    scheduler config). The scheduler's exponential ``time_shift(mu, 1, s)`` is
    ``e^mu s / (1 + (e^mu - 1) s)``, SD3's shift formula with ``shift = e^mu``, so
    ``RectifiedFlow(shift=resolution_shift(n))`` is FLUX's table for ``n`` image tokens
    (1024 px FLUX.1: 4096 tokens, shift ``e^1.15 = 3.16``).
    """
    if image_seq_len < 1 or max_seq_len <= base_seq_len:
        raise ValueError(f"need image_seq_len >= 1 and max_seq_len > base_seq_len, got "
                         f"{image_seq_len}, {base_seq_len}, {max_seq_len}")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(base_shift + slope * (image_seq_len - base_seq_len))


def _scaled_linear_betas(n: int) -> Tensor:
    return torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=torch.float64) ** 2


@dataclass(frozen=True, eq=False)
class VariancePreserving:
    """DDPM's VP schedule ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (Ho et al. 2020).

    ``t`` is the integer training step 0..N-1 (0 = least noise); the table index runs the other
    way, ``t = N - 1 - index``, so that index 0 is the noisiest level like every schedule here.
    The default ``alphas_cumprod`` is Stable Diffusion 1.x/2.x's scaled-linear betas.
    """

    alphas_cumprod: Tensor = field(
        default_factory=lambda: torch.cumprod(1 - _scaled_linear_betas(1000), 0).float())

    def __post_init__(self) -> None:
        a = self.alphas_cumprod
        if a.ndim != 1 or not bool(((a > 0) & (a < 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D tensor with values in (0, 1)")

    @property
    def num_steps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VariancePreserving) and torch.equal(
            self.alphas_cumprod.cpu(), other.alphas_cumprod.cpu())

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> VariancePreserving:
        """Build from a diffusers DDPM/DDIM scheduler config (scaled_linear or linear betas)."""
        n = int(config.get("num_train_timesteps", 1000))
        kind = config.get("beta_schedule", "scaled_linear")
        lo, hi = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
        if kind == "scaled_linear":
            betas = torch.linspace(lo**0.5, hi**0.5, n, dtype=torch.float64) ** 2
        elif kind == "linear":
            betas = torch.linspace(lo, hi, n, dtype=torch.float64)
        else:
            raise ValueError(f"unsupported beta_schedule {kind!r}; pass alphas_cumprod directly")
        return cls(alphas_cumprod=torch.cumprod(1 - betas, 0).float())

    def timesteps(self, index: Tensor) -> Tensor:
        """Integer training step ``N - 1 - index`` as float32."""
        return (self.num_steps - 1 - _check_index(index, self.num_steps)).float()

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(sqrt(abar_t), sqrt(1 - abar_t))``; ``t`` must hold integer steps."""
        step = t.round().long()
        if not torch.equal(step.to(t.dtype), t):
            raise ValueError("VariancePreserving timesteps must be integer-valued")
        abar = self.alphas_cumprod.to(t.device)[_check_index(step, self.num_steps)]
        return abar.sqrt(), (1 - abar).sqrt()


def index_alpha_sigma(schedule: Any, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(t, alpha, sigma)`` at schedule indices, each float32 of ``index``'s shape."""
    t = schedule.timesteps(index)
    alpha, sigma = schedule.alpha_sigma(t)
    return t, alpha, sigma
