"""Did the fine-tuning teach the Actor what its Reflector asked, on the prompts it trained on?

    .venv/bin/python benchmarks/sf_target_match.py RUN_DIR [--samples 8] [--save F]
        [--before-iterate A] [--after-iterate B] [--iteration I]

For every step of SF iteration ``--iteration``'s trajectories (``RUN_DIR/trajectories`` and
``reflections``; default: ``--before-iterate``'s, the ones that Actor collected and the next
iteration trained on), ``--samples`` completions are drawn on that step's prompt from the Actor
before fine-tuning (LoRA off; ``--before-iterate A``: the Actor after A SF iterations) and after
it (the run's final ``adapter/``; ``--after-iterate B``: after B), with the same keys
and the *acting* sampling parameters (what the trajectories and the held-out evaluation use;
RfR's rollouts use their own). Per class of step it prints how often the sampled action is the
target (the Reflector's improved action on a suboptimal step, the action taken on an effective
one) and the mean sampled action, before and after, and the same split by what the target
asks: ``keep`` (the allocation the step started from, undoing the Actor's change) or ``move``
(any other allocation). Set against
``python -m sfjax.agents.policy_profile RUN_DIR`` (the actions of the next collect, closed
loop), it separates what the fine-tuning changed on the labelled prompts from what the
closed loop made of it (the Actor's own allocation is part of its next prompt).

For runs of ``experiments/sf_ranslicing.py`` (any preset; its ``config.json`` is read back). On
a run of several SF iterations "after" is the final adapter unless ``--after-iterate`` says
otherwise; an iterate's LoRA comes from its collect phase's checkpoint, as
``--loop.final-actor best`` loads it (``--before-iterate 1 --after-iterate 2``: what the second
SF iteration taught, on the prompts it trained on). Measured results:
benchmarks/RESULTS.md, "What one SF iteration teaches".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

CLASSES = ("asked more", "asked less", "effective")
KEEP, MOVE = "keep", "move"
"""A request's kind: ``keep`` asks for the allocation the step started from (it undoes the
Actor's change), ``move`` for one the Actor did not hold before the step."""


class Item(NamedTuple):
    """One labelled step: its prompt, the target action and what kind of step it is."""

    prompt: str
    target: int
    cls: str
    """One of :data:`CLASSES`."""
    kind: str
    """:data:`KEEP` when the target is the allocation in the step's state (``prev_action``),
    else :data:`MOVE`."""
    taken: int
    """The action the Actor took at the step."""
    held: int | None
    """The allocation the step started from (``prev_action``), if the state has it."""


def step_targets(trajs, refls) -> list[Item]:
    """One :class:`Item` per labelled step of ``trajs`` (Trajectory objects) and their
    ``refls`` (Reflection objects); the requests are
    :func:`sfjax.agents.policy_profile.requested_changes`'s, and a suboptimal step that asks
    for the action it took is left out."""
    from sfjax.agents.policy_profile import requested_changes

    asked = requested_changes(trajs, refls)
    labels = {(r.env_index, lab.step): lab.label for r in refls for lab in r.labels}
    out = []
    for t in trajs:
        for st in t.steps:
            change = asked.get((t.env_index, st.t))
            if change is not None:
                target, cls = st.action + change, "asked more" if change > 0 else "asked less"
            elif labels[(t.env_index, st.t)] != "suboptimal":
                target, cls = st.action, "effective"
            else:
                continue
            held = st.state.get("prev_action")
            held = None if held is None else int(round(held))
            out.append(Item(st.prompt, target, cls, KEEP if held == target else MOVE,
                            st.action, held))  # fmt: skip
    return out


def _mean(actions) -> float:
    got = [x for x in actions if x is not None]
    return sum(got) / len(got) if got else float("nan")


