"""Before/after evaluation of a fine-tuned Actor on held-out environment seeds.

The self-finetuning run (experiments/sf_ranslicing.py) measures its Actor before any
fine-tuning and its final Actor (after the last SF iteration, or the iterate
``LoopConfig.final_actor`` keeps) on the same held-out seeds, with the shared
protocol of Table III (:mod:`sfjax.baselines.evaluation`: same per-step env keys, disjoint from
the keys the Actor collected its training trajectories with), and reports the paired
differences with 95 % intervals (:mod:`sfjax.baselines.paired`). Each side's per-seed metrics
are cached as JSON in ``RUN_DIR/heldout/``: ``before.json`` (the untrained Actor, the same for
any number of SF iterations) so that a resumed run never measures "before" with an already
fine-tuned Actor, and ``after_iter_<I>.json`` (the Actor after I SF iterations) named by the
Actor it measured, so that a run extended to more SF iterations measures its final Actor
afresh and never reports the shorter run's "after" as its own.

Shape legend: none (host-side orchestration).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from sfjax.configcheck import Bad, at_least, seeds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldOutConfig:
    """Held-out evaluation: the Actor before fine-tuning and the run's final Actor on the
    same env seeds and per-step keys as Table III's protocol, disjoint from the collection's
    keys; paired differences with 95 % intervals go into summary.json (``held_out``)."""

    seeds: tuple[int, ...] = (0, 1, 2, 3)
    """Env seeds of the held-out trajectories (empty: skip the evaluation)."""
    num_steps: int = 300
    """Decisions per held-out trajectory."""
    sampling_seed: int = 1
    """Seed of the Actor's sampling during the evaluation (the same before and after)."""

    def protocol(self):
        """The :class:`~sfjax.baselines.evaluation.EvalProtocol` the held-out Actors are scored
        on (Table III's, with these seeds and steps); None when there are no seeds."""
        from sfjax.baselines.evaluation import EvalProtocol

        return EvalProtocol(seeds=self.seeds, num_steps=self.num_steps) if self.seeds else None

    def invalid(self) -> list[Bad]:
        return at_least(self, 1, "num_steps") + seeds(self, "sampling_seed") \
            + seeds(self, "seeds", empty_ok=True)


BEFORE = "before fine-tuning"


def after_name(sf_iterations: int) -> str:
    """The cache name of "after": the Actor after ``sf_iterations`` SF iterations."""
    return f"after_iter_{sf_iterations}"


def adopt_unnamed_after(run_dir: Path, sf_iterations: int) -> None:
    """Name an ``after.json`` cached before "after" was named by its Actor (it measured the
    Actor after the ``sf_iterations`` its run's config.json gives) as that Actor's."""
    old = Path(run_dir) / "heldout" / "after.json"
    new = old.with_name(f"{after_name(sf_iterations)}.json")
    if old.exists() and not new.exists():
        old.rename(new)
        log.info("%s is the Actor after %d SF iteration(s): renamed %s", old, sf_iterations,
                 new.name)


