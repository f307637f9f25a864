r"""Hyperparameter search for Table III's RL baselines (DQN, PPO, SAC; rejax) on validation seeds.

    python experiments/rl_search.py smoke --run-dir runs/rl_search_smoke
    python experiments/rl_search.py paper --run-dir runs/rl_search_paper
    python experiments/rl_search.py paper --rl.budget.rounds 20 --run-dir runs/rl_search_r20
    python experiments/rl_search.py paper --run-dir runs/rl_search_grid \
        --grid dqn.learning_rate=1e-4,3e-4,1e-3 ppo.ent_coef=0,0.01 sac.target_entropy_ratio=0.5,0.7

Every candidate configuration is trained and evaluated as table3.py / rl_baselines.py do it
(sfjax.baselines.runner.train_and_evaluate: its training seeds vmapped in one program, the
greedy policy of each on the shared evaluation protocol), with the same training keys and the
same per-step env keys for every candidate, so candidates are compared paired.

The grid: by default, per algorithm, the learning rate at x1/3, x1 and x3 of the base config's
(the preset's and --rl.<algo>.* values; 3e-4 gives 1e-4, 3e-4, 9e-4). --grid replaces it for
the algorithms it names with the cartesian product of their axes (algo.field=v1,v2,...; a field
of DQNConfig / PPOConfig / SACConfig in sfjax/baselines/rl.py, nested ones dotted:
dqn.network.activation=relu,swish). The base config is always a candidate: every other one is
compared with it.

Held out. Table III is reported on env seeds 0-15 (benchmarks/RESULTS.md; table3.py's default
--protocol.seeds): choosing on those would be tuning on the test set. The candidates
are scored on the validation env seeds (--validation.seeds, default 100-115: the trajectories the
reference rows choose their static allocation and heuristic constants on), and validation seeds
among --reported-seeds or table3.py's default seeds are refused. The training seeds default to
100, 101, 102, not table3.py's and rl_baselines.py's 0, 1, 2, so that the table's row of a
winner is not the very networks that won the choice.

Budget: --rl.budget.* as in rl_baselines.py; the paper preset trains every candidate at the
paper's budget (80 rounds x 20 trajectories x 300 steps = 480,000 samples per seed). A search
at fewer rounds (--rl.budget.rounds 20) costs proportionally less, but its choice is an
approximation of the paper-budget choice: which learning rate or exploration setting is best
can change with the budget (one that learns fastest in 20 rounds may be unstable by 80), so
the winner's row at the paper's budget (table3.py) is what to report.

Writes, under --run-dir: configs/<id>.json per candidate (its config, per-trajectory metrics
[training seed, validation seed], per-round training curves, wall time), search.md and
search.json (one row per candidate: mean utility on the validation seeds, its 95 % interval
over training seeds, the paired difference with the base config, SE / reconfigurations /
violations; the best per algorithm marked) and config.json; prints the table and the
table3.py options of the winners (those that differ from the defaults).

RUN_DIR's identity is the configuration that changes results; --grid, --rl.algos and
--log-level may differ (they choose which candidates run, not what they give). A rerun with the
same identity, or with --resume, continues: a candidate whose configs/<id>.json is there is not
trained again. Another identity is refused with the keys named; --resume then continues with
the run's own values for them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_common  # noqa: E402
import rl_baselines  # noqa: E402

from sfjax import atomic, compile_cache  # noqa: E402
from sfjax.baselines import rl, search  # noqa: E402
from sfjax.baselines.evaluation import EvalProtocol  # noqa: E402
from sfjax.baselines.runner import ROW_NAMES, RLRunConfig, train_and_evaluate  # noqa: E402
from sfjax.baselines.summary import preset_of  # noqa: E402
from sfjax.configcheck import Bad, ConfigError  # noqa: E402
from sfjax.console import configure_logging  # noqa: E402
from sfjax.envs.ran import RanSlicingConfig, RanSlicingEnv  # noqa: E402

log = logging.getLogger("rl_search")

REPORTED_SEEDS = tuple(range(16))
"""Env seeds Table III's measured rows are reported on (benchmarks/RESULTS.md)."""
TABLE3_TRAINING_SEEDS = RLRunConfig().seeds
"""table3.py's and rl_baselines.py's training seeds (0, 1, 2)."""


