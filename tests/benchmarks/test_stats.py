"""Paired tests across seeds: the t-test against scipy's definition, Holm, verdict words."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("scipy")

from benchmarks.stats import compare_paired, holm, paired_t


def test_paired_t_matches_its_formula():
    a, b = [3.0, 2.5, 4.1, 3.3], [2.0, 2.4, 3.0, 3.1]
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    got_mean, t, p = paired_t(a, b)
    assert got_mean == pytest.approx(mean) and t == pytest.approx(mean / (sd / 2))
    assert 0.1 < p < 0.11  # t = 2.30 on 3 degrees of freedom
    assert all(math.isnan(v) for v in paired_t([1.0, 2.0], [0.0, 1.0])[1:])  # no spread


def test_holm_is_step_down_and_monotone():
    assert holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan],
                                                               nan_ok=True)


def test_verdicts_only_where_the_adjusted_test_supports_them():
    clear = ({"A": "new", "B": "old"}, [1.0, 1.1, 0.9, 1.0, 1.05], [2.0, 2.2, 1.9, 2.1, 2.0])
    noise = ({"A": "new", "B": "old"}, [1.0, 2.0, 1.5, 0.7, 1.2], [1.1, 1.8, 1.6, 0.9, 1.0])
    diverged = ({"A": "x", "B": "y"}, [1.0, None, 2.0], [0.5, 3.0, None])
    rows = compare_paired([clear, noise, diverged])
    assert rows[0]["verdict"] == "new lower" and rows[0]["p (Holm)"] < 0.05
    assert rows[1]["verdict"] == "n.s."
    assert rows[2]["n"] == 1 and rows[2]["verdict"] == "n.s."
