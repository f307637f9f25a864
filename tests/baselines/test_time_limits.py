"""Bootstrapping at the time limit (sfjax.baselines.time_limits): DQN / SAC TD targets and PPO
advantages at a truncated step, checked against values computed by hand on a counter env
whose final observation is known."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from field_docs import field_doc  # tests/field_docs.py
from flax import struct
from flax.training.train_state import TrainState
from gymnax.environments import environment, spaces

from sfjax.baselines import rl, time_limits
from sfjax.baselines.wrappers import RejaxEnv

STEPS = 3
"""Time limit of the counter env in these tests."""
BUDGET = rl.Budget(rounds=1, trajectories_per_round=2, steps_per_trajectory=STEPS)


@struct.dataclass
class CounterParams(environment.EnvParams):
    max_steps_in_episode: int = STEPS
    terminal_step: int = 0
    """Terminate (a true end) when the time reaches this step; 0: never."""


class CounterEnv(environment.Environment):
    """obs = [t + 1, 1] at time t, reward t + 1, two actions that change nothing.

    With the time limit ``STEPS`` = 3 the third step is truncated: its final observation is
    [4, 1] and the observation returned (after gymnax's auto-reset) is [1, 1].
    """

    @property
    def default_params(self) -> CounterParams:
        return CounterParams()

    def action_space(self, params=None):
        return spaces.Discrete(2)

    def observation_space(self, params=None):
        return spaces.Box(0.0, 100.0, (2,), jnp.float32)

    def _obs(self, state):
        return jnp.stack([state.time + 1.0, 1.0]).astype(jnp.float32)

    def reset_env(self, key, params):
        state = environment.EnvState(time=jnp.int32(0))
        return self._obs(state), state

    def step_env(self, key, state, action, params):
        reward = (state.time + 1.0).astype(jnp.float32)
        new = environment.EnvState(time=state.time + 1)
        terminated = jnp.logical_and(params.terminal_step > 0, new.time >= params.terminal_step)
        return self._obs(new), new, reward, terminated, {}

    def is_terminated(self, state, params):
        return jnp.logical_and(params.terminal_step > 0, state.time >= params.terminal_step)


FINAL_OBS = np.array([STEPS + 1.0, 1.0], np.float32)
RESET_OBS = np.array([1.0, 1.0], np.float32)
REWARD_AT_LIMIT = float(STEPS)


def _config(name: str, bootstrap: bool | None, normalize: bool = False):
    kw = {"normalize_observations": normalize, "normalize_rewards": normalize}
    if bootstrap is not None:
        kw["bootstrap_truncation"] = bootstrap
    if name == "dqn":
        return rl.DQNConfig(fill_buffer=4, batch_size=2, target_update_freq=4, **kw)
    if name == "sac":
        return rl.SACConfig(fill_buffer=4, batch_size=2, **kw)
    return rl.PPOConfig(rollout_steps=STEPS, num_minibatches=2, num_epochs=1, **kw)


def _collect(algo, ts, steps: int):
    """``steps`` replay-buffer collection steps; the stored transitions stacked on axis 0."""
    batches = []
    for _ in range(steps):
        if isinstance(algo, time_limits.DQN):
            ts, mb = algo.collect_transitions(ts, 1.0, uniform=True)
        else:
            ts, mb = algo.collect_transitions(ts)
        batches.append(mb)
    return ts, jax.tree.map(lambda *x: jnp.stack(x), *batches)


def _sgd(train_state: TrainState) -> TrainState:
    """The same params with plain SGD at step 1, so that an update reads back as -gradient."""
    return TrainState.create(apply_fn=(), params=train_state.params, tx=optax.sgd(1.0))


def _minus_update(before, after):
    return jax.tree.map(lambda a, b: a - b, before, after)


def test_rejax_env_carries_final_observation_and_flags():
    env = CounterEnv()
    wrapped = RejaxEnv(env)
    key = jax.random.key(0)
    _, state = wrapped.reset(key, env.default_params)
    for t in range(STEPS):
        obs, state, reward, done, info = wrapped.step(
            jax.random.fold_in(key, t), state, jnp.int32(0), env.default_params
        )
    assert bool(done) and bool(info["truncated"]) and not bool(info["terminated"])
    np.testing.assert_array_equal(obs, RESET_OBS)
    np.testing.assert_array_equal(info["final_observation"], FINAL_OBS)
    assert info["final_observation"].dtype == jnp.float32


class _NoFinalObsEnv(CounterEnv):
    """An env whose own ``step`` drops gymnax's ``final_observation``."""

    def step(self, key, state, action, params=None):
        obs, state, reward, terminated, truncated, info = super().step(key, state, action, params)
        info = {k: v for k, v in info.items() if k != "final_observation"}
        return obs, state, reward, terminated, truncated, info


def test_rejax_env_refuses_a_step_without_final_observation():
    env = _NoFinalObsEnv()
    wrapped = RejaxEnv(env)
    _, state = wrapped.reset(jax.random.key(0), env.default_params)
    with pytest.raises(ValueError, match="final_observation"):
        wrapped.step(jax.random.key(1), state, jnp.int32(0), env.default_params)


def test_default_bootstraps_as_documented():
    for cfg_type in (rl.DQNConfig, rl.PPOConfig, rl.SACConfig):
        doc = " ".join(field_doc(cfg_type, "bootstrap_truncation").split())
        assert doc.startswith("At the env's time limit (a truncation; the RAN env never "
                              "terminates) bootstrap from the final observation")  # fmt: skip
        assert "False: rejax's own behaviour" in doc
        assert cfg_type().bootstrap_truncation is True  # so True is the documented default
    env = CounterEnv()
    for name in rl.ALGOS:
        algo = rl.make_algo(name, _config(name, None), env, None, BUDGET)
        assert algo.bootstrap_truncation is True
        algo = rl.make_algo(name, _config(name, False), env, None, BUDGET)
        assert algo.bootstrap_truncation is False


@pytest.mark.parametrize("name", ["dqn", "sac"])
@pytest.mark.parametrize("bootstrap", [True, False])
def test_replay_transition_at_the_time_limit(name, bootstrap):
    env = CounterEnv()
    algo = rl.make_algo(name, _config(name, bootstrap), env, None, BUDGET)
    ts = algo.init_state(jax.random.key(0))
    ts, mb = _collect(algo, ts, STEPS + 1)
    # Steps 0, 1 run inside the trajectory; step 2 hits the limit; step 3 starts the next one.
    np.testing.assert_array_equal(mb.next_obs[0], [[2, 1], [2, 1]])
    np.testing.assert_array_equal(mb.obs[STEPS], [RESET_OBS, RESET_OBS])
    np.testing.assert_array_equal(mb.reward[STEPS - 1], [REWARD_AT_LIMIT] * 2)
    last = jax.tree.map(lambda x: x[STEPS - 1], mb)
    if bootstrap:
        np.testing.assert_array_equal(last.next_obs, [FINAL_OBS, FINAL_OBS])
        assert not np.any(last.done)
    else:  # rejax: the reset observation, and the step is terminal
        np.testing.assert_array_equal(last.next_obs, [RESET_OBS, RESET_OBS])
        assert np.all(last.done)
    np.testing.assert_array_equal(ts.last_obs, [[2, 1], [2, 1]])  # acting is unchanged


@pytest.mark.parametrize("name", ["dqn", "sac"])
def test_replay_termination_still_ends_the_return(name):
    env = CounterEnv()
    params = env.default_params.replace(max_steps_in_episode=100, terminal_step=2)
    budget = rl.Budget(rounds=1, trajectories_per_round=2, steps_per_trajectory=100)
    algo = rl.make_algo(name, _config(name, True), env, params, budget)
    ts = algo.init_state(jax.random.key(0))
    _, mb = _collect(algo, ts, 2)
    assert not np.any(mb.done[0]) and np.all(mb.done[1])
    np.testing.assert_array_equal(mb.next_obs[1], [[3, 1], [3, 1]])


def _dqn_target_by_hand(algo, ts, mb) -> np.ndarray:
    """r + gamma (1 - done) Q_target(s', argmax_a Q(s', a)) (double DQN), numpy."""
    q_next = np.asarray(algo.agent.apply(ts.q_ts.params, mb.next_obs))
    q_next_target = np.asarray(algo.agent.apply(ts.q_target_params, mb.next_obs))
    best = q_next.argmax(axis=1)
    bootstrap = q_next_target[np.arange(len(best)), best]
    return np.asarray(mb.reward) + algo.gamma * (1 - np.asarray(mb.done)) * bootstrap


def _sac_target_by_hand(algo, ts, mb) -> np.ndarray:
    """r + gamma (1 - done) sum_a pi(a|s') (min_i Q_i'(s', a) - alpha log pi(a|s')), numpy."""
    probs = np.asarray(
        algo.actor.apply(ts.actor_ts.params, mb.next_obs, method="_action_dist").probs
    )
    q_i = np.asarray(
        jax.vmap(algo.critic.apply, in_axes=(0, None))(ts.critic_target_params, mb.next_obs)
    )
    alpha = float(np.exp(ts.alpha_ts.params["log_alpha"]))
    soft_v = (probs * (q_i.min(axis=0) - alpha * np.log(probs))).sum(axis=1)
    return np.asarray(mb.reward) + algo.gamma * (1 - np.asarray(mb.done)) * soft_v


@pytest.mark.parametrize("name", ["dqn", "sac"])
@pytest.mark.parametrize("bootstrap", [True, False])
def test_td_target_at_the_time_limit(name, bootstrap):
    """rejax's own update, fed the stored truncation transition, regresses Q(s, a) onto
    r + gamma Q(final obs) (bootstrap) or onto r alone (rejax's behaviour)."""
    env = CounterEnv()
    algo = rl.make_algo(name, _config(name, bootstrap), env, None, BUDGET)
    ts = algo.init_state(jax.random.key(1))
    ts, mb = _collect(algo, ts, STEPS)
    mb = jax.tree.map(lambda x: x[STEPS - 1], mb)  # the two transitions at the time limit

    if name == "dqn":
        target = _dqn_target_by_hand(algo, ts, mb)
        q_bootstrap = target - REWARD_AT_LIMIT

        def loss(params):
            q = algo.agent.apply(params, mb.obs, mb.action, method="take")
            return optax.l2_loss(q, jnp.asarray(target)).mean()

        ts = ts.replace(q_ts=_sgd(ts.q_ts))
        got = _minus_update(ts.q_ts.params, algo.update(ts, mb).q_ts.params)
        want = jax.grad(loss)(ts.q_ts.params)
    else:
        target = _sac_target_by_hand(algo, ts, mb)
        q_bootstrap = target - REWARD_AT_LIMIT

        def loss(params):
            take = jax.vmap(lambda p: algo.critic.apply(p, mb.obs, mb.action, method="take"))(
                params
            )
            return jax.vmap(lambda q: optax.l2_loss(q, jnp.asarray(target)))(take).sum(0).mean()

        ts = ts.replace(critic_ts=_sgd(ts.critic_ts))
        got = _minus_update(ts.critic_ts.params, algo.update_critic(ts, mb).critic_ts.params)
        want = jax.grad(loss)(ts.critic_ts.params)

    if bootstrap:
        # The bootstrap is gamma x Q of [4, 1], a non-trivial value at initialisation.
        assert np.all(np.abs(q_bootstrap) > 1e-3)
    else:
        np.testing.assert_allclose(target, REWARD_AT_LIMIT)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), got, want)