@dataclass(frozen=True)
class Config:
    """Hyperparameter search for the RL baselines, scored on validation env seeds."""

    run_dir: Path = Path("runs/rl_search")
    """Output directory (created)."""
    resume: bool = False
    """Continue the search in RUN_DIR with its own values for the options that change results
    (a warning names those given otherwise now). A run dir holding a search with the same
    config is continued even without this flag; finished candidates are never trained again."""
    grid: tuple[str, ...] = ()
    """Axes to search, algo.field=v1,v2,... (e.g. dqn.learning_rate=1e-4,3e-4,1e-3
    ppo.ent_coef=0,0.01): the cartesian product per algorithm. An algorithm without an axis
    here searches its learning rate at x1/3, x1, x3 of its base config's."""
    env: RanSlicingConfig = field(default_factory=RanSlicingConfig)
    """Scenario of the JAX env (paper section V-A)."""
    rl: RLRunConfig = field(default_factory=lambda: RLRunConfig(seeds=(100, 101, 102)))
    """Algorithms, training seeds, budget and the base hyperparameters the grid varies."""
    validation: EvalProtocol = field(
        default_factory=lambda: EvalProtocol(seeds=tuple(range(100, 116)))
    )
    """Evaluation protocol of the candidates: validation env seeds, disjoint from
    --reported-seeds."""
    reported_seeds: tuple[int, ...] = REPORTED_SEEDS
    """Env seeds Table III reports on (held out: refused as validation seeds, as are
    table3.py's default --protocol.seeds)."""
    log_level: str = "INFO"
    """Python logging level of the progress lines (DEBUG, INFO, WARNING, ERROR)."""

    @property
    def held_out(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.reported_seeds) | set(EvalProtocol().seeds)))

    def invalid(self) -> list[Bad]:
        shared = sorted(set(self.validation.seeds) & set(self.held_out))
        if not shared:
            return []
        return [Bad("validation.seeds", f"disjoint from the seeds Table III reports on "
                    f"({search.fmt_seeds(self.held_out)}; --reported-seeds and table3.py's "
                    f"default --protocol.seeds): choosing on {shared} would tune on the test "
                    "set; use e.g. 100-115")]  # fmt: skip


SMOKE = Config(
    run_dir=Path("runs/rl_search_smoke"),
    rl=dataclasses.replace(rl_baselines.SMOKE.rl, seeds=(100, 101)),
    validation=EvalProtocol(seeds=(100, 101), num_steps=300),
)
PAPER = Config(run_dir=Path("runs/rl_search_paper"))
PRESETS = {
    "smoke": ("rl_baselines.py's smoke budget (a few hundred env steps per seed), 2 training "
              "seeds, 2 validation seeds: 9 candidates in a few minutes on a CPU", SMOKE),
    "paper": ("80 rounds x 20 trajectories x 300 steps per seed, 3 training seeds, 16 validation "
              "seeds (paper V-C budget)", PAPER),
}  # fmt: skip

OPERATIONAL = ("run_dir", "resume", "log_level", "grid", "rl.algos")
"""Options that may change between runs in one RUN_DIR: they choose which candidates run, not
their results."""


def plan(cfg: Config, env) -> list[search.Candidate]:
    """Every candidate, algorithm by algorithm, each checked against the budget (a PPO rollout
    length that does not divide the trajectory ...) before anything trains."""
    try:
        grid = search.parse_grid(cfg.grid, cfg.rl.algos)
    except ValueError as e:
        raise ConfigError(f"--grid: {e}") from None
    out = []
    for algo in cfg.rl.algos:
        base = cfg.rl.algo_config(algo)
        for c in search.candidates(algo, base, grid.get(algo) or search.default_axes(base)):
            try:
                rl.make_algo(algo, c.config, env, env.default_params, cfg.rl.budget)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"--grid: {algo} candidate {c.label}: {e}") from None
            out.append(c)
    return out


