"""Tiled evaluation with Gaussian blending (transformer latents, VAE encoder and decoder)."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from scoredistill.adapters import SD3ScoreModel
from scoredistill.sr.latents import decode, encode, one_step
from scoredistill.sr.tiling import (
    gaussian_weights,
    tile_starts,
    tiled_apply,
    tiled_decode,
    tiled_encode,
    tiled_one_step,
)


def smooth_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(1, 3, h, w) in [-1, 1], low-frequency like a photo."""
    coarse = torch.rand(1, 3, h // 32, w // 32, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(h, w), mode="bicubic").clamp(0, 1) * 2 - 1


@pytest.mark.parametrize(("size", "tile", "overlap", "align"),
                         [(64, 64, 8, 1), (65, 64, 8, 1), (200, 64, 8, 2), (384, 128, 32, 8)])
def test_tiles_cover_with_the_overlap_and_alignment(size, tile, overlap, align):
    starts = tile_starts(size, tile, overlap, align)
    assert starts[0] == 0 and starts[-1] + tile >= size
    assert all(s % align == 0 for s in starts)
    assert all(b - a <= tile - overlap for a, b in pairwise(starts))


def test_gaussian_window_peaks_in_the_centre_and_is_symmetric():
    w = gaussian_weights(9, 12)
    assert w.shape == (1, 1, 9, 12) and w[0, 0, 4].argmax() in (5, 6)
    torch.testing.assert_close(w, w.flip(-1).flip(-2))


@pytest.mark.parametrize(("fn", "align"), [
    (lambda x: 3 * x.square() + 1, 1),                      # pointwise
    (lambda x: F.avg_pool2d(x, 8).repeat(1, 2, 1, 1), 8),   # 8x down, like the encoder
    (lambda x: F.interpolate(x, scale_factor=8.0), 1),       # 8x up, like the decoder
])
def test_blending_is_exact_for_tile_local_functions(fn, align):
    # Functions whose output pixel depends only on its own aligned input cell: every tile
    # computes exact values, so the normalised blend must return them (fp32 rounding only).
    x = torch.randn(2, 3, 96, 160)
    out = tiled_apply(fn, x, tile=32, overlap=16, align=align)
    torch.testing.assert_close(out, fn(x), rtol=1e-5, atol=1e-5)


def column_jumps(y: torch.Tensor) -> torch.Tensor:
    """Mean |difference| between neighbouring columns, one value per column boundary."""
    return y.diff(dim=-1).abs().mean(dim=(0, 1, 2))


def test_blending_hides_the_seams_that_hard_tiles_show():
    # A zero-padded blur: each tile darkens its own borders. Hard tiles (overlap 0) show them
    # as seams; with overlap the Gaussian weights give those borders almost no weight.
    blur = torch.ones(3, 1, 5, 5) / 25

    def fn(x):
        return F.conv2d(F.conv2d(x, blur, padding=2, groups=3), blur, padding=2, groups=3)

    x = (smooth_image(64, 256) + 1) / 2
    full = fn(x)
    interior = slice(8, -8)  # the image's own zero-padded border is not a seam
    baseline = column_jumps(full)[interior].max()
    hard = tiled_apply(fn, x, tile=64, overlap=0)
    blended = tiled_apply(fn, x, tile=64, overlap=16)
    assert column_jumps(hard)[interior].max() > 5 * baseline  # the check can see seams
    assert column_jumps(blended)[interior].max() < 1.5 * baseline
    # Border error (<= 0.6 here) times the weight a tile border keeps next to a neighbour
    # 8+ px inside its tile (< 1e-2 for tile 64, overlap 16) bounds the error.
    assert (blended - full).abs().max() < 1e-2


@torch.no_grad()
def test_tiles_at_least_the_image_equal_the_untiled_call(parts):
    student, x = SD3ScoreModel(parts.transformer), smooth_image(128, 192)
    z = encode(parts.vae, x, posterior="mode")
    assert torch.equal(tiled_encode(parts.vae, x, tile=192), z)
    assert torch.equal(tiled_one_step(student, z, parts.cond, tile=24),
                       one_step(student, z, parts.cond))
    assert torch.equal(tiled_decode(parts.vae, z, tile=24), decode(parts.vae, z))


@torch.no_grad()
def test_small_tiles_on_the_tiny_model_stay_close(parts):
    # The random tiny model is non-local (attention over all tokens, GroupNorm statistics over
    # the whole image), so tiles cannot reproduce it exactly. What blending guarantees is that
    # the result is a convex combination of the tiles' outputs: its error is at most the worst
    # single tile's error, and it is finite and within [-1, 1] after decoding.
    student, x = SD3ScoreModel(parts.transformer), smooth_image(256, 384)
    z = encode(parts.vae, x, posterior="mode")
    checks = [
        (lambda a: encode(parts.vae, a, posterior="mode"), x, 128, 32, 8),
        (lambda a: one_step(student, a, parts.cond), z, 24, 8, 2),
        (lambda a: decode(parts.vae, a), z, 24, 8, 1),
    ]
    for fn, inp, tile, overlap, align in checks:
        full, tiled = fn(inp), tiled_apply(fn, inp, tile=tile, overlap=overlap, align=align)
        worst = 0.0
        scale = full.shape[-1] // inp.shape[-1] or 1
        div = inp.shape[-1] // full.shape[-1] or 1
        for y in tile_starts(inp.shape[-2], tile, overlap, align):
            for x0 in tile_starts(inp.shape[-1], tile, overlap, align):
                piece = fn(inp[..., y:y + tile, x0:x0 + tile])
                ref = full[..., y * scale // div:, x0 * scale // div:][
                    ..., :piece.shape[-2], :piece.shape[-1]]
                worst = max(worst, (piece - ref).abs().max().item())
        error = (tiled - full).abs()
        assert torch.isfinite(tiled).all()
        assert error.max().item() <= worst + 1e-5
        assert error.mean().item() < 0.5 * full.std().item()
