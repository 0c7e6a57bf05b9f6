"""Smoke test of benchmarks/compare_losses.py: a tiny run writes finite, complete results."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from benchmarks.compare_losses import (
    COLUMNS,
    COMPARISONS,
    CONDITIONAL_LOSSES,
    LOSSES,
    NEW,
    QUICK_NEW,
    TEACHER_FEATURE_LOSSES,
    main,
    plan,
)

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
    old = [n for n in LOSSES if n not in NEW]
    assert {(r["teacher"], r["loss"]) for r in rows} == {
        (t, n) for t in ("exact", "learned") for n in old} | {("exact", "+ CSD")} | {
        ("learned" if n in TEACHER_FEATURE_LOSSES else "exact", n) for n in QUICK_NEW} | {
        ("learned", n) for n in QUICK_NEW if n in LOSSES}
    # One issue-25 row of each kind in quick mode: implicit, f-distill's head, GAN, decoupled.
    kinds = {"SiD", "f-distill", "DMD2", "decoupled"}
    assert {k for k in kinds for n in QUICK_NEW if k in n} == kinds
    assert set(NEW) == {n for n in (*LOSSES, *CONDITIONAL_LOSSES, *TEACHER_FEATURE_LOSSES)
                        if n not in (*old, "+ CSD")}
    by_name = {(r["teacher"], r["loss"]): r for r in rows}
    for key in (("exact", "+ DMD2 (GAN)"), ("learned", "+ DMD2 (GAN)"),
                ("learned", "+ f-distill (JS)")):
        assert by_name[key]["head_params"] > 0 and by_name[key]["seeds_ok"] == 1, key
    assert by_name["exact", "+ SiD (α=1.2)"]["head_params"] == 0
    assert all(math.isfinite(r["ms_per_step"]) and r["ms_per_step"] > 0 for r in rows)
    for row in rows:
        assert all(c in row for c in COLUMNS), row
        for f in FIELDS:
            assert math.isfinite(row[f]), (row["teacher"], row["loss"], f, row[f])
        assert all(math.isfinite(v) for c in row["curves"].values() for v in c)
        assert len(row["per_seed"]["nll"]) == 1 and len(row["per_seed"]["cos_hq_start"]) == 1
    tests = report["paired_tests"]
    run = {t: plan(t, all_rows=False) for t in ("exact", "learned")}
    assert len(tests) == 3 * sum(a in run[t] and b in run[t] for t in run for a, b in COMPARISONS)
    for name in QUICK_NEW:  # each new row against VSD and TSD (flow), with each teacher it ran
        for ref in ("+ VSD", "+ TSD (flow)"):
            assert sum(t["A"] == name and t["B"] == ref for t in tests) == 3 * sum(
                name in r for r in run.values()), (name, ref)
    assert all(t["n"] == 1 and t["verdict"] == "n.s." for t in tests)  # one seed proves nothing
    table = (tmp_path / "compare_losses.md").read_text()
    assert "| teacher | loss |" in table and "Measured on" in table
    assert "| teacher | loss | ms / step | s (all seeds) | head params |" in table
    assert_fits_the_page(table)
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


def test_new_methods_leave_the_papers_holm_family_alone() -> None:
    from benchmarks.compare_losses import paired_tests
    from benchmarks.paired_stats import holm
    from benchmarks.report import RESULTS

    rows = json.loads((RESULTS / "compare_losses.json").read_text())["rows"]  # a full run

    def paper(tests):
        return {(t["teacher"], t["metric"], t["A"], t["B"]): t["p (Holm)"] for t in tests
                if t["family"] == "paper"}

    before = paper(paired_tests(rows))
    # Every new method's rows, as copies of DMD's per-seed results under its name.
    extra = [dict(r, loss=name) for r in rows if r["loss"] == "+ DMD" for name in NEW]
    tests = paired_tests(rows + extra)
    assert before and paper(tests) == before
    methods = [t for t in tests if t["family"] == "methods"]
    assert methods and [t["p (Holm)"] for t in methods] == holm([t["p"] for t in methods])