def prepare(cfg: Config, env) -> tuple[Config, list[search.Candidate]]:
    """Refuse a bad grid and a RUN_DIR holding another search before anything runs or is
    written (:func:`cli_common.prepare_run_dir`); returns the config to run (with ``--resume``,
    the run's own values) and its candidates."""
    plan(cfg, env)
    _, cfg = cli_common.prepare_run_dir(
        cfg, cfg.run_dir, OPERATIONAL, what="hyperparameter search of the RL baselines"
    )
    if shared := sorted(set(cfg.rl.seeds) & set(TABLE3_TRAINING_SEEDS)):
        log.warning("training seeds %s are also table3.py's: its rows of the winners would be "
                    "networks this search chose on", shared)  # fmt: skip
    return cfg, plan(cfg, env)


def settings(cfg: Config, c: search.Candidate) -> dict:
    """What a candidate's result depends on, as JSON (a finished one is reused only if it
    matches)."""
    parts = {"config": c.config, "seeds": cfg.rl.seeds, "budget": cfg.rl.budget,
             "deterministic_eval": cfg.rl.deterministic_eval, "validation": cfg.validation,
             "env": cfg.env}  # fmt: skip
    as_dict = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
               for k, v in parts.items()}  # fmt: skip
    return json.loads(json.dumps({"algo": c.algo, **as_dict}, default=str))


def record_path(cfg: Config, c: search.Candidate) -> Path:
    return cfg.run_dir / "configs" / f"{c.id}.json"


def finished(cfg: Config, c: search.Candidate) -> dict | None:
    """The candidate's saved result in RUN_DIR if it was computed with these settings."""
    path = record_path(cfg, c)
    if not path.exists():
        return None
    rec = atomic.read_json(path, f"the search's result of {c.algo} {c.label}")
    if rec.get("settings") != settings(cfg, c):
        log.warning("%s was computed with other settings: training %s %s again", path, c.algo,
                    c.label)  # fmt: skip
        return None
    return rec


def train_candidate(cfg: Config, c: search.Candidate, env) -> dict:
    """Train and evaluate one candidate (runner.train_and_evaluate); its JSON record."""
    start = time.perf_counter()
    run = train_and_evaluate(
        dataclasses.replace(cfg.rl, **{c.algo: c.config}), c.algo, env, env.default_params,
        cfg.validation,
    )  # fmt: skip
    return {
        "algo": c.algo,
        "id": c.id,
        "label": c.label,
        "axes": dict(c.axes),
        "is_default": c.is_default,
        "settings": settings(cfg, c),
        "per_episode": {k: v.tolist() for k, v in run.rollouts.per_episode().items()},
        "curves": {k: np.asarray(v).tolist() for k, v in run.train.curves.items()},
        "train_samples": run.row.train_samples,
        "eval_samples": run.row.eval_samples,
        "train_wall_time_s": run.train.wall_time_s,
        "wall_time_s": time.perf_counter() - start,
    }


def run_search(cfg: Config, env, candidates: list[search.Candidate]) -> dict[str, dict]:
    """Every candidate's record (id -> record): those finished in RUN_DIR read back, the
    others trained, one progress line each with the time left."""
    records = {c.id: rec for c in candidates if (rec := finished(cfg, c)) is not None}
    todo = len(candidates) - len(records)
    log.info("search: %d candidates (%s), %d already finished in %s, %d to train", len(candidates),
             ", ".join(f"{a}: {sum(c.algo == a for c in candidates)}" for a in cfg.rl.algos),
             len(records), cfg.run_dir, todo)  # fmt: skip
    walls: dict[str, list[float]] = {}
    for i, c in enumerate(candidates, 1):
        head = f"config {i}/{len(candidates)} {c.algo} {c.label}"
        if c.id in records:
            log.info("%s: finished in %s, not trained again", head, record_path(cfg, c))
            continue
        log.info("%s: training %d seeds x %s env steps, then %d validation seeds", head,
                 len(cfg.rl.seeds), f"{cfg.rl.budget.total_steps:,}",
                 len(cfg.validation.seeds))  # fmt: skip
        rec = train_candidate(cfg, c, env)
        atomic.write_json(record_path(cfg, c), rec, indent=1)
        records[c.id] = rec
        walls.setdefault(c.algo, []).append(rec["wall_time_s"])
        left = [p.algo for p in candidates[i:] if p.id not in records]
        eta = search.time_left(walls, left)
        log.info("%s done in %s: validation utility %.0f; %s", head,
                 search.fmt_duration(rec["wall_time_s"]),
                 float(np.mean(rec["per_episode"]["utility"])),
                 f"~{search.fmt_duration(eta)} left for {len(left)} more" if left
                 else "the last one")  # fmt: skip
    return records


