"""Algorithm 1, l. 3-10 (paper IV-B): the Actor runs the R-MDP in parallel environments.

:func:`collect` is the collect phase of the self-finetuning loop (:mod:`sfjax.agents.loop`):
at every step the Actor sees each env's eq. 14 state and its last-k history, answers with
(rho_t, a_t, eta_t), and the env returns the next states and the feedback f_t. The env and the
Actor are seen through the small protocols :class:`EnvRunner` and :class:`ActorLike`, so tests
drive the loop with fakes and other envs (ns-3) plug in.

Multi-host: an env whose results may differ between processes (``host_side = True``, e.g. one
driving ns-3 over a socket) is stepped on process 0 only and its states and feedback are
broadcast, so every process makes the same sharded Actor calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np

from sfjax import parallel
from sfjax.agents.prompts import HistoryEntry, PromptConfig
from sfjax.agents.trajectory import Step, Trajectory
from sfjax.console import progress_bar


class EnvRunner(Protocol):
    """Parallel environments seen as eq. 14 states and feedback dicts (see ``sfjax.agents.env``).

    An env whose results may differ between the processes of a multi-host run (one driving an
    external simulator such as ns-3 over a socket) sets the attribute ``host_side = True``:
    the loop then calls it on process 0 only and broadcasts its states and feedback. A pure
    function of its keys (the JAX env) needs no such attribute.
    """

    action_lo: int
    action_hi: int

    def reset(self, key: jax.Array, num_envs: int) -> list[dict[str, float]]:
        """Reset ``num_envs`` envs; return the initial eq. 14 state of each."""
        ...

    def step(self, actions: Sequence[int], key: jax.Array):
        """Apply one action per env; return (next states, feedback dicts)."""
        ...


class ActorLike(Protocol):
    def act(self, states, histories, step: int, key: jax.Array): ...

    def sample(self, prompts: Sequence[str], n: int, key: jax.Array) -> list[list[str]]: ...


def collect(
    actor: ActorLike,
    env: EnvRunner,
    prompt_cfg: PromptConfig,
    num_envs: int,
    steps: int,
    env_key: jax.Array,
    actor_key: jax.Array,
    *,
    env_seed: int = 0,
    progress: bool = True,
) -> list[Trajectory]:
    """Run the R-MDP for ``steps`` steps in ``num_envs`` parallel envs (Algorithm 1, l. 3-10)."""
    reset_key, step_keys = env_key_schedule(env_key, steps)
    states = _env_call(env, "reset", reset_key, num_envs)
    trajs = [Trajectory(e, env_seed, []) for e in range(num_envs)]
    histories: list[list[HistoryEntry]] = [[] for _ in range(num_envs)]
    bar = progress_bar(steps, "collect", enabled=progress)
    for t in range(steps):
        actor_key, ak = jax.random.split(actor_key)
        ek = step_keys[t]
        window = [
            h[-prompt_cfg.history_window :] if prompt_cfg.history_window else [] for h in histories
        ]
        decisions = actor.act(states, window, t, ak)
        actions = [int(d.action) for d in decisions]
        next_states, feedbacks = _env_call(env, "step", actions, ek)
        for e, (d, s, f) in enumerate(zip(decisions, states, feedbacks)):
            f = {k: float(v) for k, v in f.items()}
            s = {k: float(v) for k, v in s.items()}
            trajs[e].steps.append(
                Step(t, s, d.prompt, d.output, d.reflection, int(d.action), d.analysis,
                     bool(d.parsed_ok), f, d.parse_error)
            )  # fmt: skip
            histories[e].append(HistoryEntry(s, d.reflection, int(d.action), d.analysis, f))
        states = next_states
        bar.update(1)
    bar.close()
    return trajs


def env_key_schedule(env_key: jax.Array, steps: int) -> tuple[jax.Array, list[jax.Array]]:
    """The keys :func:`collect` gives the env: the reset key, then one key per step (the env
    splits each over its parallel envs). Replaying a trajectory's actions with them reproduces
    it (:mod:`sfjax.agents.label_audit`)."""
    reset_key, env_key = jax.random.split(env_key)
    step_keys = []
    for _ in range(steps):
        env_key, ek = jax.random.split(env_key)
        step_keys.append(ek)
    return reset_key, step_keys


def _env_call(env: EnvRunner, method: str, *args) -> Any:
    """``env.<method>(*args)``; for a ``host_side`` env on process 0 only and broadcast (as
    JSON, numpy scalars made Python numbers), so every process sees the same states and
    feedback."""
    if not getattr(env, "host_side", False):
        return getattr(env, method)(*args)

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [plain(v) for v in x]
        return x.tolist() if isinstance(x, np.generic | np.ndarray) else x

    return parallel.on_main_process(lambda: plain(getattr(env, method)(*args)))
