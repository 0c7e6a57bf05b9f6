"""Smoke test of benchmarks/natural_patches.py: a tiny run writes complete, finite results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("skimage", reason="the natural-patch problem reads scikit-image's photos")

from benchmarks.natural_patches import COLUMNS, CONDITIONAL_LOSSES, LOSSES, METRICS, main


def test_natural_patches_quick_smoke(tmp_path: Path) -> None:
    main(["--quick", "--steps", "5", "--seeds", "2", "--out", str(tmp_path),
          "--no-docs-assets"])
    report = json.loads((tmp_path / "natural_patches_grey_quick.json").read_text())
    assert report["mode"] == "quick" and report["budget"]["steps"] == 5
    assert not report["partial"] and report["rows_done"] == len(report["rows"])
    assert report["monte_carlo"]["mc_worst_error_in_se"] < 6
    rows = report["rows"]
    assert {(r["teacher"], r["loss"]) for r in rows} == {
        (t, n) for t in ("exact", "learned") for n in LOSSES} | {
        ("exact", n) for n in CONDITIONAL_LOSSES}
    for row in rows:
        assert all(c in row for c in COLUMNS), row
        for m in METRICS:
            assert len(row[f"{m}_per_seed"]) == 2
    recon = next(r for r in rows if r["loss"] == "recon only")
    assert all(math.isfinite(recon[f"{m}_mean"]) for m in METRICS)
    assert {v["verdict"] for v in report["verdicts"]} <= {"holds", "does not hold",
                                                          "within noise"}
    # DMD with both teachers, CSD with the exact one only, each on two metrics.
    assert sorted(v["a"] for v in report["other_verdicts"]) == sorted(
        f"{t} / + {n}" for t, n in (("exact", "DMD"), ("learned", "DMD"), ("exact", "CSD"))
        for _ in range(2))
    table = (tmp_path / "natural_patches_grey_quick.md").read_text()
    assert "| teacher | loss |" in table and "| claim | metric | verdict | effect |" in table
    assert (tmp_path / "natural_patches_grey_quick.png").stat().st_size > 10_000
