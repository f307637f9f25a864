"""Allowed values of the config classes that do not check themselves (see
:mod:`sfjax.configcheck`): ranges a bad CLI value would otherwise hit only deep inside a run.
Classes that validate in ``__post_init__`` (KTOConfig, LoRAConfig, RfRConfig, EvalProtocol,
RLRunConfig, RanSlicingConfig, CellConfig, FadingConfig, PromptConfig) are refused by tyro while
parsing; those with an ``invalid`` method check themselves (LoopConfig, ApiReflectorConfig,
PriorConfig, the RL algorithms' configs, ReferenceConfig)."""

from __future__ import annotations

from sfjax.agents.actor import ActorConfig
from sfjax.agents.reflectors.local import LocalReflectorConfig
from sfjax.agents.reflectors.rule import RuleReflectorConfig
from sfjax.agents.reflexion import ReflexionConfig
from sfjax.configcheck import Bad, Rule, at_least, seeds


def _actor(c: ActorConfig) -> list[Bad]:
    bad = at_least(c, 0, "temperature", "top_k", "rollout_temperature", "rollout_top_k")
    bad += at_least(c, 1, "max_new_tokens")
    for name in ("top_p", "rollout_top_p"):
        if not 0 < getattr(c, name) <= 1:
            bad.append(Bad(name, "in (0, 1]"))
    if c.free_budget is not None and not 0 <= c.free_budget <= c.max_new_tokens:
        bad.append(Bad("free_budget", f"None or in [0, --max-new-tokens ({c.max_new_tokens})]"))
    return bad


def _local(c: LocalReflectorConfig) -> list[Bad]:
    bad = at_least(c, 1, "window_steps", "max_new_tokens") + at_least(c, 0, "max_format_retries")
    if c.dtype not in ("bfloat16", "float32"):
        bad.append(Bad("dtype", "bfloat16 or float32"))
    if not 0 < c.top_p <= 1:
        bad.append(Bad("top_p", "in (0, 1]"))
    return bad + at_least(c, 0, "temperature")


def _rule(c: RuleReflectorConfig) -> list[Bad]:
    return at_least(c, 1, "up_step") + at_least(c, 0, "demand_slack", "drop_threshold_bytes")


def _reflexion(c: ReflexionConfig) -> list[Bad]:
    bad = at_least(c, 1, "trials", "trial_steps", "memory_size", "reflection_max_new_tokens")
    return bad + at_least(c, 1, "max_reflection_chars") + seeds(c, "seed", "trial_seeds")


RULES: dict[type, Rule] = {
    ActorConfig: _actor,
    LocalReflectorConfig: _local,
    RuleReflectorConfig: _rule,
    ReflexionConfig: _reflexion,
}
