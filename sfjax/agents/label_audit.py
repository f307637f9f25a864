"""Are the Reflector's labels right? Counterfactual replays of labelled steps in the JAX env.

The Reflector never sees the eq. 15 utility, and nothing in the SF loop checks its verdicts:
RfR makes every improved action a*_t it proposes a desirable example. On the JAX simulator the
verdicts can be checked after the fact. The env is a pure function of its keys, so a
trajectory's recorded actions, replayed with the keys its collect used
(:func:`sfjax.agents.collect.env_key_schedule`), reproduce it step for step; from the state
before any step t the env can then be run again with another action there, on the *same*
arrivals, fading and draws (common random numbers), and the eq. 15 utilities compared.

For every labelled step and every action c of the Actor's range, two counterfactuals:

* ``step``: c at step t alone, the trajectory's own actions after it; utility summed over the
  window [t, t + h). The literal per-step claim "a*_t would have been better than a_t".
* ``hold``: c for the whole run of steps from t on that kept the Actor's action a_t (at most
  ``max_hold`` steps, L), the trajectory's actions after it; window [t, t + L + h). What a
  level-setting label means ("hold 7 while the Actor held 9"; "do not dip for those steps"),
  and closer to what a fine-tuned Actor does in closed loop: its next prompt carries the
  allocation it chose. Rule 4 of the rule labeller (a short dip undone later) is only fairly
  judged here: under ``step`` the dip starts one step later and still costs its
  reconfigurations.

Both count h steps past the deviation (``horizons``), so the reconfiguration back to the
trajectory's action and the queue the deviation left are charged to it. Windows end with the
trajectory. ``gain = U(a*_t) - U(a_t)`` for a suboptimal label (right: > ``tie``, wrong:
< -``tie``); ``best = max_c U(c) - U(a_t)`` is what the best single action in hindsight (the
oracle) would have gained, for every label. What this cannot see: how the Actor would have
answered the changed states after the deviation (the continuation is the trajectory's own
actions), and anything about an env other than the JAX simulator (ns-3 is not replayable).

Usage: ``benchmarks/label_audit.py RUN_DIR`` (a ``sf_ranslicing.py`` run dir) or
:func:`audit` with an env runner and the run's collect key. :func:`relabel` scores other labels
of the same steps (another Reflector's, or another labeller setting's) on an audit's
counterfactuals without simulating again. :func:`hindsight_reflections` turns
an audit into labels (the best action in hindsight) for ``benchmarks/kto_replay.py --labels
hindsight``, a diagnostic that uses the utility. Measured results:
``benchmarks/RESULTS.md``, "Are the rule labeller's labels right?".

Shape legend: E = parallel envs, T = steps, N = labelled steps, C = candidate actions,
H = simulated steps per counterfactual, B = counterfactuals per jitted call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from sfjax.agents.collect import env_key_schedule
from sfjax.agents.env import JaxRanRunner, per_env_keys
from sfjax.agents.trajectory import Reflection, StepLabel, Trajectory
from sfjax.console import progress_bar

MODES = ("hold", "step")
CLASSES = ("asked more", "asked less", "effective")
POOLED = "all suboptimal"
"""The row over every suboptimal label: the net value of what the Reflector asked for."""
REPLAY_FIELDS = ("se", "violation", "reconfiguration")
"""Feedback fields a replay must reproduce before any counterfactual is trusted."""


@dataclass(frozen=True)
class AuditConfig:
    """How the labelled steps are replayed and scored."""

    horizons: tuple[int, ...] = (2, 5, 10)
    """Steps after the deviation each window counts (one set of sums per value)."""
    primary_horizon: int = 5
    """The horizon of the headline table (one of ``horizons``)."""
    max_hold: int = 30
    """Longest run of the Actor's action a ``hold`` counterfactual replaces."""
    tie: float = 0.01
    """|gain| in eq. 15 utility below which a label changed nothing."""
    batch: int = 256
    """Counterfactuals simulated per jitted call (memory vs calls)."""
    se_tolerance: float = 1e-3
    """Largest |SE| difference (bit/s/Hz) a replayed step may show against its record."""

    def invalid(self) -> list[str]:
        bad = []
        if not self.horizons or min(self.horizons) < 1:
            bad.append("horizons must be positive step counts")
        if self.primary_horizon not in self.horizons:
            bad.append(f"primary_horizon {self.primary_horizon} is not one of {self.horizons}")
        if self.max_hold < 1 or self.batch < 1:
            bad.append("max_hold and batch must be >= 1")
        if self.tie < 0 or self.se_tolerance < 0:
            bad.append("tie and se_tolerance must be >= 0")
        return bad


