"""Table III, Fig. 2 and Fig. 3 of the paper, written from our own runs.

* :func:`write_table3` — markdown table with rows SF, Reflexion, DQN, PPO, SAC and the three
  reference rows (best static, adaptive heuristic, hindsight bound) and columns Avg. SE,
  Reconf. times, PQoS vio., Utility (mean ± std over the evaluated trajectories,
  :mod:`sfjax.baselines.evaluation`) and % of hindsight, plus the environment samples each
  method used for training and for evaluation, the protocol, and which actor/reflector made
  the LLM rows.
* :func:`plot_fig2` — per-round training curves of the RL baselines (mean ± std band over
  training seeds) with the LLM agents' evaluated values as horizontal lines.
* :func:`plot_fig3` — (a) metrics before/after self-finetuning (one panel and unit each),
  (b..) KTO chosen/rejected reward curves per KTO iteration at their logged optimizer steps,
  and the last panel the per-iteration means.

Shape legend: N = training seeds, R = rounds.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sfjax.baselines.evaluation import METRIC_LABELS, METRICS, EvalProtocol

TABLE_ROWS = ("SF", "Reflexion", "DQN", "PPO", "SAC", "Best static", "Adaptive heuristic",
              "Hindsight (beam search)")
"""Row order of Table III: the paper's methods, then the reference rows
(:mod:`sfjax.baselines.reference`)."""
PAPER_TABLE3 = {
    "SF": (5.354, 21.091, 8.561, 25702.2),
    "Reflexion": (5.299, 29.454, 8.630, 25314.69),
    "DQN": (5.219, 46.204, 15.911, 22519.1),
    "PPO": (3.587, 51.411, 1.997, 19277.2),
    "SAC": (5.748, 44.775, 59.967, 11704.3),
}
"""The paper's Table III (Avg. SE, Reconf. times, PQoS vio., Utility), for reference."""


@dataclass(frozen=True)
class MethodResult:
    """One row of Table III."""

    name: str
    """Row name (one of TABLE_ROWS, or any other label)."""
    summary: Mapping[str, tuple[float, float]]
    """metric -> (mean, std) over evaluated trajectories (keys: evaluation.METRICS)."""
    train_samples: int
    """Environment samples used to train / adapt the method (per training seed)."""
    eval_samples: int
    """Environment samples spent on its evaluation."""
    num_trajectories: int
    """Evaluated trajectories behind the mean ± std."""
    note: str = ""
    """Free text (e.g. which actor and reflector produced an LLM row)."""

    def __post_init__(self):
        missing = [m for m in METRICS if m not in self.summary]
        if missing:
            raise ValueError(f"MethodResult {self.name!r} lacks metrics {missing}.")


@dataclass(frozen=True)
class Table3Inputs:
    """Everything the table needs besides the rows."""

    protocol: EvalProtocol
    """The shared evaluation protocol (seeds, trajectory length)."""
    llm_provenance: str
    """Which actor and reflector produced the LLM rows (SF, Reflexion)."""
    preset: str = ""
    """Experiment preset name (smoke / paper); empty: the heading says "custom config"."""
    actor_note: str = ""
    """Said right under the heading, e.g. that the LLM rows' Actor is a random tiny model."""
    extra_notes: tuple[str, ...] = field(default_factory=tuple)
    """Further lines printed under the table."""
    environment: str = ""
    """Where the rows ran (:func:`sfjax.provenance.describe_run`); empty: not said."""


def _fmt(mean: float, std: float, metric: str) -> str:
    digits = 1 if metric == "utility" else 3
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


HINDSIGHT_ROW = TABLE_ROWS[-1]
"""Name of the hindsight reference row; other rows' utilities are also shown as % of it."""


def _pct_of(value: float, bound: float) -> str:
    """``value`` as a percentage of a positive ``bound`` (utilities can be negative)."""
    return f"{100.0 * value / bound:.1f} %" if bound > 0 else "n/a"


