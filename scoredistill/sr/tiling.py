"""Tiled evaluation, so images of any size fit in memory.

TSD-SR's release tiles the transformer's latent (64 latent px, overlap 8) and blends the tiles
with Gaussian weights (as MultiDiffusion, Bar-Tal et al. 2023, averages overlapping windows):
:func:`tiled_apply`. It tiles the VAE encoder (1024 px) and decoder (224 latent px) the way of
the multidiffusion-upscaler project's tiled VAE: :mod:`scoredistill.sr.vae_tiling` partitions the
image into cores, runs each with a margin of context, and normalises every tile with the whole
image's GroupNorm statistics, so tiles do not drift in colour or brightness. Only the mid
block's attention (per tile) and the context beyond the margin differ from the untiled VAE.
An image within one tile is never tiled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from scoredistill.adapters.module import weights_dtype
from scoredistill.conditioning import tree_map
from scoredistill.protocols import Cond, ScoreModel
from scoredistill.sr.latents import (
    Posterior,
    check_posterior,
    decode,
    decoder_input,
    encode,
    one_step,
    posterior_latent,
)
from scoredistill.sr.vae_steps import decoder_network, encoder_network
from scoredistill.sr.vae_tiling import run_tiled

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

GAUSSIAN_STD = 0.1
"""Blending window std as a fraction of the tile side: weights fall to ~4e-6 at the tile edge,
so a tile's border (where its zero padding shows) barely counts wherever another tile covers it."""


@dataclass(frozen=True)
class TileConfig:
    """Tile sides and overlaps: transformer and decoder in latent px, encoder in image px.

    For the VAE, the side is a core's and the overlap is the margin of context around it.
    """

    latent: int = 64
    latent_overlap: int = 8
    encoder: int = 1024
    encoder_overlap: int = 64
    decoder: int = 224
    decoder_overlap: int = 16