class ReplayMismatch(ValueError):
    """The recorded actions, replayed with the collect's keys, did not reproduce the record."""


@dataclass
class Audit:
    """Counterfactual utilities of every labelled step (arrays over the N labelled steps)."""

    env_index: np.ndarray
    t: np.ndarray
    label: list[str]
    reason: list[str]
    taken: np.ndarray
    """a_t (RBGs)."""
    improved: np.ndarray
    """a*_t (RBGs; = a_t on effective steps)."""
    hold_length: np.ndarray
    """L: steps from t on that kept a_t (capped at ``max_hold``), the ``hold`` run."""
    actions: np.ndarray
    """The candidate actions (RBGs), shape [C]."""
    utility: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    """(mode, horizon) -> eq. 15 utility summed over the window, shape [N, C]."""
    config: AuditConfig = AuditConfig()

    @property
    def classes(self) -> list[str]:
        out = []
        for lab, a, b in zip(self.label, self.taken, self.improved):
            if lab != "suboptimal":
                out.append("effective")
            elif b > a:
                out.append("asked more")
            elif b < a:
                out.append("asked less")
            else:
                out.append("suboptimal, no change")
        return out

    def values(self, mode: str, horizon: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(U(a_t), U(a*_t), max_c U(c)) per labelled step, shape [N] each."""
        u = self.utility[(mode, horizon)]
        col = {int(a): i for i, a in enumerate(self.actions)}
        rows = np.arange(len(self.taken))
        taken = u[rows, [col[int(a)] for a in self.taken]]
        improved = u[rows, [col[int(a)] for a in self.improved]]
        return taken, improved, u.max(axis=1)

    @staticmethod
    def from_json(d: dict) -> Audit:
        """The inverse of :meth:`to_json` (utilities as saved, rounded to 1e-4)."""
        steps = d["steps"]
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in d["config"].items()}
        return Audit(
            env_index=np.asarray([s["env_index"] for s in steps]),
            t=np.asarray([s["t"] for s in steps]),
            label=[s["label"] for s in steps],
            reason=[s["reason"] for s in steps],
            taken=np.asarray([s["taken"] for s in steps]),
            improved=np.asarray([s["improved"] for s in steps]),
            hold_length=np.asarray([s["hold_length"] for s in steps]),
            actions=np.asarray(d["actions"]),
            utility={(k.split("@")[0], int(k.split("@")[1])): np.asarray(v, np.float64)
                     for k, v in d["utility"].items()},  # fmt: skip
            config=AuditConfig(**cfg),
        )

    def to_json(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config),  # tuples become lists
            "actions": self.actions.tolist(),
            "steps": [
                {"env_index": int(e), "t": int(t), "label": lab, "reason": r, "taken": int(a),
                 "improved": int(b), "hold_length": int(n)}
                for e, t, lab, r, a, b, n in zip(self.env_index, self.t, self.label, self.reason,
                                                 self.taken, self.improved, self.hold_length)
            ],  # fmt: skip
            "utility": {f"{m}@{h}": u.round(4).tolist() for (m, h), u in self.utility.items()},
        }


# ------------------------------------------------------------------------------ simulation
def _recorded_actions(trajs: Sequence[Trajectory]) -> np.ndarray:
    """The applied actions as RBGs, shape [T, E] (trajectories in env order)."""
    steps = {len(t.steps) for t in trajs}
    if len(steps) != 1:
        raise ValueError(f"trajectories of different lengths {sorted(steps)}: not one collect")
    return np.asarray([[s.action for s in t.steps] for t in trajs], np.int64).T


def replay(runner: JaxRanRunner, env_key: jax.Array, actions_TE: np.ndarray):
    """Run the recorded actions from the collect's key: (states before each step, stacked
    [T, E, ...]; step keys [T, E]; per-step infos [T, E])."""
    steps, num_envs = actions_TE.shape
    reset_key, step_keys = env_key_schedule(env_key, steps)
    keys_TE = jnp.stack([per_env_keys(k, num_envs) for k in step_keys])
    step = jax.vmap(runner.step_one)

    @jax.jit
    def run(reset_keys_E, keys_TE, idx_TE):
        _, state = jax.vmap(runner.reset_one)(reset_keys_E)

        def body(state, x):
            keys_E, idx_E = x
            _, new, _, _, info = step(keys_E, state, idx_E)
            return new, (state, {k: info[k] for k in REPLAY_FIELDS + ("utility",)})

        _, (states, infos) = jax.lax.scan(body, state, (keys_TE, idx_TE))
        return states, infos

    idx = jnp.asarray(actions_TE - runner.min_rbg, jnp.int32)
    states, infos = run(per_env_keys(reset_key, num_envs), keys_TE, idx)
    return states, keys_TE, jax.device_get(infos)


def check_replay(infos: dict, trajs: Sequence[Trajectory], se_tolerance: float) -> None:
    """Raise :class:`ReplayMismatch` unless the replay reproduces every recorded step."""
    bad = []
    for e, traj in enumerate(trajs):
        for st in traj.steps:
            got = {k: float(np.asarray(infos[k])[st.t, e]) for k in REPLAY_FIELDS}
            rec = {k: float(st.feedback[k]) for k in REPLAY_FIELDS}
            if (abs(got["se"] - rec["se"]) > se_tolerance
                    or got["violation"] != rec["violation"]
                    or got["reconfiguration"] != rec["reconfiguration"]):  # fmt: skip
                bad.append((traj.env_index, st.t, rec, got))
    if bad:
        e, t, rec, got = bad[0]
        raise ReplayMismatch(
            f"{len(bad)} of {sum(len(t.steps) for t in trajs)} replayed steps differ from the "
            f"record (first: env {e}, step {t}: recorded {rec}, replayed {got}). The run's env "
            "config, keys or simulator are not the ones this replay used (another sfjax "
            "version, or a CPU that rounds differently: benchmarks/RESULTS.md, "
            "'Reproducibility across machines'); its counterfactuals would not be about the "
            "labelled steps."
        )


def _hold_lengths(actions_TE: np.ndarray, max_hold: int) -> np.ndarray:
    """L[t, e]: how many steps from t on kept the action of step t (>= 1, <= max_hold)."""
    steps = actions_TE.shape[0]
    out = np.ones_like(actions_TE)
    for t in range(steps - 2, -1, -1):
        same = actions_TE[t] == actions_TE[t + 1]
        out[t] = np.where(same, out[t + 1] + 1, 1)
    return np.minimum(out, max_hold)


def _branch_runner(runner: JaxRanRunner):
    """jit: B counterfactuals from states gathered at (t_B, e_B) -> utilities [B, H]."""

    @jax.jit
    def run(states, t_B, e_B, keys_BH, idx_BH):
        state0 = jax.tree.map(lambda x: x[t_B, e_B], states)

        def one(state, keys_H, idx_H):
            def body(s, x):
                _, new, _, _, info = runner.step_one(x[0], s, x[1])
                return new, info["utility"]

            return jax.lax.scan(body, state, (keys_H, idx_H))[1]

        return jax.vmap(one)(state0, keys_BH, idx_BH)

    return run


def counterfactual_utilities(
    runner: JaxRanRunner,
    states,
    keys_TE: jax.Array,
    actions_TE: np.ndarray,
    starts: Sequence[tuple[int, int]],
    cfg: AuditConfig,
    *,
    progress: bool = True,
) -> tuple[dict[tuple[str, int], np.ndarray], np.ndarray]:
    """Window sums of eq. 15 utility for every start (t, e) and candidate action, both modes:
    ({(mode, h): [N, C]}, hold lengths [N])."""
    steps = actions_TE.shape[0]
    cands = np.arange(runner.action_lo, runner.action_hi + 1)
    hmax = max(cfg.horizons)
    t_N = np.asarray([t for t, _ in starts])
    e_N = np.asarray([e for _, e in starts])
    hold_N = _hold_lengths(actions_TE, cfg.max_hold)[t_N, e_N]
    run = _branch_runner(runner)
    out: dict[tuple[str, int], np.ndarray] = {}
    bar = progress_bar(2 * len(starts) * len(cands), "counterfactuals", enabled=progress)
    for mode in MODES:
        dev_N = np.ones_like(hold_N) if mode == "step" else hold_N
        # each start simulates only the steps its longest window needs (the trajectory ends),
        # rounded up to one of a few lengths (one compile each); most holds are 1-2 steps
        need_N = np.minimum(dev_N + hmax, steps - t_N)
        lengths = sorted({1 + hmax, 2 * (1 + hmax), cfg.max_hold + hmax})
        bucket_N = np.asarray([next(x for x in lengths if x >= n) for n in need_N])
        utils = np.zeros((len(starts), len(cands), max(lengths)), np.float64)
        for length in lengths:
            jobs = [(n, c) for n in np.flatnonzero(bucket_N == length) for c in range(len(cands))]
            for lo in range(0, len(jobs), cfg.batch):
                chunk = jobs[lo : lo + cfg.batch]
                n_B = np.asarray([n for n, _ in chunk] + [chunk[-1][0]] * (cfg.batch - len(chunk)))
                c_B = np.asarray([c for _, c in chunk] + [chunk[-1][1]] * (cfg.batch - len(chunk)))
                t_B, e_B = t_N[n_B], e_N[n_B]
                # steps past the trajectory's end repeat its last key and action: they fall
                # outside every window
                span = np.minimum(t_B[:, None] + np.arange(length)[None, :], steps - 1)
                acts = actions_TE[span, e_B[:, None]]
                in_dev = np.arange(length)[None, :] < dev_N[n_B][:, None]
                acts = np.where(in_dev, cands[c_B][:, None], acts)
                keys = keys_TE[jnp.asarray(span), jnp.asarray(e_B)[:, None]]
                idx = jnp.asarray(acts - runner.min_rbg, jnp.int32)
                u = np.asarray(run(states, jnp.asarray(t_B), jnp.asarray(e_B), keys, idx))
                k = len(chunk)
                utils[n_B[:k], c_B[:k], :length] = u[:k]
                bar.update(k)
        for h in cfg.horizons:
            win = np.minimum(dev_N + h, steps - t_N)  # windows end with the trajectory
            mask = np.arange(utils.shape[2])[None, :] < win[:, None]
            out[(mode, h)] = (utils * mask[:, None, :]).sum(axis=2)
    bar.close()
    return out, hold_N


def audit(
    runner: JaxRanRunner,
    env_key: jax.Array,
    trajs: Sequence[Trajectory],
    refls: Sequence[Reflection],
    cfg: AuditConfig = AuditConfig(),
    *,
    progress: bool = True,
) -> Audit:
    """Replay one collect's trajectories (``env_key``: the key that collect was given, e.g.
    ``LoopConfig.env_key(i)``), check the replay against the record, then score every
    labelled step's counterfactuals (see the module docstring)."""
    bad = cfg.invalid()
    if bad:
        raise ValueError("; ".join(bad))
    trajs = sorted(trajs, key=lambda t: t.env_index)
    if [t.env_index for t in trajs] != list(range(len(trajs))):
        raise ValueError("trajectories must be one collect's envs 0..E-1")
    actions_TE = _recorded_actions(trajs)
    states, keys_TE, infos = replay(runner, env_key, actions_TE)
    check_replay(infos, trajs, cfg.se_tolerance)
    labels = _labelled_steps(refls)
    starts = [(lab.step, e) for e, lab in labels]
    utility, hold_N = counterfactual_utilities(
        runner, states, keys_TE, actions_TE, starts, cfg, progress=progress
    )
    lo, hi = runner.action_lo, runner.action_hi
    return Audit(
        env_index=np.asarray([e for e, _ in labels]),
        t=np.asarray([lab.step for _, lab in labels]),
        label=[lab.label for _, lab in labels],
        reason=[lab.reason for _, lab in labels],
        taken=np.asarray([actions_TE[t, e] for t, e in starts]),
        improved=_improved_actions(labels, lo, hi),
        hold_length=hold_N,
        actions=np.arange(lo, hi + 1),
        utility=utility,
        config=cfg,
    )


