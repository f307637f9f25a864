"""Algorithm 1 (paper IV-B): the self-finetuning loop, with a checkpoint after every phase.

For SF iteration ``i = 0, 1, ..., I``:

1. **collect** — the Actor (LoRA weights after ``i`` SF iterations) runs ``num_envs`` parallel
   trajectories of ``trajectory_steps`` R-MDP steps (prompt from s_t and the last-k history ->
   (rho_t, a_t, eta_t) -> env feedback f_t); the trajectories are written to
   ``run_dir/trajectories/iter_<i>.json`` before anything else happens. Their metrics are the
   evaluation of the Actor after ``i`` SF iterations (iteration 0 = before any fine-tuning).
2. **reflect** (``i < I``) — the Reflector labels every step (effective / suboptimal) and
   proposes improved actions; written to ``run_dir/reflections/iter_<i>.json``.
3. **finetune** (``i < I``) — Refine-from-Reflection (Algorithm 2): ``N`` KTO iterations, each on
   the base set plus fresh rollouts of the current Actor.

The run is a fixed sequence of phases (collect, reflect, kto_0..kto_{N-1}, collect, ...). After
each phase the loop writes an orbax checkpoint (LoRA params, optimizer state, RNG key, loop
position, trajectories, reflections, RfR state and datasets, the summary so far); every phase's
randomness is ``fold_in(root_key, phase_index)``, so ``resume`` after a kill replays nothing
and reaches the same result as an uninterrupted run. The sequence is prefix-stable (a run of
more SF iterations begins with the phases of a shorter one), so ``resume`` with more SF
iterations extends a run (:mod:`sfjax.agents.extend`); a checkpoint that is no phase of the
plan (fewer SF iterations, other KTO iterations) is refused.

The run ends with the Actor ``LoopConfig.final_actor`` names: the last iterate (Algorithm 1) or
the iterate whose collected trajectories scored best, loaded from its collect phase's
checkpoint (those are never pruned); ``summary.json`` records which (``final_actor``).

The loop talks to its components through small protocols
(:class:`~sfjax.agents.collect.EnvRunner`, :class:`~sfjax.agents.collect.ActorLike`,
:class:`FineTuner`), so tests can drive it with fakes and other envs (ns-3) can plug in. Its
collect phase is :func:`sfjax.agents.collect.collect`; the iteration records of
``summary.json`` and the final table are built by :mod:`sfjax.agents.loop_records`; the
TensorBoard events are kept in step with the checkpoints by :mod:`sfjax.agents.loop_events`. The
loop's config, :class:`~sfjax.agents.loop_config.LoopConfig`, has its own module (re-exported here).

Multi-host (``jax.distributed``, e.g. under ``python -m sfjax.parallel --distributed``): every
process runs this loop (SPMD) and must make the same sharded calls, so every host-side value
that could differ between hosts is decided on process 0 and broadcast: the Reflector's reply
(:func:`~sfjax.agents.reflectors.broadcast.reflect_on_all_processes`: an API is queried once
per reflect phase), a ``host_side`` environment's states and feedback, and the phase timings.
Trajectories, reflections, datasets, ``summary.json``, TensorBoard events and progress bars are
written by process 0 only; the orbax checkpoints are saved and restored by all processes
together, each writing / reading its own shards of arrays that span hosts
(:class:`~sfjax.agents.checkpoint.LoopCheckpointer`). ``run_dir`` must be shared by all hosts
(checked at start-up).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

from sfjax import atomic, device_memory, parallel
from sfjax.agents.checkpoint import CheckpointMismatch, CheckpointMissing, LoopCheckpointer
from sfjax.agents.collect import ActorLike, EnvRunner, collect
from sfjax.agents.loop_config import LoopConfig
from sfjax.agents.loop_events import event_sizes, flush_events, trim_events
from sfjax.agents.loop_records import (
    SUMMARY_METRICS,
    best_iteration,
    format_table,
    mean_metrics,
    stats_delta,
    stats_snapshot,
)
from sfjax.agents.prompts import PromptConfig
from sfjax.agents.reflectors.base import Reflector
from sfjax.agents.reflectors.broadcast import reflect_on_all_processes
from sfjax.agents.rfr import (
    KTOExample,
    RfRConfig,
    RfRState,
    RolloutTarget,
    base_dataset,
    build_dataset,
    examples_from_json,
    examples_to_json,
)
from sfjax.agents.trajectory import Reflection, Trajectory, UtilityWeights, save_json
from sfjax.configcheck import check_config

log = logging.getLogger(__name__)

__all__ = [
    "PHASE_TEXT",
    "SUMMARY_METRICS",
    "ActorLike",
    "EnvRunner",
    "FineTuner",
    "LoopConfig",
    "Phase",
    "SelfFinetuningLoop",
    "checkpoint_arrays",
    "collect",
    "collect_step",
    "load_iterate",
    "flush_events",
    "format_table",
    "mean_metrics",
    "phase_key",
    "phase_plan",
]

PHASE_TEXT = {
    "collect": "the Actor runs the trajectories (one sampler call per decision)",
    "reflect": "the Reflector labels every step",
    "kto": "RfR rollouts of the current Actor, then KTO on the LoRA weights",
}
"""One line per phase kind, logged as each phase starts."""


class FineTuner(Protocol):
    """KTO on the Actor's LoRA params; its arrays are checkpointed by the loop."""

    def train(
        self, examples: Sequence[KTOExample], key: jax.Array, step_offset: int
    ) -> dict[str, float]:
        """One KTO iteration on ``examples``; returns mean metrics (TRL tag names)."""
        ...

    def arrays(self) -> Any:
        """Pytree of everything trainable/stateful (LoRA params, optimizer state, counters)."""
        ...

    def load_arrays(self, arrays: Any) -> None: ...


