"""Refine-from-Reflection (paper IV-C, Algorithm 2): reflection-labelled trajectories -> the
unpaired preference datasets that KTO fine-tunes the Actor on.

Per self-finetuning iteration the Reflector has labelled every step of the collected
trajectories. RfR then runs ``N`` KTO iterations; before each one it builds a fresh dataset

    D_i = D_base  U  D_rollout,i

* ``D_base`` (Algorithm 2, line 6): every step's (prompt x_t, Actor output y_t) pair, desirable
  when the Reflector labelled it effective, undesirable when suboptimal (an unusable output is
  always undesirable);
* ``D_rollout,i`` (lines 8-20): for every *unsolved* undesirable step, the current Actor (after
  KTO iteration i-1) is sampled ``K`` times on the same prompt, all prompts in one batched
  sampler call; a sample is desirable when its parsed action is within ``tolerance`` of the
  Reflector's improved action a*_t, undesirable otherwise (unparsable samples included). When
  the fraction of matching samples exceeds ``tau`` the step is marked *solved* and is not
  rolled out again in later iterations (it stays in ``D_base``), to avoid overfitting.

Everything here is plain data manipulation; the sampler and trainer are passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import jax

from sfjax.agents.prompts import PromptConfig, parse_output
from sfjax.agents.trajectory import Reflection, Trajectory


@dataclass(frozen=True)
class RfRConfig:
    """Refine-from-Reflection settings (paper Algorithm 2)."""

    kto_iterations: int = 6
    """N: KTO iterations per self-finetuning iteration, each on a freshly rolled-out dataset."""
    num_rollouts: int = 8
    """K: samples of the current Actor per unsolved undesirable prompt."""
    tolerance: int = 0
    """A sampled action matches the improved action a*_t when |a - a*_t| <= tolerance."""
    tau: float = 0.5
    """A step whose match rate exceeds tau is solved: no more rollouts on it."""
    rollouts: bool = True
    """Add refine-rollout examples (False = base dataset only, an ablation)."""

    def __post_init__(self):
        if self.kto_iterations < 1 or self.num_rollouts < 1:
            raise ValueError("RfRConfig: kto_iterations and num_rollouts must be >= 1")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"RfRConfig.tau must be in [0, 1], got {self.tau}")
        if self.tolerance < 0:
            raise ValueError("RfRConfig.tolerance must be >= 0")


@dataclass(frozen=True)
class KTOExample:
    """One unpaired preference example (prompt x, completion y, desirable?)."""

    prompt: str
    completion: str
    desirable: bool
    source: str
    """'base' (Reflector label) or 'rollout' (refine-rollout sample)."""
    env_index: int
    step: int


@dataclass(frozen=True)
class RolloutTarget:
    """An undesirable step to roll out on: its prompt and the Reflector's improved action."""

    target_id: str
    prompt: str
    improved_action: int


@dataclass
class DatasetStats:
    """Counts logged for every RfR dataset."""

    n_base_desirable: int = 0
    n_base_undesirable: int = 0
    n_rollout_desirable: int = 0
    n_rollout_undesirable: int = 0
    n_targets: int = 0
    """Undesirable steps (candidates for rollouts)."""
    n_rolled_out: int = 0
    """Targets rolled out this iteration (the unsolved ones)."""
    n_solved: int = 0
    """Targets solved so far (match rate > tau in this or an earlier iteration)."""
    mean_match_rate: float = 0.0
    """Mean fraction of samples matching a*_t over the targets rolled out."""
    rollout_parse_failures: int = 0

    @property
    def n_desirable(self) -> int:
        return self.n_base_desirable + self.n_rollout_desirable

    @property
    def n_undesirable(self) -> int:
        return self.n_base_undesirable + self.n_rollout_undesirable

    def to_json(self) -> dict:
        return {
            **asdict(self),
            "n_desirable": self.n_desirable,
            "n_undesirable": self.n_undesirable,
        }


def target_id(env_index: int, step: int) -> str:
    return f"{env_index}:{step}"


