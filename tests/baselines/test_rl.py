"""RL baselines: rejax adapters, per-round trajectory statistics, short training runs."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfjax.baselines import rl
from sfjax.baselines.evaluation import EvalProtocol
from sfjax.baselines.wrappers import RejaxEnv, episode_stats_env, last_episode_stats

BUDGET = rl.Budget(rounds=2, trajectories_per_round=4, steps_per_trajectory=40)


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
    wrapped = episode_stats_env(env)  # gymnax LogWrapper inside, gymnax 1.0 step API
    assert wrapped.unwrapped is env
    step = jax.jit(wrapped.step)
    key = jax.random.key(3)
    obs, state = wrapped.reset(key, params)
    sums = np.zeros(4)
    finished = []
    rng = np.random.default_rng(0)
    for t in range(17):
        action = jnp.int32(rng.integers(0, params.num_actions))
        obs, state, reward, term, trunc, info = step(
            jax.random.fold_in(key, t), state, action, params
        )
        sums += [
            float(reward),
            float(info["se"]),
            float(info["reconfiguration"]),
            float(info["violation"]),
        ]
        if bool(term) or bool(trunc):
            finished.append(sums.copy())
            sums[:] = 0
    assert int(state.episodes) == 2 == len(finished)
    last = last_episode_stats(state)
    np.testing.assert_allclose(
        [last["utility"], last["mean_se"] * 7, last["reconfigurations"], last["violations"]],
        finished[-1],
        rtol=1e-5,
    )
    assert int(last["length"]) == 7
    assert int(state.env_state.episode_lengths) == 3  # gymnax LogWrapper's running count


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


@pytest.mark.parametrize("config, lines", [
    (rl.PPOConfig(gamma=5.0, num_minibatches=0, clip_eps=0.0),
     ["--ppo.gamma 5.0: must be in [0, 1]", "--ppo.num-minibatches 0: must be >= 1",
      "--ppo.clip-eps 0.0: must be > 0"]),
    (rl.DQNConfig(batch_size=0, learning_rate=-1.0, eps_end=0.5, eps_start=0.1),
     ["--dqn.learning-rate -1.0: must be > 0", "--dqn.batch-size 0: must be >= 1",
      "--dqn.eps-end 0.5: must be <= --eps-start"]),
    (rl.SACConfig(fill_buffer=10, polyak=1.5, network=rl.NetworkConfig(activation="nosuch")),
     ["--sac.fill-buffer 10: must be >= --batch-size (128)", "--sac.polyak 1.5: must be in [0, 1]",
      "--sac.network.activation 'nosuch': must be the name of a flax.linen function"]),
])  # fmt: skip
def test_bad_algorithm_values_are_named_before_anything_runs(config, lines):
    from sfjax.configcheck import problems

    found = problems(config, prefix=type(config).__name__[:-6].lower() + ".")
    assert len(found) == len(lines), found
    for want in lines:
        assert any(f.startswith(want) for f in found), (want, found)
    for default in (rl.DQNConfig(), rl.PPOConfig(), rl.SACConfig()):
        assert problems(default) == []


@pytest.fixture(scope="module")
def ran_env():
    from sfjax.envs.ran import RanSlicingConfig, RanSlicingEnv

    env = RanSlicingEnv(RanSlicingConfig(ttis_per_step=10))
    return env, env.default_params


@pytest.mark.parametrize("name", rl.ALGOS)
def test_baseline_on_the_ran_env(name, ran_env, caplog):
    env, params = ran_env
    budget = rl.Budget(rounds=2, trajectories_per_round=2, steps_per_trajectory=50)
    cfg = {
        "dqn": rl.DQNConfig(fill_buffer=40, batch_size=16, target_update_freq=40),
        "ppo": rl.PPOConfig(rollout_steps=25, num_minibatches=2, num_epochs=1),
        "sac": rl.SACConfig(fill_buffer=40, batch_size=16),
    }[name]
    with caplog.at_level(logging.INFO, logger="sfjax.baselines.round_progress"):
        result = rl.train(name, cfg, env, params, budget, seeds=[0, 1], progress_every_s=0.0)
    assert result.env_samples == 2 * 2 * 50
    c = result.curves
    # One progress line per round, from inside the jitted program, with the seeds' mean of
    # that round's Fig. 2 utility; the returned algorithm carries no progress hook.
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("round_progress")]
    assert [line.split(",")[0] for line in lines] == [f"{name}: round {r}/2" for r in (1, 2)]
    for r, line in enumerate(lines):
        logged = float(line.split("utility of its trajectories ")[1].split(" ")[0])
        assert logged == pytest.approx(c["utility"][:, r].mean(), abs=0.51)
    assert result.algo.eval_callback is rl._round_curves
    for key in rl.CURVE_KEYS:
        assert c[key].shape == (2, budget.rounds) and np.all(np.isfinite(c[key]))
    # Every round ends exactly when each of the 2 env copies finishes one trajectory.
    np.testing.assert_array_equal(c["episodes"], [[2, 4], [2, 4]])
    assert np.all((c["mean_se"] >= 0) & (c["mean_se"] <= 5.5547 + 1e-4))
    assert np.all((c["violations"] >= 0) & (c["violations"] <= 50))
    assert np.all((c["reconfigurations"] >= 0) & (c["reconfigurations"] <= 50))
    # Utility is eq. 15 summed over the trajectory: check it against the other curves
    # (15 (SE + 1) per step - 15 per reconfiguration - 300 per violation), per round mean.
    expected = 15 * 50 * (c["mean_se"] + 1) - 15 * c["reconfigurations"] - 300 * c["violations"]
    np.testing.assert_allclose(c["utility"], expected, rtol=1e-4, atol=1e-2)
    rollouts = rl.evaluate_trained(result, env, EvalProtocol(seeds=(0, 3), num_steps=20))
    assert rollouts.actions.shape == (2, 2, 20)
    assert 0 <= rollouts.actions.min() and rollouts.actions.max() < env.num_actions
    # The greedy policy is the argmax of the trained network and acts in range; so does the
    # algorithm's own behaviour policy.
    obs = jnp.array([0.5, 0.4, 0.3, 0.0, 0.0, 0.4, 0.3, 0.0, 0.0])  # both slices (default)
    for deterministic in (True, False):
        policy = rl.greedy_policy(result.algo, result.seed_state(1), deterministic)
        assert 0 <= int(policy(obs, jax.random.key(0))) < env.num_actions
