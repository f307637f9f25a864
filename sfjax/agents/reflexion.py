"""The Reflexion baseline (Shinn et al. 2023) as the paper adapts it (section V-B).

Reflexion keeps Reflexion's three parts and never updates weights:

* **Actor** — the same LLM Actor as self-finetuning (:class:`sfjax.agents.actor.Actor`, same
  prompt, same history window), whose system prompt additionally carries a *verbal memory*:
  the last ``memory_size`` self-reflections, oldest first (:class:`ReflexionActor`).
* **Evaluator** — scores a finished trial: the Reflector (any backend: api / local / rule)
  labels every step effective / suboptimal with an improved action; the evaluation is the
  share of suboptimal steps, the direction of the proposed corrections and the trajectory
  metrics (avg. SE, reconfigurations, QoS violations), never the eq. 15 scalar utility.
* **Self-reflection** — turns the trial and its evaluation into a few sentences of lessons
  for the next trial. With an LLM backend (``api`` / ``local``) the same model that
  reflects writes them; with the ``rule`` backend a fixed template writes them from the
  evaluation (named as rule-based in the text).

One Reflexion run = ``trials`` trials; trial k acts with the memory of trials < k. The
final memory is then frozen and the agent is scored on the shared evaluation protocol
(:mod:`sfjax.baselines.evaluation`) like every other method of Table III.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax

from sfjax.agents.actor import Actor, ActorConfig
from sfjax.agents.objective_text import objective_compact
from sfjax.agents.prompts import HistoryEntry, PromptConfig, build_messages
from sfjax.agents.reflectors.base import Reflector, reply_answer, trajectory_summary
from sfjax.agents.trajectory import Reflection, Trajectory, trajectory_metrics
from sfjax.baselines.evaluation import EvalProtocol, Rollouts, evaluate_agent
from sfjax.baselines.llm_agent import LLMEnvAgent

log = logging.getLogger(__name__)

RULE_SELF_REFLECTION_TAG = "[rule-based self-reflection, no LLM] "


@dataclass(frozen=True)
class ReflexionConfig:
    """Reflexion trials and memory."""

    trials: int = 3
    """Trials (trajectories collected, evaluated and reflected on) before the final evaluation."""
    trial_seeds: tuple[int, ...] = (100,)
    """Environment seeds of each trial's trajectories (one trajectory per seed per trial)."""
    trial_steps: int = 300
    """Decisions per trial trajectory (paper: 300)."""
    memory_size: int = 3
    """Self-reflections kept in the Actor's prompt (Reflexion's Omega; 1-3 in its paper)."""
    max_reflection_chars: int = 700
    """A self-reflection longer than this is cut (keeps the prompt within context)."""
    reflection_max_new_tokens: int = 1024
    """Token budget of one LLM self-reflection (local backend)."""
    seed: int = 0
    """Seed of the Actor's sampling and the local self-reflection sampling."""

    def __post_init__(self):
        if self.trials < 0 or self.memory_size < 1 or self.trial_steps < 1:
            raise ValueError(
                "ReflexionConfig: need trials >= 0, memory_size >= 1, trial_steps >= 1"
            )
        if not self.trial_seeds:
            raise ValueError("ReflexionConfig.trial_seeds is empty")


def memory_block(memory: Sequence[str]) -> str:
    """The verbal memory as it appears at the end of the Actor's system prompt."""
    if not memory:
        return ""
    lines = ["", "Reflections on your previous trials (oldest first); use their lessons:"]
    lines += [f"Trial reflection {i + 1}: {' '.join(m.split())}" for i, m in enumerate(memory)]
    return "\n".join(lines)


class ReflexionActor(Actor):
    """The Actor with Reflexion's verbal memory appended to its system prompt."""

    def __init__(self, sampler, tokenizer, cfg: ActorConfig, memory: Sequence[str] = ()):
        super().__init__(sampler, tokenizer, cfg)
        self.memory: list[str] = list(memory)

    def messages(self, state, history: Sequence[HistoryEntry], step: int) -> list[dict]:
        messages = build_messages(state, history, self.cfg.prompt, step=step)
        messages[0] = {**messages[0], "content": messages[0]["content"] + memory_block(self.memory)}
        return messages

    def prompt_text(self, state, history: Sequence[HistoryEntry], step: int) -> str:
        from sfjax.tokenizer import chat_prompt

        return chat_prompt(
            self.tokenizer,
            self.messages(state, history, step),
            enable_thinking=self.cfg.prompt.enable_thinking,
        )


