"""Paired before/after comparison on held-out environment seeds, with t confidence intervals.

Self-finetuning changes one Actor; its effect is measured by running the Actor before and after
on the *same* held-out seeds with the *same* per-step environment keys
(:mod:`sfjax.baselines.evaluation`), so each seed gives one paired difference
``d_s = after_s - before_s`` per metric. The report is the mean of each side, the mean
difference and its two-sided Student-t confidence interval ``mean(d) +- t_{1-a/2, n-1}
sd(d) / sqrt(n)``, and whether the interval excludes zero (the direction is then significant at
level ``a``). With fewer than two seeds no interval exists and none is claimed.

Shape legend: S = seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy import stats


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the 95 % two-sided Student-t quantile (scipy; the normal 1.96 would
    understate it by 2-4 % for 30 < df < 60, e.g. 2.021 at df = 40)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return float(stats.t.ppf(0.975, df))


def t_interval(values_N) -> tuple[float, float | None, float | None]:
    """(mean, low, high) of 1-D ``values_N``: the mean and its 95 % two-sided Student-t
    interval ``mean +- t_{0.975, N-1} sd / sqrt(N)``; no interval (None, None) for one value."""
    v = np.asarray(values_N, np.float64)
    mean = float(v.mean())
    if v.size < 2:
        return mean, None, None
    half = t_quantile_975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return mean, mean - half, mean + half


def paired_difference(before_S, after_S) -> dict[str, float | bool | int | None]:
    """Mean before / after, mean paired difference and its 95 % t interval."""
    b = np.asarray(before_S, np.float64)
    a = np.asarray(after_S, np.float64)
    if b.shape != a.shape or b.ndim != 1 or b.size == 0:
        raise ValueError(f"need two equal 1-D non-empty arrays, got {b.shape} and {a.shape}")
    diff, low, high = t_interval(a - b)
    return {"n": b.size, "before": float(b.mean()), "after": float(a.mean()), "diff": diff,
            "ci_low": low, "ci_high": high,
            "significant": low is not None and bool(low > 0 or high < 0)}


def paired_report(before: Mapping[str, np.ndarray],
                  after: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """:func:`paired_difference` for every metric present in both (per-seed arrays)."""
    return {k: paired_difference(before[k], after[k]) for k in before if k in after}


def format_paired(report: Mapping[str, Mapping], labels: Mapping[str, str] | None = None,
                  names: tuple[str, str, str] = ("before", "after", "after-before")) -> str:
    """A before/after table with the 95 % interval of the paired difference (``names``: the
    two columns' and the difference's headings)."""
    labels = labels or {}
    before, after, diff = names
    head = f"{'metric':<22} {before:>10} {after:>10} {diff + ' [95% CI]':>34}"
    lines = [head, "-" * len(head)]
    for k, r in report.items():
        ci = ("n/a (one seed)" if r["ci_low"] is None
              else f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]{' *' if r['significant'] else ''}")
        lines.append(f"{labels.get(k, k):<22} {r['before']:>10.2f} {r['after']:>10.2f} "
                     f"{r['diff']:>+12.2f} {ci:>21}")
    return "\n".join(lines)
