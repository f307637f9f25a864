"""RL baselines of Table III (paper section V-B): DQN, PPO and SAC (discrete), trained with
rejax on the JAX RAN slicing env, with the eq. 15 utility as reward.

A whole training run is one jitted function of a key (rejax's ``Algorithm.train``); the
training seeds are vmapped, so N seeds train in one XLA program. The paper's budget is
80 rounds x 20 trajectories x 300 decisions = 480 000 environment samples per seed; here a
round is ``trajectories_per_round`` env copies stepped in lock-step for one full trajectory
each, so at the end of every round each copy has just finished exactly one trajectory and
the per-round curves of Fig. 2 (utility, average SE, reconfigurations, QoS violations) are
the means over those trajectories (read by a rejax ``eval_callback`` from gymnax's
``LogWrapper`` and :class:`~sfjax.baselines.wrappers.EpisodeMetricsWrapper`; no extra
environment samples are spent on them).

The paper used RLlib; rejax's implementations are the JAX equivalents. Hyperparameters are
the frozen configs below (the paper does not state its own; the defaults are the usual ones
for small discrete-action control, with reward and observation normalisation because the
RAN observation mixes PRB counts, bit/s and bytes, and the per-step utility is O(100)).
Two departures from rejax's defaults (:mod:`sfjax.baselines.time_limits`): the 300-decision
time limit is a truncation, not the end of the task, so all three bootstrap from the final
observation there (``bootstrap_truncation``); and SAC's log-probability of an action whose
probability underflowed to 0 is the log-softmax, not rejax's NaN-making log(0)
(``safe_log_probs``).

Shape legend: N = training seeds, R = rounds, S = evaluation seeds, T = decisions.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import rejax
from flax import linen as nn
from rejax.networks import DiscreteQNetwork, EpsilonGreedyPolicy

from sfjax.baselines import time_limits
from sfjax.baselines.evaluation import EvalProtocol, Rollouts, rollout
from sfjax.baselines.round_progress import RoundProgress, with_progress
from sfjax.baselines.wrappers import RejaxEnv, episode_stats_env, last_episode_stats
from sfjax.configcheck import Bad, at_least, greater_than, problems

AlgoName = Literal["dqn", "ppo", "sac"]
ALGOS: tuple[AlgoName, ...] = ("dqn", "ppo", "sac")
CURVE_KEYS = ("utility", "mean_se", "reconfigurations", "violations")
"""Per-round training curves (Fig. 2), each [N, R]."""


@dataclass(frozen=True)
class Budget:
    """Environment interaction budget of one training run (per seed)."""

    rounds: int = 80
    """Training rounds (paper: 80)."""
    trajectories_per_round: int = 20
    """Trajectories collected per round = parallel env copies (paper: 20)."""
    steps_per_trajectory: int = 300
    """Decisions per trajectory (paper: 300, i.e. 30 s of 100 ms decisions)."""

    def __post_init__(self):
        for name in ("rounds", "trajectories_per_round", "steps_per_trajectory"):
            if getattr(self, name) < 1:
                raise ValueError(f"Budget.{name} must be >= 1, got {getattr(self, name)}.")

    @property
    def steps_per_round(self) -> int:
        return self.trajectories_per_round * self.steps_per_trajectory

    @property
    def total_steps(self) -> int:
        """Environment samples per training seed (paper: 480 000)."""
        return self.rounds * self.steps_per_round


@dataclass(frozen=True)
class NetworkConfig:
    """MLP torso shared by every network of an algorithm."""

    hidden_layer_sizes: tuple[int, ...] = (64, 64)
    """Widths of the hidden layers."""
    activation: str = "swish"
    """Name of a ``flax.linen`` activation (``relu``, ``swish``, ``tanh`` ...)."""

    def invalid(self) -> list[Bad]:
        bad = [] if callable(getattr(nn, self.activation, None)) else [
            Bad("activation", "the name of a flax.linen function (relu, swish, tanh ...)")]
        if not self.hidden_layer_sizes or min(self.hidden_layer_sizes) < 1:
            bad.append(Bad("hidden_layer_sizes", "one or more widths >= 1"))
        return bad


def _common_invalid(cfg) -> list[Bad]:
    """The checks every algorithm's config shares: a step size, a discount, a clip."""
    return greater_than(cfg, 0, "learning_rate", "max_grad_norm") + _unit_interval(cfg, "gamma")


