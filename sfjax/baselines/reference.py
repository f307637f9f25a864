"""Reference rows of Table III: what no learning, simple adaptation and hindsight achieve.

Three non-learning references put the learned methods' numbers in context, each scored by the
shared evaluation protocol (:mod:`sfjax.baselines.evaluation`, same seeds, same per-step keys):

* **best static allocation** -- every fixed action is run on the *training* seeds and the one
  with the highest mean eq. 15 utility is kept (:func:`best_static_action`); it is then
  evaluated on the held-out evaluation seeds like every other method;
* **adaptive heuristic** -- :func:`demand_tracking_policy`, a hand-written controller that sizes
  both slices from their observed arrival rates (eq. 14 of both slices) with headroom and
  hysteresis; its four constants are chosen on the training seeds by grid search
  (:func:`tune_heuristic`), never on the evaluation seeds;
* **hindsight beam search** -- :func:`hindsight_beam_search` plans the allocation sequence of
  each evaluation trajectory *knowing its future*: the simulator, driven with that
  trajectory's own per-step keys (same traffic and channel realisation for every action
  sequence), is the model; a beam of the best partial sequences is extended by every action
  at every step (vmapped). The reference policies' own sequences ride along in the beam, so
  the result is never below them. It is a strong reference, not a causal policy and not a
  proven optimum (beam search prunes).

Shape legend: A = actions, S = seeds, T = decisions, W = beam width, K = forced sequences,
C = candidates (beams x actions), G = heuristic parameter grid.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from sfjax.baselines.evaluation import EvalProtocol, Rollouts, rollout
from sfjax.baselines.report import TABLE_ROWS
from sfjax.configcheck import Bad, at_least, seeds


def _unwrapped(env):
    return getattr(env, "unwrapped", env)


def _mean_utilities(make_policy, theta_G, env, env_params, protocol: EvalProtocol) -> np.ndarray:
    """Mean utility over the protocol's seeds of ``make_policy(theta)`` for every ``theta`` of
    a batch (a pytree with a leading axis G), in one jitted program (one compile for all)."""
    reset_S, steps_ST, policy_S = protocol.all_keys()

    def per_theta(theta):
        def per_seed(r, s, p):
            return rollout(make_policy(theta), env, env_params, r, s, p)[1].sum()

        return jax.vmap(per_seed)(reset_S, steps_ST, policy_S).mean()

    return np.asarray(jax.jit(jax.vmap(per_theta))(theta_G))


# ------------------------------------------------------------------------------ static


def static_policy(action):
    """A JAX policy ``(obs, key) -> action`` that always plays ``action`` (may be traced)."""

    def policy(obs, key):
        del obs, key
        return jnp.asarray(action, jnp.int32)

    return policy


def best_static_action(env, env_params, train: EvalProtocol) -> tuple[int, np.ndarray]:
    """The fixed action with the best mean utility on the training protocol's seeds; also
    every action's mean utility ``[A]``."""
    actions_A = jnp.arange(int(env.num_actions), dtype=jnp.int32)
    utilities_A = _mean_utilities(static_policy, actions_A, env, env_params, train)
    return int(np.argmax(utilities_A)), utilities_A


# ---------------------------------------------------------------------------- heuristic


@dataclass(frozen=True)
class HeuristicParams:
    """Constants of :func:`demand_tracking_policy` (chosen on training seeds; each may also
    be a traced array, which is how :func:`tune_heuristic` searches them in one program)."""

    kbps_per_prb: float = 250.0
    """Arrival rate one PRB of the controlled slice is sized for, kb/s: far below a PRB's
    ~700 kb/s at CQI 15, the headroom that keeps a 10 ms delay budget."""
    other_kbps_per_prb: float = 650.0
    """The same for the other slice (a 50 ms budget needs throughput, little headroom)."""
    hysteresis_rbg: int = 2
    """The allocation shrinks only when the target is this many actions below it."""
    queue_alarm: float = 0.02
    """Queue growth (fraction of the slice's buffers) that counts as under-provisioning."""
    base_action: int = -1
    """Allocation held while neither slice's demand asks for another (the best static
    allocation, chosen on the training seeds); -1: none, the allocation follows the demand
    all the way down."""


