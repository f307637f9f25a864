"""Are a run's Reflector labels right? Counterfactual replays of every labelled step.

    .venv/bin/python benchmarks/label_audit.py RUN_DIR [--iteration I ...] [--save F]
        [--horizons 2 5 10] [--primary-horizon 5] [--max-hold 30] [--by-reason]
        [--rule FIELD=VALUE ... | --reflections F]
    .venv/bin/python benchmarks/label_audit.py --from F [--primary-horizon H] [--tie X]
        [RUN_DIR --rule FIELD=VALUE ... | RUN_DIR --reflections F]

For SF iteration ``I``'s trajectories (``RUN_DIR/trajectories/iter_<I>.json``, all iterations
with reflections by default) the recorded actions are replayed in the JAX env with the keys
that collect used (``LoopConfig.env_key``), checked against the record, and every labelled step
is run again with each action of the Actor's range, on the same arrivals and fading:
:mod:`sfjax.agents.label_audit` explains the two counterfactuals (``hold``, ``step``) and the
figures. Per class of label (asked more / asked less / effective) it prints how often the
Reflector's improved action beat the Actor's, by how much, and what the best action in
hindsight would have gained. ``--by-reason`` adds the same per reason (digits folded, for the
rule labeller's fixed reasons). ``--save F`` writes every step's counterfactual utilities;
``--from F`` prints the tables from them again (another of the saved horizons, another tie)
without simulating.

Other labels of the same steps can be scored instead of the run's: ``--rule FIELD=VALUE``
(repeatable) relabels the iteration's trajectories with the rule labeller, the run's settings
(``--reflector.rule.*``) with these fields changed (``--rule proven_levels=false``: rule 5 off),
and ``--reflections F`` reads them from F (a JSON list of reflections, as
``reflections/iter_<I>.json`` holds; one ``--iteration``), e.g. an LLM Reflector's verdicts
on a rule-labelled run's trajectories obtained outside the loop. The counterfactuals do not
depend on the labels: with ``--from F`` (RUN_DIR defaults to the saved one) a labeller variant
is scored in seconds, nothing simulated.

Any Reflector's labels can be audited this way (the rule labeller, DeepSeek-R1 or another
endpoint), on runs of the JAX simulator (``experiments/sf_ranslicing.py``; ns-3 episodes
cannot be replayed). Measured results: benchmarks/RESULTS.md, "Are the rule labeller's labels
right?".
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sf_target_match as stm  # noqa: E402 -- benchmarks/ (puts experiments/ on sys.path)


def iterations_with_labels(run: Path) -> list[int]:
    """SF iterations with both trajectories and reflections in ``run``."""
    from sfjax.agents.trajectory import iteration_files

    traj = {i for i, _ in iteration_files(run, "trajectories")}
    return [i for i, _ in iteration_files(run, "reflections") if i in traj]


def reason_kind(reason: str) -> str:
    """A reason with its numbers folded to '#' and cut at 60 characters, so that the rule
    labeller's reasons group by rule."""
    return re.sub(r"\d+(\.\d+)?", "#", reason)[:60]


def by_reason(a, mode: str, horizon: int) -> list[str]:
    import numpy as np

    u_taken, u_improved, u_best = a.values(mode, horizon)
    gain, kinds = u_improved - u_taken, np.asarray([reason_kind(r) for r in a.reason])
    tie = a.config.tie
    out = []
    for k in sorted(set(kinds.tolist()), key=lambda k: -int((kinds == k).sum())):
        m = kinds == k
        out.append(f"  {int(m.sum()):>4} | right {100 * (gain[m] > tie).mean():3.0f} % | wrong "
                   f"{100 * (gain[m] < -tie).mean():3.0f} % | gain {gain[m].mean():+8.1f} | "
                   f"best {(u_best - u_taken)[m].mean():+8.1f} | {k}")  # fmt: skip
    return out


def report(res, title: str, reasons: bool) -> None:
    from sfjax.agents.label_audit import MODES, format_audit

    print(format_audit(res, title))
    if reasons:
        for mode in MODES:
            print(f"\nby reason [{mode}, h = {res.config.primary_horizon}]:")
            print("\n".join(by_reason(res, mode, res.config.primary_horizon)))
    print()


def given_settings(a) -> dict:
    """``--primary-horizon`` / ``--tie`` as given (unset: AuditConfig's default, or with
    ``--from`` the saved value)."""
    return {k: v for k, v in (("primary_horizon", a.primary_horizon), ("tie", a.tie))
            if v is not None}  # fmt: skip


SIMULATION_SETTINGS = ("horizons", "max_hold", "batch")
"""AuditConfig fields given as options that only a simulation uses (unset: its defaults)."""


