"""Environment adapters that let rejax train on the project's gymnax environments.

Two small wrappers, both pure (no Python state is touched inside ``step``):

* :class:`RejaxEnv` — gymnax 1.x ``Environment.step`` returns the six-tuple
  ``(obs, state, reward, terminated, truncated, info)`` while rejax 0.1.3 unpacks the
  five-tuple of gymnax 0.0.x ``(obs, state, reward, done, info)``. The adapter merges
  ``done = terminated | truncated`` (the RAN episode of 300 decisions ends by truncation;
  like purejaxrl we treat it as an episode boundary for bootstrapping and GAE) and casts
  observations to float32 so the networks never see integer features. An environment
  that already returns five values is passed through unchanged.
* :class:`EpisodeStatsWrapper` — accumulates, per environment copy, the paper's trajectory
  metrics (eq. 1-3 and eq. 15) from the ``info`` feedback vector and keeps the totals of
  the last finished episode in the state, so a rejax ``eval_callback`` can read the
  training-trajectory curves of Fig. 2 straight from ``train_state.env_state``.

Info keys read (missing keys count as zero, which keeps classic gymnax envs usable for
tests): ``se`` (SE_t of the controlled slice, bit/s/Hz), ``reconfiguration`` (c_t),
``violation`` (v_t). The utility is the sum of rewards (the env's reward is eq. 15).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

INFO_SE = "se"
INFO_RECONFIGURATION = "reconfiguration"
INFO_VIOLATION = "violation"


class EnvWrapper:
    """Forwards public attributes (spaces, default params, name) to the wrapped env."""

    def __init__(self, env):
        self._env = env

    def __getattr__(self, name: str):
        # Private names are not forwarded: deepcopy/pickle probe them on half-built objects.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._env, name)

    @property
    def unwrapped(self):
        env = self._env
        while isinstance(env, EnvWrapper):
            env = env._env
        return env


class RejaxEnv(EnvWrapper):
    """gymnax 1.x -> rejax step convention: five-tuple, ``done = terminated | truncated``."""

    def reset(self, key: jax.Array, params: Any = None):
        obs, state = self._env.reset(key, params)
        return jnp.asarray(obs, jnp.float32), state

    def step(self, key: jax.Array, state: Any, action: jax.Array, params: Any = None):
        out = self._env.step(key, state, action, params)
        if len(out) == 6:
            obs, state, reward, terminated, truncated, info = out
            done = jnp.logical_or(terminated, truncated)
        elif len(out) == 5:
            obs, state, reward, done, info = out
        else:
            raise ValueError(
                f"{type(self._env).__name__}.step returned {len(out)} values; expected the "
                "gymnax 1.x six-tuple or the gymnax 0.0.x five-tuple."
            )
        return jnp.asarray(obs, jnp.float32), state, jnp.asarray(reward, jnp.float32), done, info


class EpisodeStats(struct.PyTreeNode):
    """Per-trajectory sums of the paper's metrics (one entry per env copy when vmapped)."""

    utility: jax.Array
    """Σ_t U_t: the eq. 15 utility of the trajectory (sum of rewards)."""
    se_sum: jax.Array
    """Σ_t SE_t; divide by ``length`` for the trajectory's average SE (eq. 1)."""
    reconfigurations: jax.Array
    """Σ_t c_t (eq. 3)."""
    violations: jax.Array
    """Σ_t v_t (eq. 2)."""
    length: jax.Array
    """Number of decisions in the trajectory."""

    @classmethod
    def zeros(cls) -> EpisodeStats:
        z = jnp.zeros((), jnp.float32)
        return cls(z, z, z, z, jnp.zeros((), jnp.int32))

    @property
    def mean_se(self) -> jax.Array:
        return self.se_sum / jnp.maximum(self.length, 1)


class EpisodeStatsState(struct.PyTreeNode):
    env_state: Any
    running: EpisodeStats
    last: EpisodeStats
    """Totals of the last finished trajectory (zeros until one has finished)."""
    episodes: jax.Array
    """Number of finished trajectories so far."""


def _info_scalar(info: dict, name: str) -> jax.Array:
    value = info.get(name)
    if value is None:
        return jnp.zeros((), jnp.float32)
    return jnp.asarray(value, jnp.float32).reshape(())


class EpisodeStatsWrapper(EnvWrapper):
    """Keeps running and last-finished trajectory metrics in the env state.

    Wraps a :class:`RejaxEnv` (five-tuple convention). The auto-reset of the wrapped env is
    kept; on ``done`` the running totals (including the final step) move to ``last``.
    """

    def reset(self, key: jax.Array, params: Any = None):
        obs, env_state = self._env.reset(key, params)
        zeros = EpisodeStats.zeros()
        return obs, EpisodeStatsState(env_state, zeros, zeros, jnp.zeros((), jnp.int32))

    def step(self, key: jax.Array, state: EpisodeStatsState, action: jax.Array, params=None):
        obs, env_state, reward, done, info = self._env.step(key, state.env_state, action, params)
        r = state.running
        running = EpisodeStats(
            utility=r.utility + jnp.asarray(reward, jnp.float32).reshape(()),
            se_sum=r.se_sum + _info_scalar(info, INFO_SE),
            reconfigurations=r.reconfigurations + _info_scalar(info, INFO_RECONFIGURATION),
            violations=r.violations + _info_scalar(info, INFO_VIOLATION),
            length=r.length + 1,
        )
        zeros = EpisodeStats.zeros()
        new_state = EpisodeStatsState(
            env_state=env_state,
            running=jax.tree.map(lambda z, x: jnp.where(done, z, x), zeros, running),
            last=jax.tree.map(lambda x, y: jnp.where(done, x, y), running, state.last),
            episodes=state.episodes + done.astype(jnp.int32),
        )
        return obs, new_state, reward, done, info
