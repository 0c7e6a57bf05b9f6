"""Real-ESRGAN second-order degradation (Wang et al., ICCVW 2021): (B,3,H,W) -> (B,3,H/s,W/s)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import kornia
import torch
import torch.nn.functional as F

from .jpeg_codecs import JPEG_CODECS, compress
from .kernels import (
    KernelConfig,
    choice,
    filter2d,
    random_kernel,
    random_sinc_kernel,
    trim_kernel,
    uniform,
)

RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclass(frozen=True)
class StageConfig:
    """One degradation order: blur, random resize, noise, JPEG; defaults are stage 1's numbers."""

    kernel: KernelConfig = field(default_factory=KernelConfig)
    blur_prob: float = 1.0
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5  # else Poisson noise
    gaussian_sigma_range: tuple[float, float] = (1.0, 30.0)  # on the 0-255 scale
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    grey_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)  # drawn as a float, as Real-ESRGAN does


def _second_stage() -> StageConfig:
    return StageConfig(
        kernel=KernelConfig(sigma_range=(0.2, 1.5)),
        blur_prob=0.8,
        resize_probs=(0.3, 0.4, 0.3),
        resize_range=(0.3, 1.2),
        gaussian_sigma_range=(1.0, 25.0),
        poisson_scale_range=(0.05, 2.5),
    )


@dataclass(frozen=True)
class DegradationConfig:
    """Real-ESRGAN x4 pipeline as SeeSR/OSEDiff set it up (Wang et al. 2021), with step switches."""

    scale: int = 4
    first: StageConfig = field(default_factory=StageConfig)
    second: StageConfig = field(default_factory=_second_stage)
    final_sinc_prob: float = 0.8
    final_sinc_cutoff: tuple[float, float] = (math.pi / 3, math.pi)
    resize_modes: tuple[str, ...] = RESIZE_MODES
    usm_sharpen_hq: bool = False
    # Real-ESRGAN's simulated codec (basicsr DiffJPEG), or the real one (Pillow's libjpeg, at the
    # quality rounded to an integer; every JPEG output then sits on 8-bit levels).
    jpeg_codec: str = "diffjpeg"
    blur: bool = True  # every kernel, the final sinc included
    resize: bool = True  # the random-scale resizes; the final resize to H/s always happens
    noise: bool = True
    jpeg: bool = True
    stage2: bool = True

    def __post_init__(self) -> None:
        if self.jpeg_codec not in JPEG_CODECS:
            raise ValueError(f"jpeg_codec must be one of {JPEG_CODECS}, got {self.jpeg_codec!r}")


@dataclass(frozen=True)
class NoiseParams:
    """Gaussian (level = σ on the 0-255 scale) or Poisson (level = scale) noise of one sample."""

    gaussian: bool
    level: float
    grey: bool


@dataclass(frozen=True)
class StageParams:
    """One sample's draw for one order; None means the step is skipped."""

    kernel: torch.Tensor | None  # (k,k) float64
    resize: tuple[float, str] | None  # scale, interpolation mode
    noise: NoiseParams | None
    jpeg_quality: float | None


@dataclass(frozen=True)
class SampleParams:
    """All random choices for one sample of the two-order pipeline (Wang et al. 2021, Fig. 2)."""

    first: StageParams
    second: StageParams | None
    final_mode: str
    sinc: torch.Tensor | None  # (k,k) float64
    jpeg_last: bool  # second-order JPEG after (True) or before the final resize + sinc


class Degraded(NamedTuple):
    """The HQ target (B,3,H,W), USM-sharpened if configured, and its LQ (B,3,H/s,W/s)."""

    hq: torch.Tensor
    lq: torch.Tensor


def sample_params(
    batch_size: int, config: DegradationConfig, generator: torch.Generator | None = None
) -> list[SampleParams]:
    """Independent random parameters for each of `batch_size` samples (Wang et al. 2021)."""
    return [_sample_one(config, generator) for _ in range(batch_size)]