class Refused(Exception):
    """A bad option value or file: the message is printed and the script exits with 2."""


def rule_settings(pairs: list[str], run_cfg):
    """``--rule FIELD=VALUE ...`` applied to the run's rule labeller settings (checked)."""
    import dataclasses

    from sfjax.config_rules import RULES
    from sfjax.configcheck import problems

    base = run_cfg.reflector.rule
    try:
        changes = stm.field_changes(pairs, base, "--rule")
    except ValueError as e:
        raise Refused(str(e)) from None
    new = dataclasses.replace(base, **changes)
    if bad := problems(new, "reflector.rule.", RULES):
        raise Refused("--rule: " + "; ".join(bad))
    return new, changes


def other_labels(a, run_cfg, trajs) -> tuple[list, str] | None:
    """The labels ``--rule`` / ``--reflections`` give an iteration's trajectories ``trajs``, and
    their description; None without either option (the run's own labels)."""
    if a.rule:
        from sfjax.agents.reflectors.rule import RuleReflector

        rule_cfg, changes = rule_settings(a.rule, run_cfg)
        refls = RuleReflector(rule_cfg, stm.run_prompt_config(run_cfg)).reflect(trajs)
        what = ", ".join(f"{k}={v!r}" for k, v in changes.items())
        return refls, f"{refls[0].backend} with {what}, relabelled here"
    if a.reflections:  # before any simulation: labels of other steps are refused
        try:
            return stm.reflections_for(a.reflections, trajs), f"{a.reflections}"
        except ValueError as e:
            raise Refused(f"--reflections {e}") from None
    return None


def relabelled(res, labels):
    """``res`` with ``labels`` (from :func:`other_labels`) instead of its own."""
    from sfjax.agents.label_audit import relabel

    try:
        return relabel(res, labels[0])
    except ValueError as e:
        raise Refused(f"labels from {labels[1]}: {e}") from None


def relabelled_title(title: str, labels) -> str:
    """An audit's title with the labels of :func:`other_labels` named in place of the run's."""
    return f"{title.split(', labels by')[0]}, labels: {labels[1]}"