@dataclass(frozen=True)
class TrialEvaluation:
    """The evaluator's verdict on one trial (aggregated over its trajectories)."""

    steps: int
    suboptimal: int
    """Steps the Reflector labelled suboptimal."""
    wanted_more: int
    """Suboptimal steps whose improved action is larger than the one taken."""
    wanted_less: int
    """Suboptimal steps whose improved action is smaller."""
    wanted_same_as_before: int
    """Suboptimal steps whose improved action is the previous allocation (a needless change)."""
    avg_se: float
    reconfigurations: float
    violations: float
    summary: str
    """The Reflector's whole-trajectory summary (first trajectory)."""
    top_reasons: tuple[str, ...] = ()
    """Most frequent reasons given for suboptimal steps."""

    @property
    def suboptimal_share(self) -> float:
        return self.suboptimal / max(self.steps, 1)


def evaluate_trial(
    trajs: Sequence[Trajectory], reflections: Sequence[Reflection]
) -> TrialEvaluation:
    """Reflexion's evaluator: aggregate the Reflector's step labels and the trial metrics."""
    if len(trajs) != len(reflections) or not trajs:
        raise ValueError("evaluate_trial needs one Reflection per trajectory (and >= 1)")
    steps = sub = more = less = same = 0
    reasons: Counter[str] = Counter()
    metrics = [trajectory_metrics(t) for t in trajs]
    for traj, refl in zip(trajs, reflections):
        by_t = {s.t: s for s in traj.steps}
        for lab in refl.labels:
            steps += 1
            if lab.label != "suboptimal":
                continue
            sub += 1
            step = by_t[lab.step]
            if int(lab.improved_action) == int(step.state.get("prev_action", -1)):
                same += 1
            elif lab.improved_action > step.action:
                more += 1
            elif lab.improved_action < step.action:
                less += 1
            reasons[lab.reason.strip()[:160]] += 1
    n = len(metrics)
    return TrialEvaluation(
        steps=steps,
        suboptimal=sub,
        wanted_more=more,
        wanted_less=less,
        wanted_same_as_before=same,
        avg_se=sum(m["avg_se"] for m in metrics) / n,
        reconfigurations=sum(m["reconfigurations"] for m in metrics) / n,
        violations=sum(m["violations"] for m in metrics) / n,
        summary=reflections[0].summary or trajectory_summary(trajs[0]),
        top_reasons=tuple(r for r, _ in reasons.most_common(3) if r),
    )


def rule_self_reflection(ev: TrialEvaluation, trial: int) -> str:
    """Template self-reflection from an evaluation (the ``rule`` backend; no LLM)."""
    parts = [
        f"{RULE_SELF_REFLECTION_TAG}Trial {trial}: {ev.suboptimal} of {ev.steps} decisions were "
        f"judged suboptimal; mean SE {ev.avg_se:.2f}, {ev.reconfigurations:.0f} "
        f"reconfigurations, {ev.violations:.0f} QoS-violation steps."
    ]
    if ev.wanted_more >= max(ev.wanted_less, ev.wanted_same_as_before) and ev.wanted_more:
        parts.append(
            f"Most corrections ({ev.wanted_more}) asked for MORE resources: allocate earlier and "
            "more generously when arrivals rise, the queue grows or packets are dropped."
        )
    if ev.wanted_less > max(ev.wanted_more, ev.wanted_same_as_before):
        parts.append(
            f"Most corrections ({ev.wanted_less}) asked for FEWER resources: when the queue is "
            "stable and there are no drops, step down to raise SE."
        )
    if ev.wanted_same_as_before:
        parts.append(
            f"{ev.wanted_same_as_before} changes were needless: keep the allocation unless the "
            "feedback clearly demands a change."
        )
    if ev.suboptimal == 0:
        parts.append("Every decision was judged effective: keep the same policy.")
    return " ".join(parts)