def relabel(a: Audit, refls: Sequence[Reflection]) -> Audit:
    """The audit ``a`` with other labels of the same steps (another Reflector, or the rule
    labeller with other settings, on the same trajectories): the counterfactuals do not depend
    on the labels, so nothing is simulated again. The labelled steps must be ``a``'s."""
    labels = _labelled_steps(refls)
    steps = [(e, lab.step) for e, lab in labels]
    if steps != list(zip(a.env_index.tolist(), a.t.tolist())):
        raise ValueError(f"the new labels cover other steps than the audit's ({len(steps)} "
                         f"labelled steps against {len(a.t)}): not the same trajectories?")  # fmt: skip
    return dataclasses.replace(
        a,
        label=[lab.label for _, lab in labels],
        reason=[lab.reason for _, lab in labels],
        improved=_improved_actions(labels, int(a.actions.min()), int(a.actions.max())),
    )


def _labelled_steps(refls: Sequence[Reflection]) -> list[tuple[int, StepLabel]]:
    """Every (env index, label) of ``refls``, ordered by env, then step."""
    labels = sorted(((r.env_index, lab) for r in refls for lab in r.labels),
                    key=lambda x: (x[0], x[1].step))  # fmt: skip
    if not labels:
        raise ValueError("no labelled steps")
    return labels


