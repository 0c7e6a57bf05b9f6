"""The grid and seam measures on photos with planted artifacts of known strength, and the
pipeline's tiled output against its untiled one."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

pytest.importorskip("skimage", reason="the clean photos are scikit-image's bundled ones")

from examples.tsdsr.data.tiny_data import HELD_OUT, TRAIN, photo
from scoredistill.sr.artifacts import grid_score, seam_error, seam_gradient_excess, seam_lines
from scoredistill.sr.tiling import TileConfig

CLEAN_MAX_DB = 1.0
"""No clean photo scores above this (measured: -0.61 .. +0.42 dB at period 16 and -0.52 ..
+0.75 dB at period 8 over scikit-image's 15 photos at 128, 256 and 512 px)."""
STRENGTHS = (0.0, 0.01, 0.02, 0.05, 0.1)  # peak amplitude of the planted pattern, in [0, 1] units


def pattern(period: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A random zero-mean period x period tile repeated over (1, 1, height, width), peak 1."""
    tile = torch.rand(1, 1, period, period, generator=torch.Generator().manual_seed(seed)) - 0.5
    tile = tile / tile.abs().max()
    return tile.repeat(1, 1, -(-height // period), -(-width // period))[..., :height, :width]


def with_grid(image: torch.Tensor, strength: float, period: int = 16) -> torch.Tensor:
    return (image + strength * pattern(period, *image.shape[-2:])).clamp(0, 1)


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    return photo("astronaut", 256)[None]  # (1, 3, 256, 256)


def test_grid_score_ranks_planted_grids_by_strength(astronaut):
    scores = [grid_score(with_grid(astronaut, s)).item() for s in STRENGTHS]
    assert scores == sorted(scores) and len(set(scores)) == len(scores), scores
    assert scores[0] < CLEAN_MAX_DB < scores[2], scores  # a 2% grid is flagged


def test_grid_score_is_per_image_in_a_batch(astronaut):
    batch = torch.cat([with_grid(astronaut, s) for s in STRENGTHS])
    alone = torch.stack([grid_score(with_grid(astronaut, s))[0] for s in STRENGTHS])
    torch.testing.assert_close(grid_score(batch), alone)


@pytest.mark.parametrize("period", [16, 8])
def test_grid_score_stays_low_on_clean_photos(period):
    scores = {name: grid_score(photo(name, 256)[None], period).item()
              for name in TRAIN + HELD_OUT}
    assert max(scores.values()) < CLEAN_MAX_DB, scores
    assert min(scores.values()) > -CLEAN_MAX_DB, scores


@pytest.mark.parametrize("other", [7, 10, 13])
def test_grid_of_another_period_does_not_trigger_it(astronaut, other):
    # Periods 7, 10 and 13 share no harmonic with 16 below the Nyquist frequency.
    assert grid_score(with_grid(astronaut, 0.1, other)).item() < CLEAN_MAX_DB
    assert grid_score(with_grid(astronaut, 0.1, 16)).item() > 5 * CLEAN_MAX_DB


def test_grid_score_period_8_sees_an_8_px_grid(astronaut):
    assert grid_score(with_grid(astronaut, 0.05, 8), period=8).item() > 5 * CLEAN_MAX_DB
    assert grid_score(with_grid(astronaut, 0.05, 16), period=16).item() > 5 * CLEAN_MAX_DB


def test_grid_score_crops_sides_that_are_no_multiple_of_the_period(astronaut):
    odd = with_grid(astronaut, 0.05)[..., :250, :237]
    assert grid_score(odd).item() > 5 * CLEAN_MAX_DB
    assert abs(grid_score(astronaut[..., :250, :237]).item()) < CLEAN_MAX_DB


def test_grid_score_of_a_flat_image_is_zero():
    assert grid_score(torch.full((2, 3, 80, 96), 0.5)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("images, period, match", [
    (torch.rand(1, 3, 48, 128), 16, "at least 64 px"),
    (torch.rand(1, 3, 128, 128), 12.0, "even integer"),
    (torch.rand(1, 3, 128, 128), 6 + 1, "even integer"),
    (torch.rand(3, 128, 128), 16, r"\(B, 3, H, W\)"),
    (torch.rand(1, 3, 128, 128) * 255, 16, r"in \[0, 1\]"),
    ((torch.rand(1, 3, 128, 128) * 255).byte(), 16, "divide uint8"),
])
def test_grid_score_refuses_bad_input_in_one_line(images, period, match):
    with pytest.raises(ValueError, match=match) as info:
        grid_score(images, period)
    assert "\n" not in str(info.value)


# --- seams --------------------------------------------------------------------------------------

ROWS, COLS = [64, 128, 192], [96, 160]  # tile borders of a 256 x 256 image
SEAMLESS_MAX = 0.25
"""|seam_gradient_excess| of scikit-image's 15 photos at 256 px on ROWS/COLS: at most 0.22."""


def with_seams(image: torch.Tensor, strength: float, seed: int = 0) -> torch.Tensor:
    """``image`` with every tile (between ROWS/COLS) shifted by its own offset: steps there."""
    g = torch.Generator().manual_seed(seed)
    out = image.clone()
    ys, xs = [0, *ROWS, image.shape[-2]], [0, *COLS, image.shape[-1]]
    for y0, y1 in pairwise(ys):
        for x0, x1 in pairwise(xs):
            out[..., y0:y1, x0:x1] += strength * (torch.rand(1, generator=g).item() * 2 - 1)
    return out.clamp(0, 1)


def test_seam_gradient_excess_ranks_planted_seams_and_is_near_zero_without(astronaut):
    scores = [seam_gradient_excess(with_seams(astronaut, s), ROWS, COLS).item()
              for s in STRENGTHS]
    assert scores == sorted(scores) and len(set(scores)) == len(scores), scores
    assert abs(scores[0]) < SEAMLESS_MAX < scores[3], scores  # 5% steps are flagged


def test_seam_gradient_excess_of_seamless_photos_is_small():
    scores = {name: seam_gradient_excess(photo(name, 256)[None], ROWS, COLS).item()
              for name in TRAIN + HELD_OUT}
    assert max(abs(s) for s in scores.values()) < SEAMLESS_MAX, scores


def test_seam_error_ranks_border_errors_and_ignores_even_ones(astronaut):
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(astronaut.shape, generator=g) * 2 - 1
    border = torch.zeros(256, 256, dtype=torch.bool)
    for r in ROWS:
        border[r - 2:r + 2] = True
    for c in COLS:
        border[:, c - 2:c + 2] = True
    scores = []
    for s in STRENGTHS:
        tiled = (astronaut + 0.01 * noise + s * noise * border).clamp(0, 1)
        scores.append(seam_error(tiled, astronaut, ROWS, COLS).item())
    assert scores == sorted(scores) and len(set(scores)) == len(scores), scores
    assert abs(scores[0]) < 1e-3, scores  # the same error everywhere is no seam
    base = astronaut * 0.9
    assert seam_error(base, base, ROWS, COLS).item() == 0.0
    assert abs(seam_error(base + 0.05, base, ROWS, COLS).item()) < 1e-6


def test_seam_measures_refuse_bad_lines_and_shapes(astronaut):
    for call, match in (
        (lambda: seam_error(astronaut, astronaut[..., :128], ROWS, COLS), "shapes differ"),
        (lambda: seam_error(astronaut, astronaut, [0], []), "not inside the image"),
        (lambda: seam_gradient_excess(astronaut, [], []), "no seam lines"),
        (lambda: seam_error(astronaut, astronaut, ROWS, COLS, width=200), "whole"),
        (lambda: seam_error(astronaut, astronaut, ROWS, COLS, width=0), "positive integer"),
    ):
        with pytest.raises(ValueError, match=match):
            call()


def test_seam_lines_follow_the_tiling_code():
    # 1024 px: latent 128, transformer tiles at 0, 32, 64 (64 wide) meet at (0+32+64)/2 and
    # (32+64+64)/2 latent px; the VAE runs whole (128 <= 224 latent, 1024 <= 1024 px).
    assert seam_lines(1024, 1024) == ([384, 640], [384, 640])
    # 2048 px: five transformer tiles (starts 0, 48, 96, 144, 192), two decoder cores of 128
    # latent px and two encoder cores of 1024 px: both cut at 1024.
    lines = [448, 832, 1024, 1216, 1600]
    assert seam_lines(2048, 2048) == (lines, lines)
    assert seam_lines(512, 2048) == ([], lines)  # a short side within one tile is not cut
    assert seam_lines(512, 512) == ([], [])
    with pytest.raises(ValueError, match="multiples of 16"):
        seam_lines(520, 512)


# --- the pipeline -----------------------------------------------------------------------------

SEAM_MAX = 0.005
"""seam_error of the tiny model's tiled output (128 x 192 px, 8-latent-px tiles) against its
untiled one: -0.0009 with the VAE margins of ``exact_margin``; 0.019 to 0.025 with margins of
16/4 px down to none (the zero padding at a tile's edge then reaches its core)."""


def test_pipeline_tiled_output_has_no_seams_against_untiled():
    pytest.importorskip("diffusers")
    from examples.tsdsr.models.tiny import random_backbone
    from scoredistill.sr.loading import load_model
    from scoredistill.sr.pipeline import TSDSRPipeline
    from scoredistill.sr.vae_steps import decoder_network, encoder_network, exact_margin

    model = load_model(random_backbone())
    x = torch.rand(1, 3, 128, 192, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole = (TSDSRPipeline(model, tiles=None).forward([x])[0] + 1) / 2

    def seams(encoder_margin: int, decoder_margin: int) -> float:
        tiles = TileConfig(latent=8, latent_overlap=2, encoder=64, decoder=8,
                           encoder_overlap=encoder_margin, decoder_overlap=decoder_margin)
        tiled = (TSDSRPipeline(model, tiles=tiles).forward([x])[0] + 1) / 2
        assert (tiled - whole).abs().max() > 1e-3  # tiled: attention sees its tile only
        rows, cols = seam_lines(128, 192, tiles)
        assert len(rows) >= 3 and len(cols) >= 4  # every stage is tiled
        return seam_error(tiled, whole, rows, cols).item()

    exact = [exact_margin(net(model.vae)) for net in (encoder_network, decoder_network)]
    assert seams(*exact) < SEAM_MAX
    assert seams(8, 2) > 2 * SEAM_MAX  # the measure sees the seams of too small margins
