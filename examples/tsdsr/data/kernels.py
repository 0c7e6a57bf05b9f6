"""Real-ESRGAN blur kernels (Wang et al., ICCVW 2021, Sec. 3.2): (k,k) float64, sum 1; filtering."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KERNEL_TYPES = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)


@dataclass(frozen=True)
class KernelConfig:
    """Ranges and probabilities of one stage's random kernel (Real-ESRGAN, Wang et al. 2021)."""

    sigma_range: tuple[float, float] = (0.2, 3.0)
    type_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # order of KERNEL_TYPES
    generalized_beta_range: tuple[float, float] = (0.5, 4.0)
    plateau_beta_range: tuple[float, float] = (1.0, 2.0)
    sinc_prob: float = 0.1
    sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    # Real-ESRGAN narrows the sinc cutoff for small kernels, which cannot hold a low cutoff.
    sinc_cutoff_small: tuple[float, float] = (math.pi / 3, math.pi)
    sinc_cutoff_large: tuple[float, float] = (math.pi / 5, math.pi)
    sinc_large_from: int = 13
    pad_to: int = 21


def uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    """One float drawn uniformly from [low, high) with `generator`."""
    u = torch.rand((), generator=generator, device=_device(generator), dtype=torch.float64)
    return low + (high - low) * float(u)


def randint(generator: torch.Generator | None, low: int, high: int) -> int:
    """One integer drawn uniformly from [low, high], both ends included."""
    return int(torch.randint(low, high + 1, (), generator=generator, device=_device(generator)))


def choice(generator: torch.Generator | None, probs: Sequence[float]) -> int:
    """An index drawn with the (unnormalised) probabilities `probs`."""
    weights = torch.tensor(probs, dtype=torch.float64, device=_device(generator))
    return int(torch.multinomial(weights, 1, generator=generator))


def _device(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """(size,size) map of c^T Σ^-1 c on the centred pixel grid, Σ = R diag(σx², σy²) R^T."""
    if size % 2 != 1:
        raise ValueError(f"kernel size must be odd, got {size}")
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    cos, sin = math.cos(theta), math.sin(theta)
    # Rotating the grid by -theta makes the covariance diagonal.
    u = cos * x + sin * y
    v = -sin * x + cos * y
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def _normalise(kernel: torch.Tensor) -> torch.Tensor:
    return kernel / kernel.sum()


def gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0
) -> torch.Tensor:
    """(size,size) bivariate Gaussian exp(-q/2), isotropic if sigma_y is None (Wang et al. 2021)."""
    q = _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
    return _normalise(torch.exp(-0.5 * q))


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
) -> torch.Tensor:
    """(size,size) generalized Gaussian exp(-q^β/2) of Real-ESRGAN (Wang et al. 2021, Eq. 2)."""
    q = _quadratic_form(size, sigma_x, sigma_y, theta)
    return _normalise(torch.exp(-0.5 * q.pow(beta)))


def plateau_kernel(
    size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
) -> torch.Tensor:
    """(size,size) plateau-shaped kernel 1/(1+q^β) of Real-ESRGAN (Wang et al. 2021, Eq. 3)."""
    q = _quadratic_form(size, sigma_x, sigma_y, theta)
    return _normalise(1.0 / (1.0 + q.pow(beta)))


def sinc_kernel(size: int, cutoff: float) -> torch.Tensor:
    """(size,size) 2-D circular low-pass ωJ1(ωr)/(2πr), cutoff ω in rad/pixel (Wang et al. 2021)."""
    if size % 2 != 1:
        raise ValueError(f"kernel size must be odd, got {size}")
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    r = torch.sqrt(x**2 + y**2)
    safe_r = torch.where(r == 0, torch.ones_like(r), r)
    kernel = cutoff * torch.special.bessel_j1(cutoff * safe_r) / (2 * math.pi * safe_r)
    # The r -> 0 limit of ωJ1(ωr)/(2πr) is ω²/(4π).
    kernel = torch.where(r == 0, torch.full_like(r, cutoff**2 / (4 * math.pi)), kernel)
    return _normalise(kernel)