def _improved_actions(labels: list[tuple[int, StepLabel]], lo: int, hi: int) -> np.ndarray:
    improved = np.asarray([lab.improved_action for _, lab in labels])
    if ((improved < lo) | (improved > hi)).any():
        raise ValueError(f"improved actions outside the Actor's range [{lo}, {hi}]")
    return improved


# ----------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class ClassStats:
    """One class of labels under one (mode, horizon)."""

    cls: str
    n: int
    right: float
    """Share of the class's labels whose a*_t gained more than ``tie`` (nan for effective)."""
    wrong: float
    """Share whose a*_t lost more than ``tie`` (nan for effective)."""
    mean_gain: float
    """Mean U(a*_t) - U(a_t) (0 for effective labels)."""
    gain_ci: tuple[float, float]
    """95 % t interval of mean_gain over trajectories (their per-trajectory means)."""
    mean_best: float
    """Mean max_c U(c) - U(a_t): what the best action in hindsight would have gained."""
    captured: float
    """Sum of gains / sum of best gains (nan for effective)."""
    missed: float
    """Share of steps where some action gained more than ``tie`` over a_t."""
    best_more: float
    """Share of steps whose best action is larger than a_t (of those with a gain > tie)."""


def _t_interval(xs: Sequence[float]) -> tuple[float, float]:
    from sfjax.baselines.paired import t_interval

    _, lo, hi = t_interval(xs)
    return (math.nan, math.nan) if lo is None else (lo, hi)


