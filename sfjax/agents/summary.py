"""The closing summary of the LLM-agent experiments (self-finetuning, Reflexion).

What a newcomer needs after a run: what ran, the before/after numbers with their units, what
each column means, where every artefact is and how to open TensorBoard on it. The
experiments print :func:`format_sf_summary` / :func:`format_reflexion_summary` at the end.

Units of the per-trajectory metrics (paper eq. 1-3 and 15):

* avg SE — mean over the trajectory's steps of the controlled slice's spectral efficiency,
  bit/s/Hz;
* reconfigurations — steps whose allocation differs from the previous step's, per
  trajectory;
* QoS violations — steps in which some packet missed its delay budget or was dropped, per
  trajectory;
* utility — eq. 15 summed over the trajectory (15 (SE + 1) - 15 c - 300 v per step;
  dimensionless, higher is better);
* parse failures — steps whose Actor output had no parsable action (the previous allocation
  is then kept; with constrained decoding, the default, every output parses), per trajectory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sfjax.baselines.paired import format_paired
from sfjax.console import artefact_lines, fmt_change, tensorboard_hint
from sfjax.provenance import DESCRIPTION as ENVIRONMENT_NOTE
from sfjax.provenance import FILE as ENVIRONMENT_FILE

METRICS = (
    ("utility", "utility (eq. 15, summed over the trajectory)", "", 1),
    ("avg_se", "avg SE", "bit/s/Hz", 3),
    ("reconfigurations", "reconfigurations", "per trajectory", 1),
    ("violations", "QoS violations", "steps per trajectory", 1),
    ("parse_failures", "parse failures", "steps per trajectory", 1),
)
"""(summary.json key, name, unit, digits) of the before/after lines."""

HELD_OUT_LABELS = {
    "utility": "utility (eq. 15)",
    "mean_se": "avg SE [bit/s/Hz]",
    "reconfigurations": "reconfigurations",
    "violations": "QoS violation steps",
}
"""Row names (with units) of the held-out table; counts are per trajectory."""

TINY_NOTE = (
    "The Actor is a tiny randomly initialised Qwen3-architecture model: these numbers show "
    "that the machinery runs end to end and say nothing about the paper's claims."
)


def _dash(v: Any) -> str:
    return "-" if v is None else str(v)


def iteration_table(iterations: list[Mapping[str, Any]]) -> str:
    """One row per SF iteration, units in the header, a legend under it."""
    head = (
        f"{'iter':>4} {'avg SE':>9} {'reconf.':>8} {'QoS vio.':>9} {'utility':>10} "
        f"{'parse':>6} {'KTO data':>12} {'KTO iters':>9}"
    )
    units = (
        f"{'':>4} {'bit/s/Hz':>9} {'/traj':>8} {'steps/traj':>9} {'eq. 15':>10} "
        f"{'fail':>6} {'des./undes.':>12} {'':>9}"
    )
    lines = [head, units, "-" * len(head)]
    for r in iterations:
        data = (
            f"{_dash(r.get('n_desirable'))}/{_dash(r.get('n_undesirable'))}"
            if r.get("n_desirable") is not None
            else "- (eval)"
        )
        lines.append(
            f"{r['iteration']:>4} {r['avg_se']:>9.3f} {r['reconfigurations']:>8.1f} "
            f"{r['violations']:>9.1f} {r['utility']:>10.1f} {r['parse_failures']:>6.1f} "
            f"{data:>12} {len(r.get('kto_iterations') or []):>9}"
        )
    return "\n".join(lines)


def format_sf_summary(
    summary: Mapping[str, Any],
    run_dir: str | Path,
    *,
    trajectory_steps: int,
    num_envs: int,
    tiny_actor: bool = False,
    same_env_seeds: bool = True,
) -> str:
    """The self-finetuning run explained: what ran, before/after with units, artefacts."""
    run_dir = Path(run_dir)
    its = list(summary.get("iterations", []))
    n_sf = max(len(its) - 1, 0)
    kto = max((len(r.get("kto_iterations") or []) for r in its), default=0)
    out = [
        "",
        "=== Self-finetuning: summary ===",
        f"What ran: {n_sf} self-finetuning iteration(s), each = collect {num_envs} trajectory(ies) "
        f"of {trajectory_steps} decisions with the Actor -> reflect (every step labelled by "
        f"the Reflector: {summary.get('reflector', '?')}) -> Refine-from-Reflection dataset "
        f"+ {kto} KTO iteration(s) on the LoRA weights; then one more collection that only "
        "evaluates the fine-tuned Actor.",
        f"Actor: {summary.get('actor', '?')} + LoRA.",
    ]
    improved = sum(e.get("n_improved", 0) for r in its for e in r.get("kto_iterations") or [])
    if improved:
        out.append(
            f"The KTO datasets held {improved} desirable copies of suboptimal steps' outputs at "
            "the Reflector's improved action (--rfr.improved-examples: not Algorithm 2's "
            "construction); they are counted as desirable below."
        )
    anchored = [e["kto/token_kl"] for r in its for e in r.get("kto_iterations") or []
                if "kto/token_kl" in e]  # fmt: skip
    if anchored:
        out.append(
            "KTO's loss carried a per-token KL anchor to the reference (--kto.token-kl-coef: not "
            "the paper's or TRL's loss); summed token KL per example, mean over the last KTO "
            f"iteration: {anchored[-1]:.3f} nats."
        )
    if tiny_actor:
        out.append(TINY_NOTE)
    out += [
        "",
        "Per iteration (mean over the collected trajectories; iteration 0 = the Actor before "
        "any fine-tuning, the last row = after the last KTO iteration, evaluation only; "
        "KTO data = desirable/undesirable examples summed over the iteration's KTO datasets):",
        iteration_table(its),
    ]
    kept = summary.get("final_actor") or {}
    k = kept.get("iteration", n_sf)
    if kept.get("rule") == "best":
        out.append(
            f"Final Actor: iteration {k} of 0..{n_sf}, the best mean utility above "
            "(--loop.final-actor best); the held-out 'after' and adapter/ are of it. Its row "
            "above was chosen on those numbers, so it is optimistic; the held-out table is not."
        )
    if len(its) >= 2:
        first, last = its[0], its[min(k, len(its) - 1)]
        where = (
            "on the same env seeds the Reflector labelled (in-sample)"
            if same_env_seeds
            else "on fresh env seeds per iteration"
        )
        out += ["", f"Before -> after fine-tuning ({where}):"]
        for key, name, unit, digits in METRICS:
            if key in first and key in last:
                out.append(f"  {name}: {fmt_change(first[key], last[key], unit, digits)}")
    held = summary.get("held_out")
    if held:
        out += [
            "",
            f"Held-out env seeds {held['seeds']} ({held['num_steps']} decisions each, not the "
            "ones the Reflector labelled): the Actor before fine-tuning vs after, with the 95 % "
            "interval of the paired difference (* = excludes 0):",
            format_paired(held["metrics"], HELD_OUT_LABELS),
        ]
    t = summary.get("timings_s", {})
    if t:
        names = {"held_out": "held-out evaluation"}  # before and after together
        phases = [k for k in ("setup", "collect", "reflect", "kto", "held_out") if k in t]
        out += [
            "",
            "Wall time: " + ", ".join(f"{names.get(k, k)} {t[k]:.0f} s" for k in phases)
            + " (CPU seconds per phase in summary.json)",
        ]
    out += [
        "",
        f"Artefacts in {run_dir}/:",
        *artefact_lines([
            (run_dir / "summary.json", "the numbers above, per iteration and KTO iteration"),
            (run_dir / "heldout", "per-seed held-out metrics before / after"),
            (run_dir / "tb", "TensorBoard: train/* KTO per step (loss, rewards/*, kl, "
                             "kl_unclamped), kto_iter/*, rfr/*, env/*, heldout/*"),
            (run_dir / "adapter", "final LoRA as a PEFT adapter "
                                  "(peft.AutoPeftModelForCausalLM.from_pretrained)"),
            (run_dir / "trajectories", "every trajectory: prompts, outputs, actions, feedback "
                                       "(how the Actor's actions changed per iteration: "
                                       f"python -m sfjax.agents.policy_profile {run_dir})"),
            (run_dir / "reflections", "the Reflector's labels and improved actions"),
            (run_dir / "datasets", "every KTO dataset"),
            (run_dir / "checkpoints", "orbax, one per phase (--resume continues from here)"),
            (run_dir / "tiny_actor", "the tiny random base model of this run"),
            (run_dir / "config.json", "the full configuration"),
            (run_dir / ENVIRONMENT_FILE, ENVIRONMENT_NOTE),
        ]),  # fmt: skip
        "",
        "Open TensorBoard: " + tensorboard_hint(run_dir / "tb"),
    ]
    return "\n".join(out)


def format_reflexion_summary(
    row_summary: Mapping[str, tuple[float, float]],
    run_dir: str | Path,
    *,
    provenance: str,
    trials: int,
    num_trajectories: int,
    num_steps: int,
    trial_metrics: list[Mapping[str, tuple[float, float]]] | None = None,
    tiny_actor: bool = False,
    actor_note: str = "",
) -> str:
    """The Reflexion run explained: trials, the evaluation with units, artefacts.
    ``actor_note``: what the Actor is and means for the numbers (the behavioural prior's),
    printed under the provenance."""
    run_dir = Path(run_dir)
    units = {
        "utility": ("utility (eq. 15, summed over the trajectory)", "", 1),
        "mean_se": ("avg SE", "bit/s/Hz", 3),
        "reconfigurations": ("reconfigurations", "per trajectory", 1),
        "violations": ("QoS violations", "steps per trajectory", 1),
    }
    out = [
        "",
        "=== Reflexion: summary ===",
        f"What ran: {trials} Reflexion trial(s) (the Actor acts with a verbal memory of its "
        "earlier self-reflections, no weight updates), then the Actor with its final memory "
        f"evaluated on {num_trajectories} trajectory(ies) of {num_steps} decisions.",
        f"Actor and evaluator: {provenance}.",
    ]
    if tiny_actor:
        out.append(TINY_NOTE)
    if actor_note:
        out.append(actor_note)
    if trial_metrics:
        out += ["", "Per trial (mean over the trial's trajectories):"]
        for k, m in enumerate(trial_metrics):
            cells = [
                f"{units[key][0].split(' (')[0]} {m[key][0]:.{units[key][2]}f}"
                for key in units if key in m
            ]  # fmt: skip
            out.append(f"  trial {k + 1}: " + ", ".join(cells))
    out += ["", "Evaluation (mean ± std over trajectories):"]
    for key, (name, unit, digits) in units.items():
        if key in row_summary:
            mean, std = row_summary[key]
            out.append(f"  {name}: {mean:.{digits}f} ± {std:.{digits}f} {unit}".rstrip())
    out += [
        "",
        f"Artefacts in {run_dir}/:",
        *artefact_lines([
            (run_dir / "reflexion" / "summary.json", "row, memory, reflections, trial metrics"),
            (run_dir / "reflexion" / "trials",
             "every trial's trajectories and state (a rerun goes on after the saved trials)"),
            (run_dir / "reflexion" / "eval_trajectories.json", "the evaluation trajectories"),
            (run_dir / "reflexion" / "eval_rollouts.npz", "per-step evaluation records"),
            (run_dir / "tb", "TensorBoard: reflexion/trial/*, reflexion/eval/*"),
            (run_dir / "config.json", "the full configuration"),
            (run_dir / ENVIRONMENT_FILE, ENVIRONMENT_NOTE),
        ]),  # fmt: skip
        "",
        "Open TensorBoard: " + tensorboard_hint(run_dir / "tb"),
    ]
    return "\n".join(out)
