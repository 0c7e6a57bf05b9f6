"""Paired tests across seeds for the benchmarks' comparisons: verdicts only where they hold."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

ALPHA = 0.05
TEST_COLUMNS = ("teacher", "metric", "A", "B", "n", "mean A - B", "t", "p", "p (Holm)",
                "verdict")


def paired_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """(mean of a - b, t statistic, two-sided p) of the paired t-test; NaNs where undefined."""
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(diffs) / len(diffs) if diffs else math.nan
    if len(diffs) < 2 or all(d == diffs[0] for d in diffs):
        return mean, math.nan, math.nan  # no spread: the test says nothing
    result = stats.ttest_rel(a, b)
    return mean, float(result.statistic), float(result.pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error over all of them); NaN stays NaN."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def compare_paired(pairs: Sequence[tuple[dict[str, Any], Sequence[float | None],
                                         Sequence[float | None]]],
                   alpha: float = ALPHA) -> list[dict[str, Any]]:
    """One row per ``(labels, A per seed, B per seed)`` (lower is better; None: diverged seed).

    Seeds where either value is None are dropped; p-values are Holm-adjusted over all pairs;
    the verdict names the lower of A and B only where the adjusted p is below ``alpha``.
    """
    rows = []
    for labels, a, b in pairs:
        kept = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
        xs, ys = [x for x, _ in kept], [y for _, y in kept]
        mean, t, p = paired_t(xs, ys)
        rows.append({**labels, "n": len(kept), "mean A - B": mean, "t": t, "p": p})
    for row, adjusted in zip(rows, holm([r["p"] for r in rows]), strict=True):
        row["p (Holm)"] = adjusted
        if math.isnan(adjusted) or adjusted >= alpha:
            row["verdict"] = "n.s."
        else:
            winner = row.get("A", "A") if row["mean A - B"] < 0 else row.get("B", "B")
            row["verdict"] = f"{winner} lower"
    return rows