def table3_preset(preset: str) -> str:
    """The table3.py preset a search's winners go with: ``smoke`` for the smoke search (the same
    RL base configs), else ``paper``."""
    return "smoke" if preset == "smoke" else "paper"


def results(cfg: Config, candidates: list[search.Candidate], records: dict[str, dict],
            preset: str = "") -> dict:  # fmt: skip
    """search.json's content: one scored row per candidate, the winner of each algorithm and
    the table3.py options that give the winners (against that table3.py preset's RL configs)."""
    rows, winners, flags = [], {}, {}
    base = rl_baselines.PRESETS[table3_preset(preset)][1].rl
    for algo in cfg.rl.algos:
        mine = [c for c in candidates if c.algo == algo]
        default = next(c for c in mine if c.is_default)
        base_u = np.asarray(records[default.id]["per_episode"]["utility"])
        scored = []
        for c in mine:
            rec = records[c.id]
            per_episode = {k: np.asarray(v) for k, v in rec["per_episode"].items()}
            row = search.score(per_episode, None if c.is_default else base_u)
            scored.append({"algo": algo, "id": c.id, "label": c.label, "axes": dict(c.axes),
                           "is_default": c.is_default, **row, "wall_time_s": rec["wall_time_s"],
                           "best": False})  # fmt: skip
        top = search.best([r["utility"] for r in scored], mine.index(default))
        scored[top]["best"] = True
        winners[algo] = scored[top]["id"]
        flags[algo] = search.table3_flags(algo, mine[top].config, base.algo_config(algo))
        rows += scored
    paper = cfg.rl.budget == rl.Budget()
    return {
        "settings": {
            "algos": list(cfg.rl.algos),
            "training_seeds": list(cfg.rl.seeds),
            "budget": dataclasses.asdict(cfg.rl.budget),
            "paper_budget": paper,
            "validation": dataclasses.asdict(cfg.validation),
            "held_out_seeds": list(cfg.held_out),
            "grid": list(cfg.grid),
        },
        "rows": rows,
        "winners": winners,
        "table3_flags": flags,
        "table3_command": table3_command(cfg, flags, table3_preset(preset)),
    }


def table3_command(cfg: Config, flags: dict[str, list[str]], preset: str = "paper") -> str:
    """table3.py's RL and reference rows with the winners, on the held-out seeds."""
    seeds = cfg.reported_seeds
    contiguous = seeds and list(seeds) == list(range(seeds[0], seeds[0] + len(seeds)))
    given = "" if not seeds else (  # explicit even when table3's default: a record
        f" --protocol.seeds $(seq {seeds[0]} {seeds[-1]})" if contiguous
        else " --protocol.seeds " + " ".join(map(str, seeds)))  # fmt: skip
    extra = "".join(f" {f}" for algo in cfg.rl.algos for f in flags[algo])
    if not cfg.rl.deterministic_eval:  # table3.py's default evaluates the greedy policy
        extra += " --rl.no-deterministic-eval"
    return (f".venv/bin/python experiments/table3.py {preset} --methods {' '.join(cfg.rl.algos)} "
            f"static heuristic hindsight{given}{extra} --run-dir runs/table3_rl_tuned")  # fmt: skip


def _ci(lo, hi) -> str:
    return "n/a (one seed)" if lo is None else f"[{lo:,.0f}, {hi:,.0f}]"