def class_stats(a: Audit, mode: str, horizon: int) -> list[ClassStats]:
    """Per class of label (:data:`CLASSES`, then 'suboptimal, no change' if any), then
    :data:`POOLED`."""
    u_taken, u_improved, u_best = a.values(mode, horizon)
    gain, best = u_improved - u_taken, u_best - u_taken
    best_action = a.actions[a.utility[(mode, horizon)].argmax(axis=1)]
    classes = np.asarray(a.classes)
    tie = a.config.tie
    out = []
    for cls in CLASSES + ("suboptimal, no change", POOLED):
        m = (classes != "effective") if cls == POOLED else (classes == cls)
        if not m.any():
            if cls in CLASSES or cls == POOLED:
                out.append(ClassStats(cls, 0, *(math.nan,) * 2, math.nan, (math.nan,) * 2,
                                      *(math.nan,) * 4))  # fmt: skip
            continue
        envs = sorted(set(a.env_index[m].tolist()))
        per_traj = [float(gain[m & (a.env_index == e)].mean()) for e in envs]
        has_gain = m & (best > tie)
        sub = cls != "effective"
        out.append(ClassStats(
            cls=cls,
            n=int(m.sum()),
            right=float((gain[m] > tie).mean()) if sub else math.nan,
            wrong=float((gain[m] < -tie).mean()) if sub else math.nan,
            mean_gain=float(gain[m].mean()),
            gain_ci=_t_interval(per_traj),
            mean_best=float(best[m].mean()),
            captured=float(gain[m].sum() / best[m].sum()) if sub and best[m].sum() > 0
            else math.nan,
            missed=float((best[m] > tie).mean()),
            best_more=float((best_action[has_gain] > a.taken[has_gain]).mean())
            if has_gain.any() else math.nan,
        ))  # fmt: skip
    return out


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:.0f} %"