def base_dataset(
    trajectories: Sequence[Trajectory], reflections: Sequence[Reflection]
) -> tuple[list[KTOExample], list[RolloutTarget]]:
    """Algorithm 2 line 6: label every step's (prompt, output); collect the undesirable ones."""
    examples, targets = [], []
    by_env = {r.env_index: r for r in reflections}
    for traj in trajectories:
        refl = by_env.get(traj.env_index)
        if refl is None or len(refl.labels) != len(traj.steps):
            raise ValueError(f"trajectory {traj.env_index} has no complete reflection")
        for step, lab in zip(traj.steps, refl.labels):
            if lab.step != step.t:
                raise ValueError(
                    f"reflection step {lab.step} does not match trajectory step {step.t}"
                )
            desirable = lab.label == "effective" and step.parsed_ok
            examples.append(
                KTOExample(step.prompt, step.output, desirable, "base", traj.env_index, step.t)
            )
            if not desirable:
                targets.append(
                    RolloutTarget(
                        target_id(traj.env_index, step.t), step.prompt, lab.improved_action
                    )
                )
    return examples, targets


SampleFn = Callable[[list[str], int, jax.Array], list[list[str]]]
"""(prompts, K, key) -> K sampled completions per prompt (one batched sampler call)."""


def rollout_examples(
    targets: Sequence[RolloutTarget],
    samples: Sequence[Sequence[str]],
    cfg: RfRConfig,
    prompt_cfg: PromptConfig,
) -> tuple[list[KTOExample], list[float], int]:
    """Label rollout samples against a*_t (Algorithm 2 lines 10-17); returns examples, the
    match rate per target and the number of unparsable samples."""
    if len(samples) != len(targets):
        raise ValueError(f"{len(samples)} sample groups for {len(targets)} targets")
    examples, rates, failures = [], [], 0
    for tgt, group in zip(targets, samples):
        env_index, step = (int(x) for x in tgt.target_id.split(":"))
        hits = 0
        for text in group:
            parsed = parse_output(text, prompt_cfg)
            failures += not parsed.ok
            match = parsed.ok and abs(parsed.action - tgt.improved_action) <= cfg.tolerance
            hits += match
            examples.append(KTOExample(tgt.prompt, text, match, "rollout", env_index, step))
        rates.append(hits / max(len(group), 1))
    return examples, rates, failures


@dataclass
class RfRState:
    """What RfR carries across KTO iterations of one SF iteration (checkpointed)."""

    solved: list[str] = field(default_factory=list)
    """Target ids whose match rate exceeded tau."""


def build_dataset(
    base: Sequence[KTOExample],
    targets: Sequence[RolloutTarget],
    state: RfRState,
    sample_fn: SampleFn | None,
    cfg: RfRConfig,
    prompt_cfg: PromptConfig,
    key: jax.Array,
) -> tuple[list[KTOExample], DatasetStats, RfRState]:
    """One KTO iteration's dataset D_i = D_base U D_rollout,i, and the updated solved set."""
    stats = DatasetStats(
        n_base_desirable=sum(e.desirable for e in base),
        n_base_undesirable=sum(not e.desirable for e in base),
        n_targets=len(targets),
    )
    dataset = list(base)
    solved = set(state.solved)
    todo = [t for t in targets if t.target_id not in solved] if cfg.rollouts else []
    if todo and sample_fn is not None:
        samples = sample_fn([t.prompt for t in todo], cfg.num_rollouts, key)
        extra, rates, failures = rollout_examples(todo, samples, cfg, prompt_cfg)
        dataset += extra
        stats.n_rollout_desirable = sum(e.desirable for e in extra)
        stats.n_rollout_undesirable = sum(not e.desirable for e in extra)
        stats.n_rolled_out = len(todo)
        stats.mean_match_rate = sum(rates) / len(rates)
        stats.rollout_parse_failures = failures
        solved |= {t.target_id for t, r in zip(todo, rates) if r > cfg.tau}
    stats.n_solved = len(solved)
    # keep a stable order (targets' order) so that checkpoints and resumes agree
    order = {t.target_id: i for i, t in enumerate(targets)}
    return dataset, stats, RfRState(sorted(solved, key=lambda s: order.get(s, -1)))


def examples_to_json(examples: Sequence[KTOExample]) -> list[dict]:
    return [asdict(e) for e in examples]


def examples_from_json(items: Sequence[dict]) -> list[KTOExample]:
    return [KTOExample(**d) for d in items]
