"""Training validation logs the grid-artifact measure beside PSNR and SSIM."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("skimage", reason="the photos are scikit-image's bundled ones")

from examples.tsdsr.data.tiny_data import photo
from examples.tsdsr.evaluation.metrics import grid_db, psnr_y
from examples.tsdsr.training import validation
from examples.tsdsr.training.validation import ValPair
from tests.sr.test_artifacts import with_grid


def _validate(monkeypatch, tmp_path, pairs: list[ValPair], srs: list[torch.Tensor]) -> dict:
    """validate() with the student's outputs replaced by ``srs`` (1, 3, H, W), in order."""
    outputs = iter(srs)
    monkeypatch.setattr(validation, "super_resolve", lambda *args: next(outputs))
    return validation.validate(None, pairs, {}, tmp_path, 0, torch.device("cpu"), write=False)


def test_validate_logs_the_mean_grid_measure_of_the_sr_images(monkeypatch, tmp_path):
    hq = [photo("astronaut", 128), photo("coffee", 128), photo("chelsea", 48)]
    pairs = [ValPair(f"p{i}", image, image) for i, image in enumerate(hq)]
    srs = [with_grid(image[None], s) for image, s in zip(hq, (0.05, 0.0, 0.05), strict=True)]
    metrics = _validate(monkeypatch, tmp_path, pairs, srs)
    # chelsea is 48 px high, under 4 periods of 16: left out of the grid mean only.
    grids = [grid_db(sr) for sr in srs[:2]]
    assert grid_db(srs[2]) is None and grids[0] > 1.0 > grids[1]
    assert metrics["val/grid"] == pytest.approx(sum(grids) / 2)
    assert metrics["val/psnr"] == pytest.approx(
        sum(float(psnr_y(sr, p.hq[None])) for sr, p in zip(srs, pairs, strict=True)) / 3)
    assert "val/grid" not in _validate(monkeypatch, tmp_path, pairs[2:], srs[2:])