def action_changes(items, before, after) -> dict[str, list[float]]:
    """Per class: each prompt's change in mean sampled action (after - before; prompts with no
    parsable sample on one side are left out)."""
    out = defaultdict(list)
    for item, b, f in zip(items, before, after):
        d = _mean(f) - _mean(b)
        if not math.isnan(d):
            out[item.cls].append(d)
    return out


def report(items: list[Item], before, after) -> str:
    """The table: per class and kind the target rate and mean sampled action before / after,
    then the mean change per class (95 % t over prompts) and the contrast of the two requests.

    ``before`` / ``after``: per item, its sampled actions (None = unparsable)."""
    import numpy as np
    from scipy import stats

    from sfjax.baselines.paired import t_interval

    rows = defaultdict(lambda: {"n": 0, "match": [0, 0], "samples": [0, 0], "action": [[], []]})
    for item, *both in zip(items, before, after):
        for row in (rows[item.cls], rows[(item.cls, item.kind)]):
            row["n"] += 1
            for i, acts in enumerate(both):
                row["match"][i] += sum(x == item.target for x in acts)
                row["samples"][i] += len(acts)
                row["action"][i] += [x for x in acts if x is not None]
    lines = [f"{'step class':12} {'steps':>6} {'target rate before':>19} {'after':>7} "
             f"{'mean action before':>19} {'after':>7}"]  # fmt: skip
    names = {KEEP: "  keep", MOVE: "  move"}
    for cls in CLASSES:
        for name, r in [(cls, rows.get(cls))] + [(names[kd], rows.get((cls, kd))) for kd in names]:
            if r is None:
                continue
            rate = [m / max(n, 1) for m, n in zip(r["match"], r["samples"])]
            mean = [_mean(x) for x in r["action"]]
            lines.append(f"{name:12} {r['n']:>6} {rate[0]:>19.3f} {rate[1]:>7.3f} "
                         f"{mean[0]:>19.2f} {mean[1]:>7.2f}")  # fmt: skip
    lines.append("(keep: the target is the allocation the step started from; move: any other)")
    changes = action_changes(items, before, after)
    parts = []
    for cls in CLASSES:
        if len(changes.get(cls, ())) >= 2:
            m, lo, hi = t_interval(changes[cls])
            parts.append(f"{cls} {m:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    if parts:
        lines.append("change in mean sampled action per prompt: " + ", ".join(parts))
    more, less = changes.get("asked more", []), changes.get("asked less", [])
    if len(more) >= 2 and len(less) >= 2:
        ci = stats.ttest_ind(more, less, equal_var=False).confidence_interval()
        lines.append(
            f"asked more - asked less: {np.mean(more) - np.mean(less):+.2f} "
            f"[{ci.low:+.2f}, {ci.high:+.2f}] (Welch): the part of the change that follows the "
            "requests; the rest moved every prompt alike. Intervals treat prompts as independent "
            "(consecutive steps of a trajectory are not), so they are optimistic."
        )
    return "\n".join(lines)


def int_at_least(low: int):
    """An argparse ``type``: an int ``>= low``, refused at parse time (before any model loads
    or any KTO step runs) with the bound in the message."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
        return n

    return parse


COUNT, INDEX = int_at_least(1), int_at_least(0)
"""argparse types: a count (samples, prompts per call), an SF iteration or iterate."""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--samples", type=COUNT, default=8, help="completions per prompt (K)")
    p.add_argument("--iteration", type=INDEX, default=None,
                   help="SF iteration whose steps to use (default: --before-iterate)")
    p.add_argument("--before-iterate", type=INDEX, default=0,
                   help="'before' = the Actor after this many SF iterations (0: LoRA off)")
    p.add_argument("--after-iterate", type=INDEX, default=None,
                   help="'after' = the Actor after this many SF iterations (default: the run's "
                        "final adapter/)")
    p.add_argument("--seed", type=int, default=1234, help="sampling key (the same before/after)")
    p.add_argument("--batch", type=COUNT, default=64, help="prompts per sampler call")
    p.add_argument("--save", type=Path, default=None,
                   help="write every step's target, class, kind and sampled actions (before / "
                        "after) to this JSON file, for analyses beyond the table")  # fmt: skip
    a = p.parse_args(argv)
    run = a.run_dir
    if a.iteration is None:
        a.iteration = a.before_iterate
    ran = json.loads((run / "config.json").read_text())["loop"]["sf_iterations"] \
        if (run / "config.json").exists() else None  # fmt: skip
    for opt in ("before_iterate", "after_iterate"):
        k = getattr(a, opt)
        if k is not None and ran is not None and not 0 <= k <= ran:
            p.error(f"--{opt.replace('_', '-')} {k}: the run has iterates 0..{ran} (the Actor "
                    "after that many SF iterations)")
        if k and not (run / "checkpoints").is_dir():
            p.error(f"--{opt.replace('_', '-')} {k} needs {run / 'checkpoints'}")
    for need in ("config.json", "summary.json", "adapter", f"trajectories/iter_{a.iteration}.json",
                 f"reflections/iter_{a.iteration}.json"):  # fmt: skip
        if not (run / need).exists():
            p.error(f"{run / need} is missing (a finished sf_ranslicing run dir is needed)")

    import jax

    from sfjax.models.lora import adapters_disabled, load_adapter

    r = load_run(run)
    cfg, model, tokenizer = r.cfg, r.model, r.tokenizer
    load_adapter(model, run / "adapter")
    items = labelled_steps(run, a.iteration)
    key = jax.random.key(a.seed)
    k = a.samples

    def sampled_actions() -> list[list[int | None]]:
        return sample_actions(r.actor, [x.prompt for x in items], r.prompt_cfg, k, key, a.batch)

    from sfjax.agents.finetune import KTOFineTuner

    load_iterate = iterate_loader(
        run, cfg, lambda: KTOFineTuner(model, tokenizer, cfg.kto, cfg.lora), p.error,
        purpose=lambda k: f"the Actor after {k} SF iteration(s) is asked",
        remedy="Compare iterates whose checkpoints are there",
    )  # fmt: skip
    if a.before_iterate == 0:
        with adapters_disabled(model):
            before = sampled_actions()
    else:
        load_iterate(a.before_iterate)
        before = sampled_actions()
    if a.after_iterate is None:
        load_adapter(model, run / "adapter")
    else:
        load_iterate(a.after_iterate)
    after = sampled_actions()

    if a.save is not None:
        from sfjax.agents.trajectory import save_json

        save_json(a.save, {
            "run_dir": str(run), "iteration": a.iteration, "samples": k, "seed": a.seed,
            "before_iterate": a.before_iterate, "after_iterate": a.after_iterate,
            "steps": [{"target": x.target, "class": x.cls, "kind": x.kind, "taken": x.taken,
                       "held": x.held, "before": b, "after": f}
                      for x, b, f in zip(items, before, after)],
        })  # fmt: skip
    def name(i):
        return "LoRA off" if i == 0 else f"after {i} SF iteration(s)"

    print(f"{run}: SF iteration {a.iteration}'s {len(items)} labelled steps, K = {k} samples "
          f"each at the acting sampling parameters, before ({name(a.before_iterate)}) / after "
          f"({'final adapter' if a.after_iterate is None else name(a.after_iterate)})")
    print(report(items, before, after))


class LoadedRun(NamedTuple):
    """A finished run's config and its Actor (base model, LoRA added by the caller)."""

    cfg: Any
    """The run's ``sf_ranslicing.ExperimentConfig`` (from its ``config.json``)."""
    prompt_cfg: Any
    model: Any
    tokenizer: Any
    actor: Any


def run_config(run: Path):
    """The ``sf_ranslicing.ExperimentConfig`` a run dir's ``config.json`` holds (a damaged file
    is named: :class:`sfjax.atomic.DamagedFile`)."""
    import cli_common
    import sf_ranslicing as sf

    from sfjax import atomic

    values = atomic.read_json(run / "config.json", "the run's config")
    return cli_common.with_values(sf.ExperimentConfig(), values)


def field_changes(pairs: list[str], cfg, option: str) -> dict:
    """``FIELD=VALUE`` strings (command-line ``option``, e.g. ``--kto``) as ``{field: value}``
    for the dataclass ``cfg``; VALUE is JSON (a bare word is a string), checked against the
    field's type (an int is a float's value too, a JSON list a tuple's). ValueError naming a
    field that does not exist or a value of another type."""
    import typing

    hints = typing.get_type_hints(type(cfg))
    fields = {f.name for f in dataclasses.fields(cfg)}
    out = {}
    for item in pairs:
        name, sep, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ValueError(f"{option} {item!r}: expected FIELD=VALUE, e.g. "
                             f"{sorted(fields)[0]}=...")  # fmt: skip
        if name not in fields:
            raise ValueError(f"{option} {item!r}: {type(cfg).__name__} has no field {name!r} "
                             f"(fields: {', '.join(sorted(fields))})")  # fmt: skip
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        ok, out[name] = _typed(value, hints.get(name, Any))
        if not ok:
            raise ValueError(f"{option} {item!r}: {name} takes {_type_words(hints[name])}, "
                             f"got {value!r}")  # fmt: skip
    return out


def _typed(value, hint) -> tuple[bool, Any]:
    """``(fits, value)``: whether the JSON ``value`` is one of type ``hint``'s values, and the
    value as the field holds it (an int as a float, a list as a tuple). Types this does not know
    are taken as they are (the config's own check judges them)."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None, value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            ok, v = _typed(value, arm)
            if ok:
                return True, v
        return False, value
    if origin is typing.Literal:
        return value in args and not isinstance(value, bool), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, list):
            return False, value
        arms = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(arms) != len(value):
            return False, value
        got = [_typed(v, a) for v, a in zip(value, arms)]
        return all(ok for ok, _ in got), tuple(v for _, v in got)
    return True, value


def _type_words(hint) -> str:
    """``hint`` in words for an error message: "an int", "a float or None", "one of 'a', 'b'"."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_words(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return "a JSON list"
    name = getattr(hint, "__name__", str(hint))
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def run_prompt_config(cfg):
    """The Actor's and Reflector's ``PromptConfig`` of a run's config (action range, slices and
    objective from its env), as the experiment builds it."""
    from sfjax.baselines.llm_agent import prompt_config_for_env
    from sfjax.envs.ran import RanSlicingEnv

    return prompt_config_for_env(RanSlicingEnv(cfg.env), cfg.actor.prompt)


def load_run(run: Path) -> LoadedRun:
    """The config and Actor of the ``sf_ranslicing`` run in ``run`` (its checkpoint from
    ``summary.json``, prompts for its env); the model has no adapters yet."""
    import sf_ranslicing as sf

    from sfjax.agents.actor import Actor
    from sfjax.models import qwen3
    from sfjax.sampling import Sampler
    from sfjax.tokenizer import load_tokenizer

    cfg = run_config(run)
    ckpt = json.loads((run / "summary.json").read_text())["actor"]
    prompt_cfg = run_prompt_config(cfg)
    model = qwen3.from_pretrained(ckpt, dtype=sf._dtype(cfg.model.dtype))
    tokenizer = load_tokenizer(ckpt)
    actor = Actor(Sampler(model, tokenizer), tokenizer,
                  dataclasses.replace(cfg.actor, prompt=prompt_cfg))  # fmt: skip
    return LoadedRun(cfg, prompt_cfg, model, tokenizer, actor)


def iteration_trajectories(run: Path, iteration: int) -> list:
    """SF iteration ``iteration``'s trajectories."""
    from sfjax.agents.trajectory import load_trajectories

    return load_trajectories(run / f"trajectories/iter_{iteration}.json")


def iteration_labels(run: Path, iteration: int) -> tuple[list, list]:
    """SF iteration ``iteration``'s trajectories and the Reflector's reflections on them."""
    from sfjax.agents.trajectory import load_reflections

    return (iteration_trajectories(run, iteration),
            load_reflections(run / f"reflections/iter_{iteration}.json"))  # fmt: skip


def reflections_for(path: Path, trajs) -> list:
    """The reflections in ``path`` (a JSON list, as ``reflections/iter_<I>.json`` holds, e.g.
    from benchmarks/reflect_run.py), checked to label exactly the steps of ``trajs``, each once.
    ValueError naming the file otherwise."""
    from sfjax.agents.trajectory import load_reflections

    try:
        refls = load_reflections(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a list of reflections ({e})") from None
    check_reflections(refls, trajs, str(path))
    return refls


def check_reflections(refls, trajs, source: str) -> None:
    """ValueError naming ``source`` unless ``refls`` label every step of ``trajs`` once, each
    fitting the action taken (eq. 7)."""
    taken = {(t.env_index, s.t): s.action for t in trajs for s in t.steps}
    if sorted((r.env_index, x.step) for r in refls for x in r.labels) != sorted(taken):
        raise ValueError(f"{source}: its labels are not of this iteration's {len(taken)} steps")
    # eq. 7: an effective step's a*_t is the action taken, a suboptimal one's another action
    off = sum((x.improved_action == taken[r.env_index, x.step]) != (x.label == "effective")
              for r in refls for x in r.labels)  # fmt: skip
    if off:
        raise ValueError(f"{source}: {off} of its labels do not fit these trajectories' actions "
                         "(an effective step's improved action is the action taken, a suboptimal "
                         "one's another): labels of another iteration's trajectories?")  # fmt: skip


def labelled_steps(run: Path, iteration: int) -> list[Item]:
    """:func:`step_targets` of SF iteration ``iteration``'s trajectories and reflections."""
    return step_targets(*iteration_labels(run, iteration))


def sample_actions(actor, prompts, prompt_cfg, k: int, key, batch: int = 64):
    """``k`` completions per prompt at the acting sampling parameters, parsed to actions (None:
    unparsable); prompts ``i .. i + batch`` use ``fold_in(key, i)``, so equal keys give equal
    samples whatever else ran."""
    import jax

    from sfjax.agents.prompts import parse_output

    out: list[list[int | None]] = []
    for i in range(0, len(prompts), batch):
        for texts in actor.sample(prompts[i : i + batch], k, jax.random.fold_in(key, i),
                                  acting=True):  # fmt: skip
            parsed = [parse_output(t, prompt_cfg) for t in texts]
            out.append([x.action if x.ok else None for x in parsed])
    return out


def iterate_loader(run: Path, cfg, make_finetuner, error, *, purpose, remedy):
    """A function putting the LoRA of the Actor after k SF iterations into the model: from the
    checkpoint of phase ``iter<k>/collect``, through the loop's fine-tuner (``make_finetuner()``,
    called on first use) and checkpointer (what ``--loop.final-actor best`` loads).
    ``purpose(k)``: why iterate k is needed, ``remedy``: what to do instead, ``error``: how a
    missing or damaged one is reported."""

    from sfjax import atomic
    from sfjax.agents.checkpoint import CheckpointMissing, LoopCheckpointer
    from sfjax.agents.loop import load_iterate, phase_plan

    state = {}

    def load(k: int) -> None:
        if not state:
            state["ft"] = make_finetuner()
            state["ckpt"] = LoopCheckpointer(run / "checkpoints")
        try:
            load_iterate(state["ckpt"], phase_plan(cfg.loop.sf_iterations,
                                                   cfg.rfr.kto_iterations),
                         state["ft"], k, purpose=purpose(k), remedy=remedy)  # fmt: skip
        except (CheckpointMissing, atomic.DamagedFile) as e:
            error(str(e))

    return load


if __name__ == "__main__":
    main()
