"""Paired comparison of two evaluated rows, from the run dirs that produced them.

    python -m sfjax.baselines.compare runs/table3_default:ppo runs/table3_tuned:ppo
    python -m sfjax.baselines.compare runs/table3_paper:heuristic runs/table3_paper:sf

``table3.md`` gives each row's mean ± std over its trajectories. Two rows evaluated under the
same protocol (the same env seeds, trajectory length and per-step keys, the same env config)
saw the same traffic and channels step by step, so their difference is better read paired:
this prints ``B − A`` per metric with its 95 % Student-t interval (:mod:`sfjax.baselines.paired`):

- **by evaluation seed** (always): each seed's metric, averaged over training seeds where a
  row has them, differenced; df = seeds − 1;
- **by training seed** (RL rows of both sides with the same training seeds, i.e. the same
  training keys): each training seed's mean over the evaluation seeds, differenced; df =
  training seeds − 1. This is the interval to quote when the question is whether a training
  setting (a learning rate) is better, since it counts training seeds as the replicates.

A row is ``RUN_DIR:ROW``: ``RUN_DIR`` a table3.py, rl_baselines.py or reflexion_ranslicing.py
run dir and ``ROW`` one of :data:`ROW_FILES` (where that run wrote the row's per-step records),
or a sf_ranslicing.py run dir (table3's ``sf/`` too) and ``ROW`` one of its held-out Actors
(:data:`SF_ROWS`): ``before`` (the Actor before fine-tuning), ``after`` (the run's final Actor)
or ``after-K`` (the Actor after K SF iterations, where the run measured it). A held-out
evaluation uses Table III's protocol (:mod:`sfjax.baselines.heldout`), so an SF run whose
``--heldout.seeds`` / ``--heldout.num-steps`` and env are a table3 run's pairs with its rows.
Rows of two runs with different protocols or env configs are refused: their seeds are not the
same trajectories, and an unpaired comparison is not what this tool is for.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfjax import atomic, provenance
from sfjax.atomic import DamagedFile
from sfjax.baselines.evaluation import METRIC_LABELS, Rollouts
from sfjax.baselines.heldout import HeldOutConfig, after_name
from sfjax.baselines.paired import format_paired, paired_report
from sfjax.baselines.reference import REFERENCE_ROWS
from sfjax.baselines.rl import ALGOS

ROW_FILES = {
    **{name: f"{name}/eval_rollouts.npz" for name in ("sf", "reflexion", *ALGOS)},
    **{key: f"eval_{key}.npz" for key in REFERENCE_ROWS},
}
"""Row name -> its per-step evaluation records, relative to the run dir that evaluated it
(table3.py writes the reference rows' under these names)."""
SF_ROWS = ("before", "after", "after-K")
"""The held-out Actors of a sf_ranslicing.py run dir (``RUN_DIR/heldout/*.json``)."""
LEGACY_FILES = {"static": "eval_best.npz", "heuristic": "eval_adaptive.npz"}
"""Where table3.py wrote two reference rows before they were named by their row key."""


@dataclass(frozen=True)
class Row:
    """One evaluated row and what it must share with another to be paired."""

    label: str
    """``RUN_DIR:ROW`` as given."""
    per_episode: dict[str, np.ndarray]
    """Metric -> per-trajectory values, shape [N, S] (N training seeds) or [S]."""
    protocol: dict[str, Any]
    """The run's evaluation protocol (seeds, num_steps, key_offset) from its config.json."""
    env: dict[str, Any]
    """The run's env config from its config.json."""
    train_seeds: tuple[int, ...] | None
    """Training seeds behind a leading N axis (RL rows), else None."""
    environment: list[dict[str, Any]] | None = field(default_factory=list)
    """The run's :mod:`sfjax.provenance` records, one per start ([]: a run from before they
    were written; None: its ``environment.json`` is damaged)."""


def load_row(spec: str) -> Row:
    """Read ``RUN_DIR:ROW`` (see the module docstring); clear errors for what is missing."""
    run, sep, name = spec.rpartition(":")
    if not sep or not run:
        raise ValueError(f"{spec!r}: expected RUN_DIR:ROW, ROW one of {sorted(ROW_FILES)} "
                         f"(an SF run dir: {', '.join(SF_ROWS)})")  # fmt: skip
    sf_row = name in SF_ROWS[:2] or re.fullmatch(r"after-\d+", name)
    if name not in ROW_FILES and not sf_row:
        raise ValueError(f"{spec!r}: unknown row {name!r}; one of {sorted(ROW_FILES)} "
                         f"(an SF run dir: {', '.join(SF_ROWS)})")  # fmt: skip
    run_dir = Path(run)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{spec!r}: no {config_path} (not a finished run dir?)")
    config = atomic.read_json(config_path, "the run's config")
    environment = _environment(run_dir)
    if sf_row:
        return _sf_row(spec, run_dir, config, name, environment)
    missing = [k for k in ("protocol", "env") if k not in config]
    if missing:
        raise ValueError(f"{spec!r}: {config_path} has no {missing}: not a table3.py, "
                         "rl_baselines.py or reflexion_ranslicing.py run")  # fmt: skip
    path = run_dir / ROW_FILES[name]
    legacy = run_dir / LEGACY_FILES.get(name, ROW_FILES[name])
    if not path.is_file() and legacy.is_file():
        path = legacy
    if not path.is_file():
        raise FileNotFoundError(f"{spec!r}: no {path}: this run did not evaluate row {name!r}")
    per_episode = Rollouts.load(path).per_episode()
    seeds = None
    if name in ALGOS:
        seeds = tuple(int(s) for s in config.get("rl", {}).get("seeds", ()))
        n = per_episode["utility"].shape[0]
        if per_episode["utility"].ndim != 2 or len(seeds) != n:
            raise ValueError(f"{spec!r}: {path} holds {per_episode['utility'].shape} "
                             f"trajectories, config.json lists training seeds {seeds}")  # fmt: skip
    return Row(spec, per_episode, config["protocol"], config["env"], seeds, environment)


def _environment(run_dir: Path) -> list[dict[str, Any]] | None:
    try:
        return provenance.read(run_dir)
    except DamagedFile:
        return None


def _sf_row(spec: str, run_dir: Path, config: dict, name: str, environment) -> Row:
    """A held-out Actor of a sf_ranslicing.py run dir (``before``, ``after``, ``after-K``)."""
    heldout = config.get("heldout")
    if "env" not in config or not isinstance(heldout, dict):
        raise ValueError(f"{spec!r}: {run_dir / 'config.json'} is not a sf_ranslicing.py "
                         "run's (no 'heldout' section); rows before / after / after-K are an "
                         "SF run's")  # fmt: skip
    if not heldout.get("seeds"):
        raise ValueError(f"{spec!r}: the run had no held-out evaluation (--heldout.seeds empty)")
    if name == "after":
        summary = run_dir / "summary.json"
        held = atomic.read_json(summary, "the run's summary").get("held_out") \
            if summary.is_file() else None
        if not held:
            raise FileNotFoundError(f"{spec!r}: {summary} reports no held-out 'after' yet (an "
                                    "unfinished run? after-K names an iterate's)")  # fmt: skip
        name = f"after-{held['after_iteration']}"
    file = "before" if name == "before" else after_name(int(name.split("-")[1]))
    path = run_dir / "heldout" / f"{file}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{spec!r}: no {path}: this run did not measure that Actor")
    per_seed = atomic.read_json(path, "the held-out evaluation")
    if missing := [k for k in METRIC_LABELS if k not in per_seed]:
        raise DamagedFile(f"the held-out evaluation {path} lacks {missing}")
    per_episode = {k: np.asarray(per_seed[k], np.float32) for k in METRIC_LABELS}
    # what the held-out evaluation ran (sfjax.baselines.heldout): its protocol, as config.json
    # writes one, on the run's env with episodes cut to the protocol's length
    p = HeldOutConfig(seeds=tuple(heldout["seeds"]), num_steps=heldout["num_steps"]).protocol()
    protocol = {**asdict(p), "seeds": list(p.seeds)}
    env = {**config["env"], "episode_steps": p.num_steps}
    return Row(spec, per_episode, protocol, env, None, environment)


