"""Self-finetuning LLM agent for RAN slicing (paper Algorithms 1-2), end to end.

    python experiments/sf_ranslicing.py smoke --run-dir runs/demo
    python experiments/sf_ranslicing.py paper --run-dir runs/paper \
        --model.checkpoint /path/to/Qwen3-4B            # DEEPSEEK_API_KEY in the environment
    python experiments/sf_ranslicing.py smoke --run-dir runs/demo --resume   # after a kill
    python experiments/sf_ranslicing.py {smoke,paper} --help                 # every option

Presets:
  smoke  the behavioural-prior Actor: a small Qwen3-architecture model that STANDS IN for a
         pretrained LLM's prior, trained by sfjax (supervised) to imitate a demand-tracking
         controller with a deliberate flaw (no hysteresis: it follows every load change),
         built on first use and cached (``python -m sfjax.agents.prior``); the offline
         rule-based hindsight labeller as Reflector (no LLM); the JAX RAN simulator; one SF
         iteration from 4 x 100-step trajectories with 2 KTO iterations; the Actor before and
         after on 6 held-out env seeds. It tests the learning machinery against a rule
         reflector, not the paper's LLM result.
  paper  Qwen3-4B Actor (local path or hub id) with LoRA, DeepSeek-R1 Reflector through an
         OpenAI-compatible API (key read from the environment variable named by
         --reflector.api.api-key-env); as the paper, one SF iteration from a single 300-step
         trajectory with 6 KTO iterations.

Writes to the run dir: ``config.json``, ``trajectories/``, ``reflections/``, ``datasets/``,
``checkpoints/`` (orbax, one per phase), ``tb/`` (TensorBoard: ``train/*`` KTO metrics under
TRL's tags, ``kto_iter/*`` per KTO iteration, ``env/*`` per trajectory, ``rfr/*`` dataset
statistics), ``adapter/`` (final LoRA as a PEFT adapter), ``summary.json`` and the final table
on stdout.

Several hosts: ``python -m sfjax.parallel --distributed [mesh options] -- experiments/
sf_ranslicing.py paper --run-dir /shared/runs/paper ...`` on every host. RUN_DIR must be on a
filesystem all hosts mount (checked at start); process 0 writes every file but the orbax
checkpoints, which all processes write together, and queries the Reflector API.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tyro  # noqa: E402

from sfjax.agents.actor import PAPER_ACTOR, ActorConfig  # noqa: E402
from sfjax.agents.loop import LoopConfig  # noqa: E402
from sfjax.agents.prior import PRIOR_LABEL, SMOKE_PROMPT, PriorConfig  # noqa: E402
from sfjax.agents.reflector import ApiReflectorConfig, ReflectorConfig  # noqa: E402
from sfjax.agents.rfr import RfRConfig  # noqa: E402
from sfjax.envs.scenario import RanSlicingConfig  # noqa: E402
from sfjax.models.lora import LoRAConfig  # noqa: E402
from sfjax.train.kto import KTOConfig  # noqa: E402


@dataclass(frozen=True)
class ModelConfig:
    """The Actor's base model."""

    checkpoint: str = ""
    """HF-layout checkpoint directory or hub id (e.g. Qwen/Qwen3-4B). Empty with ``tiny``."""
    tiny: bool = False
    """Write a tiny random Qwen3-architecture checkpoint into RUN_DIR/tiny_actor and use it."""
    prior: bool = False
    """Use the behavioural-prior Actor (``--prior.*``): a small Qwen3 that STANDS IN for a
    pretrained LLM's prior, trained by sfjax to imitate a flawed controller (no hysteresis,
    many reconfigurations); built once and cached (``python -m sfjax.agents.prior``)."""
    tiny_seed: int = 0
    """Seed of the tiny checkpoint's random weights."""
    dtype: str = "bfloat16"
    """Base weight dtype: bfloat16 or float32 (LoRA params stay float32)."""


