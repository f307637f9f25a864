"""A tiny gymnax env with the RAN env's interface (info keys se / violation / reconfiguration,
eq. 15 reward), so the baseline plumbing is tested independently of the simulator."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import struct
from gymnax.environments import environment, spaces


@struct.dataclass
class ToyState(environment.EnvState):
    demand: jax.Array
    queue: jax.Array
    prev_action: jax.Array


@struct.dataclass
class ToyParams(environment.EnvParams):
    max_steps_in_episode: int = 300
    num_actions: int = struct.field(pytree_node=False, default=6)
    capacity_per_unit: float = 1.0


class ToySlicingEnv(environment.Environment):
    """Demand follows a bounded random walk; action a serves (a + 1) units per step.

    SE = served / (a + 1); a violation when the backlog exceeds one step of demand; a
    reconfiguration when the action changes; reward = 15 (SE + 1) - 15 c - 300 v (eq. 15).
    """

    @property
    def default_params(self) -> ToyParams:
        return ToyParams()

    def action_space(self, params=None):
        return spaces.Discrete((params or self.default_params).num_actions)

    def observation_space(self, params=None):
        return spaces.Box(-1e3, 1e3, (4,), jnp.float32)

    def _obs(self, state):
        return jnp.stack([state.prev_action, state.demand, state.queue, state.time]).astype(
            jnp.float32
        )

    def reset_env(self, key, params):
        demand = jax.random.uniform(key, (), minval=1.0, maxval=float(params.num_actions))
        state = ToyState(time=0, demand=demand, queue=jnp.zeros(()), prev_action=jnp.zeros(()))
        return self._obs(state), state

    def step_env(self, key, state, action, params):
        units = action.astype(jnp.float32) + 1.0
        offered = state.queue + state.demand
        served = jnp.minimum(offered, units * params.capacity_per_unit)
        queue = offered - served
        se = served / units
        violation = (queue > 0.5 * state.demand).astype(jnp.float32)
        reconf = (action.astype(jnp.float32) != state.prev_action).astype(jnp.float32)
        reward = 15.0 * (se + 1.0) - 15.0 * reconf - 300.0 * violation
        demand = jnp.clip(
            state.demand + jax.random.normal(key) * 0.3, 0.5, float(params.num_actions)
        )
        new = ToyState(
            time=state.time + 1, demand=demand, queue=queue, prev_action=action.astype(jnp.float32)
        )
        info = {"se": se, "violation": violation, "reconfiguration": reconf}
        return self._obs(new), new, reward, jnp.array(False), info

    def is_terminated(self, state, params):
        return jnp.array(False)


@pytest.fixture(scope="session")
def toy_env():
    env = ToySlicingEnv()
    return env, env.default_params
