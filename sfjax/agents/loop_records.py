"""The self-finetuning loop's iteration records (``summary.json``) and its final table.

Each SF iteration's record holds the mean metrics of its collected trajectories
(:func:`mean_metrics`), the Reflector's calls in its reflect phase (retries, their reasons,
cache hits: the change of the Reflector's counters, :func:`stats_snapshot` before and after,
:func:`stats_delta`) and its KTO iterations; :func:`format_table` prints one row per
iteration, and :func:`best_iteration` picks the iterate ``LoopConfig.final_actor='best'`` keeps.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sfjax.agents.trajectory import Trajectory, UtilityWeights, trajectory_metrics

SUMMARY_METRICS = ("avg_se", "reconfigurations", "violations", "utility", "parse_failures")


def mean_metrics(trajs: Sequence[Trajectory], weights: UtilityWeights) -> dict[str, float]:
    """Per-trajectory metrics averaged over the parallel trajectories (and their std)."""
    per = [trajectory_metrics(t, weights) for t in trajs]
    out = {}
    for k in SUMMARY_METRICS:
        v = np.array([p[k] for p in per], dtype=np.float64)
        out[k] = float(v.mean())
        out[f"{k}_std"] = float(v.std())
    out["num_trajectories"] = len(per)
    return out


def best_iteration(iterations: Sequence[Mapping[str, Any]]) -> int:
    """The iteration whose collected trajectories had the highest mean utility; the earlier
    on a tie, and never one whose utility is NaN unless all are."""
    best = None
    for r in iterations:
        u = float(r["utility"])
        if not np.isnan(u) and (best is None or u > best[1]):
            best = (int(r["iteration"]), u)
    return best[0] if best is not None else int(iterations[0]["iteration"])


def stats_snapshot(reflector) -> dict:
    """A copy of a Reflector's counters (``stats``: numbers and dicts of numbers), or {}."""
    return json.loads(json.dumps(getattr(reflector, "stats", {}) or {}))


def stats_delta(before: dict, after: dict, into: dict | None = None) -> dict:
    """``into + (after - before)``, key by key, nested dicts included; zero entries dropped."""
    out = dict(into or {})
    for k, v in after.items():
        if isinstance(v, dict):
            sub = stats_delta(before.get(k, {}), v, out.get(k, {}))
            if sub:
                out[k] = sub
        elif isinstance(v, int | float) and v - before.get(k, 0):
            out[k] = out.get(k, 0) + v - before.get(k, 0)
    return out


def _or_dash(v) -> str:
    return "-" if v is None else str(v)


def format_table(summary: Mapping[str, Any]) -> str:
    """The final table: one row per SF iteration (iteration 0 = before fine-tuning)."""
    head = (
        f"{'iter':>4} {'avg SE':>8} {'reconf':>7} {'PQoS vio':>9} {'utility':>10} "
        f"{'parse fail':>10} {'n_D':>6} {'n_U':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in summary["iterations"]:
        lines.append(
            f"{r['iteration']:>4} {r['avg_se']:>8.3f} {r['reconfigurations']:>7.1f} "
            f"{r['violations']:>9.1f} {r['utility']:>10.1f} {r['parse_failures']:>10.1f} "
            f"{_or_dash(r.get('n_desirable')):>6} {_or_dash(r.get('n_undesirable')):>6}"
        )
    return "\n".join(lines)