def _unit_interval(cfg, *names: str) -> list[Bad]:
    return [Bad(n, "in [0, 1]") for n in names if not 0.0 <= getattr(cfg, n) <= 1.0]


def _replay_invalid(cfg) -> list[Bad]:
    """Replay-buffer sizes (DQN, SAC). rejax 0.1.3 draws a minibatch without replacement and,
    with fewer entries than the batch, returns uninitialised ones (``ReplayBuffer.sample``): the
    buffer must hold a batch before the first update."""
    bad = at_least(cfg, 1, "batch_size", "updates_per_iteration")
    for name in ("buffer_size", "fill_buffer"):
        if getattr(cfg, name) < cfg.batch_size:
            bad.append(Bad(name, f">= --batch-size ({cfg.batch_size})"))
    return bad


@dataclass(frozen=True)
class DQNConfig:
    """Double DQN with a hard-updated target network and epsilon-greedy exploration."""

    learning_rate: float = 3e-4
    """Adam step size."""
    gamma: float = 0.99
    """Discount factor."""
    batch_size: int = 128
    """Replay minibatch size."""
    buffer_size: int = 100_000
    """Replay capacity in transitions."""
    fill_buffer: int = 6_000
    """Uniform-random transitions collected before learning starts (one paper round)."""
    updates_per_iteration: int = 4
    """Gradient steps per iteration of ``trajectories_per_round`` env steps."""
    target_update_freq: int = 2_000
    """Environment steps between hard target-network updates."""
    eps_start: float = 1.0
    """Initial exploration rate."""
    eps_end: float = 0.05
    """Final exploration rate."""
    exploration_fraction: float = 0.3
    """Fraction of the budget over which epsilon decays linearly."""
    bootstrap_truncation: bool = True
    """At the env's time limit (a truncation; the RAN env never terminates) bootstrap from the
    final observation, and end the return only at a termination (Pardo et al. 2018; as SB3 and
    RLlib do; :mod:`sfjax.baselines.time_limits`). False: rejax's own behaviour, the limit
    taken for the end of the task (TD target r at the last step)."""
    ddqn: bool = True
    """Double-DQN targets (online argmax, target evaluation)."""
    max_grad_norm: float = 10.0
    """Gradient clipping, element-wise: rejax 0.1.3 applies ``optax.clip`` (each gradient entry
    to +-this value before Adam), not a clip of the global norm."""
    normalize_observations: bool = True
    """Running mean/std normalisation of observations."""
    normalize_rewards: bool = True
    """Scale rewards by a running std of the discounted return."""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    """Q-network torso."""

    def invalid(self) -> list[Bad]:
        bad = _common_invalid(self) + _replay_invalid(self)
        bad += at_least(self, 1, "target_update_freq")
        bad += _unit_interval(self, "eps_start", "eps_end")
        if not self.eps_end <= self.eps_start:
            bad.append(Bad("eps_end", "<= --eps-start"))
        if not 0.0 < self.exploration_fraction <= 1.0:
            bad.append(Bad("exploration_fraction", "in (0, 1]"))
        return bad