@dataclass(frozen=True)
class HeldOutConfig:
    """Held-out evaluation: the Actor before fine-tuning and after the last SF iteration on the
    same env seeds and per-step keys as Table III's protocol, disjoint from the collection's
    keys; paired differences with 95 % intervals go into summary.json (``held_out``)."""

    seeds: tuple[int, ...] = (0, 1, 2, 3)
    """Env seeds of the held-out trajectories (empty: skip the evaluation)."""
    num_steps: int = 300
    """Decisions per held-out trajectory."""
    sampling_seed: int = 1
    """Seed of the Actor's sampling during the evaluation (the same before and after)."""


@dataclass(frozen=True)
class ExperimentConfig:
    """Self-finetuning on the RAN slicing task (paper Algorithm 1)."""

    run_dir: str = "runs/sf_ranslicing"
    """Output directory (checkpoints, TensorBoard, trajectories, summary.json)."""
    resume: bool = False
    """Continue the run in RUN_DIR from its last checkpoint. A run dir holding a run with the
    same config is continued (or, when complete, reported) even without this flag."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The Actor's base model."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters trained by KTO."""
    kto: KTOConfig = field(default_factory=KTOConfig)
    """KTO trainer (one train() call per KTO iteration)."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """Actor prompt and sampling (action range comes from the env)."""
    reflector: ReflectorConfig = field(default_factory=ReflectorConfig)
    """Reflector backend."""
    rfr: RfRConfig = field(default_factory=RfRConfig)
    """Refine-from-Reflection (Algorithm 2)."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Algorithm 1: iterations, trajectories."""
    env: RanSlicingConfig = field(default_factory=RanSlicingConfig)
    """The simulated RAN and its scoring objective (``--env.objective.*``: SE definition,
    which slices' violations count, eq. 15 weights); the prompts state the same objective."""
    heldout: HeldOutConfig = field(default_factory=lambda: HeldOutConfig())
    """Before/after evaluation of the Actor on held-out env seeds (not the ones it trained on)."""
    prior: PriorConfig = field(default_factory=PriorConfig)
    """The behavioural-prior Actor built with ``--model.prior`` (stands in for a pretrained
    LLM's prior; see sfjax.agents.prior)."""
    log_level: str = "INFO"
    """Python logging level."""


SMOKE = ExperimentConfig(
    run_dir="runs/demo",
    # the behavioural-prior Actor (sfjax.agents.prior): a small Qwen3 standing in for a
    # pretrained LLM's prior, built by sfjax on first use and cached
    model=ModelConfig(prior=True, dtype="float32"),
    lora=LoRAConfig(rank=8, alpha=16.0),
    kto=KTOConfig(
        # 5e-3 (the random tiny Actor's rate) collapsed the prior: the rollouts' match rate with
        # the improved actions fell 0.24 -> 0.08 between KTO iterations; 1e-3 raised it
        learning_rate=1e-3,
        micro_batch_size=8,
        epochs=1,
        max_prompt_length=512,
        max_completion_length=24,
        buckets=(384, 512),
        warmup_ratio=0.0,
        lr_schedule="constant",
    ),
    actor=ActorConfig(prompt=SMOKE_PROMPT, max_new_tokens=24, free_budget=8),
    reflector=ReflectorConfig(backend="rule"),
    rfr=RfRConfig(kto_iterations=2, num_rollouts=4, tolerance=0, tau=0.5),
    loop=LoopConfig(sf_iterations=1, num_envs=4, trajectory_steps=100),
    heldout=HeldOutConfig(seeds=(0, 1, 2, 3, 4, 5), num_steps=100),
)

PAPER = ExperimentConfig(
    run_dir="runs/paper",
    model=ModelConfig(checkpoint="Qwen/Qwen3-4B", dtype="bfloat16"),
    lora=LoRAConfig(rank=16, alpha=32.0),
    kto=KTOConfig(
        learning_rate=5e-5,
        micro_batch_size=8,
        epochs=2,
        max_prompt_length=2048,
        max_completion_length=256,
    ),
    actor=PAPER_ACTOR,
    reflector=ReflectorConfig(backend="api", api=ApiReflectorConfig()),
    rfr=RfRConfig(kto_iterations=6, num_rollouts=8, tolerance=0, tau=0.5),
    # the paper: one SF iteration from a single 300-step trajectory, 6 KTO iterations
    loop=LoopConfig(sf_iterations=1, num_envs=1, trajectory_steps=300),
)

