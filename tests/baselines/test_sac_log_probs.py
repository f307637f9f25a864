"""Discrete SAC's log-probabilities where a softmax probability underflows to 0
(``safe_log_probs``, :mod:`sfjax.baselines.time_limits`): rejax's ``log(probs)`` is -inf there
and ``pi (alpha log pi - Q)`` is 0 x inf = NaN in the actor loss, the critic's soft target and
the temperature loss; the fix takes the log-softmax there and changes nothing elsewhere."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from field_docs import field_doc  # tests/field_docs.py
from flax.training.train_state import TrainState
from rejax.buffers import Minibatch

from sfjax.baselines import rl, search, time_limits

BUDGET = rl.Budget(rounds=3, trajectories_per_round=2, steps_per_trajectory=20)
PAPERLIKE_BUDGET = rl.Budget(rounds=3, trajectories_per_round=2, steps_per_trajectory=38)
"""228 samples: a fill of 128, then 50 iterations of 2 updates."""
GAP = 250.0
"""Spread of the logits (max - min) of the minibatch's second state: exp(-250) is 0 in float32."""


def _config(safe: bool | None, **kw) -> rl.SACConfig:
    if safe is not None:
        kw["safe_log_probs"] = safe
    return rl.SACConfig(**{"fill_buffer": 20, "batch_size": 16, **kw})


PAPERLIKE = {"learning_rate": 9e-4, "batch_size": 128, "fill_buffer": 128}
"""The collapsed runs' learning rate and the default minibatch. With these, 3 vmapped seeds and
the RAN env's 12 actions (and a fill of one batch: rejax draws a minibatch without replacement
and returns uninitialised entries from a buffer holding fewer), XLA fused a formula equal to
rejax's (an outer ``jnp.where`` with a log-softmax branch) differently, and the trained
parameters differed in ulps; with 6 actions (at batch 16 or 128) the same formula was
bit-identical."""


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def test_safe_log_probs_is_the_documented_default(toy_env):
    doc = " ".join(field_doc(rl.SACConfig, "safe_log_probs").split())
    assert doc.endswith("False runs rejax's log(probs) unchanged.")
    assert rl.SACConfig().safe_log_probs is True
    env, params = toy_env
    assert rl.make_algo("sac", _config(None), env, params, BUDGET).safe_log_probs is True
    assert rl.make_algo("sac", _config(False), env, params, BUDGET).safe_log_probs is False
    assert search.table3_flags("sac", _config(False), _config(None)) == [
        "--rl.sac.no-safe-log-probs"
    ]


