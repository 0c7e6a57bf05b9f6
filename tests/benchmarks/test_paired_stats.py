"""Paired comparisons and verdicts: against scipy's reference values and hand-made cases."""

import math

import pytest

from benchmarks.paired_stats import Claim, compare_paired, holm, judge, paired_test, verdict


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


def test_holm_adjustment_is_step_down_and_leaves_undefined_tests_out():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan],
                                                               nan_ok=True)


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


def test_compare_paired_names_a_winner_only_where_the_adjusted_test_supports_it():
    clear = ({"A": "new", "B": "old"}, [1.0, 1.1, 0.9, 1.0, 1.05], [2.0, 2.2, 1.9, 2.1, 2.0])
    noise = ({"A": "new", "B": "old"}, [1.0, 2.0, 1.5, 0.7, 1.2], [1.1, 1.8, 1.6, 0.9, 1.0])
    diverged = ({"A": "x", "B": "y"}, [1.0, None, 2.0], [0.5, 3.0, None])
    rows = compare_paired([clear, noise, diverged])
    assert rows[0]["verdict"] == "new lower" and rows[0]["p (Holm)"] < 0.05
    assert rows[0]["t"] == pytest.approx(-paired_test(*clear[2:0:-1])["d_z"] * math.sqrt(5))
    assert rows[1]["verdict"] == "n.s."
    assert rows[2]["n"] == 1 and rows[2]["verdict"] == "n.s."


def test_judge_reads_a_on_metric_and_b_on_metric_b():
    """Two quantities of the same runs: a's ``m1`` against b's ``m2``. Reading either run on the
    other metric flips the verdict and changes the difference."""
    per_seed = {
        ("exact", "A"): {"m1": [1.0, 1.1, 0.9, 1.0, 1.05], "m2": [5.0, 5.2, 4.9, 5.1, 5.0]},
        ("exact", "B"): {"m1": [0.0, 0.1, -0.1, 0.05, 0.0], "m2": [2.0, 2.2, 1.9, 2.1, 2.0]}}
    row, = judge([Claim("A's m1 below B's m2", "m1", ("exact", "A"), ("exact", "B"),
                        metric_b="m2")], per_seed)
    want = [x - y for x, y in zip(per_seed["exact", "A"]["m1"], per_seed["exact", "B"]["m2"],
                                  strict=True)]
    assert row["diff_mean"] == pytest.approx(sum(want) / 5)  # -1.03; b on m1: +1.0, a on m2: +3
    assert row["verdict"] == "holds" and row["metric"] == "m1 vs m2"
    # Without metric_b both runs are read on metric: here A's m1 is above B's m1.
    row, = judge([Claim("A's m1 below B's m1", "m1", ("exact", "A"), ("exact", "B"))], per_seed)
    assert row["verdict"] == "does not hold" and row["diff_mean"] == pytest.approx(1.0)
