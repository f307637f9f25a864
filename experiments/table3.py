r"""Table III, Fig. 2 and Fig. 3 of the paper from our own runs, in one command.

    python experiments/table3.py smoke --run-dir runs/table3_smoke
    python experiments/table3.py paper --run-dir runs/table3_paper \
        --sf.model.checkpoint /path/to/Qwen3-4B         # DEEPSEEK_API_KEY in the environment
    python experiments/table3.py smoke --methods dqn ppo sac --run-dir runs/table3_rl  # some rows

Every method is trained / adapted, then evaluated on the SAME environment seeds with the
same per-step environment keys and ``--protocol.num-steps``-decision trajectories (300, as in
the paper) by one shared evaluation function (:mod:`sfjax.baselines.evaluation`):

* SF — experiments/sf_ranslicing.py's Algorithm 1 run (Actor + LoRA, Reflector, RfR, KTO),
  then the final adapter is loaded and the Actor evaluated;
* Reflexion — experiments/reflexion_ranslicing.py: the same base Actor (no weight updates),
  verbal memory from its trials, the same Reflector backend as evaluator/self-reflection;
* DQN, PPO, SAC — experiments/rl_baselines.py (rejax), the greedy policies of every seed.

Writes to ``--run-dir``: ``table3.md`` (mean ± std, environment samples per method, which
actor and reflector produced the LLM rows), ``fig2.png`` (RL training curves per round with
the LLM agents' evaluated values), ``fig3.png`` (SF metrics before/after fine-tuning and the
KTO chosen/rejected reward curves per KTO iteration), ``results.json``, and each method's own
outputs in ``sf/``, ``reflexion/``, ``dqn/``, ``ppo/``, ``sac/``, ``tb/``, and ``config.json``.

RUN_DIR's identity is the configuration that changes results (every row's options): rerunning
with the same one continues the SF row from its checkpoints (RUN_DIR/sf has its own check),
loads each RL row whose results were saved for this config (``dqn/``, ``ppo/``, ``sac/``),
continues the Reflexion row after its saved trials, loads each LLM row's evaluation saved for
the same Actor (``sf/eval_state.json``: its adapter; ``reflexion/eval_state.json``: its memory)
and computes the reference rows again; logging, the Reflector API's retry / timeout /
concurrency options and the SF row's memory options (``sf_ranslicing.MEMORY_ONLY``: results the
same up to float rounding) may differ. Any other difference is refused with the keys named;
``--resume`` then continues with the run's own values for them.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_common  # noqa: E402
import reflexion_ranslicing  # noqa: E402
import rl_baselines  # noqa: E402
import sf_ranslicing  # noqa: E402

from sfjax import atomic, compile_cache  # noqa: E402
from sfjax.agents.env import JaxRanRunner  # noqa: E402
from sfjax.agents.prior import PRIOR_LABEL, PriorConfig  # noqa: E402
from sfjax.baselines.compare import ROW_FILES  # noqa: E402
from sfjax.baselines.evaluation import EvalProtocol, evaluate_agent, evaluate_once  # noqa: E402
from sfjax.baselines.llm_agent import (  # noqa: E402
    LLMEnvAgent,
    check_given_action_range,
    load_actor,
    prompt_config_for_env,
)
from sfjax.baselines.reference import REFERENCE_ROWS, ReferenceConfig, reference_rows  # noqa: E402
from sfjax.baselines.report import (  # noqa: E402
    MethodResult,
    Table3Inputs,
    kto_iteration_curves,
    plot_fig2,
    plot_fig3,
    read_scalar_events,
    write_table3,
)
from sfjax.baselines.runner import ROW_NAMES, RLRunConfig, run_rl_baselines  # noqa: E402
from sfjax.baselines.summary import (  # noqa: E402
    format_table3_summary,
    preset_of,
    tiny_actor_note,
)
from sfjax.configcheck import Bad, changed_leaves, option, seeds  # noqa: E402
from sfjax.console import configure_logging  # noqa: E402
from sfjax.envs.ran import RanSlicingEnv  # noqa: E402
from sfjax.envs.scenario import RanSlicingConfig  # noqa: E402
from sfjax.provenance import describe_run  # noqa: E402

log = logging.getLogger("table3")
Method = Literal["sf", "reflexion", "dqn", "ppo", "sac", "static", "heuristic", "hindsight"]


@dataclass(frozen=True)
class Config:
    """Every method of Table III on one env and one evaluation protocol."""

    run_dir: Path = Path("runs/table3")
    """Output directory (created)."""
    resume: bool = False
    """Continue the run in RUN_DIR with its own values for the options that change results (a
    warning names those given otherwise now); the SF row resumes from its last checkpoint. A
    run dir holding a run with the same config is continued even without this flag."""
    methods: tuple[Method, ...] = ("sf", "reflexion", "dqn", "ppo", "sac", "static", "heuristic",
                                   "hindsight")
    """Rows to produce: the paper's methods and the reference rows (best static allocation,
    adaptive heuristic, hindsight beam search; sfjax.baselines.reference)."""
    env: RanSlicingConfig = field(default_factory=RanSlicingConfig)
    """The simulated RAN and its scoring objective (``--env.objective.*``), shared by every
    method (overrides the sub-configs' env): the RL reward, the LLM agents' task text and the
    table all use it."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """Reference rows: training seeds for the static / heuristic choice, hindsight beam width."""
    protocol: EvalProtocol = field(default_factory=EvalProtocol)
    """Shared evaluation protocol: env seeds and trajectory length (paper: 300)."""
    sf: sf_ranslicing.ExperimentConfig = field(default_factory=lambda: _sub(sf_ranslicing.PAPER))
    """Self-finetuning run. Its run dir (RUN_DIR/sf), env (--env) and resumption (--resume) are
    this script's: leave --sf.run-dir, --sf.env.* and --sf.resume unset."""
    reflexion: reflexion_ranslicing.Config = field(
        default_factory=lambda: _sub(reflexion_ranslicing.PAPER)
    )
    """Reflexion run on SF's base Actor (--sf.model.*: its checkpoint, the behavioural prior
    or the tiny random model) unless --reflexion.checkpoint is given; with the SF row too it
    must be that Actor, in SF's dtype (--reflexion.dtype = --sf.model.dtype then). Its run dir,
    env, protocol, eval seed and resumption are this script's,
    and so is the choice of prior or tiny Actor: leave --reflexion.run-dir, --reflexion.env.*,
    --reflexion.protocol.*, --reflexion.eval-seed, --reflexion.resume, --reflexion.prior,
    --reflexion.tiny and --reflexion.prior-config.* unset."""
    rl: RLRunConfig = field(default_factory=RLRunConfig)
    """RL baselines. The algorithms come from ``--methods``: leave --rl.algos unset."""
    eval_seed: int = 1
    """Seed of the LLM Actors' sampling during evaluation."""
    log_level: str = "INFO"
    """Python logging level of the progress lines (DEBUG, INFO, WARNING, ERROR)."""

    def __post_init__(self):
        if not self.methods:
            raise ValueError(
                "--methods is empty; choose among sf reflexion dqn ppo sac static heuristic "
                "hindsight"
            )

    def invalid(self) -> list[Bad]:
        """Sub-config values this script sets itself must not be given: they were silently
        replaced."""
        ours = "left unset: table3 sets it (RUN_DIR/sf)"
        bad = seeds(self, "eval_seed")
        bad += [] if self.sf.run_dir == SUB_RUN_DIR else [Bad("sf.run_dir", ours)]
        if self.reflexion.run_dir != Path(SUB_RUN_DIR):
            bad.append(Bad("reflexion.run_dir", "left unset: table3 sets it (RUN_DIR)"))
        shared = "left unset: table3's --env.* / --protocol.* / --eval-seed apply to every method"
        bad += changed_leaves(self.sf.env, RanSlicingConfig(), "sf.env", shared)
        bad += changed_leaves(self.reflexion.env, RanSlicingConfig(), "reflexion.env", shared)
        bad += changed_leaves(self.reflexion.protocol, EvalProtocol(), "reflexion.protocol", shared)
        if self.reflexion.eval_seed != reflexion_ranslicing.Config.eval_seed:
            bad.append(Bad("reflexion.eval_seed", shared))
        if self.rl.algos != RLRunConfig().algos:
            bad.append(Bad("rl.algos", "left unset: --methods chooses the RL rows"))
        bad += [Bad(f"{sub}.resume", "left unset: table3's --resume applies to its rows")
                for sub in ("sf", "reflexion") if getattr(self, sub).resume]  # fmt: skip
        # every reference row chooses the static allocation on the training seeds (the
        # hindsight bound carries the static and heuristic rows' actions along)
        learnt_on = [("reference.train_seeds", self.reference.train_seeds,
                      {"static", "heuristic", "hindsight"} & set(self.methods)),
                     ("reflexion.reflexion.trial_seeds", self.reflexion.reflexion.trial_seeds,
                      "reflexion" in self.methods)]  # fmt: skip
        bad += [Bad("protocol.seeds", f"disjoint from {option(path)}: both hold {shared}, "
                    "trajectories that row learns or chooses on")
                for path, learnt, used in learnt_on
                if used and (shared := self.protocol.shared_seeds(learnt))]
        # one way to choose the Reflexion row's Actor: SF's (--sf.model.*, --sf.prior.*), or
        # without the SF row --reflexion.checkpoint; its own prior / tiny switches would be
        # ignored (or build a second prior for another prompt than the SF row's)
        actor = ("left unset: the Reflexion row runs on SF's base Actor (--sf.model.prior, "
                 "--sf.model.tiny, --sf.prior.*) or, without the SF row, on "
                 "--reflexion.checkpoint")  # fmt: skip
        bad += [Bad(f"reflexion.{k}", actor) for k in ("prior", "tiny")
                if getattr(self.reflexion, k)]  # fmt: skip
        bad += changed_leaves(self.reflexion.prior_config, PriorConfig(), "reflexion.prior_config",
                              actor)  # fmt: skip
        given, sf_model = self.reflexion.checkpoint, self.sf.model
        if reflexion_uses_sf_actor(self) and self.reflexion.dtype != sf_model.dtype:
            # the Reflexion row loads SF's base Actor, in the dtype both LLM rows share
            bad.append(Bad("reflexion.dtype", f"--sf.model.dtype's value ({sf_model.dtype!r}): "
                           "the Reflexion row loads SF's base Actor; give both or neither"))
        if {"sf", "reflexion"} <= set(self.methods) and given != SF_ACTOR:
            # Table III compares both LLM rows on one base Actor: SF's
            if sf_model.tiny or sf_model.prior or given != sf_model.checkpoint:
                why = "left unset (or --sf.model.checkpoint's value) with the SF row: both"
                bad.append(Bad("reflexion.checkpoint", f"{why} LLM rows use SF's base Actor"))
        return bad


SUB_RUN_DIR = "(set by table3)"
"""What the sub-runs' run_dir shows in --help: table3 puts them under its own RUN_DIR."""
SF_ACTOR = reflexion_ranslicing.SF_ACTOR
"""--reflexion.checkpoint left unset: the Reflexion row uses SF's base Actor (--sf.model.*)."""


def _sub(cfg):
    """A sub-experiment's preset with the fields table3 sets itself at their neutral values."""
    kw = {"run_dir": SUB_RUN_DIR if isinstance(cfg.run_dir, str) else Path(SUB_RUN_DIR)}
    if isinstance(cfg, reflexion_ranslicing.Config):
        kw.update(env=RanSlicingConfig(), protocol=EvalProtocol(), eval_seed=1,
                  checkpoint=SF_ACTOR, prior=False, tiny=False, prior_config=PriorConfig())
    else:
        kw.update(env=RanSlicingConfig())
    return dataclasses.replace(cfg, **kw)


SMOKE = Config(
    run_dir=Path("runs/table3_smoke"),
    protocol=EvalProtocol(seeds=(0, 1), num_steps=300),
    # One SF iteration (as the paper's Table III SF row) keeps the smoke run short.
    sf=_sub(
        dataclasses.replace(
            sf_ranslicing.SMOKE,
            loop=dataclasses.replace(sf_ranslicing.SMOKE.loop, sf_iterations=1),
        )
    ),
    # reflexion_ranslicing's smoke run (the prompt of the SF row) on the SF row's Actor: the
    # behavioural prior
    reflexion=_sub(reflexion_ranslicing.SMOKE),
    rl=rl_baselines.SMOKE.rl,
    reference=ReferenceConfig(train_seeds=(100, 101), beam_width=4),
)
PAPER = Config(run_dir=Path("runs/table3_paper"))
PRESETS = {
    "smoke": ("behavioural-prior Actor (a small Qwen3 standing in for a pretrained LLM), rule "
              "reflector, short training; 300-step evaluation", SMOKE),
    "paper": ("Qwen3-4B + DeepSeek-R1 LLM agents, RL with 80x20x300 samples per seed", PAPER),
}


OPERATIONAL = (
    "run_dir",
    "resume",
    "log_level",
    *(f"sf.{k}" for k in sf_ranslicing.OPERATIONAL),
    *(f"reflexion.{k}" for k in reflexion_ranslicing.OPERATIONAL),
)
"""Options that may change between runs in one RUN_DIR: they do not change results (SF's
:data:`sf_ranslicing.MEMORY_ONLY` up to float rounding)."""


def prepare(cfg: Config) -> Config:
    """Refuse what would otherwise be replaced silently or mixed, before anything runs or is
    written: an LLM Actor's action range other than the env's, a RUN_DIR holding a run with
    another config (:func:`cli_common.prepare_run_dir`). Returns the config to run (with
    ``--resume``, the run's own values)."""
    env = RanSlicingEnv(cfg.env)
    check_given_action_range(cfg.sf.actor.prompt, env, "sf.actor.prompt")
    check_given_action_range(cfg.reflexion.actor.prompt, env, "reflexion.actor.prompt")
    earlier = {f"sf.{k}": v for k, v in sf_ranslicing.EARLIER.items()}
    _, cfg = cli_common.prepare_run_dir(cfg, cfg.run_dir, OPERATIONAL, what="Table III run",
                                        earlier=earlier,
                                        noted=[f"sf.{k}" for k in sf_ranslicing.MEMORY_ONLY])
    return cfg


def sf_config(cfg: Config) -> sf_ranslicing.ExperimentConfig:
    """The SF row's run: in RUN_DIR/sf, on table3's env, resumed with table3's --resume (its
    own RUN_DIR check then applies in RUN_DIR/sf)."""
    return dataclasses.replace(
        cfg.sf, run_dir=str(cfg.run_dir / "sf"), env=cfg.env, resume=cfg.resume
    )


def reflexion_uses_sf_actor(cfg: Config) -> bool:
    return "sf" in cfg.methods or cfg.reflexion.checkpoint == SF_ACTOR


def reflexion_actor_is_prior(cfg: Config) -> bool:
    """The Reflexion row's Actor is the behavioural prior (SF's, ``--sf.model.prior``)."""
    return reflexion_uses_sf_actor(cfg) and cfg.sf.model.prior


def reflexion_checkpoint(cfg: Config) -> str:
    """The Reflexion row's Actor: SF's base Actor (built first when it is the prior or a tiny
    random one and the SF row has not built it), or ``--reflexion.checkpoint`` without the SF
    row."""
    if reflexion_uses_sf_actor(cfg):
        return sf_ranslicing.base_checkpoint(sf_config(cfg))
    return cfg.reflexion.checkpoint


def run_sf(cfg: Config, env, writer) -> tuple[MethodResult, dict]:
    """Algorithm 1, then the final Actor (base + adapter) on the shared protocol; a rerun loads
    the evaluation saved for the same adapter, base Actor, seeds, decisions and sampling seed
    (:func:`evaluate_once`)."""
    sf_cfg = sf_config(cfg)
    log.info("SF row: Algorithm 1 in %s", sf_cfg.run_dir)
    summary = sf_ranslicing.run(sf_cfg, progress=False)
    actor_cfg = dataclasses.replace(
        sf_cfg.actor, prompt=prompt_config_for_env(env, sf_cfg.actor.prompt)
    )
    ckpt = sf_ranslicing.base_checkpoint(sf_cfg, actor_cfg.prompt)
    adapter = Path(sf_cfg.run_dir) / "adapter"
    state = {"base": str(ckpt), "adapter": {p.name: atomic.sha256_file(p)
                                       for p in sorted(adapter.iterdir()) if p.is_file()},
             "seeds": cfg.protocol.seeds, "num_steps": cfg.protocol.num_steps,
             "eval_seed": cfg.eval_seed}  # fmt: skip

    def evaluate():
        log.info("SF row: evaluating the fine-tuned Actor on env seeds %s x %d decisions",
                 list(cfg.protocol.seeds), cfg.protocol.num_steps)  # fmt: skip
        actor = load_actor(ckpt, actor_cfg, dtype=sf_cfg.model.dtype, adapter_dir=str(adapter))
        agent = LLMEnvAgent(actor, env, env.default_params, jax.random.key(cfg.eval_seed))
        return evaluate_agent(agent, env, env.default_params, cfg.protocol)

    rollouts = evaluate_once(sf_cfg.run_dir, state, evaluate, "the SF row's Actor")
    loop = sf_cfg.loop
    samples = loop.sf_iterations * loop.num_envs * loop.trajectory_steps
    row = MethodResult(
        name="SF",
        summary=rollouts.summary(),
        train_samples=samples,
        eval_samples=rollouts.num_samples,
        num_trajectories=len(cfg.protocol.seeds),
        note=(
            f"{loop.sf_iterations} SF iteration(s) x {loop.num_envs} trajectory(ies) x "
            f"{loop.trajectory_steps} steps, {sf_cfg.rfr.kto_iterations} KTO iterations each; "
            f"actor {ckpt} + LoRA; reflector {summary.get('reflector', '?')}"
        ),
    )
    return row, summary


def fig3_inputs(sf_dir: Path, summary: dict) -> tuple[list[dict], dict, str]:
    """KTO reward curves per KTO iteration (from TensorBoard), before/after metrics (on the
    held-out seeds when the SF run measured them, else in-sample) and where they come from."""
    iters = kto_iteration_curves(read_scalar_events(sf_dir / "tb"))
    if not iters or not any(it["rewards/chosen"] for it in iters):
        # No per-step points (e.g. iterations skipped for lack of data): per-iteration means,
        # each at the iteration's last global KTO step.
        entries = [e for r in summary.get("iterations", []) for e in r.get("kto_iterations", [])]
        ends = np.cumsum([int(e.get("kto/num_steps", 0)) for e in entries])
        iters = [
            {
                k: [(int(end), e[f"kto/{k}"])] if f"kto/{k}" in e else []
                for k in ("rewards/chosen", "rewards/rejected")
            }
            for e, end in zip(entries, ends)
        ]
    held = (summary.get("held_out") or {}).get("metrics")
    if held:
        keep = ("mean_se", "reconfigurations", "violations")
        before_after = {k: (held[k]["before"], held[k]["after"]) for k in keep if k in held}
        return iters, before_after, f"held-out seeds {summary['held_out']['seeds']}"
    its = summary.get("iterations", [])
    before_after = {}
    if len(its) >= 2:
        names = {
            "avg_se": "mean_se",
            "reconfigurations": "reconfigurations",
            "violations": "violations",
        }
        before_after = {
            new: (its[0][old], its[-1][old]) for old, new in names.items() if old in its[0]
        }
    return iters, before_after, "in-sample: the trajectories the Reflector labelled"


def main(cfg: Config, preset: str = "") -> dict:
    from tensorboardX import SummaryWriter

    configure_logging(cfg.log_level)
    compile_cache.enable()
    cfg = prepare(cfg)  # writes config.json
    env = JaxRanRunner(cfg.env, cfg.protocol.num_steps).env
    writer = SummaryWriter(str(cfg.run_dir / "tb"))
    rows: list[MethodResult] = []
    wall: dict[str, float] = {}
    provenance = []
    sf_summary = None
    try:
        if "sf" in cfg.methods:
            t0 = time.perf_counter()
            row, sf_summary = run_sf(cfg, env, writer)
            rows.append(row)
            wall["SF"] = time.perf_counter() - t0
            provenance.append(
                f"SF: actor {sf_summary.get('actor')} + LoRA, reflector "
                f"{sf_summary.get('reflector')}"
            )
            if cfg.sf.model.prior:
                provenance.append(f"the Actor is a {PRIOR_LABEL}")
        if "reflexion" in cfg.methods:
            t0 = time.perf_counter()
            refl_cfg = dataclasses.replace(
                cfg.reflexion,
                run_dir=cfg.run_dir,
                protocol=cfg.protocol,
                eval_seed=cfg.eval_seed,
                checkpoint=reflexion_checkpoint(cfg),
            )
            log.info("Reflexion row: %d trials, then the evaluation", refl_cfg.reflexion.trials)
            prior = reflexion_actor_is_prior(cfg)
            row, summary = reflexion_ranslicing.run(
                refl_cfg, env, writer, progress=False, actor_prior=prior
            )
            rows.append(row)
            wall["Reflexion"] = time.perf_counter() - t0
            provenance.append(f"Reflexion: {summary['provenance']}")
            if prior:
                if "sf" not in cfg.methods:  # else the SF row's provenance says it
                    provenance.append(f"the Actor is a {PRIOR_LABEL}")
                provenance.append(reflexion_ranslicing.REFLEXION_WITH_PRIOR)
        algos = tuple(m for m in cfg.methods if m in ("dqn", "ppo", "sac"))
        rl_runs = {}
        if algos:
            rl_cfg = dataclasses.replace(cfg.rl, algos=algos)
            rl_runs = run_rl_baselines(
                rl_cfg, env, env.default_params, cfg.protocol, cfg.run_dir, writer
            )
            for name, r in rl_runs.items():
                rows.append(r.row)
                wall[ROW_NAMES[name]] = r.train.wall_time_s
        refs = tuple(m for m in cfg.methods if m in ("static", "heuristic", "hindsight"))
        reference_info = {}
        if refs:
            t0 = time.perf_counter()
            log.info("reference rows %s (training seeds %s)", refs, cfg.reference.train_seeds)
            ref_rows, ref_rollouts, reference_info = reference_rows(
                env, env.default_params, cfg.protocol, cfg.reference, refs
            )
            rows += ref_rows
            for key, name in REFERENCE_ROWS.items():
                if name in ref_rollouts:  # per-step records, read by sfjax.baselines.compare
                    ref_rollouts[name].save(cfg.run_dir / ROW_FILES[key])
            wall["references"] = time.perf_counter() - t0
    finally:
        writer.close()

    note = tiny_actor_note(
        sf="sf" in cfg.methods and cfg.sf.model.tiny,
        # without SF's Actor the row's is --reflexion.checkpoint (its tiny switch is refused)
        reflexion="reflexion" in cfg.methods and reflexion_uses_sf_actor(cfg) and cfg.sf.model.tiny,
    )
    write_table3(
        cfg.run_dir / "table3.md",
        rows,
        Table3Inputs(
            protocol=cfg.protocol,
            llm_provenance="; ".join(provenance) or "(no LLM rows in this run)",
            preset=preset,
            actor_note=note,
            environment=describe_run(cfg.run_dir),
        ),
    )
    llm_rows = [r for r in rows if r.name in ("SF", "Reflexion")]
    plot_fig2(
        cfg.run_dir / "fig2.png",
        {ROW_NAMES[k]: r.train.curves for k, r in rl_runs.items()},
        llm_rows,
        llm_scale=cfg.rl.budget.steps_per_trajectory / cfg.protocol.num_steps,
    )
    if sf_summary is not None:
        iters, before_after, source = fig3_inputs(cfg.run_dir / "sf", sf_summary)
        plot_fig3(cfg.run_dir / "fig3.png", iters, before_after, source)
    results = {
        "rows": [dataclasses.asdict(r) for r in rows],
        "wall_time_s": wall,
        "protocol": dataclasses.asdict(cfg.protocol),
        "reference": reference_info,
    }
    atomic.write_json(cfg.run_dir / "results.json", results, indent=2)
    print((cfg.run_dir / "table3.md").read_text())
    print(format_table3_summary(rows, cfg.run_dir, preset=preset, actor_note=note, wall_s=wall))
    return results


if __name__ == "__main__":
    cfg = cli_common.run_cli(cli_common.parse, PRESETS, sys.argv[1:], __doc__)
    cli_common.run_cli(
        main, cfg, preset_of(sys.argv[1:], PRESETS),
        memory=sf_ranslicing.memory_options(cfg.sf, "sf.", "experiments/table3.py"),
    )  # fmt: skip
