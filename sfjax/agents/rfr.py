"""Refine-from-Reflection (paper IV-C, Algorithm 2): reflection-labelled trajectories -> the
unpaired preference datasets that KTO fine-tunes the Actor on.

Per self-finetuning iteration the Reflector has labelled every step of the collected
trajectories. RfR then runs ``N`` KTO iterations; before each one it builds a fresh dataset

    D_i = D_base  U  D_rollout,i

* ``D_base`` (Algorithm 2, line 6): every step's (prompt x_t, Actor output y_t) pair, desirable
  when the Reflector labelled it effective, undesirable when suboptimal (an unusable output is
  always undesirable);
* ``D_rollout,i`` (lines 8-20): for every *unsolved* undesirable step, the current Actor (after
  KTO iteration i-1) is sampled ``K`` times on the same prompt, in as few batched sampler
  calls as memory allows (below); a sample is desirable when its parsed action is within ``tolerance`` of the
  Reflector's improved action a*_t, undesirable otherwise (unparsable samples included). When
  the fraction of matching samples exceeds ``tau`` the step is marked *solved* and is not
  rolled out again in later iterations (it stays in ``D_base``), to avoid overfitting.

Optional, off by default and *not* in Algorithm 2: ``RfRConfig.improved_examples`` adds
``D_improved`` to every KTO iteration's dataset, one desirable example per suboptimal base step:
the Actor's own completion at that step with its action set to the Reflector's improved action
(:func:`improved_examples`). In Algorithm 2 the improved action reaches the Actor only through
rollouts that happen to sample it; this gives the desirable side that signal directly.

Rollout calls. A sampler call holds ``prompts x K`` rows, each with a KV cache of
``prompt bucket + new-token bucket`` slots; at Qwen3-4B (144 KiB of bf16 KV per token), 64
prompts x K = 8 x ~2.7k slots is ~190 GB — more than any single GPU. So the unsolved prompts go
in consecutive calls, each as large as ``RfRConfig.max_rows_per_call`` and
``RfRConfig.max_cache_gib_per_call`` allow (:func:`plan_rollout_calls`; the byte cost of a
call comes from the model's KV bytes per token and the sampler's buckets, :class:`RolloutCost`,
read off the Actor).
Prompt ``i`` of the rollout list samples with the key ``fold_in(key, i)`` (the sampler draws
sample ``j`` of it with ``fold_in(that, j)``), whatever call it lands in: the plan depends only on
the config, the model and the prompts — never on the machine — and the dataset is the same
however the prompts are chunked, sampled rollouts included (a one-call plan is exactly the
former single call: the sampler derives the same per-prompt keys from one key).

Everything here is plain data manipulation; the sampler and trainer are passed in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp

from sfjax.agents.prompts import PromptConfig, parse_output, with_action
from sfjax.agents.trajectory import Reflection, Trajectory
from sfjax.sampling.prefix import MAX_EXTRA_SLOTS
from sfjax.sampling.sampler import cache_rows, cache_slots


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
    improved_examples: bool = False
    """Add, in every KTO iteration, a desirable copy of each suboptimal step's completion with
    its action set to the Reflector's improved action. A departure from Algorithm 2, off by
    default; benchmarks/RESULTS.md reports what it measured."""
    max_rows_per_call: int = 0
    """Most sampler rows (prompts x K) per rollout call; 0 = no row limit (bytes only)."""
    max_cache_gib_per_call: float = 32.0
    """KV-cache GiB one rollout call may allocate (rows x slots x the model's KV bytes per
    token, at the sampler's buckets): 32 GiB = 64 rows of 2.2k-token SF prompts at Qwen3-4B
    in bf16 (3,200 slots each, counting the prefix cache's worst case).
    0 = no limit. The sampler briefly holds about twice this while it copies the prompts'
    caches K times, next to the weights."""

    def __post_init__(self):
        if self.kto_iterations < 1 or self.num_rollouts < 1:
            raise ValueError("RfRConfig: kto_iterations and num_rollouts must be >= 1")
        if self.max_rows_per_call < 0 or self.max_cache_gib_per_call < 0:
            raise ValueError(
                "RfRConfig: max_rows_per_call and max_cache_gib_per_call must be >= 0 "
                "(0 = no limit)"
            )
        if 0 < self.max_rows_per_call < self.num_rollouts:
            raise ValueError(
                f"RfRConfig.max_rows_per_call={self.max_rows_per_call} < num_rollouts="
                f"{self.num_rollouts}: a call holds all K samples of at least one prompt"
            )
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
    """'base' (Reflector label), 'rollout' (refine-rollout sample) or 'improved' (a base
    completion with the improved action, :func:`improved_examples`)."""
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
    n_improved: int = 0
    """Desirable improved-action copies (``RfRConfig.improved_examples``; 0 when off)."""
    n_targets: int = 0
    """Undesirable steps (candidates for rollouts)."""
    n_rolled_out: int = 0
    """Targets rolled out this iteration (the unsolved ones)."""
    n_solved: int = 0
    """Targets solved so far (match rate > tau in this or an earlier iteration)."""
    mean_match_rate: float = 0.0
    """Mean fraction of samples matching a*_t over the targets rolled out."""
    rollout_parse_failures: int = 0
    rollout_calls: int = 0
    """Sampler calls the rollouts took (memory-bounded chunks, :func:`plan_rollout_calls`)."""

    @property
    def n_desirable(self) -> int:
        return self.n_base_desirable + self.n_rollout_desirable + self.n_improved

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


def improved_examples(
    base: Sequence[KTOExample], targets: Sequence[RolloutTarget], prompt_cfg: PromptConfig
) -> list[KTOExample]:
    """One desirable example per undesirable base example: its completion with the action set
    to the Reflector's improved action (:func:`sfjax.agents.prompts.with_action`), in base
    order. Skipped: steps whose output already takes that action, and outputs with no
    rewritable action field (unparsable ones that :func:`~sfjax.agents.prompts.with_action`
    cannot mend)."""
    improved = {t.target_id: t.improved_action for t in targets}
    out = []
    for e in base:
        action = improved.get(target_id(e.env_index, e.step))
        if e.desirable or action is None or parse_output(e.completion, prompt_cfg).action == action:
            continue
        text = with_action(e.completion, action, prompt_cfg)
        if text is not None:
            out.append(KTOExample(e.prompt, text, True, "improved", e.env_index, e.step))
    return out


SampleFn = Callable[[list[str], int, jax.Array], list[list[str]]]
"""(prompts, K, keys) -> K sampled completions per prompt (one batched sampler call); ``keys``
holds one typed key per prompt (``Actor.sample`` / ``Sampler.generate`` accept it)."""

_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- rollout calls
@dataclass(frozen=True)
class RolloutCost:
    """What a rollout call costs in KV-cache memory: the model's side of the chunk plan."""

    kv_bytes_per_token: int
    """K + V bytes of one cached token over all layers (2 · L · kv heads · head dim · dtype)."""
    max_new_tokens: int
    """Tokens each rollout may generate (cache slots after the prompt)."""
    count_tokens: Callable[[str], int]
    """Prompt string -> its token count (the Actor's tokenizer)."""
    extra_slots: int = 0
    """Slots per row beyond the prompt and new-token buckets: ``PREFIX_CACHE_EXTRA_SLOTS``
    when the sampler reuses a cached prompt prefix (:mod:`sfjax.sampling.prefix`)."""
    min_prompt_bucket: int = 32
    """The sampler's smallest prompt bucket."""

    def slots(self, longest_prompt: int) -> int:
        """Cache slots per row at the sampler's own buckets
        (:func:`sfjax.sampling.sampler.cache_slots`) + ``extra_slots``."""
        return (
            cache_slots(longest_prompt, self.max_new_tokens, self.min_prompt_bucket)
            + self.extra_slots
        )

    def call_bytes(self, num_prompts: int, k: int, longest_prompt: int) -> int:
        """KV bytes of one call: rows (prompts padded to a power of two, times K) x slots."""
        return cache_rows(num_prompts, k) * self.slots(longest_prompt) * self.kv_bytes_per_token


PREFIX_CACHE_EXTRA_SLOTS = MAX_EXTRA_SLOTS
"""Most slots a cached prefix adds to a row (:data:`sfjax.sampling.prefix.MAX_EXTRA_SLOTS`)."""


def rollout_cost_of(sample_fn) -> RolloutCost | None:
    """The :class:`RolloutCost` of ``Actor.sample`` (its sampler's model config and cache dtype,
    its tokenizer and token budget); ``None`` for another callable (no byte limit then)."""
    actor = getattr(sample_fn, "__self__", None)
    sampler = getattr(actor, "sampler", None)
    config = getattr(sampler, "config", None)
    tokenizer = getattr(actor, "tokenizer", None)
    needed = ("num_layers", "num_kv_heads", "head_dim")
    if tokenizer is None or not all(hasattr(config, a) for a in needed):
        return None
    itemsize = getattr(getattr(sampler, "cache_dtype", None), "itemsize", 2)
    kv = 2 * config.num_layers * config.num_kv_heads * config.head_dim * int(itemsize)
    extra = PREFIX_CACHE_EXTRA_SLOTS if getattr(sampler, "prefix_cache", None) else 0

    def count(prompt: str) -> int:
        return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])

    return RolloutCost(int(kv), int(actor.cfg.max_new_tokens), count, extra,
                       int(getattr(sampler, "min_prompt_bucket", 32)))  # fmt: skip


