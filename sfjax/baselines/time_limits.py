"""rejax 0.1.3's DQN, PPO and SAC with the time limit treated as a time limit.

rejax (like purejaxrl) reads one ``done`` flag per step and uses it both as the end of the
trajectory (auto-reset, reward-normaliser reset, GAE cut) and as the end of the *task*: the
TD target of a done step is ``r`` alone and GAE takes the value after it to be 0. The RAN
episode never terminates (:mod:`sfjax.envs.ran`: ``terminated`` is always False); its
300-decision limit is a truncation, and the observation carries no time, so ending the
return there is a bias (Pardo et al. 2018, "Time Limits in Reinforcement Learning"): the
same state is worth ~Q at step 10 and r at step 300. Stable-Baselines3 and RLlib bootstrap
from the final observation at a time-limit truncation; so do the subclasses here, with
``bootstrap_truncation=True`` (their default; False runs rejax's own code unchanged):

* DQN, SAC -- the stored transition of a truncated step has ``next_obs`` = the final
  observation of the ended trajectory (gymnax 1.0's ``info["final_observation"]``; the
  ``next_obs`` that the env returns is already the reset one) and ``done`` = ``terminated``,
  so rejax's own update computes ``r + gamma (1 - terminated) Q(next_obs)``;
* PPO -- SB3's approach: at a truncated (not terminated) step the reward gets
  ``gamma V(final_obs)``; rejax's GAE, which still cuts at every trajectory end, then gives
  that step ``delta = r + gamma V(final_obs) - V(obs)``.

Everything else stays rejax's: ``done`` (terminated or truncated) still drives the auto-reset,
the reward normaliser's running return, the LogWrapper statistics and the rollout's last-value
mask. The final observation is normalised like every other one (with the observation
statistics of the moment: DQN/SAC at sampling time, PPO right after the step); it is not added
to those statistics, which describe the observations the policy acts on.

The envs must be wrapped in :class:`sfjax.baselines.wrappers.RejaxEnv`, which puts
``terminated``, ``truncated`` and ``final_observation`` into ``info``.

One more departure, in discrete SAC only (``safe_log_probs=True``, the default; False runs
rejax's ``log(probs)`` unchanged): rejax takes ``log pi(a|s) = log(softmax(logits))``. Once a
state's logits spread by more than ~88 (104 with denormals), the smallest probability is 0 in
float32, its log is -inf, and ``pi (alpha log pi - Q)`` -- in the actor loss, the critic's soft
target and the temperature loss -- is 0 x inf = NaN: one such state in a minibatch makes every
parameter NaN, and the greedy argmax over NaN logits is action 0 in every state. There the
log-probability is the log-softmax of the logits (finite, about -gap) instead; everywhere else
it is rejax's value, with rejax's gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import rejax
from flax import struct
from rejax.algos.ppo import Trajectory
from rejax.buffers import Minibatch

from sfjax.baselines.wrappers import INFO_FINAL_OBS, INFO_TERMINATED, INFO_TRUNCATED


def _bootstrap_view(info: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(final observation, terminated, truncated-but-not-terminated) of a vmapped step."""
    terminated = jnp.asarray(info[INFO_TERMINATED], bool)
    truncated = jnp.logical_and(jnp.asarray(info[INFO_TRUNCATED], bool), ~terminated)
    return info[INFO_FINAL_OBS], terminated, truncated


def _step_and_store(algo, ts, actions):
    """One env step of every copy, stored with the final observation at a truncation.

    rejax 0.1.3's ``DQN.collect_transitions`` / ``SAC.collect_transitions`` after the action
    choice, with ``Minibatch(next_obs=final obs, done=terminated)``.
    """
    rng, rng_steps = jax.random.split(ts.rng)
    ts = ts.replace(rng=rng)
    rng_steps = jax.random.split(rng_steps, algo.num_envs)
    next_obs, env_state, rewards, dones, info = algo.vmap_step(
        rng_steps, ts.env_state, actions, algo.env_params
    )
    final_obs, terminated, _ = _bootstrap_view(info)
    if algo.normalize_observations:
        ts = ts.replace(obs_rms_state=algo.update_obs_rms(ts.obs_rms_state, next_obs))
    if algo.normalize_rewards:
        ts = ts.replace(rew_rms_state=algo.update_rew_rms(ts.rew_rms_state, rewards, dones))
    # final_obs equals next_obs except where the trajectory ended (there next_obs is the reset
    # observation of the next trajectory).
    minibatch = Minibatch(
        obs=ts.last_obs,
        action=actions,
        reward=rewards,
        next_obs=final_obs.astype(next_obs.dtype),
        done=terminated,
    )
    ts = ts.replace(
        last_obs=next_obs,
        env_state=env_state,
        global_step=ts.global_step + algo.num_envs,
    )
    return ts, minibatch


