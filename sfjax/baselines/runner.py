"""Train + evaluate + persist the RL baselines (used by experiments/rl_baselines.py and table3.py).

For every algorithm: one jitted, seed-vmapped training run (:func:`sfjax.baselines.rl.train`)
and the trained seeds evaluated on the shared protocol (:func:`train_and_evaluate`, also the
unit of experiments/rl_search.py's hyperparameter search); :func:`run_rl_baselines` adds the
per-round curves to TensorBoard and ``<run_dir>/<algo>/curves.npz``, the evaluation rollouts
(``eval_rollouts.npz``), and ``summary.json`` with the Table III row, wall time and sample
counts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfjax.baselines import rl
from sfjax.baselines.evaluation import EvalProtocol, Rollouts
from sfjax.baselines.report import MethodResult
from sfjax.configcheck import seed_problem

log = logging.getLogger(__name__)

ROW_NAMES = {"dqn": "DQN", "ppo": "PPO", "sac": "SAC"}


@dataclass(frozen=True)
class RLRunConfig:
    """Which RL baselines to train, how, and how to evaluate them."""

    algos: tuple[rl.AlgoName, ...] = rl.ALGOS
    """Algorithms to run, among dqn, ppo, sac."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Training seeds (vmapped in one program per algorithm)."""
    budget: rl.Budget = field(default_factory=rl.Budget)
    """Environment samples per training seed (paper: 80 x 20 x 300)."""
    dqn: rl.DQNConfig = field(default_factory=rl.DQNConfig)
    """DQN hyperparameters."""
    ppo: rl.PPOConfig = field(default_factory=rl.PPOConfig)
    """PPO hyperparameters."""
    sac: rl.SACConfig = field(default_factory=rl.SACConfig)
    """SAC (discrete) hyperparameters."""
    deterministic_eval: bool = True
    """Evaluate the greedy policy (argmax) rather than the behaviour policy."""

    def __post_init__(self):
        bad = [a for a in self.algos if a not in rl.ALGOS]
        if bad:
            raise ValueError(f"unknown RL baseline(s) {bad}; choose among {rl.ALGOS}.")
        if problem := seed_problem(self.seeds):
            raise ValueError(f"RLRunConfig.seeds {self.seeds}: must be {problem} (training "
                             "seeds, one independent run each).")

    def algo_config(self, name: str):
        return getattr(self, name)


@dataclass
class RLRun:
    """One algorithm's outcome."""

    train: rl.TrainResult
    rollouts: Rollouts
    """Evaluation rollouts, [N, S, T]."""
    row: MethodResult


def train_and_evaluate(
    cfg: RLRunConfig, name: rl.AlgoName, env, env_params: Any, protocol: EvalProtocol
) -> RLRun:
    """One algorithm of ``cfg`` (its hyperparameters ``cfg.<name>``): train every seed of
    ``cfg.seeds`` in one program, evaluate each on ``protocol``; its Table III row. Writes
    nothing (the hyperparameter search, experiments/rl_search.py, calls it per candidate)."""
    log.info("training %s: %d seeds x %d env steps", name, len(cfg.seeds), cfg.budget.total_steps)
    result = rl.train(name, cfg.algo_config(name), env, env_params, cfg.budget, cfg.seeds)
    log.info("%s trained in %.1f s; evaluating %d seeds x %d env seeds x %d steps", name,
             result.wall_time_s, len(cfg.seeds), len(protocol.seeds), protocol.num_steps)  # fmt: skip
    rollouts = rl.evaluate_trained(result, env, protocol, cfg.deterministic_eval)
    row = MethodResult(
        name=ROW_NAMES[name],
        summary=rollouts.summary(),
        train_samples=result.env_samples,
        eval_samples=rollouts.num_samples,
        num_trajectories=int(np.prod(rollouts.rewards.shape[:-1])),
        note=(
            f"rejax {name.upper()}, {len(cfg.seeds)} training seeds x "
            f"{len(protocol.seeds)} evaluation seeds, "
            f"{'greedy' if cfg.deterministic_eval else 'stochastic'} policy"
        ),
    )
    s = row.summary
    log.info(
        "%s done: utility %.1f ± %.1f, avg SE %.3f bit/s/Hz, %.1f reconfigurations, %.1f "
        "violating steps per trajectory", name, *s["utility"], s["mean_se"][0],
        s["reconfigurations"][0], s["violations"][0],
    )  # fmt: skip
    return RLRun(result, rollouts, row)