def test_no_underflow_trains_exactly_as_rejax(toy_env):
    """A few rounds in which no probability reaches 0 (rejax's own path stays finite): the
    trained networks, optimiser states and curves are bit-identical with and without the fix."""
    env, params = toy_env
    params = params.replace(num_actions=12)  # as the RAN env
    runs = {
        safe: rl.train("sac", _config(safe, **PAPERLIKE), env, params, PAPERLIKE_BUDGET,
                       [0, 1, 2])
        for safe in (True, False)
    }

    def learned(ts):
        return (ts.actor_ts, ts.critic_ts, ts.critic_target_params, ts.alpha_ts)

    fixed, rejax_run = (learned(runs[s].train_state) for s in (True, False))
    assert _finite(rejax_run)  # so no probability underflowed in rejax's run
    # It trained: 228 samples / 2 env copies = 114 iterations, the 50 after the 128 samples of
    # fill_buffer with 2 updates each, which moved the temperature.
    assert int(fixed[3].step[0]) == 100 and np.all(np.asarray(fixed[3].params["log_alpha"]) != 0)
    # (leaf by leaf: the TrainStates' optax transforms are distinct objects of the two runs)
    a, b = (jax.tree_util.tree_leaves_with_path(t) for t in (fixed, rejax_run))
    assert [path for path, _ in a] == [path for path, _ in b] and len(a) > 20
    for (path, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    jax.tree.map(np.testing.assert_array_equal, runs[True].curves, runs[False].curves)


def _logits(algo, actor_params, obs):
    """The actor's output layer (distrax's Categorical keeps them shifted to the log-softmax)."""
    return algo.actor.apply(actor_params, obs, method=lambda m, o: m.action_logits(m.features(o)))


def _underflow_case(env, params, safe: bool):
    """An initialised SAC whose actor's last layer is scaled so that of two states, x and 5 x,
    the second's logits spread by GAP (its smallest probabilities are 0 in float32) and the
    first's by GAP / 5 (none is 0); optimisers replaced by SGD(1) so an update reads back as
    minus the gradient."""
    cfg = _config(safe, normalize_observations=False, normalize_rewards=False)
    algo = rl.make_algo("sac", cfg, env, params, BUDGET)
    ts = algo.init_state(jax.random.key(0))
    x = jnp.array([1.0, 2.0, 0.5, 3.0])
    obs = jnp.stack([x, 5 * x])
    actor = ts.actor_ts.params
    logits = _logits(algo, actor, obs)
    scale = GAP / float(logits[1].max() - logits[1].min())
    last = actor["params"]["action_logits"]
    actor = {
        "params": {**actor["params"], "action_logits": {**last, "kernel": last["kernel"] * scale}}
    }

    def sgd(params):
        return TrainState.create(apply_fn=(), params=params, tx=optax.sgd(1.0))

    ts = ts.replace(
        actor_ts=sgd(actor), critic_ts=sgd(ts.critic_ts.params), alpha_ts=sgd(ts.alpha_ts.params)
    )
    mb = Minibatch(
        obs=obs,
        action=jnp.array([1, 4]),
        reward=jnp.array([1.0, 2.0]),
        next_obs=obs,
        done=jnp.array([False, False]),
    )
    return algo, ts, mb


def _by_hand(algo, ts, mb):
    """The three SAC losses with log pi = jax.nn.log_softmax(logits) (as functions of the
    parameters they update)."""
    alpha = jnp.exp(ts.alpha_ts.params["log_alpha"])

    def log_pi(actor_params, obs):
        return jax.nn.log_softmax(_logits(algo, actor_params, obs))

    def min_q(critic_params, obs):
        return jax.vmap(algo.critic.apply, in_axes=(0, None))(critic_params, obs).min(axis=0)

    def actor_loss(actor_params):
        lp = log_pi(actor_params, mb.obs)
        q = min_q(ts.critic_ts.params, mb.obs)
        return jnp.sum(jnp.exp(lp) * (alpha * lp - q), axis=1).mean()

    lp_next = log_pi(ts.actor_ts.params, mb.next_obs)
    soft_v = jnp.sum(
        jnp.exp(lp_next) * (min_q(ts.critic_target_params, mb.next_obs) - alpha * lp_next), axis=1
    )
    target = mb.reward + algo.gamma * soft_v

    def critic_loss(critic_params):
        take = jax.vmap(lambda p: algo.critic.apply(p, mb.obs, mb.action, method="take"))
        return jax.vmap(lambda q: optax.l2_loss(q, target))(take(critic_params)).sum(0).mean()

    lp = log_pi(ts.actor_ts.params, mb.obs)

    def alpha_loss(alpha_params):
        a = jnp.exp(alpha_params["log_alpha"])
        return jnp.sum(jnp.exp(lp) * (-a * (lp + algo.target_entropy)), axis=1).mean()

    return actor_loss, critic_loss, alpha_loss, lp


def _updates(algo, ts, mb):
    """rejax's update sequence, each step from ``ts``: minus the gradients (SGD(1)) of the
    actor, critics and temperature, and the log-probabilities that update_alpha gets."""

    def run(ts):
        ts_a, logprob = algo.update_actor(ts, mb)
        ts_c = algo.update_critic(ts, mb)
        ts_t = algo.update_alpha(ts, logprob)
        minus = jax.tree.map(lambda a, b: a - b, (ts.actor_ts.params, ts.critic_ts.params,
                             ts.alpha_ts.params), (ts_a.actor_ts.params, ts_c.critic_ts.params,
                             ts_t.alpha_ts.params))  # fmt: skip
        return minus, logprob

    return jax.jit(run)(ts)


@pytest.mark.parametrize("safe", [False, True])
def test_underflowed_probability(toy_env, safe):
    env, params = toy_env
    algo, ts, mb = _underflow_case(env, params, safe)
    dist = algo.actor.apply(ts.actor_ts.params, mb.obs, method="_action_dist")
    probs = np.asarray(dist.probs)
    assert probs[0].min() > 0 and (probs[1] == 0).sum() >= 2  # state 0 fine, state 1 underflows
    (g_actor, g_critic, g_alpha), logprob = _updates(algo, ts, mb)
    actor_loss, critic_loss, alpha_loss, lp_hand = _by_hand(algo, ts, mb)
    alpha = jnp.exp(ts.alpha_ts.params["log_alpha"])
    q = jax.vmap(algo.critic.apply, in_axes=(0, None))(ts.critic_ts.params, mb.obs).min(axis=0)

    def loss_per_state(lp):  # rejax's discrete actor loss before the mean over states
        return jnp.sum(jnp.exp(lp) * (alpha * lp - q), axis=1)

    rejax_log = jnp.log(dist.probs)
    if not safe:
        # rejax: log 0 = -inf; 0 x inf = NaN in the underflowed state's loss and in all three
        # gradients (and so in every parameter after Adam).
        assert np.isneginf(np.asarray(logprob)[1]).sum() >= 2
        for g in (g_actor, g_critic, g_alpha):
            assert np.isnan(np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])).any()
        loss = loss_per_state(rejax_log)
        assert np.isfinite(loss[0]) and np.isnan(loss[1])
        return
    # Fixed: state 0's log-probabilities are rejax's to the bit, state 1's are the log-softmax
    # (finite, down to about -GAP where the probability is 0).
    np.testing.assert_array_equal(logprob[0], rejax_log[0])
    assert np.all(np.isfinite(logprob)) and float(logprob[1].min()) < -0.9 * GAP
    np.testing.assert_allclose(logprob[1][probs[1] == 0], lp_hand[1][probs[1] == 0], rtol=1e-6)
    np.testing.assert_allclose(logprob, lp_hand, rtol=1e-5, atol=1e-5)
    # A finite actor loss, equal to the one computed with jax.nn.log_softmax.
    loss = loss_per_state(time_limits.safe_log_probs(dist)).mean()
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(loss, actor_loss(ts.actor_ts.params), rtol=1e-5)
    # Finite gradients of all three updates, those of the losses computed by hand.
    for got, loss_fn, p in ((g_actor, actor_loss, ts.actor_ts.params),
                            (g_critic, critic_loss, ts.critic_ts.params),
                            (g_alpha, alpha_loss, ts.alpha_ts.params)):  # fmt: skip
        assert _finite(got)
        want = jax.grad(loss_fn)(p)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, want)