def markdown(cfg: Config, out: dict, preset: str = "") -> str:
    """search.md: the settings, one table per algorithm, the winners' table3.py options."""
    s = out["settings"]
    b = cfg.rl.budget
    budget = (f"{b.rounds} rounds x {b.trajectories_per_round} trajectories x "
              f"{b.steps_per_trajectory} steps = {b.total_steps:,} env samples per training seed")  # fmt: skip
    lines = [
        "# RL baselines: hyperparameter search on validation seeds",
        "",
        f"Preset: {preset or 'custom config'}. Budget: {budget}"
        + (" (the paper's)." if s["paper_budget"] else
           f" — **not the paper's** ({rl.Budget().total_steps:,}): the choice below is an "
           "approximation of the choice at the paper's budget, where the ranking may differ."),
        f"Training seeds {search.fmt_seeds(cfg.rl.seeds)} (the same training keys for every "
        f"candidate); validation env seeds {search.fmt_seeds(cfg.validation.seeds)}, "
        f"{cfg.validation.num_steps}-step trajectories, "
        f"{'greedy' if cfg.rl.deterministic_eval else 'stochastic'} policies. Held out, never "
        f"evaluated here: env seeds {search.fmt_seeds(cfg.held_out)} (Table III's).",
        "Utility: eq. 15 summed over a trajectory, mean over training seeds x validation seeds; "
        "95 % t interval over training seeds (df = seeds - 1). − default: the paired difference "
        "with the algorithm's default config (same training seed, same validation seed), its "
        "interval over training seeds; * = the interval excludes 0.",
    ]  # fmt: skip
    if shared := sorted(set(cfg.rl.seeds) & set(TABLE3_TRAINING_SEEDS)):
        lines.append(f"Note: training seeds {shared} are also table3.py's.")
    for algo in cfg.rl.algos:
        lines += ["", f"## {ROW_NAMES[algo]}", "",
                  "| config | Utility | 95 % CI | − default [95 % CI] | Avg. SE | Reconf. times | "
                  "PQoS vio. | wall |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in (r for r in out["rows"] if r["algo"] == algo):
            ci = r["utility_ci"] or (None, None)
            d = r["vs_default"]
            diff = "—" if d is None else (
                f"{d['diff']:+,.0f} {_ci(d['ci_low'], d['ci_high'])}"
                f"{' *' if d['significant'] else ''}")  # fmt: skip
            name = f"**{r['label']}** (best)" if r["best"] else r["label"]
            lines.append(f"| {name} | {r['utility']:,.0f} | {_ci(*ci)} | {diff} | "
                         f"{r['mean_se']:.3f} | {r['reconfigurations']:.1f} | "
                         f"{r['violations']:.1f} | {search.fmt_duration(r['wall_time_s'])} |")  # fmt: skip
    lines += ["", "## table3.py options for the winners", ""]
    for algo in cfg.rl.algos:
        win = next(r for r in out["rows"] if r["id"] == out["winners"][algo])
        flags = " ".join(out["table3_flags"][algo]) or "(the defaults: no option)"
        note = ""
        if not win["is_default"] and not (win["vs_default"] or {}).get("significant"):
            note = " — not significantly better than the default on these training seeds"
        lines.append(f"- {ROW_NAMES[algo]}: `{flags}`{note}")
    lines += ["", "```bash", out["table3_command"], "```", ""]
    if cfg.env != RanSlicingConfig():
        lines += ["The search ran on a scenario other than the default (--env.* given): give "
                  "table3.py the same --env.* options.", ""]  # fmt: skip
    return "\n".join(lines)


def main(cfg: Config, preset: str = "") -> dict:
    configure_logging(cfg.log_level)
    compile_cache.enable()
    env = RanSlicingEnv(cfg.env)
    cfg, candidates = prepare(cfg, env)
    records = run_search(cfg, env, candidates)
    out = results(cfg, candidates, records, preset)
    out["preset"] = preset
    atomic.write_json(cfg.run_dir / "search.json", out, indent=2)
    text = markdown(cfg, out, preset)
    atomic.write_text(cfg.run_dir / "search.md", text)
    print(text)
    print(f"Written: {cfg.run_dir / 'search.md'}, {cfg.run_dir / 'search.json'}, per candidate "
          f"{cfg.run_dir / 'configs'}/<id>.json")  # fmt: skip
    return out


def cli(argv: list[str] | None = None) -> Config:
    """Pick a preset (``smoke`` / ``paper``) and override any field from the command line."""
    return cli_common.run_cli(cli_common.parse, PRESETS, argv, __doc__)


if __name__ == "__main__":
    cli_common.run_cli(main, cli(sys.argv[1:]), preset_of(sys.argv[1:], PRESETS))