def run_identity(cfg: RLRunConfig, name: str, env, protocol: EvalProtocol) -> dict:
    """What one algorithm's saved results depend on (JSON values): its hyperparameters, the
    budget, training seeds, greedy or not, the evaluation protocol and the env's config."""
    return json.loads(json.dumps({
        "algo": name, "config": dataclasses.asdict(cfg.algo_config(name)),
        "budget": dataclasses.asdict(cfg.budget), "seeds": list(cfg.seeds),
        "deterministic_eval": cfg.deterministic_eval, "protocol": dataclasses.asdict(protocol),
        "env": dataclasses.asdict(env.config),
    }, default=str))  # fmt: skip


def load_finished(d: Path, name: str, identity: dict) -> RLRun | None:
    """The run saved in ``d`` (``<run_dir>/<algo>``) when its ``summary.json`` (written last)
    records ``identity``; None otherwise (nothing saved, another identity, a summary from before
    identities were recorded, or damaged files: a warning, and the algorithm trains again).
    Its ``train.train_state`` is None: the trained networks are not saved."""
    from sfjax import atomic

    path = d / "summary.json"
    if not path.exists():
        return None
    try:
        saved = atomic.read_json(path, "the RL baseline's summary")
        if saved.get("identity") != identity:
            return None
        curves = _read_curves(d)
        rollouts = Rollouts.load(d / "eval_rollouts.npz")
        row = dict(saved["row"])
    except atomic.UNREADABLE as e:
        log.warning("%s: its saved results in %s cannot be read (%s: %s); it trains again",
                    name, d, type(e).__name__, e)  # fmt: skip
        return None
    row = MethodResult(**{**row, "summary": rollouts.summary()})
    train = rl.TrainResult(name=name, algo=None, train_state=None, curves=curves,
                           seeds=tuple(saved["seeds"]), env_samples=row.train_samples,
                           wall_time_s=float(saved["wall_time_s"]))  # fmt: skip
    return RLRun(train, rollouts, row)


def _read_curves(d: Path) -> dict[str, np.ndarray]:
    """``<run_dir>/<algo>/curves.npz`` as arrays."""
    with np.load(d / "curves.npz") as z:
        return {k: z[k] for k in z.files}


def run_rl_baselines(
    cfg: RLRunConfig,
    env,
    env_params: Any,
    protocol: EvalProtocol,
    run_dir: str | Path,
    writer=None,
) -> dict[str, RLRun]:
    """Train, evaluate and save every configured baseline; returns name -> RLRun.

    An algorithm whose results in ``<run_dir>/<algo>/`` were saved for the same
    :func:`run_identity` is loaded, not trained again (a run killed during its third algorithm
    continues there; its TensorBoard points were written when it ran). Files are written whole
    (temporary file, then rename), ``summary.json`` last."""
    from sfjax import atomic

    run_dir = Path(run_dir)
    out: dict[str, RLRun] = {}
    for name in cfg.algos:
        d = run_dir / name
        identity = run_identity(cfg, name, env, protocol)
        done = load_finished(d, name, identity)
        if done is not None:
            log.info("%s: loaded from %s (trained and evaluated before with this config)", name, d)
            out[name] = done
            continue
        run = train_and_evaluate(cfg, name, env, env_params, protocol)
        result, rollouts, row = run.train, run.rollouts, run.row
        atomic.write_npz(d / "curves.npz", result.curves)
        rollouts.save(d / "eval_rollouts.npz")
        atomic.write_json(d / "summary.json", {
            "row": dataclasses.asdict(row),
            "wall_time_s": result.wall_time_s,
            "seeds": list(result.seeds),
            "budget": dataclasses.asdict(cfg.budget),
            "config": dataclasses.asdict(cfg.algo_config(name)),
            "per_seed_eval_utility": rollouts.per_episode()["utility"].mean(-1).tolist(),
            "identity": identity,
        }, indent=2)  # fmt: skip
        if writer is not None:
            rl.write_curves(writer, name, result.curves)
            for metric, (mean, _std) in row.summary.items():
                writer.add_scalar(f"{name}/eval/{metric}", mean, cfg.budget.rounds)
            writer.flush()
        out[name] = run
    return out


def load_curves(run_dir: str | Path, algos: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """Read ``<run_dir>/<algo>/curves.npz`` back (for re-plotting Fig. 2)."""
    out = {}
    for name in algos:
        out[ROW_NAMES.get(name, name)] = _read_curves(Path(run_dir) / name)
    return out
