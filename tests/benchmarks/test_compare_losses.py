"""Smoke test of benchmarks/compare_losses.py: a tiny run writes finite, complete results."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from benchmarks.compare_losses import COLUMNS, COMPARISONS, LOSSES, main

FIELDS = ("nll_mean", "nll_std", "sliced_w2_mean", "sliced_w2_std", "mse_mean", "mse_std",
          "cos_hat_start", "cos_hat_end", "cos_hq_start", "cos_hq_end", "cos_hat_exact_end",
          "tsm_align_flow_end", "tsm_align_epsilon_end")


def test_compare_losses_quick_smoke(tmp_path: Path) -> None:
    main(["--quick", "--steps", "10", "--seeds", "1", "--out", str(tmp_path),
          "--no-docs-assets"])
    report = json.loads((tmp_path / "compare_losses.json").read_text())
    assert report["mode"] == "quick" and report["budget"]["steps"] == 10
    assert report["machine"]["device"] and math.isfinite(report["runtime_s"])
    rows = report["rows"]
    assert {(r["teacher"], r["loss"]) for r in rows} == {
        (t, n) for t in ("exact", "learned") for n in LOSSES} | {("exact", "+ CSD")}
    for row in rows:
        assert all(c in row for c in COLUMNS), row
        for f in FIELDS:
            assert math.isfinite(row[f]), (row["teacher"], row["loss"], f, row[f])
        assert all(math.isfinite(v) for c in row["curves"].values() for v in c)
        assert len(row["per_seed"]["nll"]) == 1 and len(row["per_seed"]["cos_hq_start"]) == 1
    tests = report["paired_tests"]
    assert len(tests) == 2 * len(COMPARISONS) * 3
    assert all(t["n"] == 1 and t["verdict"] == "n.s." for t in tests)  # one seed proves nothing
    table = (tmp_path / "compare_losses.md").read_text()
    assert "| teacher | loss |" in table and "Measured on" in table
    assert table.count("\n| verdict | metric | A | B | A − B | p (Holm) |") == 2  # per teacher
    assert (tmp_path / "compare_losses.png").stat().st_size > 10_000


def test_quick_run_defaults_to_a_temporary_folder(monkeypatch) -> None:
    import benchmarks.compare_losses as cl
    from benchmarks.report import RESULTS

    class Written(Exception):
        pass

    def write_report(*args, out_dir, **kwargs):
        raise Written(out_dir)

    monkeypatch.setattr(cl, "write_report", write_report)
    with pytest.raises(Written) as written:
        cl.main(["--quick", "--steps", "2", "--seeds", "1", "--no-docs-assets"])
    assert written.value.args[0] != RESULTS


def test_from_json_rewrites_the_committed_table_unchanged(tmp_path: Path) -> None:
    """The committed table is what its committed JSON renders to: nothing measured, no number
    changed (the committed files are re-rendered this way after a layout change)."""
    from benchmarks.report import RESULTS

    before = (RESULTS / "compare_losses.json").read_bytes()
    main(["--from-json", str(RESULTS / "compare_losses.json"), "--out", str(tmp_path),
          "--no-docs-assets"])
    table = (tmp_path / "compare_losses.md").read_text()
    assert table == (RESULTS / "compare_losses.md").read_text()
    assert_fits_the_page(table)
    assert (tmp_path / "compare_losses.png").stat().st_size > 10_000
    assert (RESULTS / "compare_losses.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare_losses.md",
                                                          "compare_losses.png"]


def assert_fits_the_page(markdown: str) -> None:
    """Every table at most six columns, a verdict column first: the docs theme gives a column
    at least 100 px and the page about 690 at a 1280 px window (measured in headless Chromium),
    and a wider table scrolls, hiding its last columns."""
    headers = [line.strip("| ").split(" | ")
               for line, below in itertools.pairwise(markdown.splitlines())
               if below.startswith("|---")]
    assert headers
    for cells in headers:
        assert len(cells) <= 6, cells
        assert "verdict" not in cells[1:], cells