class DQN(rejax.DQN):
    """rejax's DQN; with ``bootstrap_truncation`` the TD target bootstraps at truncation."""

    bootstrap_truncation: bool = struct.field(pytree_node=False, default=True)
    """True: target ``r + gamma Q(final obs)`` at a truncation; False: rejax's ``r``."""

    def collect_transitions(self, ts, epsilon, uniform=False):
        if not self.bootstrap_truncation:
            return super().collect_transitions(ts, epsilon, uniform)
        rng, rng_action = jax.random.split(ts.rng)
        ts = ts.replace(rng=rng)

        def sample_uniform(rng):
            sample_fn = self.env.action_space(self.env_params).sample
            return jax.vmap(sample_fn)(jax.random.split(rng, self.num_envs))

        def sample_policy(rng):
            last_obs = ts.last_obs
            if self.normalize_observations:
                last_obs = self.normalize_obs(ts.obs_rms_state, last_obs)
            return self.agent.apply(ts.q_ts.params, last_obs, rng, epsilon=epsilon, method="act")

        actions = jax.lax.cond(uniform, sample_uniform, sample_policy, rng_action)
        return _step_and_store(self, ts, actions)


def safe_log_probs(action_dist) -> jax.Array:
    """``log(action_dist.probs)`` where no probability is 0; the log-softmax of the logits where
    one underflowed (there ``log`` gives -inf and a 0 x inf NaN downstream).

    ``jnp.where`` feeds ``log`` a 1 where the probability is 0 (the gradient of ``log`` at 0 is
    inf, and x 0 that is NaN), so ``log`` gives 0 there; the log-softmax is added only there
    (distrax's ``Categorical`` keeps its logits normalised: ``.logits`` is the log-softmax). The
    log-softmax is a constant to the gradient: every SAC loss weights an action's term by
    ``exp(log pi)``, which is 0 (at most a denormal) for an underflowed action, so the gradient
    through it is 0 in float32 anyway. The form matters for XLA, which fuses the jitted program differently for
    formulas that are equal, and then sums in another order: the backward pass keeps rejax's
    ops plus one select, and where no probability is 0 the values and gradients (and whole
    vmapped training runs) are rejax's bit for bit. An outer ``jnp.where(underflow, log-softmax,
    log)``, or a differentiated log-softmax, changed ulps of the trained parameters.
    """
    probs = action_dist.probs
    underflow = probs == 0
    log_probs = jnp.log(jnp.where(underflow, 1.0, probs))
    return log_probs + jnp.where(underflow, jax.lax.stop_gradient(action_dist.logits), 0.0)


