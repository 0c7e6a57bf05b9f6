"""The tiny-demo headroom benchmark's smoke run: it scores the demo's own held-out pairs."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("skimage")

from benchmarks.tiny_sr_headroom import held_out_pairs, main, residual_cnn, scores
from examples.tsdsr.data.tiny_data import HELD_OUT
from examples.tsdsr.run_tiny import DRAWS


def test_quick_run_reports_the_cnn_against_bicubic_per_checkpoint(tmp_path):
    main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "tiny_sr_headroom.json").read_text())
    assert report["command"] == "python -m benchmarks.tiny_sr_headroom --quick"
    rows = report["rows"]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["training photos"] == "128 px" and r["train s"] > 0
        assert r["CNN - bicubic dB"] == pytest.approx(r["CNN PSNR"] - r["bicubic PSNR"])
        assert 10 < r["bicubic PSNR"] < 40 and 0 < r["CNN SSIM"] < 1
    assert rows[0]["CNN PSNR"] != rows[1]["CNN PSNR"]  # it trained between the checkpoints


def test_every_draw_of_every_held_out_photo_and_a_zero_residual_is_bicubic():
    pairs = held_out_pairs(seed=0)
    assert len(pairs) == DRAWS * len(HELD_OUT)
    assert all(lq.shape == hq.shape for lq, hq in pairs)
    zero = residual_cnn()
    for p in zero.parameters():
        p.data.zero_()
    assert scores(zero, pairs) == scores(None, pairs)
