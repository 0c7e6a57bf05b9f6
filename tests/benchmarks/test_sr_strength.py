"""benchmarks.sr_strength: the quick run writes its table, JSON and plot, one row a strength,
and its numbers are the metrics of the pipeline's own outputs at that strength."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("skimage")
pytest.importorskip("matplotlib")

from benchmarks import sr_strength
from benchmarks.tiny_sr_headroom import demo_pairs
from examples.tsdsr.evaluation.metrics import psnr_y
from scoredistill.sr.pipeline import TSDSRPipeline


def test_quick_run_rows_are_the_pipelines_metrics(tmp_path):
    sr_strength.main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "sr_strength.json").read_text())
    assert (tmp_path / "sr_strength.md").is_file() and (tmp_path / "sr_strength.png").is_file()
    rows = report["rows"]
    assert [r["strength"] for r in rows] == [0.0, 1.0]
    pipe = TSDSRPipeline.from_pretrained(report["model"])
    name, lq, hq = demo_pairs(seed=0)[0]
    for row in rows:
        sr = pipe(lq, strength=row["strength"], output_type="np").images[0]  # 8 bit, as files
        sr = torch.from_numpy((sr * 255).round() / 255).permute(2, 0, 1)[None].float()
        assert row["per image"][name]["psnr"] == pytest.approx(float(psnr_y(sr, hq)), abs=1e-4)
    assert rows[0]["PSNR (Y)"] != rows[1]["PSNR (Y)"]  # the strength reaches the model
    assert torch.isfinite(torch.tensor([r["grid dB"] for r in rows])).all()
