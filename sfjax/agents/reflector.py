"""Reflector configuration and construction: one interface, three backends (paper IV-B2).

* ``api``   — any OpenAI-compatible chat endpoint (DeepSeek-R1 by default), see
  :mod:`sfjax.agents.reflectors.api`;
* ``local`` — a Flax Qwen3 checkpoint run by sfjax's sampler, see
  :mod:`sfjax.agents.reflectors.local`;
* ``rule``  — the offline rule-based hindsight labeller (no LLM; tests, CI, smoke runs), see
  :mod:`sfjax.agents.reflectors.rule`.

All return :class:`sfjax.agents.trajectory.Reflection` objects whose ``backend`` field names the
backend that produced them. In a multi-host run call them through
:func:`reflect_on_all_processes` (the loop does), so every host gets process 0's reply and an API
is queried once, not once per host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from sfjax.agents.prompts import PromptConfig
from sfjax.agents.reflectors.api import ApiReflector, ApiReflectorConfig
from sfjax.agents.reflectors.base import (
    AGENT_TEXT_CHARS,
    Reflector,
    ReflectorError,
    ReplyError,
    validate_reply,
)
from sfjax.agents.reflectors.broadcast import reflect_on_all_processes
from sfjax.agents.reflectors.local import LocalReflector, LocalReflectorConfig
from sfjax.agents.reflectors.rule import RULE_BACKEND_NAME, RuleReflector, RuleReflectorConfig
from sfjax.configcheck import Bad, at_least

__all__ = [
    "ApiReflector",
    "ApiReflectorConfig",
    "LocalReflector",
    "LocalReflectorConfig",
    "RULE_BACKEND_NAME",
    "Reflector",
    "ReflectorConfig",
    "ReflectorError",
    "ReplyError",
    "RuleReflector",
    "RuleReflectorConfig",
    "make_reflector",
    "reflect_on_all_processes",
    "validate_reply",
]


@dataclass(frozen=True)
class ReflectorConfig:
    """Which Reflector labels the trajectories, and its settings."""

    backend: Literal["api", "local", "rule"] = "rule"
    """api (OpenAI-compatible endpoint), local (Flax checkpoint), or rule (offline hindsight
    labeller, no LLM)."""
    api: ApiReflectorConfig = field(default_factory=ApiReflectorConfig)
    """Settings of the api backend."""
    local: LocalReflectorConfig = field(default_factory=LocalReflectorConfig)
    """Settings of the local backend."""
    rule: RuleReflectorConfig = field(default_factory=RuleReflectorConfig)
    """Settings of the rule backend."""
    agent_text_chars: int = AGENT_TEXT_CHARS
    """Characters of each step's reflection and analysis (the Actor's own text) that an LLM
    Reflector (api, local) reads, whitespace collapsed; longer text is cut, ending in '...'.
    0 leaves the Actor's text out. More shows more of the Actor's reasoning but fills the
    context sooner. Measured on the paper preset's prompt (benchmarks/paper_rehearsal.py, the
    api backend's defaults: 65,536-token context, 16,384 for the reply): a 300-step trajectory
    is ~97k characters without the Actor's text (one request) and ~190k with 160 characters
    of each (two windows of 150 steps); the api backend windows by the context it is given
    (logged), the local one by --reflector.local.window-steps."""

    def invalid(self) -> list[Bad]:
        return at_least(self, 0, "agent_text_chars")


def make_reflector(
    cfg: ReflectorConfig,
    prompt_cfg: PromptConfig,
    cache_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
) -> Reflector:
    """Build the configured backend; fails early (missing key, missing checkpoint).
    ``progress=False`` hides the api backend's progress bar (its log lines stay)."""
    if cfg.backend == "rule":
        return RuleReflector(cfg.rule, prompt_cfg)
    if cfg.backend == "api":
        return ApiReflector(cfg.api, prompt_cfg, cache_dir, progress=progress,
                            agent_text_chars=cfg.agent_text_chars)
    if cfg.backend == "local":
        if not cfg.local.checkpoint:
            raise ValueError("the local Reflector needs --reflector.local.checkpoint PATH")
        from sfjax.agents.reflectors.local_model import sampler_generate_fn

        generate = sampler_generate_fn(cfg.local)
        return LocalReflector(cfg.local, prompt_cfg, generate, cfg.local.checkpoint,
                              agent_text_chars=cfg.agent_text_chars)
    raise ValueError(f"unknown reflector backend {cfg.backend!r}; use api, local or rule")
