"""TSDSRPipeline on the tiny SD3-shaped model: batching tiles and images changes nothing but
rounding, compile matches eager, FP8 is refused where there is no FP8 hardware."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from examples.tsdsr.models.tiny import random_backbone
from scoredistill.sr.latents import decode, encode, one_step
from scoredistill.sr.loading import load_model
from scoredistill.sr.pipeline import SROptions, TSDSRPipeline
from scoredistill.sr.tiling import TileConfig
from scoredistill.sr.timing import StageTimer

# Tiny tiles so that 48 x 80 px outputs (6 x 10 latent px) are tiled by all three stages.
SMALL_TILES = TileConfig(latent=4, latent_overlap=2, encoder=32, encoder_overlap=8, decoder=4,
                         decoder_overlap=2)
OPTIONS = SROptions(upscale=2.0, process_size=32)
TOL = dict(rtol=0, atol=2e-5)  # fp32: batched matmuls and convolutions round differently


def image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    """The random tiny backbone (8x VAE, patch 2), QKV fused, built once for the module."""
    return load_model(random_backbone())


def test_tiles_batched_equal_tiles_one_at_a_time(model):
    x = [image(24, 40, 0)]
    one = TSDSRPipeline(model, tiles=SMALL_TILES, batch_size=1, vae_batch_size=1).run(x, OPTIONS)
    many = TSDSRPipeline(model, tiles=SMALL_TILES, batch_size=8, vae_batch_size=8).run(x, OPTIONS)
    assert one[0].shape == (3, 48, 80)
    torch.testing.assert_close(many[0], one[0], **TOL)
    # Tiling changes the output (the test would pass trivially if nothing were tiled) ...
    whole = TSDSRPipeline(model, tiles=None).run(x, OPTIONS)[0]
    assert (whole - one[0]).abs().max() > 1e-3


def test_images_batched_equal_images_one_at_a_time(model):
    images = [image(24, 40, 1), image(16, 16, 2), image(24, 40, 3), image(40, 24, 4)]
    for tiles in (SMALL_TILES, None):
        pipe = TSDSRPipeline(model, tiles=tiles, batch_size=16)
        together = pipe.run(images, OPTIONS)
        for img, out in zip(images, together, strict=True):
            assert out.shape == (3, 2 * img.shape[1], 2 * img.shape[2])
            torch.testing.assert_close(out, pipe.run([img], OPTIONS)[0], **TOL)


def test_untiled_forward_is_decode_of_one_step_of_encode(model):
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(5)) * 2 - 1
    z = encode(model.vae, x, posterior="mode")
    expected = decode(model.vae, one_step(model.student, z, {
        k: v.expand(2, *v.shape[1:]) for k, v in model.cond.items()}))
    out = TSDSRPipeline(model, tiles=None).forward([x])[0]
    torch.testing.assert_close(out, expected, **TOL)


def test_latent_tiles_counts_the_transformer_windows(model):
    pipe = TSDSRPipeline(model, tiles=SMALL_TILES)
    calls, step = [], pipe._step
    pipe._step = lambda z: calls.append(z.shape[0]) or step(z)  # count the tiles it is given
    for h, w in ((24, 40), (16, 16), (8, 8)):
        calls.clear()
        pipe.run([image(h, w, 0)], OPTIONS)
        assert sum(calls) == pipe.latent_tiles(h, w, OPTIONS)


def test_stage_timer_reports_every_stage_only_when_enabled(model):
    timer = StageTimer(enabled=True)
    TSDSRPipeline(model, timer=timer).run([image(16, 16, 0)], OPTIONS)
    totals = timer.totals()
    assert {"VAE encode", "transformer", "VAE decode"} <= totals.keys()
    assert all(s > 0 for s in totals.values())
    quiet = StageTimer()
    TSDSRPipeline(model, timer=quiet).run([image(16, 16, 0)], OPTIONS)
    assert quiet.totals() == {}


def test_fp8_is_refused_without_an_fp8_gpu(model):
    with pytest.raises(RuntimeError, match="FP8 needs a CUDA GPU"):
        TSDSRPipeline(model, fp8=True)


def test_bad_arguments_are_refused(model):
    with pytest.raises(ValueError, match="cuda_graphs needs compile"):
        TSDSRPipeline(model, cuda_graphs=True)
    with pytest.raises(ValueError, match="batch sizes"):
        TSDSRPipeline(model, batch_size=0)
    with pytest.raises(ValueError, match="at least 8 px"):
        TSDSRPipeline(model).run([image(4, 30, 0)], OPTIONS)


@pytest.mark.slow
def test_compiled_equals_eager_on_the_cpu(model, tmp_path, monkeypatch):
    """CPU inductor compiles the transformer (tiles padded to the static batch of 4), the VAE
    encode and decode of the small images once each, and the norms of the large image's tiled
    VAE; the outputs match eager to 1e-4 (inductor fuses and reorders float32 ops). About 2 to 3
    CPU minutes on the 2-core machine, nearly all compiling."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # no cache shared with others
    # Three images within one tile of every stage, one tiled by all three.
    images = [image(16, 16, 6), image(16, 16, 7), image(16, 16, 8), image(24, 40, 9)]
    eager = TSDSRPipeline(model, batch_size=4, tiles=SMALL_TILES).run(images, OPTIONS)
    counters.clear()
    compiled = TSDSRPipeline(model, batch_size=4, tiles=SMALL_TILES, compile=True).run(images,
                                                                                      OPTIONS)
    # Compiled for real (a fallback to eager would pass the comparison trivially): at least the
    # transformer, the encoder, the decoder and the tiled VAE's norms each became a graph.
    assert counters["stats"]["unique_graphs"] >= 4, dict(counters["stats"])
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