def plan_rollout_calls(
    prompts: Sequence[str], cfg: RfRConfig, cost: RolloutCost | None
) -> list[tuple[int, int]]:
    """Split ``prompts`` (kept in order) into ``[start, stop)`` ranges, one per sampler call,
    each as long as ``cfg.max_rows_per_call`` and ``cfg.max_cache_gib_per_call`` allow.

    A prompt whose K rows alone exceed the byte budget still gets a call of its own (logged).
    Without a ``cost`` only the row limit applies.
    """
    K = cfg.num_rollouts
    lengths = [cost.count_tokens(p) for p in prompts] if cost is not None else None
    budget = cfg.max_cache_gib_per_call * 2**30 if cost is not None else 0
    plan, start = [], 0
    while start < len(prompts):
        stop, longest = start + 1, lengths[start] if lengths else 0
        while stop < len(prompts):
            rows = (stop + 1 - start) * K
            if cfg.max_rows_per_call and rows > cfg.max_rows_per_call:
                break
            nxt = max(longest, lengths[stop]) if lengths else 0
            if budget and cost.call_bytes(stop + 1 - start, K, nxt) > budget:
                break
            stop, longest = stop + 1, nxt
        if budget and stop == start + 1 and cost.call_bytes(1, K, longest) > budget:
            _log.warning(
                "RfR: one prompt of %d tokens x K=%d needs %.1f GiB of KV cache, more than "
                "max_cache_gib_per_call=%.1f; sampling it alone", longest, K,
                cost.call_bytes(1, K, longest) / 2**30, budget / 2**30,
            )  # fmt: skip
        plan.append((start, stop))
        start = stop
    return plan


