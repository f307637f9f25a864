"""The evaluation protocol shared by every method of Table III.

Every method — RL policies (jitted), the Reflexion and self-finetuning LLM agents (Python
loop around a jitted env step) — is scored on the same environment seeds with the same
per-step environment keys, over ``num_steps``-decision trajectories (300 in the paper,
section V-C). Given the same actions, two methods therefore see the same traffic and
channel realisations; differences in the table come from the policies alone.

Per trajectory (paper eq. 1-3, 15), for the controlled slice:
    Avg. SE        = (1/T) Σ_t SE_t
    Reconf. times  = Σ_t c_t
    PQoS vio.      = Σ_t v_t
    Utility        = Σ_t U_t   (the env reward is the eq. 15 per-step utility)
Table entries are mean ± std over the evaluated trajectories.

Shape legend: S = evaluation seeds, T = decisions per trajectory, N = training seeds.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from sfjax.baselines.wrappers import (
    INFO_RECONFIGURATION,
    INFO_SE,
    INFO_VIOLATION,
    EnvWrapper,
    RejaxEnv,
)

METRICS = ("mean_se", "reconfigurations", "violations", "utility")
"""Table III columns, in order."""
METRIC_LABELS = {
    "mean_se": "Avg. SE",
    "reconfigurations": "Reconf. times",
    "violations": "PQoS vio.",
    "utility": "Utility",
}


@dataclass(frozen=True)
class EvalProtocol:
    """Which trajectories every method is scored on."""

    seeds: tuple[int, ...] = tuple(range(16))
    """Environment seeds; one trajectory per seed, identical for every method. Default 0-15:
    the 16 seeds benchmarks/RESULTS.md reports Table III on (paired intervals over 16 seeds;
    each LLM row costs 16 x 300 Actor decisions)."""
    num_steps: int = 300
    """Decisions per evaluation trajectory (paper: 300)."""
    key_offset: int = 1_000_003
    """Mixed into every seed so evaluation keys never coincide with training keys."""

    def __post_init__(self):
        from sfjax.configcheck import SEED_LIMIT, SEED_RANGE, seed_problem

        if problem := seed_problem(self.seeds):
            raise ValueError(f"EvalProtocol.seeds {self.seeds}: must be {problem} (environment "
                             "seeds, one trajectory each).")
        if not 0 <= self.key_offset < SEED_LIMIT:
            raise ValueError(f"EvalProtocol.key_offset must be {SEED_RANGE}, got "
                             f"{self.key_offset}.")
        if self.num_steps < 1:
            raise ValueError(f"EvalProtocol.num_steps must be >= 1, got {self.num_steps}.")

    def episode_keys(self, seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(reset key, per-step env keys [T], policy key) of the trajectory for ``seed``."""
        root = jax.random.fold_in(jax.random.key(self.key_offset), seed)
        reset_key, steps_key, policy_key = jax.random.split(root, 3)
        return reset_key, jax.random.split(steps_key, self.num_steps), policy_key

    def episode_params(self, env_params: Any) -> Any:
        """``env_params`` whose time limit is ``num_steps``: a protocol trajectory is one
        episode for every method, never cut by an auto-reset at a shorter limit."""
        if hasattr(env_params, "max_steps_in_episode"):
            env_params = env_params.replace(max_steps_in_episode=self.num_steps)
        return env_params

    def shared_seeds(self, seeds: Sequence[int]) -> list[int]:
        """The env seeds of ``seeds`` that are also evaluation seeds. A method that learns or
        chooses on an env seed through this key stream (the reference rows' training seeds,
        Reflexion's trials) has seen that evaluation trajectory: keep them disjoint."""
        return sorted(set(self.seeds) & set(seeds))

    def all_keys(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Stacked :meth:`episode_keys` over seeds: ([S], [S, T], [S])."""
        keys = [self.episode_keys(s) for s in self.seeds]
        return tuple(jnp.stack(k) for k in zip(*keys))


@dataclass(frozen=True)
class Rollouts:
    """Per-step records of the evaluated trajectories (numpy, shapes [..., S, T])."""

    actions: np.ndarray
    rewards: np.ndarray
    se: np.ndarray
    reconfiguration: np.ndarray
    violation: np.ndarray

    def per_episode(self) -> dict[str, np.ndarray]:
        """Table III metrics per trajectory, each of shape [..., S]."""
        return {
            "mean_se": self.se.mean(-1),
            "reconfigurations": self.reconfiguration.sum(-1),
            "violations": self.violation.sum(-1),
            "utility": self.rewards.sum(-1),
        }

    def summary(self) -> dict[str, tuple[float, float]]:
        """metric -> (mean, std) over all trajectories (population std, ddof=0)."""
        return {k: (float(np.mean(v)), float(np.std(v))) for k, v in self.per_episode().items()}

    @property
    def num_samples(self) -> int:
        """Environment steps spent on this evaluation."""
        return int(self.rewards.size)

    def save(self, path) -> None:
        """To ``path`` (an ``.npz``) whole or not at all (:func:`sfjax.atomic.write_npz`)."""
        from sfjax import atomic

        atomic.write_npz(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path) -> Rollouts:
        with np.load(path) as data:
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@functools.lru_cache(maxsize=16)
def _as_rejax(env):
    return env if isinstance(env, EnvWrapper) else RejaxEnv(env)


def _record(info: dict, reward) -> tuple[jax.Array, ...]:
    def get(name):
        value = info.get(name)
        return jnp.zeros((), jnp.float32) if value is None else jnp.asarray(value, jnp.float32)

    return (
        jnp.asarray(reward, jnp.float32).reshape(()),
        get(INFO_SE).reshape(()),
        get(INFO_RECONFIGURATION).reshape(()),
        get(INFO_VIOLATION).reshape(()),
    )


def rollout(
    policy: Callable[[jax.Array, jax.Array], jax.Array],
    env,
    env_params: Any,
    reset_key: jax.Array,
    step_keys_T: jax.Array,
    policy_key: jax.Array,
) -> tuple[jax.Array, ...]:
    """One trajectory of ``policy(obs, key) -> action``; pure and jit-able.

    Returns per-step (actions_T, rewards_T, se_T, reconfiguration_T, violation_T).
    """
    env = _as_rejax(env)
    obs, state = env.reset(reset_key, env_params)

    def step(carry, step_key):
        obs, state, key = carry
        key, act_key = jax.random.split(key)
        action = policy(obs, act_key)
        obs, state, reward, _, info = env.step(step_key, state, action, env_params)
        return (obs, state, key), (jnp.asarray(action, jnp.int32), *_record(info, reward))

    _, out = jax.lax.scan(step, (obs, state, policy_key), step_keys_T)
    return out


def evaluate_policy(policy, env, env_params, protocol: EvalProtocol) -> Rollouts:
    """Jitted evaluation of a JAX policy on every protocol seed (vmapped over seeds)."""
    env_params = protocol.episode_params(env_params)
    reset_S, steps_ST, policy_S = protocol.all_keys()
    run = jax.jit(jax.vmap(lambda r, s, p: rollout(policy, env, env_params, r, s, p)))
    return Rollouts(*(np.asarray(x) for x in run(reset_S, steps_ST, policy_S)))


@functools.lru_cache(maxsize=16)
def _batched_env_fns(env):
    """Jitted, seed-vmapped reset and step+record of ``env`` (cached: no recompiles across
    repeated evaluations, e.g. Reflexion trials)."""

    def step_record(keys, state, actions, env_params):
        obs, state, reward, _, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
            keys, state, actions, env_params
        )
        return obs, state, info, jax.vmap(_record)(info, reward)

    return jax.jit(jax.vmap(env.reset, in_axes=(0, None))), jax.jit(step_record)


class Agent(Protocol):
    """A controller evaluated in Python (the LLM agents), acting for all seeds as a batch."""

    def reset(self, seeds: Sequence[int]) -> None:
        """Start one new trajectory per seed (clear history windows / episode memory)."""

    def act(self, obs_S: np.ndarray, infos: list[dict[str, float]] | None) -> Sequence[int]:
        """One action per seed; ``infos`` are the feedback dicts of the previous step (None at
        the first decision). An agent may also define ``finish(infos)``, called with the
        feedback of the last step."""


def evaluate_agent(agent: Agent, env, env_params, protocol: EvalProtocol) -> Rollouts:
    """Evaluate a Python agent on the protocol seeds with exactly the keys of
    :func:`evaluate_policy`; the seeds form one batch (one agent call per decision), the env
    step is jitted and vmapped over seeds."""
    reset, step = _batched_env_fns(_as_rejax(env))
    env_params = protocol.episode_params(env_params)
    reset_S, steps_ST, _ = protocol.all_keys()
    agent.reset(list(protocol.seeds))
    obs, state = reset(reset_S, env_params)
    infos = None
    actions_T, records_T = [], []
    for t in range(protocol.num_steps):
        actions = np.asarray([int(a) for a in agent.act(np.asarray(obs), infos)], np.int32)
        if actions.shape != (len(protocol.seeds),):
            raise ValueError(
                f"agent.act returned {actions.shape[0]} actions for {len(protocol.seeds)} seeds"
            )
        obs, state, info, record = step(steps_ST[:, t], state, jnp.asarray(actions), env_params)
        info_np = {k: np.asarray(v) for k, v in info.items() if np.ndim(v) == 1}
        infos = [{k: float(v[i]) for k, v in info_np.items()} for i in range(len(actions))]
        actions_T.append(actions)
        records_T.append([np.asarray(x) for x in record])
    finish = getattr(agent, "finish", None)
    if finish is not None:
        finish(infos)
    per = [np.stack([r[j] for r in records_T], axis=-1) for j in range(4)]
    return Rollouts(np.stack(actions_T, axis=-1), *per)


EVAL_ROLLOUTS, EVAL_STATE = "eval_rollouts.npz", "eval_state.json"
"""A saved evaluation: its rollouts and what they were measured with (:func:`evaluate_once`)."""


def evaluate_once(out_dir, state: dict, evaluate: Callable[[], Rollouts], what: str,
                  on_measured: Callable[[], None] | None = None) -> Rollouts:  # fmt: skip
    """The evaluation of ``what`` saved in ``out_dir`` when its ``eval_state.json`` equals
    ``state`` (JSON: what decides the result, e.g. the Actor's adapter hash or memory, the seeds,
    steps and sampling seed); otherwise ``evaluate()``, saved as ``eval_rollouts.npz``, then
    ``on_measured()`` (e.g. the trajectories), then ``eval_state.json`` last: it vouches for
    the files before it. A rerun of a finished LLM row (on Qwen3-4B, the protocol's seeds x
    decisions of the Actor) thus costs nothing; a different or damaged saved one is measured
    again, with a warning."""
    import json
    import logging
    from pathlib import Path

    from sfjax import atomic

    log = logging.getLogger(__name__)
    out_dir, state = Path(out_dir), json.loads(json.dumps(state))  # as read back (tuples: lists)
    saved, rollouts_path = out_dir / EVAL_STATE, out_dir / EVAL_ROLLOUTS
    if saved.exists():
        try:
            old = atomic.read_json(saved, f"the evaluation state of {what}")
            if not isinstance(old, dict):
                raise TypeError(f"{saved.name} is not a JSON object")
            if old == state:
                rollouts = Rollouts.load(rollouts_path)
                log.info("the evaluation of %s was saved in %s: loaded", what, out_dir)
                return rollouts
            differ = sorted(k for k in state.keys() | old.keys() if old.get(k) != state.get(k))
            log.warning("the evaluation of %s in %s was made with another %s; it runs again",
                        what, out_dir, " / ".join(differ))  # fmt: skip
        except atomic.UNREADABLE as e:
            log.warning("the evaluation of %s saved in %s cannot be read (%s: %s); it runs "
                        "again", what, out_dir, type(e).__name__, e)  # fmt: skip
        saved.unlink()  # until measured again, nothing claims the files are this state's
    rollouts = evaluate()
    out_dir.mkdir(parents=True, exist_ok=True)
    rollouts.save(rollouts_path)
    if on_measured is not None:
        on_measured()
    atomic.write_json(saved, state, indent=2)
    return rollouts