@dataclass(frozen=True)
class Phase:
    index: int
    iteration: int
    kind: str  # collect | reflect | kto
    kto_iteration: int = -1

    @property
    def name(self) -> str:
        k = f"_{self.kto_iteration}" if self.kind == "kto" else ""
        return f"iter{self.iteration}/{self.kind}{k}"


def phase_plan(sf_iterations: int, kto_iterations: int) -> list[Phase]:
    """The run's fixed phase sequence (checkpoint step = phase index)."""
    phases, i = [], 0
    for it in range(sf_iterations + 1):
        phases.append(Phase(i, it, "collect"))
        i += 1
        if it == sf_iterations:
            break
        phases.append(Phase(i, it, "reflect"))
        i += 1
        for k in range(kto_iterations):
            phases.append(Phase(i, it, "kto", k))
            i += 1
    return phases


def phase_key(root_key: jax.Array, phase: Phase) -> jax.Array:
    """``phase``'s randomness: ``fold_in(root_key, phase.index)``, with the run's root key
    ``jax.random.key(LoopConfig.seed)``; a resumed or extended run, and a script replaying one of
    its phases, derive the same key."""
    return jax.random.fold_in(root_key, phase.index)


def collect_step(phases: Sequence[Phase], iteration: int) -> int:
    """The checkpoint step of iteration ``iteration``'s collect phase: the Actor after that many
    SF iterations (such checkpoints are never pruned)."""
    return next(p.index for p in phases if p.kind == "collect" and p.iteration == iteration)


def checkpoint_arrays(finetuner: FineTuner, root_key: jax.Array) -> dict:
    """The arrays of a phase checkpoint (also the template one is restored into)."""
    return {"finetuner": finetuner.arrays(), "root_key": jax.random.key_data(root_key)}


def load_iterate(ckpt: LoopCheckpointer, phases: Sequence[Phase], finetuner: FineTuner,
                 iteration: int, *, purpose: str, remedy: str) -> None:  # fmt: skip
    """Load the Actor after ``iteration`` SF iterations into ``finetuner`` from its collect
    phase's checkpoint. :class:`CheckpointMissing` / :class:`atomic.DamagedFile` when it is gone
    or unreadable, the message being ``purpose`` (why it is needed), what is wrong, ``remedy``."""
    step = collect_step(phases, iteration)
    where = f"its checkpoint (step {step}, phase iter{iteration}/collect)"
    if step not in ckpt.all_steps():
        raise CheckpointMissing(
            f"{purpose}, but {where} is not in {ckpt.directory}: runs written before every "
            f"collect phase's checkpoint was kept lost it. {remedy}"
        )
    like = checkpoint_arrays(finetuner, jax.random.key(0))  # the key: a template only
    try:
        arrays, _ = ckpt.restore(step, like)
    except CheckpointMismatch:
        raise
    except Exception as e:  # noqa: BLE001 -- orbax raises many types for damaged files
        raise atomic.DamagedFile(
            f"{purpose}, but {where} in {ckpt.directory} is damaged ({type(e).__name__}: {e}). "
            f"{remedy}"
        ) from e
    finetuner.load_arrays(arrays["finetuner"])


