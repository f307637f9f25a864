"""Environment adapters between the project's gymnax 1.0 environments and rejax 0.1.3.

The RAN env follows gymnax 1.0 (``step`` returns ``(obs, state, reward, terminated,
truncated, info)``), so gymnax's own wrappers run on it; the Fig. 2 statistics use gymnax's
:class:`~gymnax.wrappers.purerl.LogWrapper` for the utility (the eq. 15 return) and the
trajectory length. What remains here is what no kept library does:

* :class:`RejaxEnv` — rejax 0.1.3 still unpacks the gymnax 0.x five-tuple
  ``(obs, state, reward, done, info)``; the adapter merges ``done = terminated | truncated``
  (the end of a trajectory: auto-reset, episode statistics) and keeps the two flags and the
  final observation of the ended trajectory in ``info`` (``terminated``, ``truncated``,
  ``final_observation``), so that :mod:`sfjax.baselines.time_limits` can bootstrap at the
  RAN env's 300-decision time limit (a truncation, not the end of the task) instead of
  treating it as terminal as rejax and purejaxrl do. Observations are cast to float32.
* :class:`EpisodeMetricsWrapper` — per-trajectory sums of eq. 1-3 (SE, reconfigurations,
  violations) from the ``info`` feedback. gymnax's ``LogWrapper`` sums the reward and counts
  steps only (its ``LogEnvState`` has no other fields), so these three sums are kept here,
  next to it: ``EpisodeMetricsWrapper(LogWrapper(env))`` (see :func:`episode_stats_env`).

Info keys read (missing keys count as zero, which keeps classic gymnax envs usable for
tests): ``se`` (SE_t of the controlled slice, bit/s/Hz), ``reconfiguration`` (c_t),
``violation`` (v_t).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.wrappers.purerl import LogWrapper

INFO_SE = "se"
INFO_RECONFIGURATION = "reconfiguration"
INFO_VIOLATION = "violation"
INFO_TERMINATED = "terminated"
INFO_TRUNCATED = "truncated"
INFO_FINAL_OBS = "final_observation"


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
        while "_env" in vars(env):  # ours and gymnax's wrappers keep the inner env in _env
            env = vars(env)["_env"]
        return env


class RejaxEnv(EnvWrapper):
    """gymnax 1.0 -> rejax 0.1.3 step convention: five-tuple, ``done = terminated | truncated``.

    ``info`` also holds ``terminated``, ``truncated`` and ``final_observation`` (float32): the
    observation the step reached, before gymnax's auto-reset replaced it by the next
    trajectory's first one (equal to ``obs`` unless the trajectory ended).
    """

    def reset(self, key: jax.Array, params: Any = None):
        obs, state = self._env.reset(key, params)
        return jnp.asarray(obs, jnp.float32), state

    def step(self, key: jax.Array, state: Any, action: jax.Array, params: Any = None):
        out = self._env.step(key, state, action, params)
        if len(out) != 6:
            raise ValueError(
                f"{type(self._env).__name__}.step returned {len(out)} values; expected gymnax "
                "1.0's (obs, state, reward, terminated, truncated, info)."
            )
        obs, state, reward, terminated, truncated, info = out
        if INFO_FINAL_OBS not in info:
            raise ValueError(
                f"{type(self._env).__name__}.step put no '{INFO_FINAL_OBS}' in info; the RL "
                "baselines bootstrap from it at a time-limit truncation (gymnax 1.0's "
                "Environment.step provides it: do not override step, override step_env)."
            )
        done = jnp.logical_or(terminated, truncated)
        info = {
            **info,
            INFO_TERMINATED: jnp.asarray(terminated, bool),
            INFO_TRUNCATED: jnp.asarray(truncated, bool),
            INFO_FINAL_OBS: jnp.asarray(info[INFO_FINAL_OBS], jnp.float32),
        }
        return jnp.asarray(obs, jnp.float32), state, jnp.asarray(reward, jnp.float32), done, info


class EpisodeMetrics(struct.PyTreeNode):
    """Per-trajectory sums of eq. 1-3 (one entry per env copy when vmapped)."""

    se_sum: jax.Array
    """Σ_t SE_t; divide by the trajectory length for its average SE (eq. 1)."""
    reconfigurations: jax.Array
    """Σ_t c_t (eq. 3)."""
    violations: jax.Array
    """Σ_t v_t (eq. 2)."""

    @classmethod
    def zeros(cls) -> EpisodeMetrics:
        z = jnp.zeros((), jnp.float32)
        return cls(z, z, z)


class EpisodeMetricsState(struct.PyTreeNode):
    env_state: Any
    """The wrapped env's state (a gymnax ``LogEnvState`` in :func:`episode_stats_env`)."""
    running: EpisodeMetrics
    last: EpisodeMetrics
    """Sums of the last finished trajectory (zeros until one has finished)."""
    episodes: jax.Array
    """Number of finished trajectories so far."""