def demand_tracking_policy(env, hp: HeuristicParams):
    """Size both slices from the last step's observed arrival rates, with hysteresis.

    From the eq. 14 observation of both slices (``observe_other_slice``): the other slice
    needs ``need_o = arrivals_o / other_kbps_per_prb`` PRBs and caps the controlled slice at
    the largest action leaving it that many (a slice short of throughput violates in nearly
    every step, a slice short of headroom only sometimes, so the cap wins a conflict); the
    controlled slice wants the smallest action with ``arrivals_c / kbps_per_prb`` PRBs, and
    at least ``base_action`` when one is set (then the policy is the static allocation with
    demand-driven departures: up when slice 0's load needs more, down when slice 1's does). A
    slice whose queue grew by more than ``queue_alarm`` of its buffers, or that dropped
    bytes, counts one action unit short. The allocation grows at once, shrinks at once when
    the cap demands it, and otherwise only by ``hysteresis_rbg`` or more (a reconfiguration
    costs as much as one unit of SE for one step).
    """
    cfg = _unwrapped(env).config
    if not cfg.observe_other_slice:
        raise ValueError("demand_tracking_policy needs observe_other_slice=True")
    ues = _unwrapped(env).ues
    prbs_A = jnp.asarray(cfg.prbs_per_action, jnp.float32)
    n_act = cfg.num_actions
    total = float(cfg.cell.schedulable_prbs)
    peak_c, peak_o = (float(x) for x in ues.peak_rate_S)

    def policy(obs, key):
        del key
        cur = jnp.argmin(jnp.abs(prbs_A - obs[0] * cfg.cell.n_prb)).astype(jnp.int32)
        need_c = obs[2] * peak_c / 1e3 / hp.kbps_per_prb
        need_o = obs[6] * peak_o / 1e3 / hp.other_kbps_per_prb
        alarm_c = (obs[3] > hp.queue_alarm) | (obs[4] > 0)
        alarm_o = (obs[7] > hp.queue_alarm) | (obs[8] > 0)
        # smallest action covering need_c; largest action leaving the other slice need_o
        want = jnp.minimum(jnp.sum(prbs_A < need_c - 1e-6), n_act - 1)
        want = jnp.maximum(want, hp.base_action)
        upper = jnp.maximum(jnp.sum(prbs_A <= total - need_o + 1e-6) - 1, 0)
        want = jnp.where(alarm_c, jnp.maximum(want, cur + 1), want)
        upper = jnp.where(alarm_o, jnp.minimum(upper, cur - 1), upper)
        upper = jnp.clip(upper, 0, n_act - 1)
        want = jnp.clip(jnp.minimum(want, upper), 0, n_act - 1)
        shrink = (cur > upper) | (cur - want >= hp.hysteresis_rbg)
        return jnp.where((want > cur) | shrink, want, cur).astype(jnp.int32)

    return policy


HEURISTIC_GRID = {
    "kbps_per_prb": (150.0, 200.0, 250.0, 300.0, 350.0),
    "other_kbps_per_prb": (550.0, 650.0, 750.0, 850.0),
    "hysteresis_rbg": (1, 2, 3),
}
"""Values searched by :func:`tune_heuristic` (queue_alarm stays at its default)."""


def tune_heuristic(env, env_params, train: EvalProtocol,
                   grid: dict[str, Sequence] | None = None,
                   base_action: int = -1) -> tuple[HeuristicParams, dict]:
    """Grid search of :class:`HeuristicParams` on the training seeds by mean utility (with a
    fixed ``base_action``)."""
    grid = {**(grid or HEURISTIC_GRID), "base_action": (base_action,)}
    names = list(grid)
    combos = list(itertools.product(*(grid[n] for n in names)))
    theta_G = {n: jnp.asarray([c[i] for c in combos], jnp.float32) for i, n in enumerate(names)}
    utilities_G = _mean_utilities(
        lambda th: demand_tracking_policy(env, HeuristicParams(**th)), theta_G, env,
        env_params, train,
    )
    best = combos[int(np.argmax(utilities_G))]
    hp = {n: (int(v) if n in ("hysteresis_rbg", "base_action") else float(v))
          for n, v in zip(names, best)}
    return HeuristicParams(**hp), {
        "grid": {n: list(grid[n]) for n in names},
        "best": hp,
        "best_train_utility": float(np.max(utilities_G)),
    }


# ------------------------------------------------------------------------ beam search