def format_table3(rows: Sequence[MethodResult], inputs: Table3Inputs) -> str:
    """Markdown text of Table III (rows in TABLE_ROWS order first, then any others)."""
    if not rows:
        raise ValueError("format_table3 needs at least one MethodResult.")
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate rows in Table III: {names}")
    order = {n: i for i, n in enumerate(TABLE_ROWS)}
    rows = sorted(rows, key=lambda r: order.get(r.name, len(order)))
    bound = next((r for r in rows if r.name == HINDSIGHT_ROW), None)
    header = ["Algorithm", *(METRIC_LABELS[m] for m in METRICS), "Train samples", "Eval samples"]
    if bound is not None:
        header.insert(1 + len(METRICS), "% of hindsight")
    lines = [
        f"# Table III (reproduced, preset `{inputs.preset}`)"
        if inputs.preset
        else "# Table III (reproduced, custom config)",
        "",
        *([f"**{inputs.actor_note}**", ""] if inputs.actor_note else []),
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        cells = [_fmt(*r.summary[m], m) for m in METRICS]
        if bound is not None:
            cells.append(_pct_of(r.summary["utility"][0], bound.summary["utility"][0]))
        lines.append(
            f"| {r.name} | " + " | ".join(cells) + f" | {r.train_samples:,} | {r.eval_samples:,} |"
        )
    p = inputs.protocol
    lines += [
        "",
        f"Mean ± std over evaluated trajectories; every method is evaluated on the same "
        f"environment seeds {list(p.seeds)} with {p.num_steps}-step trajectories "
        f"(identical per-step environment keys). Train samples = environment steps used to "
        f"train or adapt the method, per training seed.",
        f"LLM rows (SF, Reflexion): {inputs.llm_provenance}",
        *([f"Ran on (environment.json): {inputs.environment}"] if inputs.environment else []),
    ]
    for r in rows:
        if r.note:
            lines.append(f"- {r.name}: {r.note} ({r.num_trajectories} trajectories)")
    lines += [*inputs.extra_notes, "", "Paper's Table III, for reference:", ""]
    lines += ["| Algorithm | " + " | ".join(METRIC_LABELS[m] for m in METRICS) + " |"]
    lines += ["|" + "---|" * (len(METRICS) + 1)]
    for name, vals in PAPER_TABLE3.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:g}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def write_table3(path: str | Path, rows: Sequence[MethodResult], inputs: Table3Inputs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_table3(rows, inputs))
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FIG2_PANELS = (
    ("utility", "(a) Episode utility"),
    ("mean_se", "(b) Mean SE (bit/s/Hz)"),
    ("violations", "(c) Packet QoS violation times"),
    ("reconfigurations", "(d) Reconfiguration times"),
)


_LLM_STYLES = (("black", "--"), ("tab:purple", ":"), ("tab:brown", "-."))
_SUM_METRICS = ("utility", "reconfigurations", "violations")