class HeldOutEval:
    """The Actor before / after on ``cfg``'s seeds of the env ``env_cfg`` (module docstring)."""

    def __init__(self, cfg: HeldOutConfig, env_cfg, actor, run_dir: Path):
        self.cfg, self.env_cfg, self.actor = cfg, env_cfg, actor
        self.dir = Path(run_dir) / "heldout"
        self.protocol = cfg.protocol()

    def evaluate(self, name: str, what: str) -> dict | None:
        """The per-seed metrics cached as ``name``.json, measured first when missing; ``what``:
        the Actor measured, for the log."""
        import jax

        from sfjax import atomic, parallel
        from sfjax.agents.trajectory import save_json
        from sfjax.baselines.evaluation import evaluate_agent
        from sfjax.baselines.llm_agent import LLMEnvAgent
        from sfjax.envs.ran import RanSlicingEnv

        if self.protocol is None:
            return None
        path = self.dir / f"{name}.json"
        if path.exists():
            try:
                return atomic.read_json(path, "the held-out evaluation")
            except atomic.DamagedFile as e:
                raise atomic.DamagedFile(f"{e}; remove it and run the same command again to "
                                         "measure that Actor anew") from None
        log.info("held-out evaluation (%s): %d seeds x %d steps", what,
                 len(self.protocol.seeds), self.protocol.num_steps)
        env = RanSlicingEnv(dataclasses.replace(self.env_cfg,
                                                episode_steps=self.protocol.num_steps))
        agent = LLMEnvAgent(self.actor, env, env.default_params,
                            jax.random.key(self.cfg.sampling_seed))
        per = evaluate_agent(agent, env, env.default_params, self.protocol).per_episode()
        result = {k: [float(x) for x in v] for k, v in per.items()}
        parallel.on_main_process(lambda: save_json(path, result))
        return result

    def before(self, untrained: bool, adapters_off=None) -> None:
        """Evaluate (or load) "before"; only an untrained Actor may be measured as such.

        ``untrained``: the Actor has not been fine-tuned yet. When it has and ``before.json`` is
        missing (removed, e.g. after its damaged-file error), ``adapters_off`` (a context manager
        factory, e.g. ``lambda: lora.adapters_disabled(model)``) makes the Actor the untrained
        one again: LoRA's B starts at 0, so the adapted Actor before fine-tuning is the base
        model. Without it the before/after comparison is skipped."""
        if untrained or (self.dir / "before.json").exists():
            self.evaluate("before", BEFORE)
        elif adapters_off is not None and self.protocol is not None:
            log.info("no held-out 'before' evaluation in %s and the run has already trained: "
                     "the untrained Actor is measured with its LoRA adapters off (its B starts "
                     "at 0, so it is the base model)", self.dir)
            with adapters_off():
                self.evaluate("before", BEFORE)
        elif self.protocol is not None:
            log.warning("no held-out 'before' evaluation in %s and the run has already trained: "
                        "the before/after comparison is skipped", self.dir)
            self.protocol = None

    def after_and_report(self, sf_iterations: int) -> dict | None:
        """Evaluate (or load) "after", the Actor after ``sf_iterations`` SF iterations (the
        run's final Actor); the paired report for summary.json, or None."""
        from sfjax.baselines.paired import paired_report

        before = self.evaluate("before", BEFORE)
        after = self.evaluate(after_name(sf_iterations),
                               f"after {sf_iterations} SF iteration(s)")
        if before is None:
            return None
        return {"seeds": list(self.protocol.seeds), "num_steps": self.protocol.num_steps,
                "after_iteration": sf_iterations,
                "note": "per-seed Table III metrics of the Actor before fine-tuning and of the "
                        "run's final Actor (after after_iteration SF iterations) on held-out env "
                        "seeds; diff = after - before with its 95 % paired t interval",
                "metrics": paired_report(before, after)}


def write_heldout_scalars(writer, report: dict | None) -> None:
    """The held-out means of ``report`` (:meth:`HeldOutEval.after_and_report`) as TensorBoard
    scalars ``heldout/<metric>``: the Actor before fine-tuning at step 0 and the run's final
    Actor at step ``after_iteration``, on the SF-iteration axis of ``env/*`` (whose points are
    in-sample: the trajectories the Reflector labelled); ``heldout/<metric>_diff`` (after −
    before) with its 95 % interval, ``_ci_low`` / ``_ci_high``, at ``after_iteration``. When
    the final Actor is the untrained one (``--loop.final-actor best`` kept iterate 0) only
    step 0 is written. Nothing without a writer or a report."""
    if writer is None or not report:
        return
    last = int(report["after_iteration"])
    for name, r in report["metrics"].items():
        writer.add_scalar(f"heldout/{name}", r["before"], 0)
        if last == 0:
            continue
        writer.add_scalar(f"heldout/{name}", r["after"], last)
        writer.add_scalar(f"heldout/{name}_diff", r["diff"], last)
        if r["ci_low"] is not None:
            writer.add_scalar(f"heldout/{name}_diff_ci_low", r["ci_low"], last)
            writer.add_scalar(f"heldout/{name}_diff_ci_high", r["ci_high"], last)