def _num(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:+,.1f}"


def format_audit(a: Audit, title: str = "") -> str:
    """The headline table (primary horizon, both modes) and one line per other horizon."""
    h0 = a.config.primary_horizon
    lines = [title] if title else []
    lines.append(
        f"{len(a.taken)} labelled steps; eq. 15 utility summed over the window "
        f"(hold: the Actor's run of a_t, at most {a.config.max_hold} steps, + h; step: 1 + h), "
        f"h = {h0}; tie = {a.config.tie}"
    )
    for mode in MODES:
        lines.append("")
        lines.append(f"[{mode}] class | n | a* right | a* wrong | gain U(a*)-U(a) [95 % CI "
                     "over trajectories] | best in hindsight | captured | some action better | "
                     "best is larger")  # fmt: skip
        for s in class_stats(a, mode, h0):
            lines.append(
                f"  {s.cls} | {s.n} | {_pct(s.right)} | {_pct(s.wrong)} | {_num(s.mean_gain)} "
                f"[{_num(s.gain_ci[0])}, {_num(s.gain_ci[1])}] | {_num(s.mean_best)} | "
                f"{_pct(s.captured)} | {_pct(s.missed)} | {_pct(s.best_more)}"
            )
    lines.append("")
    lines.append("other horizons (a* right / wrong per suboptimal class; mean gain):")
    for mode in MODES:
        for h in a.config.horizons:
            if h == h0:
                continue
            parts = [f"{s.cls}: {_pct(s.right)} / {_pct(s.wrong)}, {_num(s.mean_gain)}"
                     for s in class_stats(a, mode, h) if s.cls != "effective"]  # fmt: skip
            lines.append(f"  [{mode}, h = {h}] " + "; ".join(parts))
    return "\n".join(lines)


# --------------------------------------------------------------------- hindsight labels
HINDSIGHT_BACKEND = "hindsight oracle (counterfactual eq. 15 utility; a diagnostic, not reward-free)"


def hindsight_reflections(a: Audit, mode: str = "hold", horizon: int | None = None) -> list[Reflection]:
    """Labels from the audit's counterfactuals instead of a Reflector: a step is suboptimal when
    some action beats the Actor's by more than ``tie`` (a*_t = the best one), else effective.
    They are computed from the eq. 15 utility, so an SF iteration trained on them is **not**
    the paper's method: a diagnostic of what labels this good would teach
    (``benchmarks/kto_replay.py --labels hindsight``)."""
    horizon = a.config.primary_horizon if horizon is None else horizon
    u = a.utility[(mode, horizon)]
    u_taken, _, u_best = a.values(mode, horizon)
    best = a.actions[u.argmax(axis=1)]
    by_env: dict[int, list[StepLabel]] = {}
    for n, (e, t) in enumerate(zip(a.env_index.tolist(), a.t.tolist())):
        gain = float(u_best[n] - u_taken[n])
        if gain > a.config.tie:
            lab = StepLabel(t, "suboptimal", int(best[n]),
                            f"[hindsight oracle] {best[n]} gains {gain:+.1f} over the {mode} "
                            f"window (h = {horizon})")  # fmt: skip
        else:
            lab = StepLabel(t, "effective", int(a.taken[n]), "[hindsight oracle] no action gains")
        by_env.setdefault(e, []).append(lab)
    return [Reflection(e, labs, f"hindsight labels ({mode}, h = {horizon})", HINDSIGHT_BACKEND)
            for e, labs in sorted(by_env.items())]  # fmt: skip