PRESETS = {
    "smoke": ("behavioural-prior Actor (a small Qwen3 standing in for a pretrained LLM, built "
              "and cached on first use), rule reflector, 1 SF iteration (CPU, minutes)", SMOKE),
    "paper": ("Qwen3-4B Actor, DeepSeek-R1 reflector, 300-step trajectories, 6 KTO iters", PAPER),
}


PRIOR_DEMO_NOTE = (
    "This tests the learning machinery (RfR + KTO moving an Actor the way its Reflector asks, "
    "on env seeds it never trained on) with a rule-based Reflector and a small stand-in prior; "
    "it is not the paper's LLM result (Qwen3-4B Actor, DeepSeek-R1 Reflector)."
)


def _dtype(name: str):
    import jax.numpy as jnp

    table = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
    if name not in table:
        raise ValueError(f"--model.dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def _changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the config entries that differ between two JSON dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _changed_keys(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}")
    return out


def _prepare_run_dir(cfg: ExperimentConfig, run_dir: Path) -> bool:
    """Check RUN_DIR against ``cfg`` and write ``config.json``; returns whether to resume."""
    saved = run_dir / "config.json"
    as_json = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    as_json.pop("resume", None)
    has_run = (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir())
    before = json.loads(saved.read_text()) if saved.exists() else None
    if before is not None:
        before.pop("resume", None)
    resume = cfg.resume
    if has_run and before != as_json:
        changed = _changed_keys(before or {}, as_json)
        raise FileExistsError(
            f"{run_dir} holds a run with a different config ({saved}; differs in: "
            f"{', '.join(changed[:8]) or 'everything'}{' ...' if len(changed) > 8 else ''}). "
            "Resume it with the same preset and options, or start a new run elsewhere "
            "(--run-dir DIR; for `make demo`: `make demo RUN_DIR=runs/demo2`, or delete the old "
            "run directory). A changed default after an update counts as a different config."
        )
    if has_run and not resume:
        # Same config: continue (or, if complete, just report) — `make demo` is idempotent.
        logging.getLogger(__name__).info("continuing the run in %s (same config)", run_dir)
        resume = True
    saved.write_text(json.dumps(as_json, indent=2))
    return resume


def _save_adapter(finetuner, out_dir: Path) -> None:
    """The final LoRA as a PEFT adapter, written by process 0.

    With several processes the adapters may be sharded over devices of other hosts, so their
    shards are first gathered onto every host (a collective, hence on all processes).
    """
    import jax
    from flax import nnx

    from sfjax import parallel
    from sfjax.models import lora as lora_lib

    trainer = finetuner.trainer
    if jax.process_count() > 1:
        state = lora_lib.lora_state(trainer.model)
        nnx.update(trainer.model, parallel.to_host(state))  # the run is over: host copies

    def write():
        trainer.save_adapter(out_dir)

    parallel.on_main_process(write)


