"""The train-step benchmark's quick mode: runs, checks its gradients, writes its report."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from benchmarks.train_step import check_terms, expected_calls, main


def test_quick_run_writes_calls_times_and_bytes(tmp_path):
    md = main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "train_step.json").read_text())
    assert md == tmp_path / "train_step.md" and "backbone calls" in md.read_text()
    assert report["machine"]["device"] and report["config"] == "tiny"
    library, release = report["rows"]
    # One student call, one fused call per DASM point (N = 4), one fake-score call; the
    # release's train.py makes three batched-CFG calls per point: 3N + 2.
    assert report["calls"] == expected_calls(4) == {"library": 6, "release": 14}
    assert (library["backbone calls"], release["backbone calls"]) == (6, 14)
    assert library["median s"] > 0 and release["median s"] > 0
    assert library["params MiB"] < release["params MiB"]
    errors = report["term_rel_error_fp32"]
    assert set(errors) == {"vsd direction", "tsm direction", "tsd direction",
                           "student grad of TSD", "student grad of MSE", "fake grad"}
    assert max(errors.values()) < 1e-4
    shared, copies = report["resident_sd3_medium"]
    assert shared["base copies"] == 1 and copies["base copies"] == 2
    assert 3.5 < shared["base GiB"] < 4.0  # SD3-medium: ~2.03 B parameters in half precision
    assert copies["total GiB"] - shared["total GiB"] == pytest.approx(shared["base GiB"])
    counts = report["param_counts"]
    assert counts["student LoRA params"] > counts["fake LoRA params"] > 0


def test_term_check_fails_without_the_tsd_term(monkeypatch):
    # TSD is a small part of the student's summed gradient: the check compares it on its own.
    import benchmarks.train_step as ts

    library = ts.library_generator

    def without_tsd(roles, data):
        terms = library(roles, data)
        terms.tsd = 0 * terms.tsd
        return terms

    monkeypatch.setattr(ts, "library_generator", without_tsd)
    with pytest.raises(AssertionError, match="student grad of TSD"):
        check_terms("tiny", "cpu", 1e-4)


def test_quick_mode_writes_to_a_temporary_folder():
    from benchmarks.report import RESULTS

    md = main(["--quick"])
    assert md.parent != RESULTS and md.name == "train_step.md"
