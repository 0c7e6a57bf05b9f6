"""Paired comparisons across seeds and verdicts written from them, never typed by hand.

Every claim compares two runs that share their seeds (same generator init, data stream, fake
score warm-up), so the per-seed differences are paired: a paired t-test (Student 1908) decides,
a Wilcoxon signed-rank test is reported beside it, the p-values of one family of claims are
Holm-adjusted (Holm 1979), and the effect size is the mean difference and Cohen's d_z.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from scipy import stats

ALPHA = 0.05
# The verdict first; six columns at most: the docs theme gives each column at least 100 px and
# the page ~690 (a wider table scrolls and hides its last columns). n, t and the unadjusted p
# stay in the JSON.
TEST_COLUMNS = ("verdict", "metric", "A", "B", "mean A - B", "p (Holm)")
TEST_HEADERS = {"mean A - B": "A − B"}


@dataclass(frozen=True)
class Claim:
    """Run ``a`` is better than run ``b`` on ``metric`` (``b`` read on ``metric_b`` if given:
    two quantities of the same runs); ``better`` says which direction is better."""

    text: str
    metric: str
    a: tuple[str, str]  # (teacher, loss) row keys
    b: tuple[str, str]
    better: Literal["lower", "higher"] = "lower"
    metric_b: str | None = None


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean and sd of ``a - b`` over paired seeds, d_z, paired t and Wilcoxon two-sided p."""
    diff = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diff)
    mean = sum(diff) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1)) if n > 1 else math.nan
    if n < 2 or sd == 0:
        p_t = 0.0 if n > 1 and mean != 0 else 1.0
    else:
        p_t = float(stats.ttest_rel(a, b).pvalue)
    p_w = float(stats.wilcoxon(diff).pvalue) if n > 1 and any(diff) else 1.0
    return {"n": n, "diff_mean": mean, "diff_sd": sd, "d_z": mean / sd if sd else math.inf,
            "p_t": p_t, "p_wilcoxon": p_w}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given; NaN, an undefined test, stays NaN
    and does not count in the family)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted, running = [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def verdict(diff_mean: float, p_adjusted: float, better: str) -> str:
    """holds / does not hold (the opposite is significant) / within noise."""
    if p_adjusted >= ALPHA or diff_mean == 0:
        return "within noise"
    a_better = diff_mean < 0 if better == "lower" else diff_mean > 0
    return "holds" if a_better else "does not hold"


def judge(claims: Sequence[Claim], per_seed: dict[tuple[str, str], dict[str, list[float]]]
          ) -> list[dict[str, Any]]:
    """One row per claim with its test, Holm-adjusted p and verdict; claims whose runs are
    missing are left out, runs diverged on some seed are compared on the seeds both finished."""
    rows = []
    for c in claims:
        if c.a not in per_seed or c.b not in per_seed:
            continue
        a, b = per_seed[c.a][c.metric], per_seed[c.b][c.metric_b or c.metric]
        pairs = [(x, y) for x, y in zip(a, b, strict=True)
                 if math.isfinite(x) and math.isfinite(y)]
        test = paired_test([x for x, _ in pairs], [y for _, y in pairs])
        metric = c.metric if c.metric_b is None else f"{c.metric} vs {c.metric_b}"
        rows.append({"claim": c.text, "metric": metric, "a": " / ".join(c.a),
                     "b": " / ".join(c.b), "better": c.better, **test})
    for row, p in zip(rows, holm([r["p_t"] for r in rows]), strict=True):
        row["p_holm"] = p
        row["verdict"] = verdict(row["diff_mean"], p, row["better"])
        row["effect"] = (f"{row['diff_mean']:+.3g} (d_z {row['d_z']:+.2g}), "
                         f"p_t {row['p_t']:.2g}, Holm {p:.2g}, Wilcoxon {row['p_wilcoxon']:.2g}")
    return rows


def compare_paired(pairs: Sequence[tuple[dict[str, Any], Sequence[float | None],
                                         Sequence[float | None]]],
                   alpha: float = ALPHA) -> list[dict[str, Any]]:
    """One row per ``(labels, A per seed, B per seed)`` (lower is better; None: diverged seed).

    Seeds where either value is None are dropped; p-values (paired t) are Holm-adjusted over all
    pairs; the verdict names the lower of A and B only where the adjusted p is below ``alpha``.
    """
    rows = []
    for labels, a, b in pairs:
        kept = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
        test = paired_test([x for x, _ in kept], [y for _, y in kept]) if kept else None
        mean = test["diff_mean"] if test else math.nan
        t = test["d_z"] * math.sqrt(test["n"]) if test and test["n"] > 1 else math.nan
        rows.append({**labels, "n": len(kept), "mean A - B": mean, "t": t,
                     "p": test["p_t"] if test else math.nan})
    for row, adjusted in zip(rows, holm([r["p"] for r in rows]), strict=True):
        row["p (Holm)"] = adjusted
        if math.isnan(adjusted) or adjusted >= alpha:
            row["verdict"] = "n.s."
        else:
            winner = row.get("A", "A") if row["mean A - B"] < 0 else row.get("B", "B")
            row["verdict"] = f"{winner} lower"
    return rows