def plot_fig2(
    path: str | Path,
    curves: Mapping[str, Mapping[str, np.ndarray]],
    llm_rows: Sequence[MethodResult] = (),
    llm_scale: float = 1.0,
) -> Path:
    """Fig. 2: RL training curves per round (``curves[algo][metric]`` is [N, R]) and the
    LLM agents' evaluated means as horizontal lines.

    ``llm_scale`` multiplies the LLM rows' per-trajectory sums (utility, reconfigurations,
    violations) — training trajectory length / evaluation length — so that both are per
    training trajectory when the two lengths differ (smoke runs); 1 in the paper setting.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (metric, title) in zip(axes.flat, FIG2_PANELS):
        for name, c in curves.items():
            v_NR = np.asarray(c[metric], np.float64)
            rounds = np.arange(1, v_NR.shape[1] + 1)
            mean, std = v_NR.mean(0), v_NR.std(0)
            (line,) = ax.plot(rounds, mean, label=name)
            ax.fill_between(rounds, mean - std, mean + std, alpha=0.2, color=line.get_color())
        for row, (color, style) in zip(llm_rows, _LLM_STYLES):
            value = row.summary[metric][0] * (llm_scale if metric in _SUM_METRICS else 1.0)
            ax.axhline(value, linestyle=style, color=color, label=f"{row.name} (evaluated)")
        ax.set_title(title)
        ax.set_xlabel("training round")
        ax.grid(alpha=0.3)
    if curves or llm_rows:  # a table of reference rows alone draws no curve to label
        axes.flat[0].legend(fontsize=8)
    if llm_scale != 1.0:
        fig.text(
            0.5, 0.005,
            f"LLM sums rescaled by {llm_scale:.3g} (training / evaluation trajectory length)",
            ha="center", fontsize=8,
        )  # fmt: skip
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


FIG3_UNITS = {
    "mean_se": ("Avg. SE", "bit/s/Hz"),
    "reconfigurations": ("Reconfigurations", "per trajectory"),
    "violations": ("PQoS violations", "steps per trajectory"),
    "utility": ("Utility (eq. 15)", "per trajectory"),
}
REWARD_LABEL = "KTO reward β·log(πθ/πref)"


def plot_fig3(
    path: str | Path,
    kto_iterations: Sequence[Mapping[str, Sequence[tuple[int, float]]]],
    before_after: Mapping[str, tuple[float, float]] | None = None,
    before_after_source: str = "",
) -> Path:
    """Fig. 3: one panel per before/after metric (one unit per axis), one per KTO iteration
    and a last one with the per-iteration means.

    ``kto_iterations[i][key]`` holds ``(global KTO step, value)`` points of
    ``rewards/chosen`` and ``rewards/rejected`` of KTO iteration i, plotted at their logged
    steps (a step whose micro-batches held one class only has no point for the other);
    ``before_after[metric] = (before, after)``, measured on ``before_after_source`` (e.g.
    "held-out seeds"; shown in the panels' titles).
    """
    plt = _pyplot()
    n = len(kto_iterations)
    metrics = list(before_after or {}) or [None]
    panels = len(metrics) + n + 1
    cols = min(4, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    flat = list(axes.flat)
    for j, metric in enumerate(metrics):
        ax = flat[j]
        tag = f"(a{j + 1})" if len(metrics) > 1 else "(a)"
        if metric is None:
            ax.text(0.5, 0.5, "no before/after metrics", ha="center", va="center")
            ax.set_title("(a) before vs after")
            continue
        name, unit = FIG3_UNITS.get(metric, (METRIC_LABELS.get(metric, metric), ""))
        before, after = before_after[metric]
        ax.bar([0, 1], [before, after], 0.6, color=["tab:gray", "tab:blue"])
        ax.set_xticks([0, 1], ["before SF", "after SF"])
        ax.set_ylabel(f"{name} [{unit}]" if unit else name)
        # the source (e.g. a list of 16 held-out seeds) wrapped to the panel's width
        source = textwrap.fill(f"({before_after_source})", 34) if before_after_source else ""
        ax.set_title(f"{tag} {name}" + (f"\n{source}" if source else ""), fontsize=9)
    means = {"rewards/chosen": [], "rewards/rejected": []}
    first = len(metrics)
    for i, it in enumerate(kto_iterations):
        ax = flat[first + i]
        for key in means:
            points = sorted(it.get(key, []))
            steps = [p[0] for p in points]
            values = np.asarray([p[1] for p in points], np.float64)
            ax.plot(steps, values, marker=".", label=key.split("/")[1])
            means[key].append(float(values.mean()) if values.size else np.nan)
        ax.axhline(0.0, color="gray", lw=0.5)
        ax.set_title(f"({chr(ord('b') + i)}) KTO iteration {i + 1}")
        ax.set_xlabel("KTO optimizer step (global)")
        ax.set_ylabel(REWARD_LABEL)
        ax.legend(fontsize=7)
    ax = flat[first + n]
    for key, vals in means.items():
        ax.plot(np.arange(1, n + 1), vals, marker="o", label=key.split("/")[1])
    ax.axhline(0.0, color="gray", lw=0.5)
    ax.set_title(f"({chr(ord('b') + n)}) mean reward per iteration")
    ax.set_xticks(np.arange(1, n + 1))
    ax.set_xlabel("KTO iteration")
    ax.set_ylabel(REWARD_LABEL)
    ax.legend(fontsize=7)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_scalar_events(tb_dir: str | Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the TensorBoard event files under ``tb_dir``
    (every sub-directory holding event files is one run), in the order they were written.

    Read with tensorboard's own ``EventAccumulator`` (record CRCs checked; a record still
    being written is left for the next read).
    """
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    runs = sorted({p.parent for p in Path(tb_dir).rglob("events.out.tfevents.*")})
    out: list[tuple[float, str, int, float]] = []
    for run in runs:
        acc = EventAccumulator(str(run), size_guidance={SCALARS: 0})  # 0: keep every point
        acc.Reload()
        for tag in acc.Tags()[SCALARS]:
            out += [(e.wall_time, tag, int(e.step), float(e.value)) for e in acc.Scalars(tag)]
    out.sort(key=lambda x: x[0])  # stable: points of one wall time keep their tag order
    return [(tag, step, value) for _, tag, step, value in out]


def kto_iteration_curves(
    events: Sequence[tuple[str, int, float]],
    step_tags: Sequence[str] = ("train/rewards/chosen", "train/rewards/rejected"),
    size_tag: str = "kto_iter/num_steps",
) -> list[dict[str, list[tuple[int, float]]]]:
    """Split per-step KTO scalars into KTO iterations by their logged steps.

    The SF loop logs ``train/*`` at the global KTO optimizer step (it keeps counting across
    KTO iterations) and, after each KTO iteration ``k``, ``kto_iter/num_steps`` = that
    iteration's optimizer steps at step ``k``; iteration ``k`` therefore owns the global
    steps after the first ``sum(num_steps[:k])``. Returns per iteration ``{"rewards/chosen":
    [(step, value), ...], "rewards/rejected": [...]}`` (keys without the ``train/`` prefix).
    """
    sizes: dict[int, float] = {}
    points: dict[str, list[tuple[int, float]]] = {t: [] for t in step_tags}
    for tag, step, value in events:
        if tag in points:
            points[tag].append((step, value))
        elif tag == size_tag:
            sizes[step] = value  # a resumed run may log an iteration again: the last wins
    bounds = np.cumsum([int(sizes[k]) for k in sorted(sizes)])
    iterations = [{t.split("/", 1)[1]: [] for t in step_tags} for _ in bounds]
    for tag, pts in points.items():
        for step, value in pts:
            k = int(np.searchsorted(bounds, step, side="left"))  # steps count from 1
            if k < len(iterations):
                iterations[k][tag.split("/", 1)[1]].append((step, value))
    return iterations
