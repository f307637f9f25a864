"""The Reflexion baseline of Table III on the JAX RAN env (paper section V-B).

    python experiments/reflexion_ranslicing.py smoke --run-dir runs/reflexion_smoke
    python experiments/reflexion_ranslicing.py paper --run-dir runs/reflexion_paper

``smoke``: the behavioural-prior Actor of ``make demo`` and table3's smoke preset (a small
Qwen3-architecture model that stands in for a pretrained LLM's prior, built on first use and
cached; sfjax.agents.prior) with their prompt, the rule-based offline labeller as evaluator (no
LLM; its self-reflections are template text and say so), short trials: the same Reflexion run
as table3's smoke row. The prior learnt to imitate a controller, not to read reflections, so
this tests the machinery, not what an LLM's self-reflection adds. ``paper``: Qwen3-4B Actor,
DeepSeek-R1 (api backend, key from $DEEPSEEK_API_KEY) as evaluator and self-reflection model,
300-step trials.

Writes ``config.json``, ``reflexion/summary.json`` (Table III row, memory, per-trial
metrics), ``reflexion/trials/trial_<k>.json`` (trajectories) and ``state_<k>.json`` (memory,
reflection, metrics after trial k), ``reflexion/eval_rollouts.npz``, ``eval_trajectories.json``
and ``eval_state.json`` (the final evaluation and the memory it was made with) and TensorBoard
scalars under ``tb/``.

RUN_DIR's identity is the configuration that changes results: rerunning with the same one
continues in RUN_DIR: the trials saved there are not run again (a run killed in trial 3 goes on
with trial 3, to the same result), a final evaluation saved for the same memory is loaded
(``eval_state.json``), and the Reflector API's replies are cached there, so finished work costs
no API calls; logging and the API's retry / timeout / concurrency options may differ. Any other
difference is refused with the keys named; ``--resume`` then reruns with the run's own values
for them.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_common  # noqa: E402

from sfjax import atomic, compile_cache, device_memory
from sfjax.agents.actor import PAPER_ACTOR, ActorConfig
from sfjax.agents.prior import PRIOR_LABEL, SMOKE_PROMPT, PriorConfig
from sfjax.agents.prompts import PromptConfig
from sfjax.agents.reflector import ReflectorConfig, make_reflector
from sfjax.agents.reflexion import (
    ReflexionActor,
    ReflexionConfig,
    load_done_trials,
    run_reflexion,
    trial_state,
)
from sfjax.agents.summary import format_reflexion_summary
from sfjax.agents.trajectory import save_json, save_trajectories
from sfjax.baselines.evaluation import EvalProtocol, evaluate_agent, evaluate_once
from sfjax.baselines.llm_agent import (
    LLMEnvAgent,
    check_given_action_range,
    load_actor,
    prompt_config_for_env,
)
from sfjax.baselines.report import MethodResult
from sfjax.configcheck import Bad, seeds
from sfjax.console import configure_logging
from sfjax.envs.ran import RanSlicingConfig, RanSlicingEnv

SF_ACTOR = "(the SF base Actor)"
"""table3.py's --reflexion.checkpoint when unset: the Reflexion row runs on SF's base Actor
(--sf.model.*), and table3 checks the Actor options itself."""


@dataclass(frozen=True)
class Config:
    """Reflexion on the JAX RAN slicing env."""

    run_dir: Path = Path("runs/reflexion")
    """Output directory (created)."""
    resume: bool = False
    """Run again in a RUN_DIR whose run had other values for options that change results,
    with the run's own values (a warning names them). A run dir holding a run with the same
    config is run again even without this flag."""
    checkpoint: str = "Qwen/Qwen3-4B"
    """Actor checkpoint (directory or hub id); empty with ``--prior`` or ``--tiny``. In
    table3.py, unset means SF's base Actor (--sf.model.*), and with the SF row any other
    value is refused: Table III compares both LLM rows on one base Actor."""
    prior: bool = False
    """Use the behavioural-prior Actor (``--prior-config.*``; sf_ranslicing's
    ``--model.prior``): a small Qwen3 that STANDS IN for a pretrained LLM's prior, trained by
    sfjax to imitate a flawed controller; built once and cached (``python -m
    sfjax.agents.prior``). With the same prior config, env and prompt it is the same model as
    SF's. In table3.py leave it unset: there the Actor is SF's (--sf.model.prior)."""
    tiny: bool = False
    """Write a tiny random Qwen3-architecture checkpoint into RUN_DIR/tiny_actor and use it
    (the machinery only: its decisions are noise). In table3.py leave it unset."""
    prior_config: PriorConfig = field(default_factory=PriorConfig)
    """The behavioural prior built with ``--prior`` (sf_ranslicing's ``--prior.*``)."""
    dtype: str = "bfloat16"
    """Actor parameter dtype: bfloat16 or float32."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """Actor prompt and sampling (its action range is set from the env)."""
    reflector: ReflectorConfig = field(default_factory=lambda: ReflectorConfig(backend="api"))
    """Evaluator / self-reflection backend (api = DeepSeek-R1 in the paper)."""
    reflexion: ReflexionConfig = field(default_factory=ReflexionConfig)
    """Trials and verbal memory."""
    env: RanSlicingConfig = field(default_factory=RanSlicingConfig)
    """Scenario of the JAX env."""
    protocol: EvalProtocol = field(default_factory=EvalProtocol)
    """Shared evaluation protocol (the same seeds for every method of Table III)."""
    eval_seed: int = 1
    """Seed of the Actor's sampling during the final evaluation."""
    log_level: str = "INFO"
    """Python logging level of the progress lines (DEBUG, INFO, WARNING, ERROR)."""

    def invalid(self) -> list[Bad]:
        """One Actor (a checkpoint, the prior or the tiny random model); the trials' env seeds
        must not be evaluation seeds: the verbal memory would have been written on the
        trajectories it is scored on."""
        bad = seeds(self, "eval_seed")
        if self.checkpoint != SF_ACTOR:  # table3's value: table3 checks its Actor options
            if self.prior and self.tiny:
                bad.append(Bad("tiny", "left unset with --prior (one Actor)"))
            bad += cli_common.checkpoint_with_switch(self.checkpoint, self.prior, self.tiny)
            if not (self.checkpoint or self.prior or self.tiny):
                bad.append(Bad("checkpoint", "a checkpoint path or hub id (or --prior or --tiny; "
                               "in table3.py: unset, for SF's base Actor --sf.model.*)"))
        if shared := self.protocol.shared_seeds(self.reflexion.trial_seeds):
            why = f"both hold {shared}, trajectories Reflexion's trials learn on"
            bad.append(Bad("protocol.seeds", f"disjoint from --reflexion.trial-seeds: {why}"))
        return bad


# The behavioural prior and prompt of sf_ranslicing's smoke preset (``make demo``): the same
# cached model, and the same Reflexion run as table3's smoke row.
SMOKE = Config(
    run_dir=Path("runs/reflexion_smoke"),
    checkpoint="",
    prior=True,
    dtype="float32",
    actor=ActorConfig(prompt=SMOKE_PROMPT, max_new_tokens=24, free_budget=8),
    reflector=ReflectorConfig(backend="rule"),
    reflexion=ReflexionConfig(trials=2, trial_seeds=(100,), trial_steps=10, memory_size=2),
    protocol=EvalProtocol(seeds=(0, 1), num_steps=300),
)
# the same Actor decoding budget as the SF paper preset (Table III compares like with like)
PAPER = Config(run_dir=Path("runs/reflexion_paper"), actor=PAPER_ACTOR)
PRESETS = {
    "smoke": ("behavioural-prior Actor (a small Qwen3 standing in for a pretrained LLM, as in "
              "make demo and table3 smoke), rule-based evaluator (no LLM), 2 short trials", SMOKE),
    "paper": ("Qwen3-4B Actor, DeepSeek-R1 evaluator/self-reflection, 3 x 300-step trials", PAPER),
}


OPERATIONAL = (
    "run_dir",
    "resume",
    "log_level",
    "prior_config.cache_dir",  # where the prior is cached, not which one (its hash leaves it out)
    *cli_common.REFLECTOR_OPERATIONAL,
)
"""Options that may change between runs in one RUN_DIR: they do not change results."""

REFLEXION_WITH_PRIOR = (
    "Reflexion with this Actor: the small model learnt only to imitate a controller's "
    "decisions with fixed-phrase reflections; it cannot reason about its own mistakes, so the "
    "verbal memory it is given is text it was never trained to read. This row shows the prior "
    "acting with extra text in its prompt, not what an LLM's self-reflection adds"
)
"""What a Reflexion run (or Table III row) on the behavioural prior means, in its outputs."""


def prepare(cfg: Config) -> Config:
    """Refuse what would otherwise be replaced silently or mixed, before anything runs: an
    action range other than the env's, a RUN_DIR holding a run with another config
    (:func:`cli_common.prepare_run_dir`); returns the config to run (with ``--resume``, the
    run's own values)."""
    check_given_action_range(cfg.actor.prompt, RanSlicingEnv(cfg.env))
    _, cfg = cli_common.prepare_run_dir(cfg, cfg.run_dir, OPERATIONAL, what="Reflexion run")
    return cfg


def actor_checkpoint(cfg: Config, env_cfg, prompt_cfg: PromptConfig) -> str:
    """The Actor's checkpoint: ``--prior``'s cached one for this env and env-derived prompt
    (built first when missing; sf_ranslicing's ``--model.prior`` finds the same one),
    ``--tiny``'s in RUN_DIR/tiny_actor (written once) or ``--checkpoint``."""
    if cfg.prior:
        from sfjax.agents.prior import ensure_prior

        return str(ensure_prior(cfg.prior_config, env_cfg, prompt_cfg))
    if not cfg.tiny:
        return cfg.checkpoint
    from sfjax import testing

    path = cfg.run_dir / "tiny_actor"
    if not path.exists():  # swapped in whole: a kill mid-write leaves none
        with atomic.replace_dir(path) as tmp:
            testing.write_tiny_checkpoint(tmp, seed=0)
    return str(path)


def final_evaluation(actor, env, params, cfg: Config, memory: list[str], out_dir: Path):
    """The Actor with its final ``memory`` on the shared protocol (``eval_rollouts.npz``,
    ``eval_trajectories.json``), loaded instead when ``eval_state.json`` says it was measured
    with this memory, seeds, decisions and sampling seed (:func:`evaluate_once`)."""
    state = {"memory": memory, "seeds": cfg.protocol.seeds, "num_steps": cfg.protocol.num_steps,
             "eval_seed": cfg.eval_seed}
    agent = LLMEnvAgent(actor, env, params, jax.random.key(cfg.eval_seed))

    def evaluate():
        logging.getLogger("reflexion").info(
            "evaluating the Actor with its final memory: %d env seeds x %d decisions",
            len(cfg.protocol.seeds), cfg.protocol.num_steps,
        )  # fmt: skip
        return evaluate_agent(agent, env, params, cfg.protocol)

    return evaluate_once(out_dir, state, evaluate, "Reflexion's final Actor", lambda:
                         save_trajectories(out_dir / "eval_trajectories.json", agent.trajectories))


def run(
    cfg: Config,
    env: RanSlicingEnv,
    writer=None,
    *,
    progress: bool = True,
    actor_prior: bool | None = None,
) -> tuple[MethodResult, dict]:
    """Reflexion trials, then the frozen-memory evaluation on the shared protocol
    (``progress=False``: no api Reflector progress bar; the log lines stay). ``actor_prior``:
    whether the Actor is the behavioural prior, for the provenance (``None``: ``cfg.prior``;
    table3 passes SF's base Actor as ``cfg.checkpoint`` and says)."""
    out_dir = cfg.run_dir / "reflexion"
    out_dir.mkdir(parents=True, exist_ok=True)
    params = env.default_params
    actor_cfg = dataclasses.replace(cfg.actor, prompt=prompt_config_for_env(env, cfg.actor.prompt))
    checkpoint = actor_checkpoint(cfg, env.config, actor_cfg.prompt)
    actor_prior = cfg.prior if actor_prior is None else actor_prior
    actor = load_actor(checkpoint, actor_cfg, dtype=cfg.dtype, actor_cls=ReflexionActor)
    reflector = make_reflector(
        cfg.reflector, actor_cfg.prompt, cache_dir=cfg.run_dir / "cache", progress=progress
    )

    trials_dir = out_dir / "trials"

    def on_trial(k, record):
        save_trajectories(trials_dir / f"trial_{k + 1}.json", record.trajectories[-1])
        save_json(trials_dir / f"state_{k + 1}.json", trial_state(record))  # after its trajectories
        if writer is not None:
            for metric, (mean, _) in record.trial_metrics[-1].items():
                writer.add_scalar(f"reflexion/trial/{metric}", mean, k + 1)

    # the trials a killed run finished are not run again (the run dir holds this config's run)
    done = load_done_trials(trials_dir, cfg.reflexion.trials)
    with device_memory.during("the Reflexion trials"):  # an out-of-memory error names them
        record = run_reflexion(actor, reflector, env, params, cfg.reflexion, on_trial=on_trial,
                               done=done)  # fmt: skip
    with device_memory.during("Reflexion's final evaluation"):
        rollouts = final_evaluation(actor, env, params, cfg, record.memory, out_dir)
    actor_name = f"{checkpoint} (the behavioural prior)" if actor_prior else checkpoint
    provenance = f"actor {actor_name}, evaluator/self-reflection {reflector.name}"
    row = MethodResult(
        name="Reflexion",
        summary=rollouts.summary(),
        train_samples=record.env_samples,
        eval_samples=rollouts.num_samples,
        num_trajectories=len(cfg.protocol.seeds),
        note=f"{cfg.reflexion.trials} trials, memory of {cfg.reflexion.memory_size}; {provenance}",
    )
    summary = {
        "row": dataclasses.asdict(row),
        "provenance": provenance,
        **({"actor_prior": PRIOR_LABEL} if actor_prior else {}),
        "memory": record.memory,
        "reflections": record.reflections,
        "trial_metrics": record.trial_metrics,
        "trial_evaluations": [dataclasses.asdict(e) for e in record.trial_evaluations],
    }
    atomic.write_json(out_dir / "summary.json", summary, indent=2)
    if writer is not None:
        for metric, (mean, _) in row.summary.items():
            writer.add_scalar(f"reflexion/eval/{metric}", mean, cfg.reflexion.trials)
        writer.flush()
    return row, summary


def prior_note() -> str:
    """What the summary says under the provenance when the Actor is the behavioural prior."""
    return f"The Actor is a {PRIOR_LABEL}. {REFLEXION_WITH_PRIOR}."


def main(cfg: Config) -> dict:
    from tensorboardX import SummaryWriter

    configure_logging(cfg.log_level)
    compile_cache.enable()
    cfg = prepare(cfg)
    env = RanSlicingEnv(cfg.env)
    writer = SummaryWriter(str(cfg.run_dir / "tb"))
    try:
        row, summary = run(cfg, env, writer)
    finally:
        writer.close()
    print(
        format_reflexion_summary(
            row.summary, cfg.run_dir, provenance=summary["provenance"],
            trials=cfg.reflexion.trials, num_trajectories=row.num_trajectories,
            num_steps=cfg.protocol.num_steps, trial_metrics=summary["trial_metrics"],
            tiny_actor=cfg.tiny, actor_note=prior_note() if cfg.prior else "",
        )  # fmt: skip
    )
    return summary


if __name__ == "__main__":
    cli_common.run_cli(main, cli_common.run_cli(cli_common.parse, PRESETS, sys.argv[1:], __doc__))
