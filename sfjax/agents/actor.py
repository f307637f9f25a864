"""The LLM Actor of the R-MDP (paper IV-A, IV-B1): prompt from state + last-k history, one
sampled output per environment, parsed into (reflection rho_t, action a_t, analysis eta_t).

The Actor acts for a batch of parallel environments in one sampler call. With constrained
decoding on (the default) the sampler guarantees an ``Action: <int>`` line in range, so every
output parses; with it off, an unusable output keeps the environment's previous allocation and
is counted as a parse failure (``ActorDecision.parsed_ok`` False).

For Refine-from-Reflection the Actor also draws ``K`` samples per prompt for many prompts in
one batched call (:meth:`Actor.sample`), which shares each prompt's prefill across its samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import jax

from sfjax.agents.prompts import ACTION_FIELD, HistoryEntry, PromptConfig, build_messages
from sfjax.agents.prompts import parse_output as parse_actor_output


@dataclass(frozen=True)
class ActorConfig:
    """How the Actor writes prompts and samples decisions."""

    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Prompt and output format."""
    temperature: float = 0.7
    """Sampling temperature when acting (Qwen3 non-thinking recommendation: 0.7)."""
    top_p: float = 0.8
    """Nucleus mass when acting."""
    top_k: int = 20
    """Top-k when acting (0 = off)."""
    max_new_tokens: int = 128
    """Token budget of one decision (reflection + action + analysis)."""
    constrained_action: bool = True
    """Enforce a valid in-range ``Action: <int>`` line with the sampler's token masks."""
    free_budget: int | None = 64
    """With constraints, most free tokens (the reflection) before ``Action:`` is forced."""
    rollout_temperature: float = 1.0
    """Temperature of RfR rollouts (more diverse than acting)."""
    rollout_top_p: float = 1.0
    """Nucleus mass of RfR rollouts."""
    rollout_top_k: int = 0
    """Top-k of RfR rollouts (0 = off)."""
    prefix_cache: bool = True
    """Reuse the KV cache of the prompt prefix shared across decisions (system prompt) instead
    of prefilling it again every step (:mod:`sfjax.sampling.prefix`; single device only)."""


PAPER_ACTOR = ActorConfig(
    prompt=PromptConfig(history_window=5), max_new_tokens=192, free_budget=96
)
"""The paper presets' Actor (SF and Reflexion decode with this same budget)."""


@dataclass(frozen=True)
class ActorDecision:
    """One environment's decision at one step."""

    prompt: str
    output: str
    reflection: str
    action: int
    """The action applied: the parsed one, or the previous allocation if unparsable."""
    analysis: str
    parsed_ok: bool
    parse_error: str | None


class Actor:
    """R-MDP Actor on a :class:`sfjax.sampling.Sampler`."""

    def __init__(self, sampler, tokenizer, cfg: ActorConfig):
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.cfg = cfg
        if cfg.prefix_cache and hasattr(sampler, "enable_prefix_cache"):
            sampler.enable_prefix_cache()

    # -- prompts ---------------------------------------------------------------------------

    def prompt_text(
        self, state: Mapping[str, float], history: Sequence[HistoryEntry], step: int
    ) -> str:
        """The chat-templated prompt string for one environment at step ``step``."""
        from sfjax.tokenizer import chat_prompt

        messages = build_messages(state, history, self.cfg.prompt, step=step)
        return chat_prompt(
            self.tokenizer, messages, enable_thinking=self.cfg.prompt.enable_thinking
        )

    def _constraint(self):
        if not self.cfg.constrained_action:
            return None
        from sfjax.sampling import ActionConstraint

        p = self.cfg.prompt
        return ActionConstraint(
            lo=p.action_lo,
            hi=p.action_hi,
            field=ACTION_FIELD,
            action_first=p.field_order == "action_first",
            free_budget=self.cfg.free_budget,
        )

    def _params(self, rollout: bool):
        from sfjax.sampling import SamplingParams

        c = self.cfg
        return SamplingParams(
            temperature=c.rollout_temperature if rollout else c.temperature,
            top_p=c.rollout_top_p if rollout else c.top_p,
            top_k=c.rollout_top_k if rollout else c.top_k,
            max_new_tokens=c.max_new_tokens,
        )

    # -- acting ----------------------------------------------------------------------------

    def act(
        self,
        states: Sequence[Mapping[str, float]],
        histories: Sequence[Sequence[HistoryEntry]],
        step: int,
        key: jax.Array,
    ) -> list[ActorDecision]:
        """One decision per environment (batched): a_t ~ pi_theta(. | x_t), eq. 5."""
        prompts = [self.prompt_text(s, h, step) for s, h in zip(states, histories)]
        out = self.sampler.generate(
            prompts, self._params(False), key, n=1, action_constraint=self._constraint()
        )
        decisions = []
        for prompt, text, state in zip(prompts, out.texts, states):
            parsed = parse_actor_output(text, self.cfg.prompt)
            action = parsed.action if parsed.ok else int(state["prev_action"])
            decisions.append(
                ActorDecision(
                    prompt,
                    text,
                    parsed.reflection,
                    action,
                    parsed.analysis,
                    parsed.ok,
                    parsed.error,
                )
            )
        return decisions

    def sample(
        self, prompts: Sequence[str], n: int, key: jax.Array, *, acting: bool = False
    ) -> list[list[str]]:
        """``n`` completions per prompt in one batched call: at the rollout sampling parameters
        (RfR rollouts, Algorithm 2), or with ``acting`` at the acting ones (what :meth:`act`
        samples with; diagnostics such as ``benchmarks/sf_target_match.py``)."""
        if not prompts:
            return []
        out = self.sampler.generate(
            list(prompts), self._params(not acting), key, n=n,
            action_constraint=self._constraint(),
        )  # fmt: skip
        texts = list(out.texts)
        if len(texts) != len(prompts) * n:
            raise RuntimeError(f"sampler returned {len(texts)} texts for {len(prompts)}x{n}")
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]
