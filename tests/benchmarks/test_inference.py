"""The inference benchmark: its fp32 correctness check (planted mistakes rejected), the CPU
smoke run's report, and the helpers behind them."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import benchmarks.inference as bench
from benchmarks.correctness import bit_identical, fp32_check, relative_l2
from benchmarks.inference import main, peak_tflops


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"device": "cpu", "tol": 1e-3, "compile": False,
                                 "quick": True, **kw})


@pytest.fixture(scope="module")
def x64() -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_fp32_check_accepts_the_merge_and_rejects_the_planted_mistakes(x64):
    rows = {r["variant"]: r for r in fp32_check("tiny", x64, _args())}
    merged = rows["LoRA merged + fused QKV"]
    assert merged["accepted"] and merged["rel L2 vs fp32 eager"] < 1e-4
    for name in ("LoRA dropped in half the blocks", "LoRA scaled by 1.05"):
        row = rows[f"{name} (planted mistake)"]
        # Rejected with room: at least 3x the tolerance, 1000x the correct merge's error.
        assert not row["accepted"] and row["as expected"]
        err = row["rel L2 vs fp32 eager"]
        assert err > 3e-3 and err > 1e3 * merged["rel L2 vs fp32 eager"]


def test_a_loose_tolerance_fails_the_benchmark(x64, tmp_path, monkeypatch):
    # The check, not the rows' presence, decides: at a tolerance that accepts the planted
    # mistakes the run must stop with an error.
    rows = fp32_check("tiny", x64, _args(tol=0.05))
    assert [r["as expected"] for r in rows] == [True, False, False]
    monkeypatch.setattr(bench, "fp32_check", lambda *a: rows)
    with pytest.raises(SystemExit, match="planted mistake"):
        main(["--quick", "--device", "cpu", "--out", str(tmp_path)])


def test_relative_l2_and_bit_identity():
    a = torch.randn(3, 5, dtype=torch.float64)
    assert relative_l2(a, a) == 0 and relative_l2(2 * a, a) == pytest.approx(1.0)
    b = a.to(torch.bfloat16)
    c = b.clone()
    c.view(torch.int16)[0, 0] += 1  # one ulp
    assert bit_identical(b, b.clone()) and not bit_identical(b, c)
    assert not bit_identical(b, b.float()) and not bit_identical(b, b[:, :4])
    nan = torch.full((2,), float("nan"))
    assert bit_identical(nan, nan.clone())  # torch.equal would say False


def test_quick_run_writes_a_checked_report(tmp_path):
    main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "inference.json").read_text())
    text = (tmp_path / "inference.md").read_text()
    assert report["config"] == "tiny" and "device" in report["machine"]
    assert report["complete"] is True
    assert report["command"] == "python -m benchmarks.inference --quick --device cpu"
    assert report["command"] in text and "planted mistake" in text
    assert all(r["as expected"] for r in report["checks"]) and len(report["checks"]) == 3
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == {"eager, LoRA unmerged", "LoRA merged + fused QKV"}
    for row in rows.values():
        assert row["ms/img"] > 0 and row["img/s"] == pytest.approx(1e3 / row["ms/img"])
        assert (row["size"], row["batch"]) == (64, 1)
    assert rows["LoRA merged + fused QKV"]["max abs diff"] < 1e-3
    assert report["counted_tflop"]["64"] > 0


def test_peak_table_and_override():
    assert peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert peak_tflops("NVIDIA H200", None) == 989.0
    assert peak_tflops("CPU", None) is None and peak_tflops("CPU", 1.5) == 1.5


def test_a_run_stopped_midway_leaves_its_measured_rows_marked_partial(tmp_path, monkeypatch):
    def stop(model):
        raise KeyboardInterrupt  # as a time limit would, after the eager rows

    monkeypatch.setattr(bench, "fp32_check", lambda *a: [])
    monkeypatch.setattr(bench, "merge_and_fuse", stop)
    with pytest.raises(KeyboardInterrupt):
        main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "inference.json").read_text())
    assert report["complete"] is False
    assert [r["variant"] for r in report["rows"]] == ["eager, LoRA unmerged"]
    assert "Partial" in (tmp_path / "inference.md").read_text()


def test_flops_are_counted_at_each_size_not_scaled_by_pixels():
    from benchmarks.inference import counted_tflop
    from benchmarks.sr_model import build, merge_and_fuse

    model = build("tiny", torch.float32, "cpu")
    merge_and_fuse(model)
    small, large = (counted_tflop(model, torch.zeros(1, 3, s, s)) for s in (32, 64))
    # Scaling by pixels (4x for twice the side) would be off by more than 2.5% here: fixed costs
    # (prompt tokens, embeddings) and attention's square growth do not follow the pixel count.
    assert small > 0 and abs(large / small - 4) > 0.1