def gaussian_weights(height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """Separable Gaussian window (1, 1, height, width) float32 centred on the tile."""

    def axis(n: int) -> Tensor:
        pos = torch.arange(n, dtype=torch.float32, device=device)
        return torch.exp(-0.5 * ((pos - (n - 1) / 2) / (GAUSSIAN_STD * n)) ** 2)

    return (axis(height)[:, None] * axis(width)[None, :])[None, None]


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Starts of the fewest tiles of side ``tile`` covering ``size`` with at least ``overlap``
    shared, spread evenly, each a multiple of ``align`` (size and tile must be multiples)."""
    if size % align or tile % align:
        raise ValueError(f"size {size} and tile {tile} must be multiples of {align}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile {tile})")
    if size <= tile:
        return [0]
    count = 1 + math.ceil((size - tile) / (tile - overlap))
    units = (size - tile) // align
    return [round(i * units / (count - 1)) * align for i in range(count)]


def tiled_apply(fn: Callable[[Tensor], Tensor], x: Tensor, *, tile: int, overlap: int,
                align: int = 1) -> Tensor:
    """``fn`` on overlapping ``tile`` x ``tile`` windows of ``x`` (B, C, H, W), blended (float32).

    ``fn`` may change the channels and scale the sides by a fixed factor (the VAE: 1/8 or 8);
    for a downscaling ``fn`` pass ``align`` = its factor so tiles start on output pixels.
    Within one tile, ``fn(x)`` is returned as it is. One window per call: :func:`tiled_map`.
    """
    return tiled_map(fn, [x], tile=tile, overlap=overlap, align=align, batch_size=1)[0]


@dataclass(frozen=True)
class _Window:
    item: int  # index into the inputs
    y: int
    x: int
    whole: bool  # the window is the whole input: its output is taken as it is


def tiled_map(fn: Callable[[Tensor], Tensor], xs: Sequence[Tensor], *, tile: int, overlap: int,
              align: int = 1, batch_size: int = 8) -> list[Tensor]:
    """:func:`tiled_apply` of ``fn`` to each of ``xs`` (each (B, C, H, W), sizes may differ),
    with the windows of all inputs batched: windows of equal shape are concatenated along the
    batch, at most ``batch_size`` windows per ``fn`` call, in input and row-major order.

    Each output equals ``tiled_apply(fn, x, ...)`` up to the rounding of a batched ``fn``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[tuple[int, ...], list[_Window]] = {}
    for i, x in enumerate(xs):
        height, width = x.shape[-2:]
        whole = height <= tile and width <= tile
        ys = [0] if whole else tile_starts(height, tile, overlap, align)
        x0s = [0] if whole else tile_starts(width, tile, overlap, align)
        for y in ys:
            for x0 in x0s:
                shape = x[..., y:y + tile, x0:x0 + tile].shape
                groups.setdefault(tuple(shape), []).append(_Window(i, y, x0, whole))
    out: list[Tensor | None] = [None] * len(xs)
    weight: list[Tensor | None] = [None] * len(xs)
    for windows in groups.values():
        for start in range(0, len(windows), batch_size):
            chunk = windows[start:start + batch_size]
            batch = torch.cat([xs[w.item][..., w.y:w.y + tile, w.x:w.x + tile] for w in chunk])
            pieces = fn(batch).split([xs[w.item].shape[0] for w in chunk])
            for w, piece in zip(chunk, pieces, strict=True):
                if w.whole:
                    out[w.item] = piece
                else:
                    _blend(piece.float(), w, xs[w.item], tile, out, weight)
    return [o if w is None else o / w for o, w in zip(out, weight, strict=True)]


def _blend(piece: Tensor, w: _Window, x: Tensor, tile: int, out: list[Tensor | None],
           weight: list[Tensor | None]) -> None:
    """Add ``piece`` (the output of window ``w`` of ``x``) with Gaussian weights into
    ``out[w.item]`` and its weight into ``weight[w.item]`` (allocated on first use)."""
    window = x[..., w.y:w.y + tile, w.x:w.x + tile]
    scale = Fraction(piece.shape[-2], window.shape[-2])
    if out[w.item] is None:
        height, width = x.shape[-2:]
        out[w.item] = piece.new_zeros(*piece.shape[:2], int(height * scale), int(width * scale))
        weight[w.item] = piece.new_zeros(1, 1, *out[w.item].shape[-2:])
    top, left = w.y * scale, w.x * scale
    if top.denominator != 1 or left.denominator != 1:
        raise ValueError(f"tile start ({w.y}, {w.x}) is not on the output grid; align it")
    gauss = gaussian_weights(*piece.shape[-2:], device=piece.device)
    region = (..., slice(int(top), int(top) + piece.shape[-2]),
              slice(int(left), int(left) + piece.shape[-1]))
    out[w.item][region] += piece * gauss
    weight[w.item][region] += gauss


def vae_factor(vae: AutoencoderKL) -> int:
    """The VAE's spatial downsampling factor (8 for SD3's four blocks)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def tiled_encode(vae: AutoencoderKL, image: Tensor, *, tile: int = 1024, overlap: int = 64,
                 posterior: Posterior = "mode", generator: torch.Generator | None = None,
                 offload: bool = True, batch_size: int = 1, compile: bool = False) -> Tensor:
    """:func:`~scoredistill.sr.latents.encode` of (B, 3, H, W) in [-1, 1] by image tiles.

    Cores of side <= ``tile`` px, each run with ``overlap`` px of context around it (rounded up
    to the VAE factor; the sides must be multiples of it) and whole-image GroupNorm statistics
    (:func:`~scoredistill.sr.vae_tiling.run_tiled`, ``batch_size`` tiles per call); ``offload``
    keeps the waiting tiles on the CPU (a no-op there); ``compile`` compiles the norms (see
    ``run_tiled``). The posterior and SD3's shift and scale apply to the assembled moments.
    """
    if max(image.shape[-2:]) <= tile:
        return encode(vae, image, posterior=posterior, generator=generator)
    check_posterior(posterior)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = run_tiled(encoder_network(vae), image.to(weights_dtype(vae)), tile=tile,
                        margin=overlap, offload=offload, batch_size=batch_size,
                        compile=compile)
    return posterior_latent(vae, DiagonalGaussianDistribution(moments), posterior, generator)


def tiled_decode(vae: AutoencoderKL, latent: Tensor, *, tile: int = 224, overlap: int = 16,
                 offload: bool = True, batch_size: int = 1, compile: bool = False) -> Tensor:
    """:func:`~scoredistill.sr.latents.decode` of (B, 16, h, w) by latent tiles, in [-1, 1].

    Cores of side <= ``tile`` latent px, each run with ``overlap`` latent px of context and
    whole-image GroupNorm statistics; ``offload``, ``batch_size`` and ``compile`` as in
    :func:`tiled_encode`.
    """
    if max(latent.shape[-2:]) <= tile:
        return decode(vae, latent)
    image = run_tiled(decoder_network(vae), decoder_input(vae, latent), tile=tile,
                      margin=overlap, offload=offload, batch_size=batch_size, compile=compile)
    return image.float().clamp(-1.0, 1.0)


def tiled_one_step(student: ScoreModel, z_lq: Tensor, cond: Cond, *, tile: int = 64,
                   overlap: int = 8, align: int = 2, batch_size: int = 1) -> Tensor:
    """:func:`~scoredistill.sr.latents.one_step` by latent tiles (``align``: the patch size),
    ``batch_size`` tiles per transformer call; ``cond`` has batch 1 or that of ``z_lq``."""
    return tiled_map(lambda z: one_step(student, z, _repeat(cond, z.shape[0])), [z_lq],
                     tile=tile, overlap=overlap, align=align, batch_size=batch_size)[0]


def _repeat(cond: Cond, batch: int) -> Cond:
    """``cond`` of batch 1 (expanded) or of a divisor of ``batch`` (repeated) at ``batch``."""
    return tree_map(lambda c: c.expand(batch, *c.shape[1:]) if c.shape[0] == 1
                    else c.repeat(batch // c.shape[0], *[1] * (c.ndim - 1)), cond)