def _sample_one(config: DegradationConfig, g: torch.Generator | None) -> SampleParams:
    first = _sample_stage(config, config.first, g)
    second = _sample_stage(config, config.second, g) if config.stage2 else None
    final_mode = config.resize_modes[choice(g, [1.0] * len(config.resize_modes))]
    sinc = None
    if config.blur and uniform(g, 0.0, 1.0) < config.final_sinc_prob:
        sinc = random_sinc_kernel(g, config.second.kernel, cutoff=config.final_sinc_cutoff)
    # Real-ESRGAN puts the last JPEG before or after the final resize + sinc with equal odds.
    jpeg_last = uniform(g, 0.0, 1.0) < 0.5
    return SampleParams(first, second, final_mode, sinc, jpeg_last)


def _sample_stage(
    config: DegradationConfig, stage: StageConfig, g: torch.Generator | None
) -> StageParams:
    kernel = None
    if config.blur and uniform(g, 0.0, 1.0) < stage.blur_prob:
        kernel = random_kernel(g, stage.kernel)
    resize = None
    if config.resize:
        low, high = stage.resize_range
        direction = choice(g, stage.resize_probs)  # up, down, keep
        scale = 1.0 if direction == 2 else uniform(g, *((1.0, high), (low, 1.0))[direction])
        resize = (scale, config.resize_modes[choice(g, [1.0] * len(config.resize_modes))])
    noise = None
    if config.noise:
        gaussian = uniform(g, 0.0, 1.0) < stage.gaussian_noise_prob
        level_range = stage.gaussian_sigma_range if gaussian else stage.poisson_scale_range
        grey = uniform(g, 0.0, 1.0) < stage.grey_noise_prob
        noise = NoiseParams(gaussian, uniform(g, *level_range), grey)
    quality = uniform(g, *stage.jpeg_range) if config.jpeg else None
    return StageParams(kernel, resize, noise, quality)


