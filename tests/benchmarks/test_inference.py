"""The inference benchmark's CPU smoke run: report fields and correctness against eager."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import benchmarks.inference as bench
from benchmarks.inference import main, peak_tflops


def test_quick_run_writes_a_checked_report(tmp_path):
    main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "inference.json").read_text())
    assert (tmp_path / "inference.md").is_file()
    assert report["config"] == "tiny" and "device" in report["machine"]
    assert report["complete"] is True
    assert report["command"] == "python -m benchmarks.inference --quick --device cpu"
    assert report["command"] in (tmp_path / "inference.md").read_text()
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == {"eager, LoRA unmerged", "LoRA merged + fused QKV"}
    merged = rows["LoRA merged + fused QKV"]
    assert merged["ok"] is True and merged["max abs diff"] <= report["tol"] == 1e-3
    for row in rows.values():
        assert row["ms/img"] > 0 and row["img/s"] == pytest.approx(1e3 / row["ms/img"])
        assert (row["size"], row["batch"]) == (64, 1)
    assert report["counted_tflop"]["64"] > 0


def test_peak_table_and_override():
    assert peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert peak_tflops("NVIDIA H200", None) == 989.0
    assert peak_tflops("CPU", None) is None and peak_tflops("CPU", 1.5) == 1.5


def test_a_run_stopped_midway_leaves_its_measured_rows_marked_partial(tmp_path, monkeypatch):
    def stop(model):
        raise KeyboardInterrupt  # as a time limit would, after the eager rows

    monkeypatch.setattr(bench, "merge_and_fuse", stop)
    with pytest.raises(KeyboardInterrupt):
        main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "inference.json").read_text())
    assert report["complete"] is False
    assert [r["variant"] for r in report["rows"]] == ["eager, LoRA unmerged"]
    assert "Partial" in (tmp_path / "inference.md").read_text()
