"""Colour alignment of an SR output to its upsampled LQ input (StableSR, Wang et al. 2023).

One-step SR models drift in colour; keeping the input's colours while keeping the output's
detail removes that drift. TSD-SR's release applies `wavelet` by default and `adain` for its
evaluation checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

WAVELET_LEVELS = 5
_EPS = 1e-5


def wavelet_decompose(
    image: torch.Tensor, levels: int = WAVELET_LEVELS
) -> tuple[torch.Tensor, torch.Tensor]:
    """A trous wavelet split of (B,C,H,W) into (high, low) frequency bands that sum back."""
    low = image
    for level in range(levels):
        low = _dilated_blur(low, dilation=2**level)
    return image - low, low


def wavelet_color_fix(sr: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Output's wavelet high frequencies + input's low frequencies (StableSR) (B,3,H,W)."""
    _check_pair(sr, lq)
    high_sr, _ = wavelet_decompose(sr)
    _, low_lq = wavelet_decompose(lq)
    return high_sr + low_lq


def adain_color_fix(sr: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Give each channel of `sr` the mean/std of `lq` (AdaIN, Huang & Belongie 2017) (B,3,H,W)."""
    _check_pair(sr, lq)
    sr_mean, sr_std = _channel_stats(sr)
    lq_mean, lq_std = _channel_stats(lq)
    return (sr - sr_mean) / sr_std * lq_std + lq_mean


def no_color_fix(sr: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Leave the output as it is (B,3,H,W)."""
    _check_pair(sr, lq)
    return sr


COLOR_FIXES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "wavelet": wavelet_color_fix,
    "adain": adain_color_fix,
    "none": no_color_fix,
}


def color_fix(sr: torch.Tensor, lq: torch.Tensor, method: str = "wavelet") -> torch.Tensor:
    """Apply the colour alignment named `method` (wavelet, adain or none) (B,3,H,W); not clamped."""
    if method not in COLOR_FIXES:
        raise ValueError(f"unknown colour fix {method!r}; choose from {', '.join(COLOR_FIXES)}")
    return COLOR_FIXES[method](sr, lq)


def _dilated_blur(image: torch.Tensor, dilation: int) -> torch.Tensor:
    """3x3 binomial ([1,2,1]/4 outer itself) blur with holes of `dilation`, edges replicated."""
    taps = image.new_tensor([0.25, 0.5, 0.25])
    channels = image.shape[1]
    kernel = torch.outer(taps, taps).expand(channels, 1, 3, 3)
    padded = F.pad(image, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=dilation)


def _channel_stats(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and std over pixels, each (B,C,1,1)."""
    flat = image.flatten(2)
    mean = flat.mean(dim=2)[..., None, None]
    std = (flat.var(dim=2, unbiased=False) + _EPS).sqrt()[..., None, None]
    return mean, std


def _check_pair(sr: torch.Tensor, lq: torch.Tensor) -> None:
    if sr.ndim != 4:
        raise ValueError(f"expected (B,C,H,W) images; got shape {tuple(sr.shape)}")
    if sr.shape != lq.shape:
        raise ValueError(
            f"output {tuple(sr.shape)} and input {tuple(lq.shape)} differ; upsample the input first"
        )
