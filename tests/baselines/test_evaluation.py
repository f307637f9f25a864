"""The shared evaluation protocol: identical env seeds and keys for every method."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfjax.baselines.evaluation import EvalProtocol, Rollouts, evaluate_agent, evaluate_policy


class ConstantAgent:
    """Python agent that records what it sees."""

    def __init__(self, action: int):
        self.action = action
        self.seen: dict[int, list[np.ndarray]] = {}
        self._seeds = []

    def reset(self, seeds) -> None:
        self._seeds = list(seeds)
        self.seen = {s: [] for s in seeds}

    def act(self, obs_S, infos):
        assert (infos is None) == (len(self.seen[self._seeds[0]]) == 0)
        if infos is not None:
            assert len(infos) == len(self._seeds) and "se" in infos[0]
        for s, o in zip(self._seeds, obs_S):
            self.seen[s].append(np.asarray(o))
        return [self.action] * len(self._seeds)


PROTOCOL = EvalProtocol(seeds=(3, 11, 12), num_steps=25)


def test_keys_are_deterministic_and_distinct_per_seed():
    r1, s1, _ = PROTOCOL.episode_keys(3)
    r2, s2, _ = PROTOCOL.episode_keys(3)
    r3, _, _ = PROTOCOL.episode_keys(11)
    assert s1.shape == (25,)
    data = jax.random.key_data
    assert np.array_equal(data(r1), data(r2)) and np.array_equal(data(s1), data(s2))
    assert not np.array_equal(data(r1), data(r3))
    with pytest.raises(ValueError):
        EvalProtocol(seeds=())
    with pytest.raises(ValueError):
        EvalProtocol(seeds=(1, 1))


def test_jitted_and_python_evaluation_see_identical_environments(toy_env):
    env, params = toy_env
    jitted = evaluate_policy(lambda obs, key: jnp.int32(2), env, params, PROTOCOL)
    agent = ConstantAgent(2)
    python = evaluate_agent(agent, env, params, PROTOCOL)
    assert jitted.rewards.shape == (3, 25)
    for a, b in zip(jitted.__dict__.values(), python.__dict__.values()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_every_method_gets_the_same_exogenous_traffic(toy_env):
    # The toy demand (obs[1]) depends only on the env keys, never on the actions.
    env, params = toy_env
    low, high = ConstantAgent(0), ConstantAgent(5)
    r_low = evaluate_agent(low, env, params, PROTOCOL)
    r_high = evaluate_agent(high, env, params, PROTOCOL)
    for seed in PROTOCOL.seeds:
        d_low = np.stack(low.seen[seed])[:, 1]
        d_high = np.stack(high.seen[seed])[:, 1]
        np.testing.assert_array_equal(d_low, d_high)
    demand_by_seed = [np.stack(low.seen[s])[:, 1] for s in PROTOCOL.seeds]
    assert not np.array_equal(demand_by_seed[0], demand_by_seed[1])
    # ... while the outcomes differ because the policies differ.
    assert not np.allclose(r_low.violation, r_high.violation)


def test_trajectories_last_num_steps_whatever_the_params_episode_length(toy_env):
    # A protocol trajectory is one episode of num_steps decisions for every method: params
    # with a shorter time limit must not auto-reset the env in the middle of it (the RL rows'
    # evaluate_trained already sets the limit to num_steps; the others must agree with it).
    env, params = toy_env
    short = params.replace(max_steps_in_episode=7)
    for evaluate in (
        lambda p: evaluate_policy(lambda obs, key: jnp.int32(2), env, p, PROTOCOL),
        lambda p: evaluate_agent(ConstantAgent(2), env, p, PROTOCOL),
    ):
        whole, cut = evaluate(params), evaluate(short)
        for a, b in zip(whole.__dict__.values(), cut.__dict__.values()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_summary_matches_numpy(tmp_path):
    rng = np.random.default_rng(0)
    shape = (2, 4, 10)
    r = Rollouts(
        actions=rng.integers(0, 5, shape).astype(np.int32),
        rewards=rng.normal(size=shape).astype(np.float32),
        se=rng.uniform(0, 6, shape).astype(np.float32),
        reconfiguration=rng.integers(0, 2, shape).astype(np.float32),
        violation=rng.integers(0, 2, shape).astype(np.float32),
    )
    s = r.summary()
    assert s["mean_se"][0] == pytest.approx(r.se.mean())
    assert s["utility"][0] == pytest.approx(r.rewards.sum(-1).mean(), rel=1e-5)
    assert s["violations"][1] == pytest.approx(r.violation.sum(-1).std(), rel=1e-5)
    assert r.num_samples == 80
    r.save(tmp_path / "r.npz")
    back = Rollouts.load(tmp_path / "r.npz")
    np.testing.assert_array_equal(back.se, r.se)


def test_repeated_python_evaluations_do_not_recompile(toy_env):
    from sfjax.baselines.evaluation import _as_rejax, _batched_env_fns

    env = type(toy_env[0])()  # a fresh env: its jit cache holds only this test's programs
    params = env.default_params
    protocol = EvalProtocol(seeds=(1, 2), num_steps=5)
    evaluate_agent(ConstantAgent(1), env, params, protocol)
    evaluate_agent(ConstantAgent(4), env, params, protocol)
    reset, step = _batched_env_fns(_as_rejax(env))
    assert reset._cache_size() == 1 and step._cache_size() == 1


def _rollouts(seed: int) -> Rollouts:
    rng = np.random.default_rng(seed)
    shape = (3, 5)
    return Rollouts(rng.integers(0, 5, shape).astype(np.int32),
                    *(rng.normal(size=shape).astype(np.float32) for _ in range(4)))  # fmt: skip


def test_evaluate_once_loads_what_was_measured_with_the_same_state(tmp_path, caplog):
    """evaluate_once: measured and saved once; loaded for the same state (tuples as lists);
    another state or a damaged file is measured again (the warning names the key that
    differs); a measurement cut before its state is written is not trusted."""
    from sfjax.baselines.evaluation import EVAL_ROLLOUTS, EVAL_STATE, evaluate_once

    calls, extra = [], []

    def evaluate():
        calls.append(1)
        return _rollouts(len(calls))

    state = {"adapter": "abc", "seeds": (0, 1, 2), "num_steps": 5}
    first = evaluate_once(tmp_path, state, evaluate, "X", lambda: extra.append(1))
    assert calls == [1] and extra == [1]
    again = evaluate_once(tmp_path, {**state, "seeds": [0, 1, 2]}, evaluate, "X")
    assert calls == [1]
    np.testing.assert_array_equal(again.rewards, first.rewards)

    caplog.clear()
    other = evaluate_once(tmp_path, {**state, "adapter": "def"}, evaluate, "X")
    assert calls == [1, 1] and "made with another adapter" in caplog.text
    assert not np.array_equal(other.rewards, first.rewards)

    data = (tmp_path / EVAL_ROLLOUTS).read_bytes()
    (tmp_path / EVAL_ROLLOUTS).write_bytes(data[: len(data) // 2])
    caplog.clear()
    evaluate_once(tmp_path, {**state, "adapter": "def"}, evaluate, "X")
    assert len(calls) == 3 and "cannot be read" in caplog.text

    def cut():
        raise KeyboardInterrupt  # killed after the rollouts, before the state

    with pytest.raises(KeyboardInterrupt):
        evaluate_once(tmp_path, state, evaluate, "X", cut)
    assert not (tmp_path / EVAL_STATE).exists()
    evaluate_once(tmp_path, state, evaluate, "X")
    assert len(calls) == 5
