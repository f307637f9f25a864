"""Gymnasium wrapper of :class:`sfjax.envs.ran.RanSlicingEnv` for numpy RL libraries.

One environment, numpy observations, ``Discrete`` actions, the gymnasium 1.x API:
``reset(seed=...) -> (obs, info)``, ``step(a) -> (obs, reward, terminated, truncated, info)``.
Episodes end by truncation after ``episode_steps`` decisions (there is no terminal state); the
wrapper does not auto-reset (gymnasium's vector envs do that). ``info`` holds the simulator's
feedback as Python floats, plus ``prbs`` of the action taken. The JAX step is jitted once.

Requires the optional ``gymnasium`` package (``pip install 'sfjax[ns3]'``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

try:
    import gymnasium
    from gymnasium import spaces
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "sfjax.envs.gymnasium_env needs gymnasium: pip install 'gymnasium>=1.1'"
    ) from e

from sfjax.envs.ran import EnvParams, RanSlicingConfig, RanSlicingEnv, info_dict


# Module-level jits with the env static: wrappers of equal configs share compiled code.
@functools.partial(jax.jit, static_argnums=0)
def _reset(env: RanSlicingEnv, key, params):
    return env.reset_env(key, params)


@functools.partial(jax.jit, static_argnums=0)
def _step(env: RanSlicingEnv, key, state, action, params):
    """gymnax 1.0's step without its auto-reset (gymnasium callers reset themselves)."""
    obs, state, reward, terminated, info = env.step_env(key, state, action, params)
    return obs, state, reward, terminated, env.is_truncated(state, params), info


class RanSlicingGymnasiumEnv(gymnasium.Env):
    """The JAX RAN slicing simulator behind the gymnasium API."""

    metadata = {"render_modes": []}

    def __init__(self, config: RanSlicingConfig | None = None, params: EnvParams | None = None):
        self.env = RanSlicingEnv(config)
        self.params = params if params is not None else self.env.default_params
        self.action_space = spaces.Discrete(self.env.num_actions)
        box = self.env.observation_space(self.params)
        self.observation_space = spaces.Box(
            low=np.asarray(box.low, np.float32), high=np.asarray(box.high, np.float32),
            dtype=np.float32,
        )
        self._reset = functools.partial(_reset, self.env)
        self._step = functools.partial(_step, self.env)
        self._key = jax.random.key(0)
        self._state = None

    @property
    def state(self):
        """The current JAX :class:`sfjax.envs.ran.EnvState` (raw units for prompts)."""
        return self._state

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._key = jax.random.key(seed)
        self._key, sub = jax.random.split(self._key)
        obs, self._state = self._reset(sub, self.params)
        return np.asarray(obs), {}

    def step(self, action):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        if not self.action_space.contains(int(action)):
            raise ValueError(f"action must be an int in [0, {self.env.num_actions}), got {action}")
        self._key, sub = jax.random.split(self._key)
        obs, self._state, reward, terminated, truncated, info = self._step(
            sub, self._state, int(action), self.params
        )
        return np.asarray(obs), float(reward), bool(terminated), bool(truncated), info_dict(info)