class HeldOutEval:
    """Before/after evaluation of the Actor on ``cfg.heldout``'s seeds (module docstring of
    :mod:`sfjax.baselines.paired`); results cached as JSON in RUN_DIR/heldout/ so a resumed
    run does not evaluate "before" with an already fine-tuned Actor."""

    def __init__(self, cfg: ExperimentConfig, actor, run_dir: Path):
        from sfjax.baselines.evaluation import EvalProtocol

        self.cfg, self.actor, self.dir = cfg, actor, run_dir / "heldout"
        h = cfg.heldout
        self.protocol = EvalProtocol(seeds=h.seeds, num_steps=h.num_steps) if h.seeds else None

    def _evaluate(self, name: str) -> dict | None:
        import jax

        from sfjax import parallel
        from sfjax.agents.trajectory import save_json
        from sfjax.baselines.evaluation import evaluate_agent
        from sfjax.baselines.llm_agent import LLMEnvAgent
        from sfjax.envs.ran import RanSlicingEnv

        if self.protocol is None:
            return None
        path = self.dir / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        logging.getLogger(__name__).info(
            "held-out evaluation (%s fine-tuning): %d seeds x %d steps", name,
            len(self.protocol.seeds), self.protocol.num_steps,
        )
        env = RanSlicingEnv(dataclasses.replace(self.cfg.env, episode_steps=self.protocol.num_steps))
        agent = LLMEnvAgent(self.actor, env, env.default_params,
                            jax.random.key(self.cfg.heldout.sampling_seed))
        per = evaluate_agent(agent, env, env.default_params, self.protocol).per_episode()
        result = {k: [float(x) for x in v] for k, v in per.items()}
        parallel.on_main_process(lambda: save_json(path, result))
        return result

    def before(self, untrained: bool) -> None:
        """Evaluate (or load) "before"; only an untrained Actor may be measured as such."""
        if untrained or (self.dir / "before.json").exists():
            self._evaluate("before")
        elif self.protocol is not None:
            logging.getLogger(__name__).warning(
                "no held-out 'before' evaluation in %s and the run has already trained: the "
                "before/after comparison is skipped", self.dir)
            self.protocol = None

    def after_and_report(self) -> dict | None:
        from sfjax.baselines.paired import paired_report

        before, after = self._evaluate("before"), self._evaluate("after")
        if before is None:
            return None
        return {"seeds": list(self.protocol.seeds), "num_steps": self.protocol.num_steps,
                "note": "per-seed Table III metrics of the Actor before fine-tuning and after "
                        "the last SF iteration on held-out env seeds; diff = after - before with "
                        "its 95 % paired t interval",
                "metrics": paired_report(before, after)}


def prior_checkpoint(cfg: ExperimentConfig) -> str:
    """Where ``--model.prior``'s checkpoint is cached for this config (built by :func:`run`)."""
    from sfjax.agents.prior import prior_dir
    from sfjax.baselines.llm_agent import prompt_config_for_env
    from sfjax.envs.ran import RanSlicingEnv

    prompt_cfg = prompt_config_for_env(RanSlicingEnv(cfg.env), cfg.actor.prompt)
    return str(prior_dir(cfg.prior, cfg.env, prompt_cfg))