def _gae_by_hand(rewards_TE, values_TE, dones_TE, last_value_E, gamma, lam) -> np.ndarray:
    """Generalised advantage estimation as a plain backwards Python loop."""
    T = rewards_TE.shape[0]
    adv = np.zeros_like(rewards_TE)
    next_adv, next_value = np.zeros_like(last_value_E), last_value_E
    for t in reversed(range(T)):
        live = 1.0 - dones_TE[t]
        delta = rewards_TE[t] + gamma * next_value * live - values_TE[t]
        next_adv = delta + gamma * lam * live * next_adv
        adv[t] = next_adv
        next_value = values_TE[t]
    return adv


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("bootstrap", [True, False])
def test_ppo_advantages_at_the_time_limit(bootstrap, normalize):
    """One rollout of exactly one trajectory; the advantages that rejax's train_iteration
    would compute equal GAE by hand with V(final obs) after the truncated step (or 0)."""
    env = CounterEnv()
    algo = rl.make_algo("ppo", _config("ppo", bootstrap, normalize), env, None, BUDGET)
    ts = algo.init_state(jax.random.key(2))
    ts, traj = algo.collect_trajectories(ts)
    last_val = algo.critic.apply(ts.critic_ts.params, ts.last_obs)
    last_val = jnp.where(ts.last_done, 0, last_val)  # as rejax's PPO.train_iteration
    adv, targets = algo.calculate_gae(traj, last_val)

    # Raw rewards 1, 2, 3; normalised (when on) by the return std of the step's statistics.
    if normalize:
        raw = np.array([1.0, 2.0, 3.0])
        # rejax's running std of the discounted return, recomputed here for 2 equal copies.
        mean, var, count, ret = 0.0, 1.0, 1e-4, 0.0
        rewards = []
        for r, done in zip(raw, [0, 0, 1]):
            ret = r + 0.99 * ret * (1 - done)  # rejax restarts the return at a done step
            tot = count + 2
            delta = ret - mean
            m2 = var * count + 0.0 * 2 + delta**2 * count * 2 / tot
            mean, var, count = mean + delta * 2 / tot, m2 / tot, tot
            rewards.append(r / np.sqrt(var + 1e-8))
        rewards_TE = np.repeat(np.array(rewards, np.float32)[:, None], 2, axis=1)
        rms = ts.obs_rms_state
        final = (FINAL_OBS - np.asarray(rms.mean)) / np.sqrt(np.asarray(rms.var) + 1e-8)
    else:
        rewards_TE = np.repeat(np.array([[1.0], [2.0], [3.0]], np.float32), 2, axis=1)
        final = FINAL_OBS
    v_final = float(algo.critic.apply(ts.critic_ts.params, jnp.asarray(final)[None])[0])
    assert abs(v_final) > 1e-3  # a bootstrap that could be confused with 0 would prove nothing
    if bootstrap:
        rewards_TE[-1] += algo.gamma * v_final
    dones_TE = np.array([[0, 0], [0, 0], [1, 1]], np.float32)
    np.testing.assert_array_equal(traj.done, dones_TE)
    want = _gae_by_hand(
        rewards_TE, np.asarray(traj.value), dones_TE, np.asarray(last_val), algo.gamma,
        algo.gae_lambda,
    )  # fmt: skip
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets, want + np.asarray(traj.value), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", rl.ALGOS)
def test_short_training_run_with_rejax_behaviour(name):
    """The option off (rejax's code path) still trains in the seed-vmapped jitted program."""
    env = CounterEnv()
    budget = rl.Budget(rounds=2, trajectories_per_round=2, steps_per_trajectory=STEPS * 4)
    result = rl.train(name, _config(name, False), env, None, budget, seeds=[0, 1])
    assert result.algo.bootstrap_truncation is False
    np.testing.assert_array_equal(result.curves["episodes"], [[2, 4], [2, 4]])
    # The utility is the return of a whole trajectory: 1 + 2 + ... + 12.
    np.testing.assert_allclose(result.curves["utility"], 78.0)
