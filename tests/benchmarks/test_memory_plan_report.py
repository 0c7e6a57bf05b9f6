"""benchmarks/memory_plan.py's quick mode: the validation rows, and the plan and floor tables of
the tiny preset (shared backbone, the release's two copies, precompute, SR)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lpips", reason="the train step needs the train extra (LPIPS)")
pytest.importorskip("transformers", reason="the precompute plan needs the train extra")

from benchmarks.memory_plan import main


@pytest.mark.slow
def test_quick_run_writes_the_check_plans_and_floors(tmp_path):
    md = main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "memory_plan.json").read_text())
    text = md.read_text()
    assert report["machine"]["device"] and "LOWER BOUND" in text
    assert all(abs(r["error %"]) <= 5 for r in report["rows"])
    plans = {p["setup"].split(",")[0]: p for p in report["plans"]}
    ours, release = plans["tiny: ours"], plans["tiny: release"]
    # The release holds a second transformer copy; the same step otherwise.
    assert release["weights GiB"] > ours["weights GiB"]
    for plan in report["plans"]:
        parts = (plan["weights GiB"] + plan["grads + optimiser GiB"]
                 + plan["activations + temp GiB"])
        assert parts == pytest.approx(plan["peak GiB"]) and plan["TFLOP / sample"] > 0
    assert [f["setup"] for f in report["floors"]] == [p["setup"] for p in report["plans"]]
    assert all(v > 0 for f in report["floors"] for k, v in f.items() if k != "setup")
    # Docs tables at most 6 columns wide (tests/test_docs.py checks them at 1280 px).
    for line in text.splitlines():
        if line.startswith("|"):
            assert line.count("|") - 1 <= 6, line
