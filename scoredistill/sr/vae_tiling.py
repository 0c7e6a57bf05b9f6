"""Run a VAE half (:class:`~scoredistill.sr.vae_steps.Network`) by tiles with the whole image's
GroupNorm statistics.

The design of the multidiffusion-upscaler project's tiled VAE, which TSD-SR's release uses: the
image is partitioned into core tiles on the network's grid, each run with a margin of real
context around it that is cropped off at the end (no blending). All tiles advance together from
one GroupNorm to the next. At each, the tiles' per-sample, per-group means and variances over
their own cores (scaled to the current resolution) are pooled into the whole image's (Chan et
al.'s parallel formula, float32 or wider), and every tile is normalised with those: no tile
drifts in colour or brightness. Between GroupNorms the tiles can wait on the CPU (``offload``),
so that the accelerator holds one tile at a time.

What still differs from the untiled network: the mid block's attention sees its own tile only,
and zero padding at a tile's edge reaches its core where the margin is below
:func:`~scoredistill.sr.vae_steps.exact_margin`. Without attention and with that margin, tiles
give the untiled result to rounding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scoredistill.sr.vae_steps import Add, Attend, Local, Network, Norm, Save

HOST = torch.device("cpu")
"""Where tiles wait between GroupNorms with ``offload``. The memory planner, which traces an
accelerator's work with CPU kernels, sets it to "meta" so that it can tell the two apart."""

Span = tuple[slice, slice]
"""Rows and columns of a rectangle, in px."""
_Op = Local | Attend | Save | Add  # the steps between GroupNorms


@dataclass(frozen=True)
class Tile:
    """A core (the input px whose outputs this tile gives) and its window (the core plus the
    margin, clipped to the image), both in input px."""

    core: Span
    window: Span


