"""Table III, Fig. 2 and Fig. 3 of the paper, written from our own runs.

* :func:`write_table3` — markdown table with rows SF, Reflexion, DQN, PPO, SAC and columns
  Avg. SE, Reconf. times, PQoS vio., Utility (mean ± std over the evaluated trajectories,
  :mod:`sfjax.baselines.evaluation`), plus the environment samples each method used for
  training and for evaluation, the protocol, and which actor/reflector made the LLM rows.
* :func:`plot_fig2` — per-round training curves of the RL baselines (mean ± std band over
  training seeds) with the LLM agents' evaluated values as horizontal lines.
* :func:`plot_fig3` — (a) metrics before/after self-finetuning, (b..) KTO chosen/rejected
  reward curves per KTO iteration, and the last panel the per-iteration means.

Shape legend: N = training seeds, R = rounds.
"""

from __future__ import annotations

import math
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
    """Experiment preset name (smoke / paper)."""
    extra_notes: tuple[str, ...] = field(default_factory=tuple)
    """Further lines printed under the table."""


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
        f"# Table III (reproduced{', preset ' + inputs.preset if inputs.preset else ''})",
        "",
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


def plot_fig3(
    path: str | Path,
    kto_iterations: Sequence[Mapping[str, Sequence[float]]],
    before_after: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """Fig. 3: ``kto_iterations[i]`` holds per-step ``rewards/chosen`` and
    ``rewards/rejected`` of KTO iteration i; ``before_after[metric] = (before, after)``."""
    plt = _pyplot()
    n = len(kto_iterations)
    panels = 1 + n + 1
    cols = min(4, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    flat = list(axes.flat)
    ax = flat[0]
    if before_after:
        labels = list(before_after)
        x = np.arange(len(labels))
        ax.bar(x - 0.2, [before_after[k][0] for k in labels], 0.4, label="before")
        ax.bar(x + 0.2, [before_after[k][1] for k in labels], 0.4, label="after")
        ax.set_xticks(x, [METRIC_LABELS.get(k, k) for k in labels], fontsize=7)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no before/after metrics", ha="center", va="center")
    ax.set_title("(a) before vs after")
    means = {"rewards/chosen": [], "rewards/rejected": []}
    for i, it in enumerate(kto_iterations):
        ax = flat[1 + i]
        for key in means:
            values = np.asarray(it.get(key, []), np.float64)
            ax.plot(np.arange(1, len(values) + 1), values, label=key.split("/")[1])
            means[key].append(float(values.mean()) if values.size else np.nan)
        ax.axhline(0.0, color="gray", lw=0.5)
        ax.set_title(f"({chr(ord('b') + i)}) KTO iteration {i + 1}")
        ax.set_xlabel("KTO step")
        ax.legend(fontsize=7)
    ax = flat[1 + n]
    for key, vals in means.items():
        ax.plot(np.arange(1, n + 1), vals, marker="o", label=key.split("/")[1])
    ax.axhline(0.0, color="gray", lw=0.5)
    ax.set_title(f"({chr(ord('b') + n)}) mean reward per iteration")
    ax.set_xlabel("KTO iteration")
    ax.legend(fontsize=7)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_scalar_events(tb_dir: str | Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the TensorBoard event files under ``tb_dir``,
    in the order they were written (files by name, i.e. by creation time).

    A minimal TFRecord reader (length, crc, payload, crc) over tensorboardX's ``Event``
    protobuf, so reading needs neither TensorFlow nor the tensorboard package.
    """
    import struct

    from tensorboardX.proto import event_pb2

    out: list[tuple[str, int, float]] = []
    for path in sorted(Path(tb_dir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            start = pos + 12
            if start + length + 4 > len(data):
                break  # a record still being written
            event = event_pb2.Event()
            event.ParseFromString(data[start : start + length])
            pos = start + length + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.append((v.tag, int(event.step), float(v.simple_value)))
    return out


def kto_iteration_curves(
    events: Sequence[tuple[str, int, float]],
    step_tags: Sequence[str] = ("train/rewards/chosen", "train/rewards/rejected"),
    boundary_tag: str = "kto_iter/num_steps",
) -> list[dict[str, list[float]]]:
    """Split per-step KTO scalars into KTO iterations.

    The SF loop logs ``kto_iter/*`` once after each KTO iteration's training, so the
    ``train/*`` points written between two such markers belong to one iteration. Keys of each
    returned dict drop the ``train/`` prefix (``rewards/chosen``, ``rewards/rejected``).
    """
    iterations: list[dict[str, list[float]]] = []
    current: dict[str, list[float]] = {t.split("/", 1)[1]: [] for t in step_tags}
    for tag, _step, value in events:
        if tag in step_tags:
            current[tag.split("/", 1)[1]].append(value)
        elif tag == boundary_tag:
            iterations.append(current)
            current = {t.split("/", 1)[1]: [] for t in step_tags}
    return iterations
