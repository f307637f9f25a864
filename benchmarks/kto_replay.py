"""Replay one SF iteration's KTO of a finished run with another KTO setting, and measure it.

    .venv/bin/python benchmarks/kto_replay.py RUN_DIR --iteration I --out DIR
        [--kto FIELD=VALUE ...] [--reference base|iterate] [--only desirable|undesirable]
        [--improved-examples] [--restart] [--aggregate]
        [--labels run|rebuild|hindsight|file] [--hindsight-tie U] [--reflections F]
        [--samples 8] [--seed 1234] [--no-heldout]

From the Actor after ``I`` SF iterations (its collect phase's checkpoint, as
``--loop.final-actor best`` loads it) the script trains SF iteration ``I``'s KTO iterations
again on the datasets the run recorded (``datasets/iter_<I>_kto_<k>.json``), with the loop's own
keys and a fresh optimizer per KTO iteration, as the loop did. Collect and reflect are not
rerun: every variant sees the same examples, so what differs is the KTO setting alone. Options:

- ``--kto FIELD=VALUE`` (repeatable; VALUE as JSON, e.g. ``beta=0.5``): a ``KTOConfig`` field.
- ``--reference iterate``: πref = the Actor after ``I`` SF iterations (its LoRA frozen;
  iterative DPO's convention) instead of the model with its adapters off (the paper's "original
  frozen LLM"); the reference table is precomputed once per dataset, except with ``--kto
  token_kl_coef=...`` (> 0), whose anchor needs the reference's next-token distributions: the
  step then runs the reference forward with the iterate's adapters.
- ``--only desirable|undesirable``: a diagnostic, one class of examples only (weights 1 / 1).
- ``--improved-examples``: add ``RfRConfig.improved_examples``' desirable copies (each
  suboptimal step's completion with the Reflector's improved action; not Algorithm 2) to every
  recorded dataset, after its examples, as the loop with that option orders them.
- ``--restart``: the LoRA starts from the untrained Actor (iterate 0, the loop's initial
  adapters) instead of continuing from iterate ``I``: STaR's convention of fine-tuning the
  original model on the data the latest iterate generated. The data, keys and reference are the
  run's; "before" in the request-following table stays iterate ``I``, the Actor whose actions
  the Reflector judged.
- ``--aggregate``: KTO iteration ``k`` trains on SF iterations ``0..I``'s recorded datasets for
  ``k``, concatenated, earliest first (DAgger-style data aggregation), instead of iteration
  ``I``'s alone (``--improved-examples``' copies still come from iteration ``I``'s steps).
- ``--labels rebuild``: the datasets are not read back but built again by RfR (Algorithm 2:
  the run's RfR settings, the loop's keys, rollouts of the Actor being trained) from the run's
  labels; it reproduces the run as the recorded datasets do (a check of the rebuild).
  ``--labels hindsight``: built the same way from labels that are the best actions in hindsight
  (:func:`sfjax.agents.label_audit.hindsight_reflections`: the counterfactual eq. 15 utility of
  every action held for the Actor's run, h = 5; a step is suboptimal when the best action gains
  more than ``--hindsight-tie``, default 0.01) instead of the Reflector's, written to
  ``DIR/hindsight_reflections.json``. Computed from the utility, so **not** the reward-free
  method: a diagnostic of whether labels this good would avoid what the Reflector's taught.
  ``--labels file --reflections F``: built the same way from the labels in F (a JSON list of
  reflections of the iteration's trajectories, e.g. another Reflector's from
  ``benchmarks/reflect_run.py``, or a labeller variant's): what that Reflector's verdicts on
  the same steps would have taught.

With none of them the replay reproduces the run: the script checks the LoRA against the run's
next iterate and says whether it is bit-identical. It prints each KTO iteration's steps, loss
and rewards, ``sf_target_match.py``'s table for the replayed Actor against iterate ``I`` on the
steps it trained on (K ``--samples``, key ``--seed``), and the run's held-out protocol (its seeds
and steps) for the replay paired by seed against the run's own iterate ``I + 1`` (taken from the
run's ``heldout/`` when cached there, else measured into DIR), and against iterate ``I`` (the
Actor the iteration started from; the same way). Everything goes to
``DIR/replay.json``. For runs of ``experiments/sf_ranslicing.py``; measured results:
benchmarks/RESULTS.md, "Why later SF iterations learn a common shift".
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sf_target_match as stm  # noqa: E402 -- benchmarks/ (puts experiments/ on sys.path)

ONLY = ("desirable", "undesirable")
LABEL_SOURCES = {"run": "the run's recorded datasets", "rebuild": "the run's labels",
                 "hindsight": "the best actions in hindsight",
                 "file": "the labels of --reflections"}  # fmt: skip
"""``--labels``: where the replayed datasets come from."""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--iteration", type=stm.INDEX, required=True,
                   help="SF iteration whose KTO to replay, from the Actor after that many")
    p.add_argument("--out", type=Path, required=True, help="directory for replay.json and caches")
    p.add_argument("--kto", action="append", default=[], metavar="FIELD=VALUE",
                   help="a KTOConfig field to change (repeatable; VALUE as JSON)")
    p.add_argument("--reference", choices=("base", "iterate"), default="base",
                   help="πref: adapters off (the paper) or the Actor after --iteration SF iterations")
    p.add_argument("--only", choices=ONLY, default=None,
                   help="diagnostic: train on one class of examples only (weights 1 / 1)")
    p.add_argument("--improved-examples", action="store_true",
                   help="add a desirable copy at the improved action per suboptimal step")
    p.add_argument("--restart", action="store_true",
                   help="train from the untrained Actor (iterate 0), not from iterate --iteration")
    p.add_argument("--aggregate", action="store_true",
                   help="train on SF iterations 0..--iteration's datasets together")
    p.add_argument("--labels", choices=tuple(LABEL_SOURCES), default="run",
                   help="datasets: the run's recorded ones, or built again by RfR from the run's "
                        "labels / the best actions in hindsight (a diagnostic) / --reflections F")  # fmt: skip
    p.add_argument("--reflections", type=Path, default=None, metavar="F",
                   help="--labels file: labels of the iteration's trajectories (a JSON list of "
                        "reflections, e.g. from benchmarks/reflect_run.py)")  # fmt: skip
    p.add_argument("--hindsight-tie", type=float, default=None, metavar="U",
                   help="--labels hindsight: a step is suboptimal when the best action gains more "
                        "than U (eq. 15 utility; default the audit's tie, 0.01)")  # fmt: skip
    p.add_argument("--samples", type=stm.COUNT, default=8, help="completions per labelled prompt (K)")
    p.add_argument("--seed", type=int, default=1234, help="sampling key (the same before/after)")
    p.add_argument("--batch", type=stm.COUNT, default=64, help="prompts per sampler call")
    p.add_argument("--no-heldout", action="store_true", help="skip the held-out evaluation")
    a = p.parse_args(argv)
    run, it = a.run_dir, a.iteration
    if a.hindsight_tie is not None and (a.labels != "hindsight" or a.hindsight_tie < 0):
        p.error("--hindsight-tie needs --labels hindsight and a value >= 0")
    if a.labels != "run" and (a.aggregate or a.improved_examples):
        p.error(f"--labels {a.labels} builds one iteration's datasets with the run's RfR settings; "
                "it does not combine with --aggregate or --improved-examples")  # fmt: skip
    if (a.reflections is not None) != (a.labels == "file"):
        p.error("--labels file and --reflections F go together")
    data_of = list(range(it + 1)) if a.aggregate else [it]  # SF iterations whose datasets train
    for need in ("config.json", "summary.json", "checkpoints", f"trajectories/iter_{it}.json",
                 f"reflections/iter_{it}.json",
                 *(f"datasets/iter_{i}_kto_0.json" for i in data_of)):  # fmt: skip
        if not (run / need).exists():
            p.error(f"{run / need} is missing: a run of experiments/sf_ranslicing.py that "
                    f"finished SF iteration {it}'s KTO is needed")  # fmt: skip

    from sfjax import atomic

    labels = stm.iteration_labels(run, it)  # the steps the iteration trained on
    if a.labels == "file":  # before the model loads: labels of other steps are refused at once
        try:
            file_labels = stm.reflections_for(a.reflections, labels[0])
        except ValueError as e:
            p.error(f"--reflections {e}")
    if a.improved_examples:  # before the model loads: a run that had them is refused at once
        ran = atomic.read_json(run / "config.json", "the run's config").get("rfr", {})
        if ran.get("improved_examples"):
            p.error("--improved-examples: the run's datasets already hold them "
                    "(it ran with --rfr.improved-examples)")  # fmt: skip

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from sfjax.agents.finetune import KTOFineTuner
    from sfjax.agents.loop import phase_key, phase_plan
    from sfjax.agents.rfr import (
        RfRState,
        base_dataset,
        build_dataset,
        examples_from_json,
        improved_examples,
    )
    from sfjax.agents.trajectory import load_json, save_json
    from sfjax.baselines.heldout import HeldOutEval, after_name
    from sfjax.baselines.paired import format_paired, paired_report

    r = stm.load_run(run)
    cfg = r.cfg
    try:
        changes = stm.field_changes(a.kto, cfg.kto, "--kto")
        if a.only:
            changes.setdefault("desirable_weight", 1.0)
            changes.setdefault("undesirable_weight", 1.0)
        if a.reference == "iterate" and not changes.get("token_kl_coef", cfg.kto.token_kl_coef):
            changes["precompute_ref_log_probs"] = True  # token_kl_coef: in the step instead
        kto_cfg = dataclasses.replace(cfg.kto, **changes, progress=False)
    except (ValueError, TypeError) as e:
        p.error(str(e))
    phases = phase_plan(cfg.loop.sf_iterations, cfg.rfr.kto_iterations)
    kto_phases = [ph for ph in phases if ph.kind == "kto" and ph.iteration == it]
    if not kto_phases:
        p.error(f"--iteration {it}: the run trained SF iterations 0..{cfg.loop.sf_iterations - 1}")
    ft = KTOFineTuner(r.model, r.tokenizer, kto_cfg, cfg.lora)

    def lora():
        return jax.tree.map(jnp.copy, nnx.state(r.model, nnx.LoRAParam))

    load = stm.iterate_loader(
        run, cfg, lambda: ft, p.error, remedy="Replay an iteration whose iterates are there",
        purpose=lambda k: f"the replay needs the Actor after {k} SF iteration(s)",
    )  # fmt: skip
    load(it + 1)  # the run's own result of the iteration (it < sf_iterations: it trained)
    run_next = lora()
    load(it)
    start = lora()  # the Actor whose trajectories the iteration's datasets were built from
    if a.restart and it > 0:
        load(0)  # the training starts from the loop's initial adapters
    if a.reference == "iterate":
        ft.trainer.reference_lora = start
    if a.labels == "hindsight":
        from sfjax.agents.env import JaxRanRunner
        from sfjax.agents.label_audit import AuditConfig, audit, hindsight_reflections

        t0 = time.perf_counter()
        acfg = AuditConfig() if a.hindsight_tie is None else AuditConfig(tie=a.hindsight_tie)
        res = audit(JaxRanRunner(cfg.env, cfg.loop.trajectory_steps), cfg.loop.env_key(it),
                    *labels, acfg, progress=False)  # fmt: skip
        labels = (labels[0], hindsight_reflections(res))
        n_sub = sum(x.label == "suboptimal" for r in labels[1] for x in r.labels)
        print(f"hindsight labels (tie {acfg.tie}): {n_sub} of {len(res.taken)} steps suboptimal "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        a.out.mkdir(parents=True, exist_ok=True)
        save_json(a.out / "hindsight_reflections.json", [x.to_json() for x in labels[1]])
    if a.labels == "file":
        labels = (labels[0], file_labels)
    if a.labels != "run":
        base, targets = base_dataset(*labels)
        rfr_state = RfRState()
    copies = improved_examples(*base_dataset(*labels), r.prompt_cfg) if a.improved_examples else []
    what = ", ".join([f"kto.{k} {getattr(cfg.kto, k)!r} -> {v!r}" for k, v in changes.items()
                      if getattr(cfg.kto, k) != v] + [f"reference {a.reference}"]
                     + ([f"only {a.only} examples"] if a.only else [])
                     + (["LoRA restarted from iterate 0"] if a.restart else [])
                     + ([f"datasets of SF iterations 0..{it} together"] if a.aggregate else [])
                     + ([f"+{len(copies)} improved-action examples per dataset"]
                        if a.improved_examples else [])
                     + ([f"datasets rebuilt by RfR from {LABEL_SOURCES[a.labels]}"]
                        if a.labels != "run" else []))  # fmt: skip
    print(f"{run}: replaying SF iteration {it}'s {len(kto_phases)} KTO iteration(s) from the "
          f"Actor after {it} SF iteration(s); {what}", flush=True)

    root = jax.random.key(cfg.loop.seed)  # the run's root key: the loop's phase keys
    kto_log = []
    for ph in kto_phases:
        roll_key, train_key = jax.random.split(phase_key(root, ph))
        if a.labels == "run":
            examples = [e for i in data_of for e in examples_from_json(
                        load_json(run / f"datasets/iter_{i}_kto_{ph.kto_iteration}.json"))]  # fmt: skip
        else:  # as the loop's KTO phase builds it (SelfFinetuningLoop._kto)
            examples, _, rfr_state = build_dataset(base, targets, rfr_state, r.actor.sample,
                                                   cfg.rfr, r.prompt_cfg, roll_key)  # fmt: skip
        examples += copies
        if a.only:
            examples = [e for e in examples if e.desirable == (a.only == "desirable")]
        t0 = time.perf_counter()
        m = ft.train(examples, train_key, 0)
        kto_log.append({"phase": ph.name, "examples": len(examples), "wall_s": time.perf_counter() - t0,
                        **{k: float(v) for k, v in m.items()}})  # fmt: skip
        print(f"  {ph.name}: {len(examples)} examples, {int(m.get('num_steps', 0))} steps, loss "
              f"{m.get('loss', float('nan')):.4f}, rewards chosen {m.get('rewards/chosen', float('nan')):+.3f}"
              f" / rejected {m.get('rewards/rejected', float('nan')):+.3f}, kl (unclamped) "
              f"{m.get('kl_unclamped', float('nan')):+.3f}"
              + (f", token KL {m['token_kl']:.3f}" if "token_kl" in m else ""), flush=True)  # fmt: skip
    replayed = lora()

    result = {"run_dir": str(run), "iteration": it, "kto_changes": changes,
              "reference": a.reference, "only": a.only, "improved_examples": len(copies),
              "restart": a.restart, "aggregate": a.aggregate, "labels": a.labels,
              "reflections": str(a.reflections) if a.reflections else None,
              "hindsight_tie": a.hindsight_tie,
              "kto": kto_log}  # fmt: skip
    diff = max(float(jnp.max(jnp.abs(x - y)))
               for x, y in zip(jax.tree.leaves(replayed), jax.tree.leaves(run_next)))  # fmt: skip
    result["max_abs_lora_diff_to_run"] = diff
    print(f"LoRA against the run's iterate {it + 1}: "
          + ("bit-identical (the run reproduced)" if diff == 0 else f"max |diff| {diff:.3g}"))

    # request-following on the steps iteration `it` trained on: iterate `it` vs the replay
    items = stm.step_targets(*labels)
    prompts, key = [x.prompt for x in items], jax.random.key(a.seed)
    nnx.update(r.model, start)
    before = stm.sample_actions(r.actor, prompts, r.prompt_cfg, a.samples, key, a.batch)
    nnx.update(r.model, replayed)
    after = stm.sample_actions(r.actor, prompts, r.prompt_cfg, a.samples, key, a.batch)
    print(f"SF iteration {it}'s {len(items)} labelled steps, K = {a.samples}: before (after {it} "
          f"SF iteration(s)) / after (the replay)")
    print(stm.report(items, before, after), flush=True)
    changes_per_class = stm.action_changes(items, before, after)
    result["action_change"] = {k: float(np.mean(v)) for k, v in changes_per_class.items()}
    more, less = changes_per_class.get("asked more", []), changes_per_class.get("asked less", [])
    if more and less:
        result["asked_more_minus_less"] = float(np.mean(more) - np.mean(less))

    if not a.no_heldout and cfg.heldout.seeds:
        held = HeldOutEval(cfg.heldout, cfg.env, r.actor, a.out)  # the model holds the replay
        ours = held.evaluate("replay", f"replay of SF iteration {it}")
        name = after_name(it + 1)
        cached = run / "heldout" / f"{name}.json"  # the run's own, never written to
        if cached.exists():
            theirs = atomic.read_json(cached, "the run's held-out evaluation")
        else:
            nnx.update(r.model, run_next)
            theirs = held.evaluate(name, f"the run's Actor after {it + 1} SF iteration(s)")
        rep = paired_report(theirs, ours)  # diff = replay - run's iterate it+1
        result["heldout"] = {"seeds": list(cfg.heldout.seeds), "num_steps": cfg.heldout.num_steps,
                             "replay": ours, "run_iterate": theirs, "paired": rep}  # fmt: skip
        print(f"held-out ({len(cfg.heldout.seeds)} seeds x {cfg.heldout.num_steps} steps): "
              f"'before' = the run's iterate {it + 1}, 'after' = the replay")
        print(format_paired(rep))
        # and against the Actor the iteration started from (the run's cached evaluation, else
        # measured into DIR)
        name0 = after_name(it) if it else "before"
        if (run / "heldout" / f"{name0}.json").exists():
            base_eval = atomic.read_json(run / "heldout" / f"{name0}.json",
                                         "the run's held-out evaluation")  # fmt: skip
        else:
            nnx.update(r.model, start)
            base_eval = held.evaluate(name0, f"the run's Actor after {it} SF iteration(s)")
        rep0 = paired_report(base_eval, ours)
        result["heldout"]["start_iterate"] = base_eval
        result["heldout"]["paired_vs_start"] = rep0
        print(f"'before' = the run's iterate {it}, 'after' = the replay")
        print(format_paired(rep0))
    a.out.mkdir(parents=True, exist_ok=True)
    save_json(a.out / "replay.json", result)
    print(f"wrote {a.out / 'replay.json'}")


if __name__ == "__main__":
    sys.exit(main())
