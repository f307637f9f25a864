"""The closing summary of the RL-baseline and Table III experiments.

:func:`format_rl_summary` (experiments/rl_baselines.py) and :func:`format_table3_summary`
(experiments/table3.py) say what ran, read the table's columns with their units, list every
artefact and how to open TensorBoard on it. :func:`preset_of` and :func:`tiny_actor_note`
feed table3.md's heading.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from sfjax.baselines.compare import ROW_FILES
from sfjax.baselines.reference import REFERENCE_ROWS
from sfjax.baselines.report import MethodResult
from sfjax.console import artefact_lines, tensorboard_hint
from sfjax.provenance import DESCRIPTION as ENVIRONMENT_NOTE
from sfjax.provenance import FILE as ENVIRONMENT_FILE

COLUMNS_LEGEND = (
    "Columns (mean ± std over the evaluated trajectories): Avg. SE = mean spectral efficiency "
    "of the controlled slice, bit/s/Hz; Reconf. times = steps whose allocation changed, per "
    "trajectory; PQoS vio. = steps with a packet over its delay budget or dropped, per "
    "trajectory; Utility = eq. 15 summed over the trajectory (higher is better); Train samples "
    "= environment steps used to train or adapt the method, per training seed; Eval samples = "
    "environment steps of its evaluation; % of hindsight (when the reference rows ran) = "
    "utility as a percentage of the hindsight upper bound on the same seeds."
)


def preset_of(argv: Sequence[str], presets: Mapping[str, object]) -> str:
    """The preset named on the command line (its first argument), or "" for none."""
    return argv[0] if argv and argv[0] in presets else ""


def tiny_actor_note(*, sf: bool, reflexion: bool) -> str:
    """The sentence table3.md puts under its heading when an LLM row's Actor is random."""
    rows = [name for name, tiny in (("SF", sf), ("Reflexion", reflexion)) if tiny]
    if not rows:
        return ""
    return (
        f"The {' and '.join(rows)} row{'s' if len(rows) > 1 else ''} use{'' if len(rows) > 1 else 's'} "
        "a tiny randomly initialised Qwen3-architecture Actor (no pretrained weights): "
        "they show that the pipeline runs and say nothing about the paper's claims."
    )


def _row_lines(rows: Sequence[MethodResult]) -> list[str]:
    out = []
    width = max((len(r.name) for r in rows), default=0)
    for r in rows:
        s = r.summary
        out.append(
            f"  {r.name:<{width}} utility {s['utility'][0]:>10.1f} ± {s['utility'][1]:<8.1f} "
            f"avg SE {s['mean_se'][0]:.3f} bit/s/Hz, {s['reconfigurations'][0]:.1f} "
            f"reconfigurations, {s['violations'][0]:.1f} violating steps per trajectory; "
            f"{r.train_samples:,} training env steps"
        )
    return out


def format_rl_summary(
    rows: Sequence[MethodResult],
    run_dir: str | Path,
    *,
    seeds: Sequence[int],
    env_steps_per_seed: int,
    eval_seeds: Sequence[int],
    eval_steps: int,
    wall_s: Mapping[str, float] | None = None,
) -> str:
    """The RL baselines' run explained: what trained how long, results with units, artefacts."""
    run_dir = Path(run_dir)
    algos = [r.name for r in rows]
    out = [
        "",
        "=== RL baselines: summary ===",
        f"What ran: {', '.join(algos)} (rejax) trained on the JAX RAN env with the eq. 15 "
        f"utility as reward, {len(seeds)} training seed(s) x {env_steps_per_seed:,} env steps "
        f"each, then the greedy policy of every seed evaluated on env seeds {list(eval_seeds)} "
        f"with {eval_steps}-step trajectories.",
        "",
        "Evaluation (mean ± std over seeds x trajectories):",
        *_row_lines(rows),
    ]
    if wall_s:
        out.append("Wall time (compile + train, all seeds): "
                   + ", ".join(f"{k} {v:.0f} s" for k, v in wall_s.items()))  # fmt: skip
    out += [
        "",
        f"Artefacts in {run_dir}/:",
        *artefact_lines([
            (run_dir / "table_rl.md", "the RL rows of Table III"),
            (run_dir / "fig2.png", "training curves per round (Fig. 2)"),
            *[(run_dir / a.lower(), "curves.npz, eval_rollouts.npz, summary.json")
              for a in algos],
            (run_dir / "tb", "TensorBoard: <algo>/utility, mean_se, reconfigurations, "
                             "violations per round, <algo>/eval/*"),
            (run_dir / "config.json", "the full configuration"),
            (run_dir / ENVIRONMENT_FILE, ENVIRONMENT_NOTE),
        ]),  # fmt: skip
        "",
        "Open TensorBoard: " + tensorboard_hint(run_dir / "tb"),
    ]
    return "\n".join(out)


def format_table3_summary(
    rows: Sequence[MethodResult],
    run_dir: str | Path,
    *,
    preset: str,
    actor_note: str = "",
    wall_s: Mapping[str, float] | None = None,
) -> str:
    """Table III's run explained (printed after table3.md): columns, artefacts, TensorBoard."""
    run_dir = Path(run_dir)
    out = [
        "",
        f"=== Table III ({f'preset {preset}' if preset else 'custom config'}): summary ===",
        f"What ran: {', '.join(r.name for r in rows)}, each trained or adapted, then scored by "
        "one evaluation function on the same env seeds and per-step keys.",
    ]
    if actor_note:
        out.append(actor_note)
    out += ["", COLUMNS_LEGEND, "", *_row_lines(rows)]
    if wall_s:
        out.append("Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in wall_s.items()))
    out += [
        "",
        f"Artefacts in {run_dir}/:",
        *artefact_lines([
            (run_dir / "table3.md", "the table above, with provenance and the paper's numbers"),
            (run_dir / "results.json", "every row as JSON, wall times, protocol"),
            (run_dir / "fig2.png", "RL training curves per round, LLM rows as lines (Fig. 2)"),
            (run_dir / "fig3.png", "SF before/after and KTO rewards per iteration (Fig. 3)"),
            (run_dir / "sf", "the self-finetuning run (summary.json, tb/, adapter/, ...)"),
            (run_dir / "reflexion", "the Reflexion run (trials, evaluation)"),
            *[(run_dir / a, "RL curves, evaluation rollouts, summary.json")
              for a in ("dqn", "ppo", "sac")],
            *[(run_dir / ROW_FILES[key], f"the {key} row's per-step evaluation records "
                                          "(python -m sfjax.baselines.compare)")
              for key in REFERENCE_ROWS],
            (run_dir / "tb", "TensorBoard of the RL and Reflexion rows"),
            (run_dir / ENVIRONMENT_FILE, ENVIRONMENT_NOTE),
        ]),  # fmt: skip
        "",
        "Open TensorBoard on everything: " + tensorboard_hint(run_dir),
    ]
    return "\n".join(out)
