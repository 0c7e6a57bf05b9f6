"""Paired comparisons and verdicts: against scipy's reference values and hand-made cases."""

import math

import pytest

from benchmarks.paired_stats import Claim, holm, judge, paired_test, verdict


def test_paired_t_matches_the_textbook_formula():
    a, b = [1.0, 2.0, 3.0, 4.0, 5.5], [0.5, 1.7, 2.2, 3.9, 4.0]
    out = paired_test(a, b)
    diff = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(diff) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / 4)
    assert out["diff_mean"] == pytest.approx(mean) and out["diff_sd"] == pytest.approx(sd)
    # t = mean / (sd / sqrt(n)) with 4 degrees of freedom, whose two-sided tail is closed
    # form: P(|T| > t) = 1 - u (1 + 2 / (t^2 + 4)), u = t / sqrt(t^2 + 4).
    t = mean / (sd / math.sqrt(5))
    u = t / math.sqrt(t * t + 4)
    assert out["p_t"] == pytest.approx(1 - u * (1 + 2 / (t * t + 4)), rel=1e-9)
    assert out["p_wilcoxon"] == pytest.approx(0.0625)  # all five differences positive


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_verdicts_follow_sign_direction_and_significance():
    assert verdict(-1.0, 0.01, "lower") == "holds"
    assert verdict(+1.0, 0.01, "lower") == "does not hold"
    assert verdict(+1.0, 0.01, "higher") == "holds"
    assert verdict(-1.0, 0.2, "lower") == "within noise"


def test_judge_pairs_by_seed_and_skips_diverged_seeds():
    per_seed = {("exact", "A"): {"m": [1.0, 1.1, 0.9, 1.0, math.nan]},
                ("exact", "B"): {"m": [2.0, 2.2, 1.9, 2.1, 2.0]}}
    row, = judge([Claim("A below B", "m", ("exact", "A"), ("exact", "B"))], per_seed)
    assert row["n"] == 4 and row["verdict"] == "holds" and row["diff_mean"] < 0
