"""RL baselines: rejax adapters, per-round trajectory statistics, short training runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfjax.baselines import rl
from sfjax.baselines.evaluation import EvalProtocol
from sfjax.baselines.wrappers import EpisodeStatsWrapper, RejaxEnv

BUDGET = rl.Budget(rounds=2, trajectories_per_round=4, steps_per_trajectory=40)
CONFIGS = {
    "dqn": rl.DQNConfig(fill_buffer=64, batch_size=32, target_update_freq=80, buffer_size=1000),
    "ppo": rl.PPOConfig(rollout_steps=20, num_minibatches=2, num_epochs=2),
    "sac": rl.SACConfig(fill_buffer=64, batch_size=32, buffer_size=1000),
}


def test_rejax_env_merges_terminated_and_truncated(toy_env):
    env, params = toy_env
    params = params.replace(max_steps_in_episode=3)
    wrapped = RejaxEnv(env)
    key = jax.random.key(0)
    obs, state = wrapped.reset(key, params)
    assert obs.dtype == jnp.float32
    dones = []
    for t in range(6):
        out = wrapped.step(jax.random.fold_in(key, t), state, jnp.int32(1), params)
        assert len(out) == 5
        obs, state, reward, done, info = out
        dones.append(bool(done))
    assert dones == [False, False, True, False, False, True]


def test_episode_stats_match_a_python_loop(toy_env):
    env, params = toy_env
    params = params.replace(max_steps_in_episode=7)
    wrapped = EpisodeStatsWrapper(RejaxEnv(env))
    step = jax.jit(wrapped.step)
    key = jax.random.key(3)
    obs, state = wrapped.reset(key, params)
    sums = np.zeros(4)
    finished = []
    rng = np.random.default_rng(0)
    for t in range(17):
        action = jnp.int32(rng.integers(0, params.num_actions))
        obs, state, reward, done, info = step(jax.random.fold_in(key, t), state, action, params)
        sums += [
            float(reward),
            float(info["se"]),
            float(info["reconfiguration"]),
            float(info["violation"]),
        ]
        if bool(done):
            finished.append(sums.copy())
            sums[:] = 0
    assert int(state.episodes) == 2 == len(finished)
    last = state.last
    np.testing.assert_allclose(
        [last.utility, last.se_sum, last.reconfigurations, last.violations],
        finished[-1],
        rtol=1e-5,
    )
    assert int(last.length) == 7
    np.testing.assert_allclose(float(last.mean_se), finished[-1][1] / 7, rtol=1e-5)
    assert int(state.running.length) == 3


@pytest.mark.parametrize("name", rl.ALGOS)
def test_baseline_trains_and_its_policy_acts(name, toy_env):
    env, params = toy_env
    result = rl.train(name, CONFIGS[name], env, params, BUDGET, seeds=[0, 1])
    assert result.env_samples == 2 * 4 * 40
    for key in rl.CURVE_KEYS:
        assert result.curves[key].shape == (2, BUDGET.rounds)
        assert np.all(np.isfinite(result.curves[key]))
    # Every round ends exactly when each of the 4 env copies finishes one trajectory.
    np.testing.assert_array_equal(result.curves["episodes"], [[4, 8], [4, 8]])
    # SE is averaged per decision, so it cannot exceed the toy env's maximum of 1.
    assert np.all(result.curves["mean_se"] <= 1.0 + 1e-6)

    protocol = EvalProtocol(seeds=(5, 6), num_steps=30)
    rollouts = rl.evaluate_trained(result, env, protocol)
    assert rollouts.actions.shape == (2, 2, 30)
    assert rollouts.actions.min() >= 0 and rollouts.actions.max() < params.num_actions
    # The greedy policy is the argmax of the trained network: recompute it for one obs.
    policy = rl.greedy_policy(result.algo, result.seed_state(0))
    obs = jnp.array([2.0, 3.0, 0.5, 4.0])
    a = int(policy(obs, jax.random.key(0)))
    assert 0 <= a < params.num_actions
    sampled = rl.greedy_policy(result.algo, result.seed_state(0), deterministic=False)
    assert 0 <= int(sampled(obs, jax.random.key(1))) < params.num_actions


def test_budget_and_config_errors(toy_env):
    env, params = toy_env
    assert rl.Budget().total_steps == 480_000
    with pytest.raises(ValueError, match="rounds"):
        rl.Budget(rounds=0)
    with pytest.raises(ValueError, match="rollout_steps"):
        rl.make_algo("ppo", rl.PPOConfig(rollout_steps=30), env, params, BUDGET)
    with pytest.raises(ValueError, match="Unknown baseline"):
        rl.make_algo("a2c", rl.PPOConfig(), env, params, BUDGET)
    with pytest.raises(TypeError):
        rl.make_algo("dqn", rl.PPOConfig(), env, params, BUDGET)
    with pytest.raises(ValueError, match="activation"):
        rl.make_algo(
            "sac", rl.SACConfig(network=rl.NetworkConfig(activation="nope")), env, params, BUDGET
        )
