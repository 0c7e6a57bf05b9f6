"""The train-step benchmark's quick mode: runs, checks its gradients, writes its report."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from benchmarks.train_step import main


def test_quick_run_writes_calls_times_and_bytes(tmp_path):
    md = main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "train_step.json").read_text())
    assert md == tmp_path / "train_step.md" and "backbone calls" in md.read_text()
    assert report["machine"]["device"] and report["config"] == "tiny"
    library, release = report["rows"]
    # One student call, one fused call per DASM point (N = 4), one fake-score call; the
    # release's loop makes six calls per point.
    assert (library["backbone calls"], release["backbone calls"]) == (6, 26)
    assert library["median s"] > 0 and release["median s"] > 0
    assert library["params MiB"] < release["params MiB"]
    assert max(report["grad_rel_error"].values()) < 1e-3
    shared, copies = report["resident_sd3_medium"]
    assert shared["base copies"] == 1 and copies["base copies"] == 2
    assert 3.5 < shared["base GiB"] < 4.0  # SD3-medium: ~2.03 B parameters in half precision
    assert copies["total GiB"] - shared["total GiB"] == pytest.approx(shared["base GiB"])
    counts = report["param_counts"]
    assert counts["student LoRA params"] > counts["fake LoRA params"] > 0
