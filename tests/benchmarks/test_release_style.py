"""The release-style baseline follows test_tsdsr.py: sizes, tile counts, tiled VAE thresholds."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import benchmarks.release_style as rs
from benchmarks.release_style import ReleaseSettings, release_forward, release_size
from scoredistill.sr.timing import StageTimer


def release_tile_count(size: int, tile: int = 64, overlap: int = 8) -> int:
    """test_tsdsr.py's tile_sample grid along one side, its while loop transcribed."""
    count, cur = 0, 0
    while cur < size:
        cur = max(count * tile - overlap * count, 0) + tile
        count += 1
    return count


@pytest.mark.parametrize(("w", "h", "expected"), [
    (128, 128, (512, 512, False)),     # RealSR's LQ: no resize
    (1024, 1024, (4096, 4096, False)),
    (100, 60, (848, 512, True)),       # short side raised to 128 (213 x 128), x4, cut to 8
    (130, 131, (520, 520, True)),      # 524 is not a multiple of 8
])
def test_release_size(w, h, expected):
    assert release_size(w, h, ReleaseSettings()) == expected


@pytest.mark.parametrize("latent", [64, 512, 1024])
def test_latent_tiles_as_many_as_the_release(latent, monkeypatch):
    calls = []

    def fake_transformer(**kw):
        calls.append(kw["hidden_states"].shape)
        return (torch.zeros_like(kw["hidden_states"]),)

    # Only the tile loop runs: a latent of `latent` px from a stub VAE whose sides stay below
    # the tiled-VAE thresholds would not reach 512 latent px, so the stages are stubbed.
    class Stub(torch.nn.Module):
        config = type("C", (), {"scaling_factor": 1.0, "patch_size": 2})()

        def forward(self, **kw):
            return fake_transformer(**kw)

    class Dist:
        def sample(self, generator=None):
            return torch.zeros(1, 16, latent, latent)

    vae = Stub()
    vae.encode = lambda x: type("E", (), {"latent_dist": Dist()})()
    vae.decode = lambda z, return_dict=False: (torch.zeros(1, 3, 8, 8),)
    model = type("M", (), {"vae": vae, "student": type("S", (), {"module": Stub()})(),
                           "cond": {"prompt_embeds": torch.zeros(1, 2, 4),
                                    "pooled_projections": torch.zeros(1, 4)}})()
    monkeypatch.setattr(rs, "run_tiled", lambda net, x, **kw: torch.zeros(1, 3, 8, 8))
    monkeypatch.setattr(rs, "decoder_network", lambda vae: None)
    release_forward(model, torch.zeros(1, 3, 8, 8), ReleaseSettings(), StageTimer(enabled=True))
    assert len(calls) == release_tile_count(latent) ** 2
    assert all(s[0] == 1 and tuple(s[-2:]) == (64, 64) for s in calls)  # one tile at a time


def test_vae_tiled_only_beyond_the_release_thresholds(monkeypatch):
    # test_tsdsr.py's vaehook tiles the encoder above 1024 + 2 x 32 px and the decoder above
    # 224 + 2 x 11 latent px, with the tiles waiting on the CPU.
    from examples.tsdsr.models.tiny import random_backbone
    from scoredistill.adapters import SD3ScoreModel

    seen = []
    real = rs.run_tiled

    def spy(net, x, *, tile, margin, offload):
        seen.append((x.shape[-1], tile, margin, offload))
        return real(net, x, tile=tile, margin=margin, offload=offload)

    monkeypatch.setattr(rs, "run_tiled", spy)
    parts = random_backbone("tiny")
    model = type("M", (), {"vae": parts.vae, "student": SD3ScoreModel(parts.transformer),
                           "cond": parts.cond})()
    s = ReleaseSettings(latent_tile=8, latent_overlap=2, encoder_tile=48, encoder_pad=8,
                        decoder_tile=4, decoder_pad=2)
    for side, expected in ((64, []), (80, [(80, 48, 8, True), (10, 4, 2, True)])):
        seen.clear()
        x = torch.rand(1, 3, side, side) * 2 - 1
        out = release_forward(model, x, s, StageTimer(enabled=True))
        assert out.shape == (3, side, side) and seen == expected