def pad_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a centred odd (k,k) kernel to (size,size) so that a batch of kernels stacks."""
    pad = (size - kernel.shape[-1]) // 2
    if pad < 0 or kernel.shape[-1] % 2 != size % 2:
        raise ValueError(f"cannot pad a {tuple(kernel.shape)} kernel to {size}")
    return F.pad(kernel, (pad, pad, pad, pad))


def random_sinc_kernel(
    generator: torch.Generator | None, config: KernelConfig, cutoff: tuple[float, float] | None
) -> torch.Tensor:
    """(pad_to,pad_to) sinc kernel of random odd size; cutoff range by size unless given."""
    size = config.sizes[choice(generator, [1.0] * len(config.sizes))]
    if cutoff is None:
        large = size >= config.sinc_large_from
        cutoff = config.sinc_cutoff_large if large else config.sinc_cutoff_small
    return pad_kernel(sinc_kernel(size, uniform(generator, *cutoff)), config.pad_to)


def random_kernel(generator: torch.Generator | None, config: KernelConfig) -> torch.Tensor:
    """(pad_to,pad_to) kernel from Real-ESRGAN's random mixture (Wang et al. 2021, Sec. 3.2)."""
    if uniform(generator, 0.0, 1.0) < config.sinc_prob:
        return random_sinc_kernel(generator, config, cutoff=None)
    size = config.sizes[choice(generator, [1.0] * len(config.sizes))]
    kind = KERNEL_TYPES[choice(generator, config.type_probs)]
    sigma_x = uniform(generator, *config.sigma_range)
    if kind.endswith("aniso"):
        sigma_y = uniform(generator, *config.sigma_range)
        theta = uniform(generator, -math.pi, math.pi)
    else:
        sigma_y, theta = sigma_x, 0.0
    if kind.startswith("generalized"):
        beta = random_beta(generator, config.generalized_beta_range)
        kernel = generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, beta)
    elif kind.startswith("plateau"):
        beta = random_beta(generator, config.plateau_beta_range)
        kernel = plateau_kernel(size, sigma_x, sigma_y, theta, beta)
    else:
        kernel = gaussian_kernel(size, sigma_x, sigma_y, theta)
    return pad_kernel(kernel, config.pad_to)


def random_beta(generator: torch.Generator | None, beta_range: tuple[float, float]) -> float:
    """β as basicsr draws it: U(low, 1) or U(1, high) with equal odds, whatever the range.

    With the plateau range [1, 2] half the draws are β = 1 exactly (U(1, 1)); with the
    generalized range [0.5, 4] peaky (β < 1) and flat-topped (β > 1) shapes are balanced.
    """
    low, high = beta_range
    below = uniform(generator, 0.0, 1.0) < 0.5
    return uniform(generator, low, 1.0) if below else uniform(generator, 1.0, high)


def trim_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """(k,k) -> (k',k') without all-zero outer rings: the same filter, cheaper to apply."""
    centre = kernel.shape[-1] // 2
    offsets = torch.nonzero(kernel) - centre
    radius = int(offsets.abs().max())
    return kernel[centre - radius : centre + radius + 1, centre - radius : centre + radius + 1]


def filter2d(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Filter (B,C,H,W) with one centrosymmetric (k,k) kernel per sample, kernels (B,k,k)."""
    b, c, h, w = x.shape
    pad = kernels.shape[-1] // 2
    # Reflection needs more pixels than the padding; tiny intermediate images fall back to edges.
    mode = "reflect" if pad < min(h, w) else "replicate"
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    weight = kernels.to(x).repeat_interleave(c, dim=0)[:, None]
    out = F.conv2d(padded.reshape(1, b * c, *padded.shape[-2:]), weight, groups=b * c)
    return out.view(b, c, h, w)
