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
        if not self.seeds:
            raise ValueError("RLRunConfig.seeds is empty.")

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


def run_rl_baselines(
    cfg: RLRunConfig,
    env,
    env_params: Any,
    protocol: EvalProtocol,
    run_dir: str | Path,
    writer=None,
) -> dict[str, RLRun]:
    """Train, evaluate and save every configured baseline; returns name -> RLRun."""
    run_dir = Path(run_dir)
    out: dict[str, RLRun] = {}
    for name in cfg.algos:
        run = train_and_evaluate(cfg, name, env, env_params, protocol)
        result, rollouts, row = run.train, run.rollouts, run.row
        d = run_dir / name
        d.mkdir(parents=True, exist_ok=True)
        np.savez(d / "curves.npz", **result.curves)
        rollouts.save(d / "eval_rollouts.npz")
        (d / "summary.json").write_text(
            json.dumps(
                {
                    "row": dataclasses.asdict(row),
                    "wall_time_s": result.wall_time_s,
                    "seeds": list(result.seeds),
                    "budget": dataclasses.asdict(cfg.budget),
                    "config": dataclasses.asdict(cfg.algo_config(name)),
                    "per_seed_eval_utility": rollouts.per_episode()["utility"].mean(-1).tolist(),
                },
                indent=2,
            )
        )
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
        with np.load(Path(run_dir) / name / "curves.npz") as z:
            out[ROW_NAMES.get(name, name)] = {k: z[k] for k in z.files}
    return out