class SelfFinetuningLoop:
    """Algorithm 1 with per-phase checkpoints; see the module docstring."""

    def __init__(
        self,
        cfg: LoopConfig,
        rfr_cfg: RfRConfig,
        prompt_cfg: PromptConfig,
        actor: ActorLike,
        env: EnvRunner,
        reflector: Reflector,
        finetuner: FineTuner,
        run_dir: str | Path,
        *,
        writer=None,
        weights: UtilityWeights | None = None,
        progress: bool = True,
        on_phase_end: Callable[[Phase], None] | None = None,
        run_info: Mapping[str, Any] | None = None,
    ):
        check_config(cfg, "loop.")  # before anything is written
        self.cfg, self.rfr_cfg, self.prompt_cfg = cfg, rfr_cfg, prompt_cfg
        self.actor, self.env, self.reflector, self.finetuner = actor, env, reflector, finetuner
        self.run_dir = Path(run_dir)
        # process 0 alone writes events and files; the others get the same values through
        # broadcasts and keep them in memory (and in the collective checkpoints)
        self.writer = writer if parallel.is_main_process() else None
        self.weights = weights or UtilityWeights()
        self.progress = progress and parallel.is_main_process()
        self.on_phase_end = on_phase_end
        self.run_info = dict(run_info or {})
        self.phases = phase_plan(cfg.sf_iterations, rfr_cfg.kto_iterations)
        parallel.check_shared_directory(self.run_dir)  # multi-host: orbax needs one directory
        self.ckpt = LoopCheckpointer(
            self.run_dir / "checkpoints", cfg.keep_checkpoints,
            preserve=[p.index for p in self.phases if p.kind == "collect"],
        )  # fmt: skip
        self.root_key = jax.random.key(cfg.seed)
        self.final_actor: dict | None = None  # {"rule", "iteration"} once the run has ended
        self._fresh_state()

    def _fresh_state(self):
        self.trajectories: list[Trajectory] = []
        self.reflections: list[Reflection] = []
        self.base: list[KTOExample] = []
        self.targets: list[RolloutTarget] = []
        self.rfr_state = RfRState()
        self.dataset: list[KTOExample] = []
        self.iterations: list[dict] = []
        self.kto_history: list[dict] = []
        self.timings: dict[str, float] = {}
        self.kto_steps = 0
        self.artefacts: dict[str, str] = {}  # run-dir relative path -> SHA-256 of its bytes

    # -- checkpoint state ------------------------------------------------------------------

    def _meta(self, phase: Phase) -> dict:
        return {
            "phase_index": phase.index,
            "phase": phase.name,
            "root_key_seed": self.cfg.seed,
            "trajectories": [t.to_json() for t in self.trajectories],
            "reflections": [r.to_json() for r in self.reflections],
            "base": examples_to_json(self.base),
            "targets": [asdict(t) for t in self.targets],
            "rfr_solved": list(self.rfr_state.solved),
            "dataset": examples_to_json(self.dataset),
            "iterations": self.iterations,
            "kto_history": self.kto_history,
            "timings": self.timings,
            "kto_steps": self.kto_steps,
            "artefacts": self.artefacts,
            "tb_sizes": event_sizes(self.writer),
        }

    def _load_meta(self, meta: dict) -> None:
        self.trajectories = [Trajectory.from_json(d) for d in meta["trajectories"]]
        self.reflections = [Reflection.from_json(d) for d in meta["reflections"]]
        self.base = examples_from_json(meta["base"])
        self.targets = [RolloutTarget(**d) for d in meta["targets"]]
        self.rfr_state = RfRState(list(meta["rfr_solved"]))
        self.dataset = examples_from_json(meta["dataset"])
        self.iterations = list(meta["iterations"])
        self.kto_history = list(meta["kto_history"])
        self.timings = dict(meta["timings"])
        self.kto_steps = int(meta["kto_steps"])
        self.artefacts = dict(meta.get("artefacts", {}))

    def _arrays(self) -> dict:
        return checkpoint_arrays(self.finetuner, self.root_key)

    def restore(self) -> int:
        """Load the newest intact checkpoint, if any (a damaged one falls back to the one
        before, with a warning); check the artefacts it lists; returns the next phase index."""
        found = self.ckpt.restore_latest(self._arrays())
        if found is None and self.ckpt.set_aside:
            log.warning(
                "no intact checkpoint left in %s (all %d were damaged; kept in %s): the run "
                "starts again from its first phase and rewrites its artefacts as it goes",
                self.ckpt.directory, len(self.ckpt.set_aside), self.ckpt.set_aside[0].parent,
            )  # fmt: skip
        if found is None:
            # a killed first process's events are rewritten
            trim_events(self.writer, self.run_dir, {})
            return 0
        step, arrays, meta = found
        self._check_plan(step, meta["phase"])
        self.finetuner.load_arrays(arrays["finetuner"])
        self.root_key = jax.random.wrap_key_data(np.asarray(arrays["root_key"]))
        self._load_meta(meta)
        self._check_artefacts(self.phases[step])
        trim_events(self.writer, self.run_dir, meta.get("tb_sizes", {}))
        log.info("resumed after phase %s", meta["phase"])
        return step + 1

    def _check_plan(self, step: int, name: str) -> None:
        """The checkpoint of phase ``name`` at ``step`` is a phase of this run's plan: a run
        continues with more SF iterations (the plan is prefix-stable) but never fewer, nor
        with another number of KTO iterations (the phases' indices would shift)."""
        if step < len(self.phases) and self.phases[step].name == name:
            return
        ours = (f"its phase {step} is {self.phases[step].name}" if step < len(self.phases)
                else f"its last phase is {len(self.phases) - 1}")
        raise CheckpointMismatch(
            f"checkpoint {step} in {self.ckpt.directory} is of phase {name}, not of this run "
            f"({self.cfg.sf_iterations} SF iteration(s) of {self.rfr_cfg.kto_iterations} KTO "
            f"iteration(s): {ours}). Continue it with the configuration that wrote it (more SF "
            "iterations extend it), or use a new run directory"
        )  # fmt: skip

    def _keep_final_actor(self) -> None:
        """Load the Actor ``cfg.final_actor`` keeps (:class:`LoopConfig`) into the fine-tuner:
        the last iterate's is there already; an earlier one comes from its collect phase's
        checkpoint. Nothing is saved: an extension continues from the last iterate."""
        last = self.phases[-1].iteration
        rule = self.cfg.final_actor
        k = best_iteration(self.iterations) if rule == "best" else last
        self.final_actor = {"rule": rule, "iteration": k}
        if k == last:
            return
        load_iterate(
            self.ckpt, self.phases, self.finetuner, k, remedy="Rerun with --loop.final-actor last",
            purpose=f"--loop.final-actor best keeps the Actor after {k} SF iteration(s) (the "
                    "best collected utility)",
        )  # fmt: skip
        log.info("final Actor: the one after %d SF iteration(s), of %d (--loop.final-actor best: "
                 "utility %.1f on its collected trajectories)", k, last,
                 self.iterations[k]["utility"])  # fmt: skip

    def _check_artefacts(self, phase: Phase) -> None:
        """Every JSON artefact listed in the checkpoint must be on disk, byte for byte. Those
        of the checkpoint's own phase are rewritten from it; an older damaged one is named."""
        if not parallel.is_main_process():
            return
        own = dict(self._phase_artefacts(phase))
        damaged = []
        for rel, digest in sorted(self.artefacts.items()):
            if atomic.sha256_file(self.run_dir / rel) == digest:
                continue
            if rel in own:
                log.warning("%s is missing or damaged; rewritten from the checkpoint", rel)
                self._save_artefact(rel, own[rel])
            else:
                damaged.append(rel)
        if damaged:
            raise atomic.DamagedFile(
                f"{self.run_dir}: {', '.join(damaged)} missing or damaged (SHA-256 differs from "
                "the one recorded when it was written); the checkpoints keep only the latest "
                "phase's data, so restore the file(s) from a copy or start a new --run-dir"
            )

    def _phase_artefacts(self, phase: Phase) -> list[tuple[str, Any]]:
        """(run-dir relative path, JSON) of the artefact(s) ``phase`` wrote, from its state."""
        if phase.kind == "collect":
            return [(f"trajectories/iter_{phase.iteration}.json",
                     [t.to_json() for t in self.trajectories])]  # fmt: skip
        if phase.kind == "reflect":
            return [(f"reflections/iter_{phase.iteration}.json",
                     [r.to_json() for r in self.reflections])]  # fmt: skip
        rel = f"datasets/iter_{phase.iteration}_kto_{phase.kto_iteration}.json"
        return [(rel, examples_to_json(self.dataset))]

    def _save_artefact(self, rel: str, obj) -> None:
        """Write a JSON artefact (process 0 only) and record its digest for the checkpoint."""
        if parallel.is_main_process():
            self.artefacts[rel] = save_json(self.run_dir / rel, obj)

    # -- phases ----------------------------------------------------------------------------

    def _key(self, phase: Phase) -> jax.Array:
        return phase_key(self.root_key, phase)

    def _collect(self, phase: Phase) -> None:
        self.trajectories = collect(
            self.actor, self.env, self.prompt_cfg, self.cfg.num_envs, self.cfg.trajectory_steps,
            self.cfg.env_key(phase.iteration), self._key(phase), env_seed=self.cfg.env_seed,
            progress=self.progress,
        )  # fmt: skip
        for rel, obj in self._phase_artefacts(phase):
            self._save_artefact(rel, obj)
        m = mean_metrics(self.trajectories, self.weights)
        # n_desirable / n_undesirable stay None for the final, evaluation-only collection
        self.iterations.append(
            {"iteration": phase.iteration, **m, "n_desirable": None, "n_undesirable": None}
        )
        self._scalars("env", m, phase.iteration)
        log.info(
            "iteration %d: utility %.1f, avg SE %.3f, reconf %.1f, violations %.1f",
            phase.iteration, m["utility"], m["avg_se"], m["reconfigurations"], m["violations"],
        )  # fmt: skip

    def _reflect(self, phase: Phase) -> None:
        before = stats_snapshot(self.reflector)
        # process 0's reply on every process (an API is queried once, not once per host)
        self.reflections = reflect_on_all_processes(
            self.reflector, self.trajectories, self._key(phase)
        )
        # retries, their reasons and cache hits of this phase (process 0's, on every host)
        calls = parallel.broadcast_object(stats_delta(before, stats_snapshot(self.reflector)))
        for rel, obj in self._phase_artefacts(phase):
            self._save_artefact(rel, obj)
        self.base, self.targets = base_dataset(self.trajectories, self.reflections)
        self.rfr_state = RfRState()
        n_sub = sum(x.label == "suboptimal" for r in self.reflections for x in r.labels)
        n = sum(len(r.labels) for r in self.reflections)
        rec = self.iterations[-1]
        rec["reflector"] = self.reflector.name
        if calls:
            rec["reflector_calls"] = calls
        rec["suboptimal_fraction"] = n_sub / max(n, 1)
        self._scalars("reflector", {"suboptimal_fraction": n_sub / max(n, 1)}, phase.iteration)
        log.info("reflect: %d of %d steps labelled suboptimal (%s)", n_sub, n, self.reflector.name)

    def _kto(self, phase: Phase) -> None:
        key = self._key(phase)
        roll_key, train_key = jax.random.split(key)
        dataset, stats, self.rfr_state = build_dataset(
            self.base, self.targets, self.rfr_state, self.actor.sample, self.rfr_cfg,
            self.prompt_cfg, roll_key,
        )  # fmt: skip
        self.dataset = dataset
        for rel, obj in self._phase_artefacts(phase):
            self._save_artefact(rel, obj)
        log.info("KTO iteration %d: %d examples (%d desirable, %d undesirable)%s",
                 phase.kto_iteration, len(dataset), stats.n_desirable, stats.n_undesirable,
                 f"; {stats.n_improved} desirable at improved actions (--rfr.improved-examples)"
                 if stats.n_improved else "")  # fmt: skip
        metrics = self.finetuner.train(dataset, train_key, self.kto_steps)
        log.info(
            "KTO iteration %d: %d steps, loss %.4f, rewards chosen %.3f / rejected %.3f, "
            "kl %.3f (unclamped %.3f)%s", phase.kto_iteration, int(metrics.get("num_steps", 0)),
            *(metrics.get(k, float("nan")) for k in ("loss", "rewards/chosen",
                                                     "rewards/rejected", "kl", "kl_unclamped")),
            f", token KL to the reference {metrics['token_kl']:.3f} (--kto.token-kl-coef)"
            if "token_kl" in metrics else "",
        )  # fmt: skip
        self.kto_steps += int(metrics.get("num_steps", 0))
        global_kto = phase.iteration * self.rfr_cfg.kto_iterations + phase.kto_iteration
        self._scalars("kto_iter", metrics, global_kto)
        self._scalars("rfr", stats.to_json(), global_kto)
        entry = {
            "iteration": phase.iteration,
            "kto_iteration": phase.kto_iteration,
            **stats.to_json(),
            **{f"kto/{k}": float(v) for k, v in metrics.items()},
        }
        self.kto_history.append(entry)
        rec = self.iterations[-1]
        if phase.kto_iteration == 0:
            rec["n_desirable"] = 0
            rec["n_undesirable"] = 0
            rec["kto_iterations"] = []
        rec["n_desirable"] += stats.n_desirable
        rec["n_undesirable"] += stats.n_undesirable
        rec["kto_iterations"].append(entry)

    # -- driver ----------------------------------------------------------------------------

    def run(self, *, resume: bool = False) -> dict:
        """Run (or resume) the whole loop; returns the summary written to summary.json."""
        try:  # the checkpoint manager is closed however the run ends
            start = self.restore() if resume else 0
            if not resume and self.ckpt.latest_step() is not None:
                raise FileExistsError(
                    f"{self.run_dir} already holds checkpoints; pass --resume to continue that run "
                    f"or choose a new --run-dir"
                )
            for phase in self.phases[start:]:
                self._run_phase(phase)
            self._keep_final_actor()
        finally:
            self.ckpt.close()
        return self.write_summary()

    def _run_phase(self, phase: Phase) -> None:
        """One phase, timed, then the summary, the events and its checkpoint."""
        log.info("phase %d/%d %s: %s", phase.index + 1, len(self.phases), phase.name,
                 PHASE_TEXT[phase.kind])  # fmt: skip
        t0, c0 = time.perf_counter(), time.process_time()
        # an out-of-memory error names the phase (the CLIs print which options lower memory)
        with device_memory.during(f"phase {phase.name} ({PHASE_TEXT[phase.kind]})"):
            {"collect": self._collect, "reflect": self._reflect, "kto": self._kto}[phase.kind](phase)
        # wall time, and CPU time of this process (all threads): the latter is what a phase
        # costs when the machine is shared
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        # process 0's clock on every host: the checkpointed loop state stays identical
        dt, dc = parallel.broadcast_object([dt, dc])
        kind = phase.kind
        self.timings[kind] = self.timings.get(kind, 0.0) + dt
        self.timings[f"{kind}_cpu"] = self.timings.get(f"{kind}_cpu", 0.0) + dc
        self.timings[f"{kind}_count"] = self.timings.get(f"{kind}_count", 0) + 1
        log.info("phase %s done in %.1f s", phase.name, dt)
        wall = self.iterations[-1].setdefault("wall_s", {})
        wall[kind] = wall.get(kind, 0.0) + dt
        wall[f"{kind}_cpu"] = wall.get(f"{kind}_cpu", 0.0) + dc
        self.write_summary()
        if self.writer is not None:
            flush_events(self.writer)  # before the checkpoint: a kill after it keeps them
        self.ckpt.save(phase.index, self._arrays(), self._meta(phase))
        if self.on_phase_end is not None:
            self.on_phase_end(phase)

    def summary(self) -> dict:
        calls: dict = {}
        for r in self.iterations:
            calls = stats_delta({}, r.get("reflector_calls", {}), calls)
        return {
            **self.run_info,
            "reflector": self.reflector.name,
            "reflector_calls": calls,
            "iterations": self.iterations,
            **({"final_actor": self.final_actor} if self.final_actor else {}),
            "timings_s": self.timings,
        }

    def write_summary(self) -> dict:
        s = self.summary()
        # rewritten after every phase and at the end, so not an artefact checked on resume
        if parallel.is_main_process():
            save_json(self.run_dir / "summary.json", s)
        return s

    def _scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, bool | int | float | np.floating | np.integer):
                self.writer.add_scalar(f"{prefix}/{k}", float(v), step)
