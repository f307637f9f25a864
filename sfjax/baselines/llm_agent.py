"""An LLM Actor as an :class:`sfjax.baselines.evaluation.Agent` on the JAX RAN env.

It lets the shared evaluation protocol drive the self-finetuning Actor and the Reflexion
Actor exactly like the RL policies (same env seeds, same per-step keys): every decision, the
env's ``info`` feedback of the previous step becomes the eq. 14 state of the prompt
(``prev_action`` in the Actor's units, ``se``, ``arrival_rate_bps``, ``queue_delta_bytes``,
``dropped_bytes``) and is appended to the last-k history window; the Actor decides for all
seeds in one batched sampler call; the steps are recorded as
:class:`sfjax.agents.trajectory.Trajectory` objects so a Reflector can label them.

Action units: the Actor speaks in RBGs for the controlled slice (``PromptConfig.action_lo
.. action_hi``); the env's action ``i`` gives ``i + min_rbg_per_slice`` RBGs
(:mod:`sfjax.envs.ran`). :func:`prompt_config_for_env` makes the two agree.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import numpy as np

from sfjax.agents.prompts import FEEDBACK_KEYS, OTHER_STATE_KEYS, HistoryEntry, PromptConfig
from sfjax.agents.trajectory import Step, Trajectory
from sfjax.configcheck import ConfigError, option

_log = logging.getLogger(__name__)
PROGRESS_EVERY = 50
"""Decisions between two progress lines of an evaluation (one LLM call per decision)."""


def action_offset(env) -> int:
    """RBGs of env action 0 (``min_rbg_per_slice`` of a RanSlicingEnv, else 0)."""
    config = getattr(env, "config", None)
    return int(getattr(config, "min_rbg_per_slice", 0))


def prompt_config_for_env(env, base: PromptConfig | None = None) -> PromptConfig:
    """``base`` with the action range, PRBs per RBG, slice description and scoring objective
    of ``env`` (so the prompt states the goal the env scores)."""
    base = base or PromptConfig()
    lo = action_offset(env)
    hi = lo + int(env.num_actions) - 1
    config = getattr(env, "config", None)
    rbg = getattr(getattr(config, "cell", None), "rbg_prbs", None)
    prbs_per_unit = int(max(rbg)) if rbg else base.prbs_per_unit
    extra = {}
    if config is not None and hasattr(config, "objective"):
        from sfjax.agents.objective_text import describe_slices

        extra = {"objective": config.objective, "slice_description": describe_slices(config)}
    return dataclasses.replace(
        base, action_lo=lo, action_hi=hi, prbs_per_unit=prbs_per_unit, **extra
    )


def check_given_action_range(given: PromptConfig, env, path: str = "actor.prompt") -> None:
    """Refuse a user-given action range other than ``env``'s.

    :func:`prompt_config_for_env` sets ``action_lo`` / ``action_hi`` from the env, so a value
    given on the command line (``--<path>.action-lo`` / ``-hi``) would be silently replaced:
    :class:`ConfigError` unless it is the PromptConfig default (meaning "from the env") or the
    env's own value.
    """
    default, env_cfg = PromptConfig(), prompt_config_for_env(env)
    n_prb = getattr(getattr(getattr(env, "config", None), "cell", None), "n_prb", "?")
    bad = [
        f"{option(f'{path}.{name}')} {getattr(given, name)}: must be left unset; the action "
        f"range comes from the env: [{env_cfg.action_lo}, {env_cfg.action_hi}] with "
        f"--env.cell.n-prb {n_prb}"
        for name in ("action_lo", "action_hi")
        if getattr(given, name) not in (getattr(default, name), getattr(env_cfg, name))
    ]
    if bad:
        raise ConfigError("\n".join(bad))


def check_prompt_matches_env(prompt_cfg: PromptConfig, env) -> None:
    """Fail early when the Actor's action range is not the env's."""
    want = prompt_config_for_env(env, prompt_cfg)
    if (prompt_cfg.action_lo, prompt_cfg.action_hi) != (want.action_lo, want.action_hi):
        raise ValueError(
            f"the Actor's action range [{prompt_cfg.action_lo}, {prompt_cfg.action_hi}] is not "
            f"the env's [{want.action_lo}, {want.action_hi}] RBGs; build its PromptConfig with "
            "sfjax.baselines.llm_agent.prompt_config_for_env(env)."
        )


def initial_state(env, obs: np.ndarray, prompt_cfg: PromptConfig) -> dict[str, float]:
    """Eq. 14 state at reset, from the scaled RanSlicingEnv observation."""
    config = getattr(env, "config", None)
    if config is None or not hasattr(env, "action_for_prbs"):
        return {"prev_action": float(prompt_cfg.action_lo), "se": 0.0, "arrival_rate_bps": 0.0,
                "queue_delta_bytes": 0.0, "dropped_bytes": 0.0}  # fmt: skip
    raw = env.observation_to_dict(obs)  # the env's own inverse of its observation scaling
    action = int(env.action_for_prbs(round(raw["prbs"]))) + action_offset(env)
    state = {
        "prev_action": float(action),
        "se": raw["se"],
        "arrival_rate_bps": raw["arrival_rate_mbps"] * 1e6,
        "queue_delta_bytes": 0.0,
        "dropped_bytes": 0.0,
    }
    if "other_arrival_rate_mbps" in raw:  # observe_other_slice
        state.update({
            "other_arrival_rate_bps": raw["other_arrival_rate_mbps"] * 1e6,
            "other_queue_delta_bytes": 0.0,
            "other_dropped_bytes": 0.0,
        })  # fmt: skip
    return state


class LLMEnvAgent:
    """Batched Actor-driven agent for :func:`sfjax.baselines.evaluation.evaluate_agent`."""

    def __init__(self, actor, env, env_params, key: jax.Array):
        self.actor = actor
        self.env = env
        self.env_params = env_params
        self.key = key
        self.prompt_cfg: PromptConfig = actor.cfg.prompt
        check_prompt_matches_env(self.prompt_cfg, env)
        self.offset = action_offset(env)
        self.trajectories: list[Trajectory] = []
        self._histories: list[list[HistoryEntry]] = []
        self._pending: list = []
        self._states: list[dict[str, float]] = []
        self._t = 0

    def reset(self, seeds: Sequence[int]) -> None:
        self.trajectories = [Trajectory(i, int(s), []) for i, s in enumerate(seeds)]
        self._histories = [[] for _ in seeds]
        self._pending = []
        self._t = 0

    def _close_step(self, infos: list[dict[str, float]]) -> None:
        """Attach the feedback of the last decision to its record and to the history."""
        for e, (state, d) in enumerate(self._pending):
            f = {k: float(infos[e].get(k, 0.0)) for k in FEEDBACK_KEYS}
            self.trajectories[e].steps.append(
                Step(self._t - 1, state, d.prompt, d.output, d.reflection, int(d.action),
                     d.analysis, bool(d.parsed_ok), f, d.parse_error)
            )  # fmt: skip
            self._histories[e].append(
                HistoryEntry(state, d.reflection, int(d.action), d.analysis, f)
            )
        self._pending = []

    def act(self, obs_S: np.ndarray, infos: list[dict[str, float]] | None) -> list[int]:
        if infos is None:
            states = [initial_state(self.env, o, self.prompt_cfg) for o in obs_S]
        else:
            prev = [d.action for _, d in self._pending]
            self._close_step(infos)
            states = [
                {"prev_action": float(a), "se": f.get("se", 0.0),
                 "arrival_rate_bps": f.get("arrival_rate_bps", 0.0),
                 "queue_delta_bytes": f.get("queue_delta_bytes", 0.0),
                 "dropped_bytes": f.get("dropped_bytes", 0.0),
                 **{k: f[k] for k in OTHER_STATE_KEYS if k in f}}
                for a, f in zip(prev, infos)
            ]  # fmt: skip
        k = self.prompt_cfg.history_window
        windows = [h[-k:] if k else [] for h in self._histories]
        self.key, sub = jax.random.split(self.key)
        decisions = self.actor.act(states, windows, self._t, sub)
        self._pending = list(zip(states, decisions))
        self._t += 1
        if self._t % PROGRESS_EVERY == 0:
            _log.info("LLM evaluation: %d decisions x %d env seeds done", self._t, len(states))
        n = int(self.env.num_actions)
        return [int(np.clip(int(d.action) - self.offset, 0, n - 1)) for d in decisions]

    def finish(self, infos: list[dict[str, float]]) -> None:
        """Called by ``evaluate_agent`` after the last step with its feedback."""
        self._close_step(infos)


def resolve_checkpoint(path_or_hub_id: str) -> str:
    """A local directory for a checkpoint path or hub id (hub ids must be in the HF cache
    when offline)."""
    import os
    from pathlib import Path

    p = Path(os.path.expanduser(path_or_hub_id))
    if p.is_dir():
        return str(p)
    from huggingface_hub import snapshot_download

    return snapshot_download(path_or_hub_id)


def load_actor(
    checkpoint: str,
    actor_cfg,
    *,
    dtype: str = "bfloat16",
    adapter_dir: str | None = None,
    actor_cls=None,
    **actor_kwargs,
):
    """Qwen3 checkpoint (+ optional PEFT LoRA adapter) -> Sampler -> Actor (or ``actor_cls``)."""
    import jax.numpy as jnp

    from sfjax.agents.actor import Actor
    from sfjax.models import lora, qwen3
    from sfjax.sampling import Sampler
    from sfjax.tokenizer import load_tokenizer

    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    local = resolve_checkpoint(checkpoint)
    model = qwen3.from_pretrained(local, dtype=getattr(jnp, dtype))
    if adapter_dir:
        lora.load_adapter(model, adapter_dir)
    tokenizer = load_tokenizer(local)
    sampler = Sampler(model, tokenizer)
    return (actor_cls or Actor)(sampler, tokenizer, actor_cfg, **actor_kwargs)