@dataclass(frozen=True)
class PPOConfig:
    """PPO with clipped surrogate, clipped value loss and GAE."""

    learning_rate: float = 3e-4
    """Adam step size (actor and critic)."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    rollout_steps: int = 100
    """Steps per env copy between updates; must divide ``steps_per_trajectory``."""
    num_minibatches: int = 4
    """Minibatches per epoch (must divide trajectories_per_round x rollout_steps)."""
    num_epochs: int = 4
    """Passes over each rollout batch."""
    bootstrap_truncation: bool = True
    """At the env's time limit (a truncation; the RAN env never terminates) bootstrap from the
    final observation, and end the return only at a termination (Pardo et al. 2018; as SB3 and
    RLlib do; :mod:`sfjax.baselines.time_limits`). False: rejax's own behaviour, the limit
    taken for the end of the task (GAE's value after the last step is 0)."""
    clip_eps: float = 0.2
    """Policy-ratio (and value) clipping."""
    vf_coef: float = 0.5
    """Value-loss weight."""
    ent_coef: float = 0.01
    """Entropy bonus weight."""
    max_grad_norm: float = 0.5
    """Gradient clipping, element-wise: rejax 0.1.3 applies ``optax.clip`` (each gradient entry
    to +-this value before Adam), not a clip of the global norm."""
    normalize_observations: bool = True
    """Running mean/std normalisation of observations."""
    normalize_rewards: bool = True
    """Scale rewards by a running std of the discounted return."""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    """Actor and critic torsos."""

    def invalid(self) -> list[Bad]:
        bad = _common_invalid(self) + _unit_interval(self, "gae_lambda")
        bad += at_least(self, 1, "rollout_steps", "num_minibatches", "num_epochs")
        return bad + at_least(self, 0, "vf_coef", "ent_coef") + greater_than(self, 0, "clip_eps")


@dataclass(frozen=True)
class SACConfig:
    """Soft actor-critic for discrete actions (Christodoulou 2019): twin Q, learned alpha."""

    learning_rate: float = 3e-4
    """Adam step size (actor, critics, temperature)."""
    gamma: float = 0.99
    """Discount factor."""
    batch_size: int = 128
    """Replay minibatch size."""
    buffer_size: int = 100_000
    """Replay capacity in transitions."""
    fill_buffer: int = 6_000
    """Transitions collected before learning starts (one paper round)."""
    updates_per_iteration: int = 2
    """Gradient steps per iteration of ``trajectories_per_round`` env steps."""
    bootstrap_truncation: bool = True
    """At the env's time limit (a truncation; the RAN env never terminates) bootstrap from the
    final observation, and end the return only at a termination (Pardo et al. 2018; as SB3 and
    RLlib do; :mod:`sfjax.baselines.time_limits`). False: rejax's own behaviour, the limit
    taken for the end of the task (critic target r at the last step)."""
    safe_log_probs: bool = True
    """Where a state's smallest action probability underflows to 0 in float32 (logits more than
    ~88 apart), take its log-probability as the log-softmax of the logits instead of rejax's
    log(probs) = -inf, whose 0 x inf = NaN in the actor, critic-target and temperature losses
    turns every parameter NaN (:mod:`sfjax.baselines.time_limits`); elsewhere values and
    gradients are rejax's. False runs rejax's log(probs) unchanged."""
    polyak: float = 0.995
    """Target critics: tau = 1 - polyak soft update every iteration."""
    target_entropy_ratio: float = 0.7
    """Target entropy = ratio x log(num_actions) (0.98 in rejax is often too exploratory)."""
    max_grad_norm: float = 10.0
    """Gradient clipping, element-wise: rejax 0.1.3 applies ``optax.clip`` (each gradient entry
    to +-this value before Adam), not a clip of the global norm."""
    normalize_observations: bool = True
    """Running mean/std normalisation of observations."""
    normalize_rewards: bool = True
    """Scale rewards by a running std of the discounted return."""
    network: NetworkConfig = field(default_factory=lambda: NetworkConfig(activation="relu"))
    """Actor and critic torsos."""

    def invalid(self) -> list[Bad]:
        bad = _common_invalid(self) + _replay_invalid(self) + _unit_interval(self, "polyak")
        if not 0.0 < self.target_entropy_ratio <= 1.0:
            bad.append(Bad("target_entropy_ratio", "in (0, 1]"))
        return bad


AlgoConfig = DQNConfig | PPOConfig | SACConfig
_CONFIG_TYPES = {"dqn": DQNConfig, "ppo": PPOConfig, "sac": SACConfig}


def prepare_env_params(env, env_params: Any, budget: Budget) -> Any:
    """Env params whose episode length is the budget's trajectory length."""
    if env_params is None:
        env_params = env.default_params
    if hasattr(env_params, "max_steps_in_episode"):
        env_params = env_params.replace(max_steps_in_episode=budget.steps_per_trajectory)
    return env_params


def make_algo(name: AlgoName, cfg: AlgoConfig, env, env_params: Any, budget: Budget):
    """Build the rejax algorithm for ``name`` on ``env`` with ``budget``.

    The env is wrapped as ``RejaxEnv(episode_stats_env(env))``; the returned algorithm's
    ``eval_callback`` (called once per round) returns the Fig. 2 curves.
    """
    if name not in _CONFIG_TYPES:
        raise ValueError(f"Unknown baseline {name!r}; choose one of {ALGOS}.")
    if not isinstance(cfg, _CONFIG_TYPES[name]):
        raise TypeError(f"{name} needs a {_CONFIG_TYPES[name].__name__}, got {type(cfg)}.")
    found = problems(cfg)  # the CLIs check these first; a config built in code gets them here
    if found:
        raise ValueError(f"{type(cfg).__name__}: " + "; ".join(found))
    env_params = prepare_env_params(env, env_params, budget)
    wrapped = RejaxEnv(episode_stats_env(env))
    n_envs = budget.trajectories_per_round
    common = dict(
        env=wrapped,
        env_params=env_params,
        total_timesteps=budget.total_steps,
        eval_freq=budget.steps_per_round,
        skip_initial_evaluation=True,
        learning_rate=cfg.learning_rate,
        gamma=cfg.gamma,
        max_grad_norm=cfg.max_grad_norm,
        normalize_observations=cfg.normalize_observations,
        normalize_rewards=cfg.normalize_rewards,
        num_envs=n_envs,
        bootstrap_truncation=cfg.bootstrap_truncation,
    )
    hidden = tuple(cfg.network.hidden_layer_sizes)
    if name == "dqn":
        algo = time_limits.DQN.create(
            **common,
            batch_size=cfg.batch_size,
            buffer_size=cfg.buffer_size,
            fill_buffer=cfg.fill_buffer,
            num_epochs=cfg.updates_per_iteration,
            target_update_freq=cfg.target_update_freq,
            polyak=0.0,
            eps_start=cfg.eps_start,
            eps_end=cfg.eps_end,
            exploration_fraction=cfg.exploration_fraction,
            ddqn=cfg.ddqn,
        )
        # rejax hard-codes a (64, 64) Q-network; rebuild it with the configured torso.
        agent = EpsilonGreedyPolicy(DiscreteQNetwork)(
            hidden_layer_sizes=hidden,
            action_dim=algo.action_dim,
            activation=getattr(nn, cfg.network.activation),
        )
        algo = algo.replace(agent=agent)
    elif name == "ppo":
        if budget.steps_per_trajectory % cfg.rollout_steps:
            raise ValueError(
                f"PPO rollout_steps={cfg.rollout_steps} must divide steps_per_trajectory="
                f"{budget.steps_per_trajectory} so that rounds hold whole trajectories."
            )
        if (n_envs * cfg.rollout_steps) % cfg.num_minibatches:
            raise ValueError(
                f"PPO num_minibatches={cfg.num_minibatches} must divide trajectories_per_round"
                f" x rollout_steps = {n_envs * cfg.rollout_steps}."
            )
        algo = time_limits.PPO.create(
            **common,
            num_steps=cfg.rollout_steps,
            num_minibatches=cfg.num_minibatches,
            num_epochs=cfg.num_epochs,
            gae_lambda=cfg.gae_lambda,
            clip_eps=cfg.clip_eps,
            vf_coef=cfg.vf_coef,
            ent_coef=cfg.ent_coef,
            agent_kwargs={"hidden_layer_sizes": hidden, "activation": cfg.network.activation},
        )
    else:
        algo = time_limits.SAC.create(
            **common,
            batch_size=cfg.batch_size,
            buffer_size=cfg.buffer_size,
            fill_buffer=cfg.fill_buffer,
            num_epochs=cfg.updates_per_iteration,
            polyak=cfg.polyak,
            target_update_freq=1,
            target_entropy_ratio=cfg.target_entropy_ratio,
            safe_log_probs=cfg.safe_log_probs,
            hidden_layer_sizes=hidden,
            agent_kwargs={"activation": cfg.network.activation},
        )
        if not algo.discrete:
            raise ValueError("The SAC baseline expects a Discrete action space.")
    return algo.replace(eval_callback=_round_curves)


def _round_curves(algo, ts, rng) -> dict[str, jax.Array]:
    """rejax eval_callback: means over the trajectories that finished in this round."""
    del algo, rng
    last = last_episode_stats(ts.env_state)
    return {
        "utility": last["utility"].mean(),
        "mean_se": last["mean_se"].mean(),
        "reconfigurations": last["reconfigurations"].mean(),
        "violations": last["violations"].mean(),
        "episodes": ts.env_state.episodes.sum(),
    }


def greedy_policy(algo, ts, deterministic: bool = True):
    """``policy(obs, key) -> action`` of a trained rejax state (one seed, unbatched).

    Deterministic: argmax of the Q-values (DQN) or of the policy logits (PPO, SAC).
    Otherwise: the algorithm's own behaviour policy (epsilon 0.005 for DQN, sampling for
    PPO/SAC), as rejax evaluates.
    """
    if not deterministic:
        return algo.make_act(ts)

    def policy(obs: jax.Array, key: jax.Array) -> jax.Array:
        del key
        x = jnp.asarray(obs, jnp.float32)[None]
        if getattr(algo, "normalize_observations", False):
            x = algo.normalize_obs(ts.obs_rms_state, x)
        if isinstance(algo, rejax.DQN):
            scores = algo.agent.apply(ts.q_ts.params, x)
        else:
            scores = algo.actor.apply(ts.actor_ts.params, x, method="_action_dist").logits
        return jnp.argmax(scores[0]).astype(jnp.int32)

    return policy


@dataclass
class TrainResult:
    """Output of :func:`train` for one algorithm (all seeds)."""

    name: str
    algo: Any
    train_state: Any
    """rejax train state, batched over training seeds (leading axis N)."""
    curves: dict[str, np.ndarray]
    """Per-round training curves, each [N, R] (keys: CURVE_KEYS + ``episodes``)."""
    seeds: tuple[int, ...]
    env_samples: int
    """Environment samples used for training, per seed."""
    wall_time_s: float
    """Compile + train wall time for all seeds together."""

    def seed_state(self, i: int):
        return jax.tree.map(lambda x: x[i], self.train_state)


def train(
    name: AlgoName,
    cfg: AlgoConfig,
    env,
    env_params: Any,
    budget: Budget,
    seeds: Sequence[int],
    progress_every_s: float = 30.0,
) -> TrainResult:
    """Train ``name`` on ``env`` for every seed in one jitted, seed-vmapped program; logs a
    progress line per round (at most one per ``progress_every_s`` seconds)."""
    if not seeds:
        raise ValueError("train() needs at least one seed.")
    algo = make_algo(name, cfg, env, env_params, budget)
    progress = RoundProgress(name, len(seeds), budget.rounds, every_s=progress_every_s)
    reporting = algo.replace(eval_callback=with_progress(algo.eval_callback, progress))
    keys_N = jnp.stack([jax.random.key(int(s)) for s in seeds])
    start = time.perf_counter()
    ts, curves = jax.jit(jax.vmap(reporting.train))(keys_N)
    curves = jax.tree.map(np.asarray, jax.block_until_ready(curves))
    wall = time.perf_counter() - start
    return TrainResult(
        name=name,
        algo=algo,
        train_state=ts,
        curves=curves,
        seeds=tuple(int(s) for s in seeds),
        env_samples=budget.total_steps,
        wall_time_s=wall,
    )


def evaluate_trained(
    result: TrainResult, env, protocol: EvalProtocol, deterministic: bool = True
) -> Rollouts:
    """Evaluate every trained seed on the shared protocol; arrays come back as [N, S, T]."""
    env_params = protocol.episode_params(result.algo.env_params)
    reset_S, steps_ST, policy_S = protocol.all_keys()
    eval_env = RejaxEnv(env)

    def one_seed(ts):
        policy = greedy_policy(result.algo, ts, deterministic)
        return jax.vmap(lambda r, s, p: rollout(policy, eval_env, env_params, r, s, p))(
            reset_S, steps_ST, policy_S
        )

    out = jax.jit(jax.vmap(one_seed))(result.train_state)
    return Rollouts(*(np.asarray(x) for x in out))


def write_curves(writer, name: str, curves: dict[str, np.ndarray]) -> None:
    """Per-round curves to TensorBoard: ``<name>/<metric>`` (seed mean) and per seed."""
    n_seeds, n_rounds = curves["utility"].shape
    for key in CURVE_KEYS:
        values_NR = curves[key]
        for r in range(n_rounds):
            writer.add_scalar(f"{name}/{key}", float(values_NR[:, r].mean()), r + 1)
            for i in range(n_seeds):
                writer.add_scalar(f"{name}/seed{i}/{key}", float(values_NR[i, r]), r + 1)
    writer.flush()