def run(cfg: ExperimentConfig, *, on_phase_end=None, progress: bool = True) -> dict:
    """Build every component from ``cfg`` and run (or resume) Algorithm 1.

    In a multi-process run every process calls this; process 0 checks RUN_DIR, writes the
    files and prints the table, the others wait for it where they must (see the module doc).
    """
    from sfjax import parallel
    from sfjax.agents.actor import Actor
    from sfjax.agents.env import JaxRanRunner
    from sfjax.agents.finetune import KTOFineTuner
    from sfjax.agents.loop import SelfFinetuningLoop, format_table
    from sfjax.agents.reflector import make_reflector
    from sfjax.agents.reflectors.broadcast import build_on_process_0
    from sfjax.baselines.llm_agent import prompt_config_for_env
    from sfjax.models import qwen3
    from sfjax.parallel import summary_writer
    from sfjax.sampling import Sampler
    from sfjax.tokenizer import load_tokenizer

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    parallel.check_shared_directory(run_dir)  # multi-host: one directory for every host
    # process 0 decides (and writes config.json) before any process reads further
    resume = parallel.on_main_process(_prepare_run_dir, cfg, run_dir)

    t0 = time.perf_counter()
    env = JaxRanRunner(cfg.env, cfg.loop.trajectory_steps)
    # action range, slices and the scoring objective in words, all from the env
    prompt_cfg = prompt_config_for_env(env.env, cfg.actor.prompt)
    if cfg.model.prior:
        from sfjax.agents.prior import ensure_prior

        # built once for this prior/env/prompt config and cached; one writer
        ckpt = parallel.on_main_process(
            lambda: str(ensure_prior(cfg.prior, cfg.env, prompt_cfg)))  # JSON to every process
    elif cfg.model.tiny:
        from sfjax.testing import write_tiny_checkpoint

        ckpt = run_dir / "tiny_actor"

        def write_tiny():
            if not (ckpt / "config.json").exists():
                write_tiny_checkpoint(ckpt, seed=cfg.model.tiny_seed, dtype="float32")

        parallel.on_main_process(write_tiny)  # one writer; the others load it afterwards
    elif cfg.model.checkpoint:
        ckpt = cfg.model.checkpoint
    else:
        raise ValueError("set --model.checkpoint PATH_OR_HUB_ID (or --model.tiny or --model.prior)")

    actor_cfg = dataclasses.replace(cfg.actor, prompt=prompt_cfg)
    # fail early on the reflector (missing key / checkpoint) before loading the Actor
    build = lambda: make_reflector(cfg.reflector, prompt_cfg, run_dir / "reflector_cache")  # noqa: E731
    # host-side backends are called on process 0 only (the loop broadcasts their labels), so
    # only process 0 builds them: the API key is needed on its host alone
    reflector = build() if cfg.reflector.backend == "local" else build_on_process_0(build)

    model = qwen3.from_pretrained(ckpt, dtype=_dtype(cfg.model.dtype))
    tokenizer = load_tokenizer(ckpt)
    writer = summary_writer(run_dir / "tb")  # process 0 only; None on other hosts
    # one progress bar per run, not per host
    kto_cfg = (
        cfg.kto if parallel.is_main_process() else dataclasses.replace(cfg.kto, progress=False)
    )
    finetuner = KTOFineTuner(model, tokenizer, kto_cfg, cfg.lora, writer)  # adds LoRA
    actor = Actor(Sampler(model, tokenizer), tokenizer, actor_cfg)
    setup_s = time.perf_counter() - t0

    loop = SelfFinetuningLoop(
        cfg.loop, cfg.rfr, prompt_cfg, actor, env, reflector, finetuner, run_dir,
        writer=writer, progress=progress, on_phase_end=on_phase_end,
        weights=cfg.env.objective.weights,
        run_info={
            "actor": str(ckpt),
            **({"actor_prior": PRIOR_LABEL} if cfg.model.prior else {}),
            "actions": f"RBGs for the controlled slice in [{env.action_lo}, {env.action_hi}]",
        },
    )  # fmt: skip
    heldout = HeldOutEval(cfg, actor, run_dir)
    # the Actor before any fine-tuning (LoRA B = 0); cached, so a resume reuses it
    heldout.before(untrained=loop.ckpt.latest_step() is None)
    summary = loop.run(resume=resume)
    summary["timings_s"]["setup"] = setup_s
    loop.run_info["held_out"] = heldout.after_and_report()
    summary = loop.write_summary()
    summary["timings_s"]["setup"] = setup_s
    _save_adapter(finetuner, run_dir / "adapter")
    if writer is not None:
        writer.close()
    if not parallel.is_main_process():
        return summary
    print(f"\nSelf-finetuning ({summary['reflector']}; actor {ckpt})")
    if cfg.model.prior:
        print(f"Actor: {PRIOR_LABEL}.")
    print(format_table(summary))
    held = summary.get("held_out")
    if held:
        from sfjax.baselines.paired import format_paired

        print(f"\nHeld-out env seeds {held['seeds']} ({held['num_steps']} steps each), "
              "before fine-tuning vs after; * = 95 % interval excludes 0:")
        print(format_paired(held["metrics"]))
        if cfg.model.prior:
            print(PRIOR_DEMO_NOTE)
    t = summary["timings_s"]
    print(
        "wall time [s]: "
        + ", ".join(f"{k} {v:.1f}" for k, v in t.items() if not k.endswith("_count"))
    )
    return summary


def main(argv=None) -> None:
    cfg = tyro.extras.overridable_config_cli(PRESETS, args=argv, description=__doc__)
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # third-party HTTP loggers would print request lines at INFO; keep them quiet
    for name in ("httpx", "httpcore", "openai", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    run(cfg)


if __name__ == "__main__":
    sys.exit(main())