def print_saved(a) -> int:
    """``--from F``: the tables of a saved audit, at a --primary-horizon / --tie given now,
    for its own labels or for ``--rule`` / ``--reflections``'."""
    import dataclasses

    from sfjax import atomic
    from sfjax.agents.label_audit import Audit

    try:
        d = atomic.read_json(a.saved, "a saved label audit")
        audits = {it: Audit.from_json(x) for it, x in d["iterations"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"label_audit: {a.saved}: not a --save file of this script ({e})", file=sys.stderr)
        return 2
    run = a.run_dir or Path(d.get("run_dir", ""))
    try:
        run_cfg = stm.run_config(run) if a.rule else None
    except (OSError, ValueError) as e:
        print(f"label_audit: --rule needs the run's config and trajectories ({e})", file=sys.stderr)
        return 2
    if a.iteration and (absent := sorted(set(a.iteration) - {int(it) for it in audits})):
        print(f"label_audit: {a.saved} holds SF iteration(s) {', '.join(sorted(audits))}, not "
              f"{', '.join(map(str, absent))}", file=sys.stderr)  # fmt: skip
        return 2
    for it, res in audits.items():
        if a.iteration and int(it) not in a.iteration:
            continue
        cfg = dataclasses.replace(res.config, **given_settings(a))
        if cfg.invalid():
            print(f"label_audit: {'; '.join(cfg.invalid())} (saved horizons: {cfg.horizons})",
                  file=sys.stderr)  # fmt: skip
            return 2
        res.config = cfg
        title = d["iterations"][it].get("title", f"== SF iteration {it}")
        try:
            trajs = stm.iteration_trajectories(run, int(it)) if a.rule or a.reflections else None
            labels = other_labels(a, run_cfg, trajs)
            if labels is not None:
                res, title = relabelled(res, labels), relabelled_title(title, labels)
        except Refused as e:
            print(f"label_audit: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"label_audit: relabelling needs iteration {it}'s trajectories ({e})",
                  file=sys.stderr)  # fmt: skip
            return 2
        report(res, f"{title} (from {a.saved})", a.by_reason)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, nargs="?", help="a sf_ranslicing.py run dir")
    p.add_argument("--iteration", type=int, nargs="*", help="SF iterations (default: all labelled)")
    p.add_argument("--horizons", type=int, nargs="+", help="default 2 5 10")
    p.add_argument("--primary-horizon", type=int, help="default 5 (--from: as saved)")
    p.add_argument("--max-hold", type=int, help="default 30")
    p.add_argument("--tie", type=float, help="default 0.01 (--from: as saved)")
    p.add_argument("--batch", type=int, help="default 256")
    p.add_argument("--by-reason", action="store_true")
    p.add_argument("--save", type=Path, help="write every step's counterfactuals (JSON)")
    p.add_argument("--from", dest="saved", type=Path,
                   help="print the tables of a --save file again (another --primary-horizon "
                        "of its horizons, --tie, --by-reason) without simulating")  # fmt: skip
    p.add_argument("--rule", action="append", default=[], metavar="FIELD=VALUE",
                   help="score the rule labeller's labels with this RuleReflectorConfig field "
                        "changed (repeatable; VALUE as JSON), not the run's")  # fmt: skip
    p.add_argument("--reflections", type=Path, metavar="F",
                   help="score the labels in F (a JSON list of reflections), not the run's")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.rule and a.reflections:
        p.error("--rule and --reflections are two sources of labels: give one")
    if a.reflections and len(a.iteration or []) != 1:
        p.error("--reflections F labels one SF iteration's trajectories: give one --iteration")

    from sfjax.agents.env import JaxRanRunner
    from sfjax.agents.label_audit import AuditConfig, ReplayMismatch, audit

    if a.saved:
        simulated = [f"--{k.replace('_', '-')}" for k in SIMULATION_SETTINGS
                     if getattr(a, k) is not None]  # fmt: skip
        if simulated:
            p.error(f"{' '.join(simulated)}: set how the counterfactuals are simulated; --from F "
                    "prints the saved ones (only --primary-horizon of its horizons and --tie "
                    "change)")  # fmt: skip
        return print_saved(a)
    if a.run_dir is None:
        p.error("RUN_DIR is needed (or --from F)")
    if not (a.run_dir / "config.json").is_file():
        print(f"label_audit: {a.run_dir / 'config.json'} not found: not a sf_ranslicing.py run "
              "dir", file=sys.stderr)  # fmt: skip
        return 2
    try:
        cfg = stm.run_config(a.run_dir)
    except (OSError, ValueError) as e:
        print(f"label_audit: {e}", file=sys.stderr)
        return 2
    acfg = AuditConfig(**{k: tuple(v) if k == "horizons" else v
                          for k in SIMULATION_SETTINGS if (v := getattr(a, k)) is not None},
                       **given_settings(a))  # fmt: skip
    bad = acfg.invalid()
    if bad:
        print("label_audit: " + "; ".join(bad), file=sys.stderr)
        return 2
    iters = a.iteration if a.iteration else iterations_with_labels(a.run_dir)
    if not iters:
        print(f"label_audit: {a.run_dir} has no labelled iteration (reflections/iter_<i>.json "
              "with its trajectories)", file=sys.stderr)  # fmt: skip
        return 2
    runner = JaxRanRunner(cfg.env, cfg.loop.trajectory_steps)
    saved = {}
    for it in iters:
        paths = [a.run_dir / f"trajectories/iter_{it}.json", a.run_dir / f"reflections/iter_{it}.json"]
        missing = [str(q) for q in paths if not q.is_file()]
        if missing:
            print(f"label_audit: missing {', '.join(missing)}", file=sys.stderr)
            return 2
        trajs, refls = stm.iteration_labels(a.run_dir, it)
        try:  # before the simulation: a bad --rule / --reflections is refused at once
            labels = other_labels(a, cfg, trajs)
        except Refused as e:
            print(f"label_audit: {e}", file=sys.stderr)
            return 2
        start = time.perf_counter()
        try:
            res = audit(runner, cfg.loop.env_key(it), trajs, refls, acfg,
                        progress=not a.no_progress)  # fmt: skip
        except ReplayMismatch as e:
            print(f"label_audit: iteration {it}: {e}", file=sys.stderr)
            return 1
        backend = refls[0].backend if refls else "?"
        title = (f"== {a.run_dir} SF iteration {it}: {len(trajs)} trajectories x "
                 f"{len(trajs[0].steps)} steps, labels by {backend}")  # fmt: skip
        shown, shown_title = res, title
        if labels is not None:  # printed; the saved file keeps the run's own labels
            try:
                shown, shown_title = relabelled(res, labels), relabelled_title(title, labels)
            except Refused as e:
                print(f"label_audit: {e}", file=sys.stderr)
                return 2
        report(shown, f"{shown_title} ({time.perf_counter() - start:.0f} s)", a.by_reason)
        saved[str(it)] = {"title": title, **res.to_json()}
    if a.save:
        from sfjax import atomic

        atomic.write_json(a.save, {"run_dir": str(a.run_dir), "iterations": saved})
        print(f"saved: {a.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