def _check_pairable(a: Row, b: Row) -> None:
    for what, x, y in (("protocol", a.protocol, b.protocol), ("env", a.env, b.env)):
        if x != y:
            keys = sorted(k for k in x.keys() | y.keys() if x.get(k) != y.get(k))
            raise ValueError(f"{a.label} and {b.label} were evaluated under different {what}s "
                             f"(keys {keys}): their trajectories are not paired")  # fmt: skip


def by_eval_seed(row: Row) -> dict[str, np.ndarray]:
    """Metric -> [S]: each evaluation seed's value, averaged over training seeds if any."""
    return {k: v.reshape(-1, v.shape[-1]).mean(0) for k, v in row.per_episode.items()}


def by_train_seed(row: Row) -> dict[str, np.ndarray]:
    """Metric -> [N]: each training seed's mean over the evaluation seeds (RL rows)."""
    return {k: v.mean(-1) for k, v in row.per_episode.items()}


def compare(a: Row, b: Row) -> dict[str, dict[str, dict]]:
    """``{"evaluation seed": report, ["training seed": report]}``, each report
    :func:`~sfjax.baselines.paired.paired_report` of B (after) against A (before)."""
    _check_pairable(a, b)
    out = {"evaluation seed": paired_report(by_eval_seed(a), by_eval_seed(b))}
    if a.train_seeds and a.train_seeds == b.train_seeds:
        out["training seed"] = paired_report(by_train_seed(a), by_train_seed(b))
    return out