def degrade(
    hq: torch.Tensor,
    config: DegradationConfig | None = None,
    generator: torch.Generator | None = None,
    params: list[SampleParams] | None = None,
) -> Degraded:
    """HQ (B,3,H,W) in [0,1] -> LQ (B,3,H/s,W/s) on 8-bit levels (Wang et al. 2021, Sec. 3)."""
    config = config or DegradationConfig()
    _check_input(hq, config.scale)
    if config.usm_sharpen_hq:
        hq = usm_sharpen(hq)
    if params is None:
        params = sample_params(hq.shape[0], config, generator)
    elif len(params) != hq.shape[0]:
        raise ValueError(f"{len(params)} parameter sets for a batch of {hq.shape[0]}")
    out_size = (hq.shape[-2] // config.scale, hq.shape[-1] // config.scale)
    first_kernels = [p.first.kernel for p in params]
    x = hq
    if any(k is not None for k in first_kernels):
        # All samples still share the HQ size here, so the first blur is one grouped convolution.
        x = filter2d(hq, torch.stack([_or_identity(k, first_kernels) for k in first_kernels]))
    # After the first random resize the sizes differ per sample, so the rest runs per sample.
    lq = [_degrade_one(x[i : i + 1], p, out_size, config.jpeg_codec, generator)
          for i, p in enumerate(params)]
    return Degraded(hq=hq, lq=torch.cat(lq))


def _check_input(hq: torch.Tensor, scale: int) -> None:
    if hq.ndim != 4 or hq.shape[1] != 3 or not hq.is_floating_point():
        raise ValueError(f"expected a float (B,3,H,W) tensor, got {hq.dtype} {tuple(hq.shape)}")
    if hq.shape[-2] % scale or hq.shape[-1] % scale:
        raise ValueError(f"H and W must be multiples of {scale}, got {tuple(hq.shape[-2:])}")


def _or_identity(kernel: torch.Tensor | None, kernels: list[torch.Tensor | None]) -> torch.Tensor:
    if kernel is not None:
        return kernel
    size = next(k for k in kernels if k is not None).shape[-1]
    identity = torch.zeros(size, size, dtype=torch.float64)
    identity[size // 2, size // 2] = 1.0
    return identity


def _degrade_one(
    x: torch.Tensor,
    p: SampleParams,
    out_size: tuple[int, int],
    codec: str,
    g: torch.Generator | None,
) -> torch.Tensor:
    """One sample (1,3,H,W), already blurred once, -> (1,3,h,w) at `out_size`."""
    if p.first.resize is not None:
        scale, mode = p.first.resize
        x = F.interpolate(x, scale_factor=scale, mode=mode)
    x = add_noise(x, p.first.noise, g)
    x = compress(x, p.first.jpeg_quality, codec)
    last_quality = None
    if p.second is not None:
        x = _blur(x, p.second.kernel)
        if p.second.resize is not None:
            scale, mode = p.second.resize
            # The second resize is relative to the final LQ size, not to the current size.
            x = F.interpolate(x, size=tuple(max(1, int(s * scale)) for s in out_size), mode=mode)
        x = add_noise(x, p.second.noise, g)
        last_quality = p.second.jpeg_quality
    if not p.jpeg_last:
        x = compress(x, last_quality, codec)
    x = _blur(F.interpolate(x, size=out_size, mode=p.final_mode), p.sinc)
    if p.jpeg_last:
        x = compress(x, last_quality, codec)
    return quantise(x)


def _blur(x: torch.Tensor, kernel: torch.Tensor | None) -> torch.Tensor:
    return x if kernel is None else filter2d(x, trim_kernel(kernel)[None])


def add_noise(
    x: torch.Tensor, noise: NoiseParams | None, g: torch.Generator | None
) -> torch.Tensor:
    """(B,3,H,W) plus Gaussian or Poisson noise, clamped to [0,1] (Wang et al. 2021, Sec. 3.2)."""
    if noise is None:
        return x
    device = x.device if g is None else g.device
    if noise.gaussian:
        shape = (x.shape[0], 1 if noise.grey else 3, *x.shape[-2:])
        draw = torch.randn(shape, generator=g, device=device, dtype=x.dtype).to(x.device)
        delta = draw * (noise.level / 255.0)
    else:
        image = kornia.color.rgb_to_grayscale(x) if noise.grey else x
        image = quantise(image)
        # Photon counts scale with the number of grey levels in use, rounded up to a power of 2.
        levels = _levels_in_use(image)
        counts = torch.poisson((image * levels).to(device), generator=g).to(x.device)
        delta = (counts / levels - image) * noise.level
    return (x + delta).clamp(0.0, 1.0)


def _levels_in_use(image: torch.Tensor) -> torch.Tensor:
    """(B,1,1,1) count of distinct 8-bit levels per sample, rounded up to a power of 2."""
    b = image.shape[0]
    offsets = 256 * torch.arange(b, device=image.device)[:, None]  # one bin range per sample
    codes = (image * 255).round().long().flatten(1) + offsets
    counts = torch.bincount(codes.flatten(), minlength=256 * b).view(b, 256).count_nonzero(dim=1)
    return torch.exp2(torch.log2(counts.to(image.dtype)).ceil()).view(b, 1, 1, 1)


def quantise(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0,1] and round to the 8-bit levels k/255, any shape."""
    return (x.clamp(0.0, 1.0) * 255.0).round() / 255.0


def usm_sharpen(
    x: torch.Tensor, radius: int = 50, weight: float = 0.5, threshold: float = 10.0
) -> torch.Tensor:
    """(B,3,H,W) unsharp mask of Real-ESRGAN, basicsr's ``USMSharp(radius)`` (Wang et al. 2021).

    As basicsr: an even radius is raised by one and used as the kernel SIZE (radius 50 -> 51 px),
    with OpenCV's default sigma for that size (``getGaussianKernel(51, 0)``: sigma 8).
    """
    size = radius + 1 if radius % 2 == 0 else radius
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8

    def blur(t: torch.Tensor) -> torch.Tensor:
        return kornia.filters.gaussian_blur2d(
            t, (size, size), (sigma, sigma), border_type="reflect"
        )

    residual = x - blur(x)
    # Sharpen only where detail exceeds the threshold, so flat regions gain no amplified noise.
    soft_mask = blur((residual.abs() * 255 > threshold).to(x.dtype))
    sharp = (x + weight * residual).clamp(0.0, 1.0)
    return soft_mask * sharp + (1 - soft_mask) * x


def upsample_lq(
    lq: torch.Tensor, size: tuple[int, int] | None = None, scale: int = 4
) -> torch.Tensor:
    """LQ (B,3,h,w) bicubic-upsampled to `size` or (s·h, s·w), clamped: TSD-SR's input."""
    size = size or (lq.shape[-2] * scale, lq.shape[-1] * scale)
    return F.interpolate(lq, size=size, mode="bicubic", align_corners=False).clamp(0.0, 1.0)