def sample_in_calls(
    sample_fn: SampleFn,
    prompts: Sequence[str],
    cfg: RfRConfig,
    key: jax.Array,
    cost: RolloutCost | None = None,
) -> tuple[list[list[str]], int]:
    """K samples per prompt through :func:`plan_rollout_calls`'s calls; returns the samples (in
    prompt order) and the number of calls. Prompt ``i`` samples with ``fold_in(key, i)`` in
    whichever call it lands."""
    plan = plan_rollout_calls(prompts, cfg, cost)
    prompt_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(len(prompts)))
    samples: list[list[str]] = []
    for start, stop in plan:
        got = sample_fn(list(prompts[start:stop]), cfg.num_rollouts, prompt_keys[start:stop])
        if len(got) != stop - start:
            raise RuntimeError(f"sample_fn returned {len(got)} groups for {stop - start} prompts")
        samples += [list(g) for g in got]
    return samples, len(plan)


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
    cost: RolloutCost | None = None,
) -> tuple[list[KTOExample], DatasetStats, RfRState]:
    """One KTO iteration's dataset D_i = D_base U D_rollout,i (U D_improved when
    ``cfg.improved_examples``), and the updated solved set.

    ``cost`` sizes the rollout calls; by default it is read off ``sample_fn`` when that is
    ``Actor.sample`` (:func:`rollout_cost_of`), else only ``cfg.max_rows_per_call`` applies.
    """
    stats = DatasetStats(
        n_base_desirable=sum(e.desirable for e in base),
        n_base_undesirable=sum(not e.desirable for e in base),
        n_targets=len(targets),
    )
    dataset = list(base)
    solved = set(state.solved)
    todo = [t for t in targets if t.target_id not in solved] if cfg.rollouts else []
    if todo and sample_fn is not None:
        _log.info("RfR rollouts: %d samples for each of %d unsolved suboptimal steps",
                  cfg.num_rollouts, len(todo))  # fmt: skip
        cost = cost if cost is not None else rollout_cost_of(sample_fn)
        samples, stats.rollout_calls = sample_in_calls(
            sample_fn, [t.prompt for t in todo], cfg, key, cost
        )
        extra, rates, failures = rollout_examples(todo, samples, cfg, prompt_cfg)
        dataset += extra
        stats.n_rollout_desirable = sum(e.desirable for e in extra)
        stats.n_rollout_undesirable = sum(not e.desirable for e in extra)
        stats.n_rolled_out = len(todo)
        stats.mean_match_rate = sum(rates) / len(rates)
        stats.rollout_parse_failures = failures
        solved |= {t.target_id for t, r in zip(todo, rates) if r > cfg.tau}
        _log.info(
            "RfR rollouts: %d desirable, %d undesirable (mean match rate %.2f); %d of %d "
            "targets solved", stats.n_rollout_desirable, stats.n_rollout_undesirable,
            stats.mean_match_rate, len(solved), len(targets),
        )  # fmt: skip
    if cfg.improved_examples:
        copies = improved_examples(base, targets, prompt_cfg)
        dataset += copies
        stats.n_improved = len(copies)
    stats.n_solved = len(solved)
    # keep a stable order (targets' order) so that checkpoints and resumes agree
    order = {t.target_id: i for i, t in enumerate(targets)}
    return dataset, stats, RfRState(sorted(solved, key=lambda s: order.get(s, -1)))


def examples_to_json(examples: Sequence[KTOExample]) -> list[dict]:
    return [asdict(e) for e in examples]


def examples_from_json(items: Sequence[dict]) -> list[KTOExample]:
    return [KTOExample(**d) for d in items]