def format_compare(a: Row, b: Row, result: dict[str, dict[str, dict]]) -> str:
    """The two tables, headed with what A and B are and what is paired."""
    n_seeds = len(a.protocol["seeds"])
    lines = [f"A = {a.label}", f"B = {b.label}",
             f"same protocol: env seeds {a.protocol['seeds']}, {a.protocol['num_steps']} steps",
             *environment_lines(a, b)]
    for unit, report in result.items():
        n = next(iter(report.values()))["n"]
        lines += ["", f"B − A paired by {unit} ({n} pairs, 95 % t, df {n - 1}"
                      + (f"; each the mean over {n_seeds} evaluation seeds)"
                         if unit == "training seed" else ")")]  # fmt: skip
        lines.append(format_paired(report, METRIC_LABELS, names=("A", "B", "B-A")))
    if "training seed" not in result:
        why = ("different training seeds" if a.train_seeds and b.train_seeds
               else "a row without training seeds")
        lines += ["", f"(no pairing by training seed: {why})"]
    return "\n".join(lines)


def environment_lines(a: Row, b: Row) -> list[str]:
    """Where A and B ran (:mod:`sfjax.provenance`): one line when the same, else what differs
    (the same config and seeds can give other numbers there), or which side has no record."""
    missing = [side for side, r in (("A", a), ("B", b)) if r.environment == []]
    damaged = [side for side, r in (("A", a), ("B", b)) if r.environment is None]
    lines = []
    if missing:
        lines.append(f"environment: not recorded for {' and '.join(missing)} (a run dir from "
                     f"before experiments wrote {provenance.FILE} has none)")  # fmt: skip
    if damaged:
        lines.append(f"environment: unknown for {' and '.join(damaged)} (its "
                     f"{provenance.FILE} is damaged)")  # fmt: skip
    if lines:
        return lines
    diffs = provenance.differences(a.environment, b.environment)
    if not diffs:
        return [f"same environment: {provenance.describe(a.environment)}"]
    return ["different environments (the same config and seeds can give other numbers; "
            "RESULTS, 'Reproducibility across machines'):", *(f"  {d}" for d in diffs)]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m sfjax.baselines.compare",
        description="B − A for two rows evaluated under the same protocol, paired by "
                    "evaluation seed (and by training seed for RL rows trained on the same "
                    "seeds), with 95 %% t intervals.")  # fmt: skip
    p.add_argument("a", metavar="RUN_DIR:ROW", help=f"row A; ROW one of {', '.join(ROW_FILES)}; "
                                                    f"of an SF run dir {', '.join(SF_ROWS)}")
    p.add_argument("b", metavar="RUN_DIR:ROW", help="row B (the difference is B − A)")
    args = p.parse_args(argv)
    try:
        a, b = load_row(args.a), load_row(args.b)
        result = compare(a, b)
    except (FileNotFoundError, ValueError, DamagedFile) as e:
        p.error(str(e))
    print(format_compare(a, b, result))


if __name__ == "__main__":
    main()
