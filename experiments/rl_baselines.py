"""Train the RL baselines of Table III (DQN, PPO, SAC-discrete; rejax) on the JAX RAN env.

    python experiments/rl_baselines.py smoke --run-dir runs/rl_smoke
    python experiments/rl_baselines.py paper --run-dir runs/rl_paper
    python experiments/rl_baselines.py paper --rl.algos dqn --rl.seeds 0 1 2 3 4

Writes, under ``--run-dir``: ``tb/`` (TensorBoard: per-round utility, SE, reconfigurations,
violations per algorithm and seed — Fig. 2), ``<algo>/curves.npz``, ``<algo>/eval_rollouts.npz``
(evaluation on the shared protocol seeds), ``<algo>/summary.json``, ``table_rl.md`` (the RL rows
of Table III) and ``fig2.png``.

RUN_DIR's identity is the configuration that changes results: rerunning with the same one
continues, loading each algorithm whose results were saved for it (a run killed during SAC
trains only SAC; ``sfjax.baselines.runner.run_rl_baselines``); ``--log-level`` may differ. Any
other difference is refused with the keys named, so that one RUN_DIR never mixes two
configurations' curves and rows; ``--resume`` then runs with the run's own values for them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_common  # noqa: E402

from sfjax import compile_cache
from sfjax.baselines import rl
from sfjax.baselines.evaluation import EvalProtocol
from sfjax.baselines.report import Table3Inputs, plot_fig2, write_table3
from sfjax.baselines.runner import ROW_NAMES, RLRunConfig, run_rl_baselines
from sfjax.baselines.summary import format_rl_summary, preset_of
from sfjax.console import configure_logging
from sfjax.envs.ran import RanSlicingConfig, RanSlicingEnv
from sfjax.provenance import describe_run


@dataclass(frozen=True)
class Config:
    """RL baselines on the JAX RAN slicing env."""

    run_dir: Path = Path("runs/rl_baselines")
    """Output directory (created)."""
    resume: bool = False
    """Run again in RUN_DIR with its own values for the options that change results (a warning
    names those given otherwise now). A run dir holding a run with the same config is run again
    even without this flag."""
    env: RanSlicingConfig = field(default_factory=RanSlicingConfig)
    """Scenario of the JAX env (paper section V-A)."""
    rl: RLRunConfig = field(default_factory=RLRunConfig)
    """Algorithms, seeds, budget and hyperparameters."""
    protocol: EvalProtocol = field(default_factory=EvalProtocol)
    """Shared evaluation protocol (same seeds as table3.py uses for every method)."""
    log_level: str = "INFO"
    """Python logging level of the progress lines (DEBUG, INFO, WARNING, ERROR)."""


SMOKE = Config(
    run_dir=Path("runs/rl_smoke"),
    rl=RLRunConfig(
        seeds=(0, 1),
        budget=rl.Budget(rounds=3, trajectories_per_round=4, steps_per_trajectory=50),
        dqn=rl.DQNConfig(fill_buffer=200, batch_size=64, target_update_freq=200),
        ppo=rl.PPOConfig(rollout_steps=25, num_minibatches=2),
        sac=rl.SACConfig(fill_buffer=200, batch_size=64),
    ),
    protocol=EvalProtocol(seeds=(0, 1), num_steps=300),
)
PAPER = Config(run_dir=Path("runs/rl_paper"))

PRESETS = {
    "smoke": (
        "a few hundred env steps per baseline, 2 seeds; runs in about a minute on a CPU",
        SMOKE,
    ),
    "paper": ("80 rounds x 20 trajectories x 300 steps per seed, 3 seeds (paper V-C)", PAPER),
}


OPERATIONAL = ("run_dir", "resume", "log_level")
"""Options that may change between runs in one RUN_DIR: they do not change results."""


def prepare(cfg: Config) -> Config:
    """Refuse a RUN_DIR holding a run with another config before anything runs or is written
    (:func:`cli_common.prepare_run_dir`); returns the config to run (with ``--resume``, the
    run's own values)."""
    what = "run of the RL baselines"
    _, cfg = cli_common.prepare_run_dir(cfg, cfg.run_dir, OPERATIONAL, what=what)
    return cfg


def main(cfg: Config, preset: str = "") -> dict:
    from tensorboardX import SummaryWriter

    configure_logging(cfg.log_level)
    compile_cache.enable()
    cfg = prepare(cfg)
    env = RanSlicingEnv(cfg.env)
    writer = SummaryWriter(str(cfg.run_dir / "tb"))
    try:
        runs = run_rl_baselines(
            cfg.rl, env, env.default_params, cfg.protocol, cfg.run_dir, writer=writer
        )
    finally:
        writer.close()
    rows = [r.row for r in runs.values()]
    write_table3(
        cfg.run_dir / "table_rl.md",
        rows,
        Table3Inputs(
            protocol=cfg.protocol, llm_provenance="(no LLM rows in this run)", preset=preset,
            environment=describe_run(cfg.run_dir),
        ),
    )
    plot_fig2(cfg.run_dir / "fig2.png", {ROW_NAMES[k]: r.train.curves for k, r in runs.items()})
    out = {
        k: {"summary": r.row.summary, "wall_time_s": r.train.wall_time_s} for k, r in runs.items()
    }
    print((cfg.run_dir / "table_rl.md").read_text())
    print(
        format_rl_summary(
            rows, cfg.run_dir, seeds=cfg.rl.seeds, env_steps_per_seed=cfg.rl.budget.total_steps,
            eval_seeds=cfg.protocol.seeds, eval_steps=cfg.protocol.num_steps,
            wall_s={ROW_NAMES[k]: r.train.wall_time_s for k, r in runs.items()},
        )  # fmt: skip
    )
    return out


def cli(argv: list[str] | None = None) -> Config:
    """Pick a preset (``smoke`` / ``paper``) and override any field from the command line."""
    return cli_common.run_cli(cli_common.parse, PRESETS, argv, __doc__)


if __name__ == "__main__":
    cli_common.run_cli(main, cli(sys.argv[1:]), preset_of(sys.argv[1:], PRESETS))