def hindsight_beam_search(env, env_params, protocol: EvalProtocol, width: int = 16,
                          forced_actions_KST: np.ndarray | None = None) -> Rollouts:
    """Per evaluation seed, the best allocation sequence found by beam search in hindsight.

    Every candidate is stepped with the trajectory's own per-step key (the protocol's keys),
    so all sequences see the same traffic and channel; beams are ranked by cumulative eq. 15
    utility. ``forced_actions_KST`` (action sequences of reference policies, per seed) are
    carried alongside the beam unchanged and compete at the end, so the result is at least
    as good as each of them. Returns the best sequence's per-step records.
    """
    base = _unwrapped(env)
    n_act = int(base.num_actions)
    reset_S, steps_ST, _ = protocol.all_keys()
    n_seeds, n_steps = steps_ST.shape[:2]
    if forced_actions_KST is None:
        forced_actions_KST = np.zeros((0, n_seeds, n_steps), np.int32)
    forced_KST = jnp.asarray(forced_actions_KST, jnp.int32)
    n_forced = forced_KST.shape[0]

    def step(state, action, key):
        # the key as ``env.step`` uses it (gymnax: split, first half to step_env), so every
        # sequence meets exactly the evaluation's traffic and channel draws
        out = base.step_env(jax.random.split(key)[0], state, action, env_params)
        state, reward, info = out[1], out[2], out[-1]
        rec = jnp.stack([jnp.asarray(reward, jnp.float32),
                         jnp.asarray(info["se"], jnp.float32),
                         jnp.asarray(info["reconfiguration"], jnp.float32),
                         jnp.asarray(info["violation"], jnp.float32)])
        return state, rec

    def one_seed(reset_key, keys_T, forced_KT):
        _, state0 = base.reset_env(reset_key, env_params)
        beams = jax.tree.map(lambda x: jnp.broadcast_to(x, (width, *x.shape)), state0)
        forced = jax.tree.map(lambda x: jnp.broadcast_to(x, (n_forced, *x.shape)), state0)
        # the beam starts as one live candidate (the others at -inf)
        score_W = jnp.full((width,), -jnp.inf).at[0].set(0.0)
        hist_WT = jnp.zeros((width, n_steps), jnp.int32)
        recs_WT4 = jnp.zeros((width, n_steps, 4), jnp.float32)
        f_recs_KT4 = jnp.zeros((n_forced, n_steps, 4), jnp.float32)

        def body(carry, t):
            beams, score_W, hist_WT, recs_WT4, forced, f_recs_KT4 = carry
            key = keys_T[t]
            actions_A = jnp.arange(n_act, dtype=jnp.int32)
            new_WA, rec_WA4 = jax.vmap(
                lambda s: jax.vmap(lambda a: step(s, a, key))(actions_A)
            )(beams)
            cand_C = (score_W[:, None] + rec_WA4[..., 0]).reshape(-1)
            top_W = jax.lax.top_k(cand_C, width)[1]
            parent_W, act_W = top_W // n_act, top_W % n_act
            beams = jax.tree.map(lambda x: x[parent_W, act_W], new_WA)
            hist_WT = hist_WT[parent_W].at[:, t].set(act_W)
            recs_WT4 = recs_WT4[parent_W].at[:, t].set(rec_WA4[parent_W, act_W])
            score_W = cand_C[top_W]
            if n_forced:
                forced, f_rec_K4 = jax.vmap(lambda s, a: step(s, a, key))(forced, forced_KT[:, t])
                f_recs_KT4 = f_recs_KT4.at[:, t].set(f_rec_K4)
            return (beams, score_W, hist_WT, recs_WT4, forced, f_recs_KT4), None

        carry = (beams, score_W, hist_WT, recs_WT4, forced, f_recs_KT4)
        (_, score_W, hist_WT, recs_WT4, _, f_recs_KT4), _ = jax.lax.scan(
            body, carry, jnp.arange(n_steps)
        )
        all_hist = jnp.concatenate([hist_WT, forced_KT], axis=0)
        all_recs = jnp.concatenate([recs_WT4, f_recs_KT4], axis=0)
        best = jnp.argmax(all_recs[..., 0].sum(-1))
        return all_hist[best], all_recs[best]

    run = jax.jit(jax.vmap(one_seed, in_axes=(0, 0, 1)))
    actions_ST, recs_ST4 = run(reset_S, steps_ST, forced_KST)
    recs = np.asarray(recs_ST4)
    return Rollouts(np.asarray(actions_ST), recs[..., 0], recs[..., 1], recs[..., 2],
                    recs[..., 3])