class SAC(rejax.SAC):
    """rejax's SAC; with ``bootstrap_truncation`` the critic target bootstraps at truncation; with
    ``safe_log_probs`` (discrete actions) no NaN comes from a probability that underflowed to 0."""

    bootstrap_truncation: bool = struct.field(pytree_node=False, default=True)
    """True: target ``r + gamma V_soft(final obs)`` at a truncation; False: rejax's ``r``."""
    safe_log_probs: bool = struct.field(pytree_node=False, default=True)
    """True: :func:`safe_log_probs` (log-softmax where a probability is 0); False: rejax's
    ``log(probs)`` unchanged."""

    def collect_transitions(self, ts):
        if not self.bootstrap_truncation:
            return super().collect_transitions(ts)
        rng, rng_action = jax.random.split(ts.rng)
        ts = ts.replace(rng=rng)
        last_obs = ts.last_obs
        if self.normalize_observations:
            last_obs = self.normalize_obs(ts.obs_rms_state, last_obs)
        actions = self.actor.apply(ts.actor_ts.params, last_obs, rng_action, method="act")
        return _step_and_store(self, ts, actions)

    def update_actor(self, ts, mb):
        if not (self.discrete and self.safe_log_probs):
            return super().update_actor(ts, mb)
        # rejax 0.1.3's SAC.update_actor (discrete branch) with log(probs) -> safe_log_probs. The
        # returned log-probabilities are what update_alpha gets.
        rng, _ = jax.random.split(ts.rng)
        ts = ts.replace(rng=rng)
        alpha = jnp.exp(ts.alpha_ts.params["log_alpha"])

        def actor_loss_fn(params):
            logprob = safe_log_probs(self.actor.apply(params, mb.obs, method="_action_dist"))
            qs = self.vmap_critic(ts.critic_ts.params, mb.obs)
            loss_pi = alpha * logprob - qs.min(axis=0)
            loss_pi = jnp.sum(jnp.exp(logprob) * loss_pi, axis=1)
            return loss_pi.mean(), logprob

        grads, logprob = jax.grad(actor_loss_fn, has_aux=True)(ts.actor_ts.params)
        ts = ts.replace(actor_ts=ts.actor_ts.apply_gradients(grads=grads))
        return ts, logprob

    def update_critic(self, ts, mb):
        if not (self.discrete and self.safe_log_probs):
            return super().update_critic(ts, mb)
        # rejax 0.1.3's SAC.update_critic (discrete branch) with log(probs) -> safe_log_probs.
        rng, _ = jax.random.split(ts.rng)
        ts = ts.replace(rng=rng)
        alpha = jnp.exp(ts.alpha_ts.params["log_alpha"])

        def critic_loss_fn(params):
            # Calculate target without gradient wrt `params`
            action_dist = self.actor.apply(ts.actor_ts.params, mb.next_obs, method="_action_dist")
            logprob = safe_log_probs(action_dist)
            qs = self.vmap_critic(ts.critic_target_params, mb.next_obs)
            q_target = jnp.min(qs, axis=0) - alpha * logprob
            q_target = jnp.sum(jnp.exp(logprob) * q_target, axis=1)
            qs = jax.vmap(
                lambda *args: self.critic.apply(*args, method="take"),
                in_axes=(0, None, None),
            )(params, mb.obs, mb.action)
            target = mb.reward + self.gamma * (1 - mb.done) * q_target
            losses = jax.vmap(lambda q: optax.l2_loss(q, target))(qs)
            return losses.sum(axis=0).mean()

        grads = jax.grad(critic_loss_fn)(ts.critic_ts.params)
        ts = ts.replace(critic_ts=ts.critic_ts.apply_gradients(grads=grads))
        return ts


class PPO(rejax.PPO):
    """rejax's PPO; with ``bootstrap_truncation`` a truncated step's reward gets
    ``gamma V(final obs)`` (Stable-Baselines3's handling of ``TimeLimit.truncated``)."""

    bootstrap_truncation: bool = struct.field(pytree_node=False, default=True)
    """True: GAE's delta at a truncation is ``r + gamma V(final obs) - V(obs)``; False:
    rejax's ``r - V(obs)``."""

    def collect_trajectories(self, ts):
        if not self.bootstrap_truncation:
            return super().collect_trajectories(ts)

        # rejax 0.1.3's PPO.collect_trajectories (discrete and continuous actions) with the
        # bootstrap added to the (normalised) reward.
        def env_step(ts, unused):
            rng, new_rng = jax.random.split(ts.rng)
            ts = ts.replace(rng=rng)
            rng_steps, rng_action = jax.random.split(new_rng, 2)
            rng_steps = jax.random.split(rng_steps, self.num_envs)

            unclipped_action, log_prob = self.actor.apply(
                ts.actor_ts.params, ts.last_obs, rng_action, method="action_log_prob"
            )
            value = self.critic.apply(ts.critic_ts.params, ts.last_obs)
            if self.discrete:
                action = unclipped_action
            else:
                space = self.env.action_space(self.env_params)
                action = jnp.clip(unclipped_action, space.low, space.high)

            next_obs, env_state, reward, done, info = self.vmap_step(
                rng_steps, ts.env_state, action, self.env_params
            )
            final_obs, _, truncated = _bootstrap_view(info)
            final_obs = final_obs.astype(next_obs.dtype)
            if self.normalize_observations:
                obs_rms_state, next_obs = self.update_and_normalize_obs(ts.obs_rms_state, next_obs)
                final_obs = self.normalize_obs(obs_rms_state, final_obs)
                ts = ts.replace(obs_rms_state=obs_rms_state)
            if self.normalize_rewards:
                rew_rms_state, reward = self.update_and_normalize_rew(
                    ts.rew_rms_state, reward, done
                )
                ts = ts.replace(rew_rms_state=rew_rms_state)
            final_value = self.critic.apply(ts.critic_ts.params, final_obs)
            reward = reward + self.gamma * jnp.where(truncated, final_value, 0.0)

            transition = Trajectory(ts.last_obs, unclipped_action, log_prob, reward, value, done)
            ts = ts.replace(
                env_state=env_state,
                last_obs=next_obs,
                last_done=done,
                global_step=ts.global_step + self.num_envs,
            )
            return ts, transition

        return jax.lax.scan(env_step, ts, None, self.num_steps)
