"""The JAX RAN slicing env (:mod:`sfjax.envs.ran`) as the LLM agents see it: parallel envs,
eq. 14 states and feedback vectors as Python dicts, actions as RBG counts.

The LLM writes ``Action: <RBGs for the controlled slice>``; the env's discrete action index is
``rbgs - min_rbg_per_slice`` (both slices always keep ``min_rbg_per_slice`` RBGs), so the
Actor's action range is ``[min_rbg_per_slice, min_rbg_per_slice + num_actions - 1]``. The
feedback dict holds the paper's feedback vector (SE, violation, reconfiguration, arrival rate,
queue increment, dropped bytes) plus the PRB count, delay statistics and which slice violated
— never the reward: the eq. 15 utility is computed only for reporting, from the same feedback.
With ``observe_other_slice`` (the default) the state also carries slice 1's arrivals, queue
change and drops: under cell-wide violations the agent must see both slices' demand.

All ``num_envs`` envs step in one jitted, vmapped call.

Shape legend: E = parallel envs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sfjax.envs.scenario import RanSlicingConfig

FEEDBACK_INFO_KEYS = (
    "se",
    "violation",
    "reconfiguration",
    "arrival_rate_bps",
    "queue_delta_bytes",
    "dropped_bytes",
    "prbs",
    "late_packets",
    "dropped_packets",
    "max_delay_ms",
    "slice_violation",
    "other_violation",
    "other_arrival_rate_bps",
    "other_queue_delta_bytes",
    "other_dropped_bytes",
)
"""``info`` keys copied into the feedback vector (the reward/utility is deliberately absent)."""


def per_env_keys(key: jax.Array, num_envs: int) -> jax.Array:
    """One key per parallel env from the runner's reset or step key, shape [E]."""
    return jax.random.split(key, num_envs)


class JaxRanRunner:
    """:class:`sfjax.agents.collect.EnvRunner` over ``RanSlicingEnv`` (vmapped over envs)."""

    def __init__(self, cfg: RanSlicingConfig, max_steps: int):
        from sfjax.envs import ran

        env_cfg = dataclasses.replace(cfg, episode_steps=max(max_steps, 1))
        self.env = ran.RanSlicingEnv(env_cfg)
        self.observe_other = env_cfg.observe_other_slice
        self.params = self.env.default_params
        self.min_rbg = env_cfg.min_rbg_per_slice
        self.action_lo = self.min_rbg
        self.action_hi = self.min_rbg + self.env.num_actions - 1
        self.prbs_per_action = tuple(env_cfg.prbs_per_action)
        self.initial_action = env_cfg.initial_action
        self._reset = jax.jit(jax.vmap(self.reset_one))
        self._step = jax.jit(jax.vmap(self.step_one))
        self._state = None
        self._prev = None

    def reset_one(self, key: jax.Array):
        """One env's reset, pure and not jitted (the runner vmaps it): gymnax's (obs, state)."""
        return self.env.reset_env(key, self.params)

    def step_one(self, key: jax.Array, state, action_idx):
        """One env's step without auto-reset, pure and not jitted (the runner vmaps it; the
        label audit scans it): gymnax's (obs, state, reward, terminated, info)."""
        return self.env.step_env(key, state, action_idx, self.params)

    def _states(self, state_E) -> list[dict[str, float]]:
        s = jax.device_get(state_E)
        out = []
        for e in range(len(self._prev)):
            out.append(
                {
                    "prev_action": float(self._prev[e]),
                    "se": float(s.se_S[e, 0]),
                    "arrival_rate_bps": float(s.arrival_rate_bps_S[e, 0]),
                    "queue_delta_bytes": float(s.queue_delta_bytes_S[e, 0]),
                    "dropped_bytes": float(s.dropped_bytes_S[e, 0]),
                    "prbs": float(s.prbs[e]),
                    **(
                        {
                            "other_arrival_rate_bps": float(s.arrival_rate_bps_S[e, 1]),
                            "other_queue_delta_bytes": float(s.queue_delta_bytes_S[e, 1]),
                            "other_dropped_bytes": float(s.dropped_bytes_S[e, 1]),
                        }
                        if self.observe_other
                        else {}
                    ),
                }
            )
        return out

    def reset(self, key: jax.Array, num_envs: int) -> list[dict[str, float]]:
        _, self._state = self._reset(per_env_keys(key, num_envs))
        self._prev = np.full(num_envs, self.initial_action + self.min_rbg, np.int64)
        return self._states(self._state)

    def step(self, actions: Sequence[int], key: jax.Array):
        """Apply RBG counts; returns (next eq. 14 states, feedback dicts)."""
        rbgs = np.asarray(actions, np.int64)
        if rbgs.shape != self._prev.shape:
            raise ValueError(f"{rbgs.shape[0]} actions for {self._prev.shape[0]} envs")
        if (rbgs < self.action_lo).any() or (rbgs > self.action_hi).any():
            raise ValueError(f"actions {rbgs} outside [{self.action_lo}, {self.action_hi}]")
        idx = jnp.asarray(rbgs - self.min_rbg, jnp.int32)
        keys = per_env_keys(key, len(rbgs))
        _, self._state, _, _, info = self._step(keys, self._state, idx)
        info = jax.device_get(info)
        feedback = [
            {k: float(np.asarray(info[k])[e]) for k in FEEDBACK_INFO_KEYS if k in info}
            for e in range(len(rbgs))
        ]
        self._prev = rbgs
        return self._states(self._state), feedback
