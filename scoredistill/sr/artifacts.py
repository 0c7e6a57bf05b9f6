"""Measures of the two artifacts one-step SR users report: a grid at the VAE x patch period, and
seams where tiles meet.

* :func:`grid_score`: the power at the period's harmonics against the neighbouring frequencies,
  in dB (0 dB: no periodic excess). SD3 students show a 16 px grid (the VAE's 8 px latent grid
  times the transformer's 2 x 2 patches; Microtreei/TSD-SR issues 7 and 17).
* :func:`seam_error`: the tiled result's error against the untiled one along the tile borders,
  in excess of its error elsewhere.
* :func:`seam_gradient_excess`: without an untiled result, the gradient across the border
  lines against the gradient across the lines next to them.
* :func:`seam_lines`: where the pipeline's tiles meet, in px of the image the model works on.

All take images (B, C, H, W) in [0, 1] and give one value per image, (B,).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import Tensor

from scoredistill.sr.tiling import TileConfig, tile_starts
from scoredistill.sr.vae_tiling import plan_tiles

LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights: the grid is measured on brightness, where it shows."""
MIN_PERIODS = 4
"""A side must hold this many periods: the harmonics are then >= 4 bins apart, so each has
neighbours (at 2 bins and beyond, past the Hann window's main lobe) that are no harmonic's."""
BAND = 4
"""Neighbours of a harmonic: the bins 2..BAND away on each side (fewer when periods are few)."""
_DEFAULT_TILES = TileConfig()  # the pipeline's default tiles
_EPS = 1e-20  # power of a flat image (float64): a constant image scores 0 dB, not 0/0