def _info_scalar(info: dict, name: str) -> jax.Array:
    value = info.get(name)
    if value is None:
        return jnp.zeros((), jnp.float32)
    return jnp.asarray(value, jnp.float32).reshape(())


class EpisodeMetricsWrapper(EnvWrapper):
    """Keeps running and last-finished eq. 1-3 sums in the env state (gymnax 1.0 API).

    The auto-reset of the wrapped env is kept; at the end of a trajectory (terminated or
    truncated) the running sums, the final step included, move to ``last``.
    """

    def reset(self, key: jax.Array, params: Any = None):
        obs, env_state = self._env.reset(key, params)
        zeros = EpisodeMetrics.zeros()
        return obs, EpisodeMetricsState(env_state, zeros, zeros, jnp.zeros((), jnp.int32))

    def step(self, key: jax.Array, state: EpisodeMetricsState, action: jax.Array, params=None):
        obs, env_state, reward, terminated, truncated, info = self._env.step(
            key, state.env_state, action, params
        )
        done = jnp.logical_or(terminated, truncated)
        r = state.running
        running = EpisodeMetrics(
            se_sum=r.se_sum + _info_scalar(info, INFO_SE),
            reconfigurations=r.reconfigurations + _info_scalar(info, INFO_RECONFIGURATION),
            violations=r.violations + _info_scalar(info, INFO_VIOLATION),
        )
        zeros = EpisodeMetrics.zeros()
        new_state = EpisodeMetricsState(
            env_state=env_state,
            running=jax.tree.map(lambda z, x: jnp.where(done, z, x), zeros, running),
            last=jax.tree.map(lambda x, y: jnp.where(done, x, y), running, state.last),
            episodes=state.episodes + done.astype(jnp.int32),
        )
        return obs, new_state, reward, terminated, truncated, info


class CopyableLogWrapper(LogWrapper):
    """gymnax's ``LogWrapper``, unchanged but deep-copyable.

    rejax's ``Algorithm.create`` deep-copies the env; gymnax's ``GymnaxWrapper.__getattr__``
    forwards every name, private ones included, to ``self._env``, so on the half-built copy
    (no ``_env`` yet) ``copy.deepcopy`` recurses until RecursionError (measured with gymnax
    1.0.1 / rejax 0.1.3). Private names are not forwarded here, as in :class:`EnvWrapper`.
    """

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._env, name)


def episode_stats_env(env) -> EpisodeMetricsWrapper:
    """``env`` with the Fig. 2 trajectory statistics in its state: gymnax's ``LogWrapper``
    (utility = return, length) inside :class:`EpisodeMetricsWrapper` (eq. 1-3 sums)."""
    return EpisodeMetricsWrapper(CopyableLogWrapper(env))


def last_episode_stats(state: EpisodeMetricsState) -> dict[str, jax.Array]:
    """The finished trajectory's utility, mean SE, reconfigurations and violations from the
    state of :func:`episode_stats_env` (zeros until one trajectory has finished)."""
    log = state.env_state
    length = log.returned_episode_lengths
    return {
        "utility": log.returned_episode_returns,
        "mean_se": state.last.se_sum / jnp.maximum(length, 1),
        "reconfigurations": state.last.reconfigurations,
        "violations": state.last.violations,
        "length": length,
    }