def llm_self_reflection_messages(
    ev: TrialEvaluation, trial: int, prompt_cfg: PromptConfig
) -> list[dict]:
    """Chat messages asking an LLM for Reflexion's self-reflection on one trial."""
    reasons = "\n".join(f"- {r}" for r in ev.top_reasons) or "- (none)"
    system = (
        "You are the self-reflection module of a Reflexion agent that controls RAN slicing: "
        f"every 100 ms it chooses how many {prompt_cfg.action_unit}s (from "
        f"{prompt_cfg.action_lo} to {prompt_cfg.action_hi}) slice 0 gets. "
        f"{objective_compact(prompt_cfg.objective, trade_off=prompt_cfg.trade_off)} "
        "Given an evaluation of its last trial, write at most three sentences of concrete, "
        "actionable lessons for the next trial. Reply with the lessons only."
    )
    user = (
        f"Trial {trial} evaluation:\n{ev.summary}\n"
        f"{ev.suboptimal} of {ev.steps} decisions were judged suboptimal: {ev.wanted_more} "
        f"needed more resources, {ev.wanted_less} fewer, {ev.wanted_same_as_before} were "
        f"needless changes.\nMost frequent reasons:\n{reasons}"
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


SelfReflectFn = Callable[[TrialEvaluation, int, jax.Array], str]


def make_self_reflect(reflector: Reflector, prompt_cfg: PromptConfig) -> SelfReflectFn:
    """Self-reflection with the same backend as the evaluator's Reflector.

    ``local`` backends expose ``generate(conversations, key)``; ``api`` backends a
    ``complete(messages)`` with retries and an on-disk cache; anything else (the ``rule``
    labeller) gets :func:`rule_self_reflection`.
    """
    generate = getattr(reflector, "generate", None)
    complete = getattr(reflector, "complete", None)

    def reflect(ev: TrialEvaluation, trial: int, key: jax.Array) -> str:
        if generate is None and complete is None:
            return rule_self_reflection(ev, trial)
        messages = llm_self_reflection_messages(ev, trial, prompt_cfg)
        text = generate([messages], key)[0] if generate is not None else complete(messages)
        text = " ".join(reply_answer(text).split())  # reasoning dropped, one line for memory
        if not text:
            raise RuntimeError("the self-reflection model returned an empty reply")
        return text

    return reflect


@dataclass
class ReflexionRun:
    """Record of one Reflexion run."""

    memory: list[str] = field(default_factory=list)
    """Final verbal memory (at most memory_size reflections)."""
    reflections: list[str] = field(default_factory=list)
    """Every self-reflection, in trial order."""
    trial_metrics: list[dict[str, tuple[float, float]]] = field(default_factory=list)
    """Per trial: metric -> (mean, std) over the trial's trajectories."""
    trial_evaluations: list[TrialEvaluation] = field(default_factory=list)
    trajectories: list[list[Trajectory]] = field(default_factory=list)
    env_samples: int = 0
    """Environment steps used by the trials."""


def run_reflexion(
    actor: ReflexionActor,
    reflector: Reflector,
    env,
    env_params,
    cfg: ReflexionConfig,
    self_reflect: SelfReflectFn | None = None,
    on_trial: Callable[[int, ReflexionRun], None] | None = None,
    done: ReflexionRun | None = None,
) -> ReflexionRun:
    """Reflexion trials: act with memory -> evaluate (Reflector) -> self-reflect -> remember.

    ``done``: the record of this run's first trials, saved by an earlier process (a run killed
    after them): they are not run again; the Actor takes their memory and the keys go on where
    they were, so the result equals an uninterrupted run's."""
    self_reflect = self_reflect or make_self_reflect(reflector, actor.cfg.prompt)
    protocol = EvalProtocol(seeds=cfg.trial_seeds, num_steps=cfg.trial_steps)
    key = jax.random.key(cfg.seed)
    run = ReflexionRun(memory=list(actor.memory))
    skip = 0
    if done is not None and done.reflections:
        skip = len(done.reflections)
        if skip > cfg.trials:
            raise ValueError(f"{skip} Reflexion trials were done and the run has {cfg.trials}")
        run = done
        actor.memory = list(done.memory)
        log.info("Reflexion: trials 1-%d of %d done before%s", skip, cfg.trials,
                 f", continuing with trial {skip + 1}" if skip < cfg.trials else "")  # fmt: skip
    for trial in range(cfg.trials):
        key, act_key, refl_key, self_key = jax.random.split(key, 4)
        if trial < skip:
            continue
        log.info("Reflexion trial %d/%d: %d env seed(s) x %d decisions, then evaluator and "
                 "self-reflection", trial + 1, cfg.trials, len(protocol.seeds), protocol.num_steps)  # fmt: skip
        agent = LLMEnvAgent(actor, env, env_params, act_key)
        rollouts: Rollouts = evaluate_agent(agent, env, env_params, protocol)
        trajs = agent.trajectories
        reflections = reflector.reflect(trajs, refl_key)
        ev = evaluate_trial(trajs, reflections)
        text = self_reflect(ev, trial + 1, self_key)[: cfg.max_reflection_chars]
        run.reflections.append(text)
        actor.memory = (actor.memory + [text])[-cfg.memory_size :]
        run.memory = list(actor.memory)
        run.trial_metrics.append(rollouts.summary())
        run.trial_evaluations.append(ev)
        run.trajectories.append(trajs)
        run.env_samples += rollouts.num_samples
        m = rollouts.summary()
        log.info(
            "Reflexion trial %d: utility %.1f, avg SE %.3f bit/s/Hz, %.1f reconfigurations, "
            "%.1f violating steps per trajectory; reflection: %s", trial + 1,
            m["utility"][0], m["mean_se"][0], m["reconfigurations"][0], m["violations"][0],
            text[:200],
        )  # fmt: skip
        if on_trial is not None:
            on_trial(trial, run)
    return run


def trial_state(run: ReflexionRun) -> dict:
    """What a run needs to continue after its latest trial (JSON; the trial's trajectories are
    saved beside it): the memory, that trial's reflection, metrics and evaluation, and the
    environment steps of all trials so far."""
    return {
        "memory": list(run.memory),
        "reflection": run.reflections[-1],
        "trial_metrics": {k: list(v) for k, v in run.trial_metrics[-1].items()},
        "trial_evaluation": dataclasses.asdict(run.trial_evaluations[-1]),
        "env_samples": run.env_samples,
    }


def load_done_trials(trials_dir: Path, trials: int) -> ReflexionRun | None:
    """The record of the trials ``1..k`` a run saved in ``trials_dir`` (``state_<k>.json`` of
    :func:`trial_state` after ``trial_<k>.json``), for :func:`run_reflexion`'s ``done``; it stops
    at the first trial missing or unreadable (that one runs again, with a warning when
    damaged). None when no trial was saved."""
    from sfjax import atomic
    from sfjax.agents.trajectory import load_trajectories

    run = ReflexionRun()
    for k in range(1, trials + 1):
        state, trajs = trials_dir / f"state_{k}.json", trials_dir / f"trial_{k}.json"
        if not (state.exists() and trajs.exists()):
            break
        try:
            s = atomic.read_json(state, "a Reflexion trial's state")
            trajectories = load_trajectories(trajs)
            ev = s["trial_evaluation"]
            evaluation = TrialEvaluation(**{**ev, "top_reasons": tuple(ev["top_reasons"])})
            metrics = {m: (float(a), float(b)) for m, (a, b) in s["trial_metrics"].items()}
            memory, reflection, samples = list(s["memory"]), s["reflection"], s["env_samples"]
        except (atomic.DamagedFile, KeyError, TypeError, ValueError) as e:
            log.warning("Reflexion trial %d's saved state in %s cannot be read (%s: %s); it "
                        "runs again", k, trials_dir, type(e).__name__, e)  # fmt: skip
            break
        run.memory, run.env_samples = memory, int(samples)
        run.reflections.append(reflection)
        run.trial_metrics.append(metrics)
        run.trial_evaluations.append(evaluation)
        run.trajectories.append(trajectories)
    return run if run.reflections else None