# ---------------------------------------------------------------------------- table rows


@dataclass(frozen=True)
class ReferenceConfig:
    """The reference rows of Table III (:func:`reference_rows`)."""

    train_seeds: tuple[int, ...] = tuple(range(100, 116))
    """Env seeds on which the static allocation and the heuristic's constants are chosen
    (disjoint from the evaluation seeds)."""
    beam_width: int = 8
    """Beam of the hindsight search (per evaluation seed; x actions candidates per step)."""

    def invalid(self) -> list[Bad]:
        return at_least(self, 1, "beam_width") + seeds(self, "train_seeds")


REFERENCE_ROWS = {"static": TABLE_ROWS[5], "heuristic": TABLE_ROWS[6], "hindsight": TABLE_ROWS[7]}
"""``--methods`` key -> Table III row name of the three reference rows."""


def reference_rows(env, env_params, protocol: EvalProtocol, cfg: ReferenceConfig,
                   which: Sequence[str] = ("static", "heuristic", "hindsight")):
    """Best static, adaptive heuristic and hindsight rows, scored on ``protocol``.

    Returns ``(rows, rollouts, info)``: :class:`~sfjax.baselines.report.MethodResult` rows,
    the evaluation :class:`Rollouts` by row name, and what was chosen on the training seeds.
    The hindsight search carries the other two rows' action sequences along.
    """
    from sfjax.baselines.evaluation import evaluate_policy
    from sfjax.baselines.report import MethodResult

    if shared := protocol.shared_seeds(cfg.train_seeds):
        raise ValueError(f"ReferenceConfig.train_seeds and the evaluation seeds share {shared}: "
                         "the static allocation and the heuristic would be chosen on the "
                         "trajectories they are scored on")
    train = EvalProtocol(seeds=cfg.train_seeds, num_steps=protocol.num_steps,
                         key_offset=protocol.key_offset)
    n_train = len(cfg.train_seeds) * protocol.num_steps
    prbs = _unwrapped(env).config.prbs_per_action
    rows, rollouts, info = [], {}, {}

    def add(name, r: Rollouts, train_samples: int, note: str):
        rollouts[name] = r
        rows.append(MethodResult(name, r.summary(), train_samples, r.num_samples,
                                 len(protocol.seeds), note))

    # always: the heuristic builds on the best static allocation, the bound carries both
    a, utils = best_static_action(env, env_params, train)
    info["static"] = {"action": a, "prbs": int(prbs[a]),
                      "train_utility_by_prbs": dict(zip(map(int, prbs), map(float, utils)))}
    add(TABLE_ROWS[5], evaluate_policy(static_policy(a), env, env_params, protocol),
        n_train * len(prbs),
        f"{prbs[a]} PRB for the controlled slice throughout, the best of every static "
        f"allocation on training seeds {list(cfg.train_seeds)}")
    if "heuristic" in which or "hindsight" in which:
        hp, tuned = tune_heuristic(env, env_params, train, base_action=a)
        info["heuristic"] = tuned
        grid = int(np.prod([len(v) for v in tuned["grid"].values()]))
        add(TABLE_ROWS[6], evaluate_policy(demand_tracking_policy(env, hp), env, env_params,
                                           protocol),
            n_train * grid,
            f"the best static allocation ({prbs[a]} PRB) with demand-driven departures for "
            "either slice, headroom and hysteresis (sfjax.baselines.reference; "
            f"{tuned['best']} chosen on the training seeds)")
    if "hindsight" in which:
        forced = np.stack([rollouts[n].actions for n in rollouts])
        add(TABLE_ROWS[7], hindsight_beam_search(env, env_params, protocol, cfg.beam_width,
                                                 forced),
            0,
            f"beam search (width {cfg.beam_width}) over allocation sequences with the "
            "simulator and each evaluation trajectory's own keys: knows the future, not a "
            "causal policy; an upper reference, not a proven optimum")
    names = {REFERENCE_ROWS[w] for w in which}
    return ([r for r in rows if r.name in names], {k: v for k, v in rollouts.items() if k in names},
            info)