def grid_score(images: Tensor, period: int = 16) -> Tensor:
    """Grid-artifact strength (B,) in dB of images (B, C, H, W) in [0, 1] (C = 3: luma; C = 1).

    Per axis, each line of the luma (mean removed, Hann-windowed) gives a power spectrum; they
    are averaged over the lines. At each harmonic ``k * N / period`` (k = 1 .. period/2 - 1, N
    the side cropped to a multiple of ``period``: the harmonics then fall on bins), the power is
    divided by the median power of the bins 2..BAND away. The score is 10 log10 of the mean of
    these ratios over both axes and all harmonics: about 0 dB without a grid, rising with its
    strength. ``period``: 16 for SD3 (8 px latent x 2 px patches), 8 for SD 1.x/2.x UNets.
    """
    if isinstance(period, bool) or not isinstance(period, int) or period < 4 or period % 2:
        raise ValueError(f"period must be an even integer >= 4 (16 for SD3, 8 for SD 1.x/2.x), "
                         f"got {period!r}")
    _check_images(images, "images")
    if min(images.shape[-2:]) < MIN_PERIODS * period:
        raise ValueError(f"grid_score needs images of at least {MIN_PERIODS * period} px a side "
                         f"({MIN_PERIODS} periods of {period} px), got "
                         f"{images.shape[-1]}x{images.shape[-2]}")
    x = images.double()
    if x.shape[1] == 3:
        x = (x * x.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = x[:, 0]
    ratios = torch.cat([_harmonic_ratios(x, period), _harmonic_ratios(x.mT, period)], dim=1)
    return (10 * ratios.mean(dim=1).log10()).float()


def _harmonic_ratios(x: Tensor, period: int) -> Tensor:
    """Power at each harmonic over its neighbours' median, along the last axis of (B, R, N)
    (R lines of N px) -> (B, period/2 - 1)."""
    n = x.shape[-1] // period * period
    bins = n // period  # bins between harmonics
    line = x[..., :n] - x[..., :n].mean(dim=-1, keepdim=True)
    # The periodic Hann window puts an on-bin tone into its bin and the two next to it only.
    line = line * torch.hann_window(n, periodic=True, dtype=x.dtype, device=x.device)
    power = torch.fft.rfft(line).abs().square().mean(dim=1)  # (B, n // 2 + 1)
    offsets = torch.arange(2, min(BAND, bins - 2) + 1, device=x.device)
    offsets = torch.cat([-offsets, offsets])
    peaks = torch.arange(1, period // 2, device=x.device) * bins
    neighbours = power[:, peaks[:, None] + offsets]  # (B, harmonics, 2 * len(offsets))
    return (power[:, peaks] + _EPS) / (neighbours.quantile(0.5, dim=-1) + _EPS)


def seam_error(tiled: Tensor, untiled: Tensor, rows: Sequence[int], cols: Sequence[int],
               width: int = 4) -> Tensor:
    """Seam error (B,): mean |tiled - untiled| within ``width`` px of the border lines minus
    its mean over the rest of the image (images (B, C, H, W) in [0, 1]).

    ``rows``/``cols``: the px rows/columns where tiles meet (a line at r lies between rows r - 1
    and r; :func:`seam_lines`). 0 when tiling changed nothing or changed it evenly everywhere;
    in the images' units (1/255: one 8-bit level).
    """
    _check_images(tiled, "tiled")
    _check_images(untiled, "untiled")
    if tiled.shape != untiled.shape:
        raise ValueError(f"tiled and untiled shapes differ: {tuple(tiled.shape)} vs "
                         f"{tuple(untiled.shape)}")
    band = _band(tiled.shape[-2:], rows, cols, width, tiled.device)
    if bool(band.all()):
        raise ValueError(f"the {width} px bands around the seams cover the whole "
                         f"{tiled.shape[-1]}x{tiled.shape[-2]} image: nothing to compare with; "
                         f"use a smaller width")
    error = (tiled.double() - untiled.double()).abs().mean(dim=1)  # (B, H, W)
    return (error[:, band].mean(dim=1) - error[:, ~band].mean(dim=1)).float()


def seam_gradient_excess(images: Tensor, rows: Sequence[int], cols: Sequence[int],
                         width: int = 4) -> Tensor:
    """Border-gradient excess (B,) of images (B, C, H, W) in [0, 1]: the mean |difference|
    across the border lines over that across the lines 2..``width`` px beside them, minus 1.

    About 0 for a seamless image, positive for a visible seam (1: the borders' steps are twice
    their neighbourhood's), negative where the borders are smoother than around them.
    """
    _check_images(images, "images")
    x = images.double().mean(dim=1)  # (B, H, W): a seam in any channel shows in the mean
    at, beside = [], []
    for lines, grad in ((rows, (x[:, 1:] - x[:, :-1]).abs().mean(dim=2)),
                        (cols, (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=1))):
        # grad[:, j] is the step between px j and j + 1, so a line at r is grad[:, r - 1].
        size = grad.shape[1] + 1
        _check_lines(lines, size)
        near = {r - 1 + d for r in lines for d in range(-width, width + 1)
                if 2 <= abs(d) <= width and 0 <= r - 1 + d < size - 1} - {r - 1 for r in lines}
        at += [grad[:, r - 1] for r in lines]
        beside += [grad[:, j] for j in sorted(near)]
    if not at:
        raise ValueError("no seam lines given: rows and cols are both empty")
    if not beside:
        raise ValueError("no lines beside the seams to compare with; use a larger width")
    ratio = (torch.stack(at).mean(0) + _EPS) / (torch.stack(beside).mean(0) + _EPS)
    return (ratio - 1).float()


def seam_lines(height: int, width: int, tiles: TileConfig = _DEFAULT_TILES, *, factor: int = 8,
               patch: int = 2) -> tuple[list[int], list[int]]:
    """The px rows and columns where :class:`~scoredistill.sr.pipeline.TSDSRPipeline`'s tiles
    meet in the ``height`` x ``width`` image the model works on (multiples of factor x patch).

    Transformer tiles (Gaussian-blended) meet mid-overlap; the tiled VAE's cores abut. ``factor``
    is the VAE's downsampling (8 for SD3), ``patch`` the transformer's patch size (2).
    """
    multiple = factor * patch
    if height % multiple or width % multiple:
        raise ValueError(f"image {height}x{width} must have sides that are multiples of "
                         f"{multiple} (VAE factor {factor} x patch {patch})")
    h, w = height // factor, width // factor
    rows: set[int] = set()
    cols: set[int] = set()
    if max(h, w) > tiles.latent:
        for side, lines in ((h, rows), (w, cols)):
            starts = tile_starts(side, tiles.latent, tiles.latent_overlap, patch)
            lines.update(round((a + b + tiles.latent) * factor / 2)
                         for a, b in pairwise(starts))
    for (size_h, size_w), tile, margin, grid, scale in (
            ((h, w), tiles.decoder, tiles.decoder_overlap, 1, factor),
            ((height, width), tiles.encoder, tiles.encoder_overlap, factor, 1)):
        if max(size_h, size_w) > tile:
            cores = plan_tiles(size_h, size_w, tile=tile, margin=margin, grid=grid)
            rows.update(t.core[0].start * scale for t in cores if t.core[0].start)
            cols.update(t.core[1].start * scale for t in cores if t.core[1].start)
    return sorted(rows), sorted(cols)


def _band(size: Sequence[int], rows: Sequence[int], cols: Sequence[int], width: int,
          device: torch.device) -> Tensor:
    """(H, W) mask of the px within ``width`` of a line (px r - width .. r + width - 1)."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer (px), got {width!r}")
    if not rows and not cols:
        raise ValueError("no seam lines given: rows and cols are both empty")
    masks = []
    for lines, n in ((rows, size[0]), (cols, size[1])):
        _check_lines(lines, n)
        pos = torch.arange(n, device=device)
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        for r in lines:
            mask |= (pos >= r - width) & (pos < r + width)
        masks.append(mask)
    return masks[0][:, None] | masks[1][None, :]


def _check_lines(lines: Sequence[int], size: int) -> None:
    bad = [r for r in lines if not 0 < r < size]
    if bad:
        raise ValueError(f"seam lines {bad} are not inside the image: a line lies between two "
                         f"px, so it must be in 1..{size - 1}")


def _check_images(images: Tensor, name: str) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a (B, 3, H, W) or (B, 1, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be float in [0, 1], got {images.dtype}: divide uint8 "
                         f"images by 255")
    if images.numel() and not (images.min() >= 0 and images.max() <= 1):  # also catches NaN
        raise ValueError(f"{name} must be in [0, 1], got values in [{images.min().item():.4g}, "
                         f"{images.max().item():.4g}]")