def _cuts(size: int, tile: int, grid: int) -> list[int]:
    # The fewest near-equal cores of at most `tile` px (at least one grid unit) on the grid.
    units, per = size // grid, max(tile // grid, 1)
    count = math.ceil(units / per)
    return [i * units // count * grid for i in range(count + 1)]


def plan_tiles(height: int, width: int, *, tile: int, margin: int, grid: int = 1) -> list[Tile]:
    """Core tiles of side <= ``tile`` partitioning a ``height`` x ``width`` image, row-major, with
    windows ``margin`` px wider (rounded up to ``grid``, which the sides must be multiples of)."""
    if height % grid or width % grid:
        raise ValueError(f"image {height}x{width} must have sides that are multiples of {grid}")
    if tile < 1 or margin < 0:
        raise ValueError(f"need tile >= 1 and margin >= 0, got {tile} and {margin}")
    margin = math.ceil(margin / grid) * grid

    def window(a: int, b: int, size: int) -> slice:
        return slice(max(a - margin, 0), min(b + margin, size))

    return [Tile((slice(y0, y1), slice(x0, x1)), (window(y0, y1, height), window(x0, x1, width)))
            for y0, y1 in pairwise(_cuts(height, tile, grid))
            for x0, x1 in pairwise(_cuts(width, tile, grid))]


@dataclass(eq=False)
class _TileState:
    """A batch of tiles with equal windows and cores within them, concatenated along the batch
    (k tiles x B samples), and their residual branches."""

    tiles: list[Tile]
    h: Tensor
    saved: list[Tensor] = field(default_factory=list)


def _batches(tiles: list[Tile], batch_size: int) -> list[list[Tile]]:
    """Tiles grouped by window shape and core position in the window (so one slice takes every
    core of a group), at most ``batch_size`` per group, in first-seen order."""
    groups: dict[tuple[int, ...], list[Tile]] = {}
    for t in tiles:
        (wy, wx), (cy, cx) = t.window, t.core
        key = (wy.stop - wy.start, wx.stop - wx.start, cy.start - wy.start, cy.stop - wy.start,
               cx.start - wx.start, cx.stop - wx.start)
        groups.setdefault(key, []).append(t)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def run_tiled(net: Network, x: Tensor, *, tile: int, margin: int,
              offload: bool = False, batch_size: int = 1, compile: bool = False) -> Tensor:
    """``net`` on (B, C, H, W) by core tiles of side <= ``tile`` with ``margin`` px of context
    (input px, rounded up to ``net.grid``) -> (B, C', H * net.scale, W * net.scale).

    ``x`` has the network's dtype; the tiles run on its device, up to ``batch_size`` of equal
    shape per call, and wait on the CPU between GroupNorms if ``offload``. One tile covering
    ``x`` gives the untiled network. ``compile``: each GroupNorm (with the whole image's
    statistics) and the SiLU after it run as one torch.compile'd kernel with dynamic shapes,
    so every norm, tile shape and image size shares a few graphs; the convolutions stay cuDNN's.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tiles = plan_tiles(*x.shape[-2:], tile=tile, margin=margin, grid=net.grid)
    store = HOST if offload else x.device
    states = [_TileState(group, torch.cat([x[(..., *t.window)] for t in group]))
              for group in _batches(tiles, batch_size)]
    normalise = _compiled_normalise() if compile else _normalise
    pending: tuple[Tensor, Tensor, nn.GroupNorm] | None = None
    for steps, norm, px in _segments(net):
        moments = []
        silu = pending is not None and bool(steps) and _is_silu(steps[0])
        for state in states:
            h = state.h.to(x.device)
            if pending is not None:
                mean, var, last = pending
                h = normalise(h, mean, var, last.weight, last.bias, last.num_groups, last.eps,
                              silu)
            for step in steps[1:] if silu else steps:
                h = _run(step, h, state, store)
            if norm is not None:
                moments.append(_moments(h[(..., *_within(state.tiles[0], px))],
                                        norm.num_groups, len(state.tiles)))
            state.h = h.to(store)
        pending = None if norm is None else (*_pool(moments), norm)
    return _assemble(states, net.px[-1], x)


def _segments(net: Network) -> list[tuple[list[_Op], nn.GroupNorm | None, Fraction]]:
    # The steps up to each GroupNorm, that norm and the px size there; then the rest.
    segments, current = [], []
    for step, px in zip(net.steps, net.px[:-1], strict=True):
        if isinstance(step, Norm):
            segments.append((current, step.norm, px))
            current = []
        else:
            current.append(step)
    segments.append((current, None, net.px[-1]))
    return segments


def _run(step: _Op, h: Tensor, state: _TileState, store: torch.device) -> Tensor:
    if isinstance(step, Save):
        state.saved.append(h.to(store))
        return h
    if isinstance(step, Add):
        saved = state.saved.pop().to(h.device)
        if step.shortcut is not None:
            saved = step.shortcut(saved)
        return (saved + h) / step.divisor
    return step.fn(h)


def _px_slice(span: slice, px: Fraction, origin: int = 0) -> slice:
    start, stop = (Fraction(v - origin) / px for v in (span.start, span.stop))
    if start.denominator != 1 or stop.denominator != 1:
        raise ValueError(f"{span} is off the {px} px grid")  # plan_tiles rules this out
    return slice(int(start), int(stop))


def _within(t: Tile, px: Fraction) -> Span:
    """The core's rows and columns in the tile's own px of side ``px``."""
    return (_px_slice(t.core[0], px, t.window[0].start),
            _px_slice(t.core[1], px, t.window[1].start))


def _accumulate(h: Tensor) -> torch.dtype:
    # Statistics in float32 at least, as GroupNorm keeps them for half-precision inputs.
    return torch.promote_types(h.dtype, torch.float32)


def _moments(core: Tensor, groups: int, tiles: int = 1) -> tuple[Tensor, Tensor, int]:
    """Mean and variance (B, G), float32 or wider, per sample and group of the cores of
    ``tiles`` tiles concatenated along the batch (tiles * B, C, h, w), pooled over the tiles,
    and the number of values per group."""
    # Per channel first (reduces the strided core in place, no copy for float32), then the
    # channels of a group and the tiles pooled: equal counts, so plain means.
    var, mean = torch.var_mean(core.to(_accumulate(core)), dim=(-2, -1), correction=0)
    mean, var = (s.view(tiles, s.shape[0] // tiles, groups, -1) for s in (mean, var))
    group_mean = mean.mean((0, -1))
    group_var = (var + (mean - group_mean[..., None]).square()).mean((0, -1))
    return group_mean, group_var, tiles * core[0].numel() // groups


def _pool(moments: list[tuple[Tensor, Tensor, int]]) -> tuple[Tensor, Tensor]:
    """Whole-image mean and variance (B, G) from the tiles' (Chan et al. 1979: stable in fp32)."""
    # Python-scalar weights: no host-to-device copy, so no synchronisation.
    total = sum(n for _, _, n in moments)
    mean = sum(m * (n / total) for m, _, n in moments)
    var = sum((v + (m - mean).square()) * (n / total) for m, v, n in moments)
    return mean, var


def _normalise(h: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
               bias: Tensor | None, groups: int, eps: float, silu: bool = False) -> Tensor:
    """A GroupNorm of ``groups`` groups of (k * B, C, h, w) (k tiles of B samples) with the given
    (B, G) statistics, then SiLU if ``silu``, in h's dtype."""
    b, c = h.shape[:2]
    per_group, tiles = c // groups, b // mean.shape[0]
    # One pass: batch_norm over B*C "channels" with the group statistics as its running
    # statistics (its mixed-precision form for a half-precision h: parameters in float32).
    stats = [s.repeat(tiles, 1).repeat_interleave(per_group, dim=1).flatten()
             for s in (mean, var)]
    affine = [None if p is None else p.to(_accumulate(h)).repeat(b) for p in (weight, bias)]
    out = F.batch_norm(h.reshape(1, b * c, -1), *stats, *affine, training=False, eps=eps)
    return F.silu(out).view_as(h) if silu else out.view_as(h)


@functools.cache
def _compiled_normalise() -> Callable[..., Tensor]:
    # Dynamic shapes: the channels, tile sides and image sizes vary from norm to norm, and
    # static shapes would compile a graph for each (and hit dynamo's recompile limit).
    return torch.compile(_normalise, dynamic=True)


def _is_silu(step: _Op) -> bool:
    return isinstance(step, Local) and type(step.fn) is nn.SiLU


def _assemble(states: list[_TileState], px: Fraction, x: Tensor) -> Tensor:
    """The tiles' cores placed in one output on x's device."""
    out = None
    for state in states:
        within = _within(state.tiles[0], px)
        for t, h in zip(state.tiles, state.h.chunk(len(state.tiles)), strict=True):
            piece = h[(..., *within)]
            if out is None:
                side = [_px_slice(slice(0, n), px).stop for n in x.shape[-2:]]
                out = piece.new_empty(*piece.shape[:2], *side, device=x.device)
            out[(..., *(_px_slice(s, px) for s in t.core))] = piece
    assert out is not None  # plan_tiles gives at least one tile
    return out
