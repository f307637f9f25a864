r"""Self-finetuning LLM agent for RAN slicing (paper Algorithms 1-2), end to end.

    python experiments/sf_ranslicing.py smoke --run-dir runs/demo
    python experiments/sf_ranslicing.py paper --run-dir runs/paper \
        --model.checkpoint /path/to/Qwen3-4B            # DEEPSEEK_API_KEY in the environment
    python experiments/sf_ranslicing.py smoke --run-dir runs/demo --resume   # after a kill
    python experiments/sf_ranslicing.py smoke --run-dir runs/demo --loop.sf-iterations 2
                                                   # one more SF iteration on the 1 done there
    python experiments/sf_ranslicing.py paper --run-dir runs/paper --resume \
        --reflector.api.max-retries 20 --reflector.api.timeout-s 900     # after an API failure
    python experiments/sf_ranslicing.py {smoke,paper} --help                 # every option

Presets:
  smoke  the behavioural-prior Actor: a small Qwen3-architecture model that STANDS IN for a
         pretrained LLM's prior, trained by sfjax (supervised) to imitate a demand-tracking
         controller with a deliberate flaw (no hysteresis: it follows every load change),
         built on first use and cached (``python -m sfjax.agents.prior``); the offline
         rule-based hindsight labeller as Reflector (no LLM); the JAX RAN simulator; one SF
         iteration from 4 x 100-step trajectories with 3 KTO iterations; the Actor before and
         after on 16 held-out env seeds. It tests the learning machinery against a rule
         reflector, not the paper's LLM result.
  paper  Qwen3-4B Actor (local path or hub id) with LoRA, DeepSeek-R1 Reflector through an
         OpenAI-compatible API (key read from the environment variable named by
         --reflector.api.api-key-env); as the paper, one SF iteration from a single 300-step
         trajectory with 6 KTO iterations.

Writes to the run dir: ``config.json``, ``trajectories/``, ``reflections/``, ``datasets/``,
``checkpoints/`` (orbax, one per phase), ``tb/`` (TensorBoard: ``train/*`` KTO metrics under
TRL's tags, ``kto_iter/*`` per KTO iteration, ``env/*`` per trajectory, ``rfr/*`` dataset
statistics, ``heldout/*`` the held-out means before and after), ``adapter/`` (final LoRA as a
PEFT adapter), ``summary.json`` and the final table on stdout. Every file is written
atomically; a damaged newest checkpoint falls back to the one before it.

RUN_DIR's identity is the configuration that changes results. Paths, logging, progress, the
API's retry / timeout / concurrency options and the options that trade device memory for time
(``MEMORY_ONLY``: results the same up to float rounding; a change is logged and recorded in
``environment.json``) may differ on a rerun; any other difference is refused with the keys
named, and ``--resume`` then continues the run with its own values for them (nothing is
deleted). A phase that runs out of device memory ends with one error naming the phase and the
options that lower memory; the same command with them continues the run.

More SF iterations extend a run: the same command with a larger ``--loop.sf-iterations`` on a
RUN_DIR holding a run of fewer (finished or not) restores that run's phases from its
checkpoints, runs the new reflect / KTO / collect phases and measures the final Actor on the
held-out seeds again (``heldout/after_iter_<I>.json``; "before" is reused), ending as a fresh
run of that many iterations would (the phase plan is prefix-stable, each phase's keys depend on
its index only). Fewer SF iterations than the run's are refused (with ``--resume``: the run's
own number), and so is a run whose last phase checkpoint is gone.

Which Actor a run ends with: ``--loop.final-actor last`` (default, Algorithm 1) or ``best``, the
iterate (0..I, 0 = before any fine-tuning) whose collected trajectories had the highest mean
utility, a guard against SF iterations that oscillate. It chooses and never trains, so it may
change on a rerun of a finished run: the held-out "after" (cached per iterate) and
``adapter/`` are then of the Actor it keeps, and ``summary.json`` names it (``final_actor``).

Several hosts: on every host,
``python -m sfjax.parallel --distributed [mesh options] -- experiments/sf_ranslicing.py paper
--run-dir /shared/runs/paper ...``. RUN_DIR must be on a
filesystem all hosts mount (checked at start); process 0 writes every file but the orbax
checkpoints, which all processes write together, and queries the Reflector API.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_common  # noqa: E402

from sfjax import atomic, compile_cache, device_memory  # noqa: E402
from sfjax.agents.actor import PAPER_ACTOR, ActorConfig  # noqa: E402
from sfjax.agents.loop_config import LoopConfig  # noqa: E402
from sfjax.agents.prior import PRIOR_LABEL, SMOKE_PROMPT, PriorConfig  # noqa: E402
from sfjax.agents.prior import fingerprint as prior_fingerprint  # noqa: E402
from sfjax.agents.reflector import ApiReflectorConfig, ReflectorConfig  # noqa: E402
from sfjax.agents.rfr import RfRConfig  # noqa: E402
from sfjax.baselines.heldout import (  # noqa: E402
    HeldOutConfig,
    HeldOutEval,
    write_heldout_scalars,
)
from sfjax.config_rules import RULES  # noqa: E402
from sfjax.configcheck import Bad, check_config, seeds  # noqa: E402
from sfjax.console import configure_logging  # noqa: E402
from sfjax.device_memory import MemoryOption  # noqa: E402
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
    """Base weight dtype: bfloat16 or float32 (LoRA params stay float32). On a CPU without bf16
    instructions (AVX2 only) bfloat16 is slower than float32 (the KTO step 1.4x here:
    benchmarks/RESULTS.md, "The CPU speed comparisons on a second CPU")."""
    scan_layers: bool = False
    """Stack the decoder layers and run them as one ``lax.scan`` (prefill, reference log-probs,
    KTO step): 5-20x faster compiles at Qwen3-4B (benchmarks/RESULTS.md), same results."""
    scan_decode: bool = False
    """With ``scan_layers``, also scan the decode steps over a stacked KV cache
    (``Qwen3Config.scan_decode``): the decode / RfR programs compiled 6.8x / 4.2x faster than
    unrolled at Qwen3-4B on CPU, but each decode step ran 2-3x slower there (GPU: to be
    measured); for compile-bound sessions such as a short accelerator lease. Same results."""

    def invalid(self) -> list[Bad]:
        bad = [] if self.dtype in ("bfloat16", "float32") else [Bad("dtype", "bfloat16 or float32")]
        if not self.tiny and not self.prior and not self.checkpoint:
            bad.append(Bad("checkpoint", "a checkpoint path or hub id (or use --model.tiny or "
                                         "--model.prior)"))
        if self.tiny and self.prior:
            bad.append(Bad("prior", "not together with --model.tiny (one Actor)"))
        # the smoke preset's Actor is the prior: a checkpoint given with it would be ignored
        bad += cli_common.checkpoint_with_switch(self.checkpoint, self.prior, self.tiny, "model.")
        if self.scan_decode and not self.scan_layers:
            bad.append(Bad("scan_decode", "used with --model.scan-layers"))
        return bad + seeds(self, "tiny_seed")


@dataclass(frozen=True)
class ExperimentConfig:
    """Self-finetuning on the RAN slicing task (paper Algorithm 1)."""

    run_dir: str = "runs/sf_ranslicing"
    """Output directory (checkpoints, TensorBoard, trajectories, summary.json)."""
    resume: bool = False
    """Continue the run in RUN_DIR from its last checkpoint, with the run's own values for the
    options given otherwise now (a larger --loop.sf-iterations still extends it). A run dir
    holding a run with the same config is continued (or, when complete, reported) even
    without this flag, and one holding a run of fewer SF iterations is extended."""
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

    def invalid(self) -> list[Bad]:
        if not self.run_dir:
            return [Bad("run_dir", "a directory")]
        levels = ("DEBUG", "INFO", "WARNING", "ERROR")
        return [] if self.log_level.upper() in levels else [Bad("log_level", " or ".join(levels))]


SMOKE = ExperimentConfig(
    run_dir="runs/demo",
    # the behavioural-prior Actor (sfjax.agents.prior): a small Qwen3 standing in for a
    # pretrained LLM's prior, built by sfjax on first use and cached
    model=ModelConfig(prior=True, dtype="float32"),
    lora=LoRAConfig(rank=8, alpha=16.0),
    kto=KTOConfig(
        # chosen on validation env seeds 50-65 over three run seeds (benchmarks/RESULTS.md,
        # "Behavioural-prior demo"), never on the held-out seeds below: 1e-3 and 5e-4
        # collapsed the prior on some run seeds, 1e-4 hardly moved it; with a constant rate
        # one run seed drifted in its second KTO iteration, TRL's default schedule (linear
        # decay after 10 % warm-up, KTOConfig's default) kept all three stable
        learning_rate=3e-4,
        micro_batch_size=8,
        epochs=1,
        max_prompt_length=512,
        max_completion_length=24,
        buckets=(384, 512),
    ),
    actor=ActorConfig(prompt=SMOKE_PROMPT, max_new_tokens=24, free_budget=8),
    reflector=ReflectorConfig(backend="rule"),
    # 3 KTO iterations: on the validation seeds the reconfigurations fell for 5 of 5 run seeds
    # (2 iterations: 3 of 5), the utility rose for 5 of 5 either way
    rfr=RfRConfig(kto_iterations=3, num_rollouts=4, tolerance=0, tau=0.5),
    loop=LoopConfig(sf_iterations=1, num_envs=4, trajectory_steps=100),
    heldout=HeldOutConfig(seeds=tuple(range(16)), num_steps=100),
)

# What the paper states and this preset follows: Qwen3-4B Actor, DeepSeek-R1 Reflector (V-B),
# 300-step trajectories of 100 ms decisions, one SF iteration from a single trajectory, six KTO
# iterations (V-C, Fig. 3), the reference = the original frozen LLM (IV-C). Everything else
# below is this project's choice where the paper gives no number: the history window k = 5
# (IV-B3 says only "a finite history window"), K = 8 rollouts, tau = 0.5, exact action match
# (tolerance 0; IV-C: "matches or aligns with the Reflector's suggestion"), rollouts at
# temperature 1.0 while acting uses 0.7 / top-p 0.8 / top-k 20, Qwen3's thinking mode off,
# beta = 0.1, lambda_D / lambda_U from the class counts (eq. 12-13 as DESIGN.md restores them),
# LoRA r = 16, lr 5e-5 with linear decay, 2 epochs and a fresh optimizer per KTO iteration,
# and the held-out evaluation (4 seeds x 300 steps, sampled at the acting temperature).
PAPER = ExperimentConfig(
    run_dir="runs/paper",
    model=ModelConfig(checkpoint="Qwen/Qwen3-4B", dtype="bfloat16", scan_layers=True),
    lora=LoRAConfig(rank=16, alpha=32.0),
    kto=KTOConfig(
        learning_rate=5e-5,
        micro_batch_size=8,
        epochs=2,
        max_prompt_length=2048,
        max_completion_length=256,
        # without remat the step needs ~173 GB at 8 x 1,024 tokens (bench_compile: 32 GB with
        # it; 53 GB at this preset's own 8 x (2,048 + 256))
        remat=True,
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


MEMORY_ONLY = ("kto.remat", "kto.logits_chunk_tokens", "rfr.max_cache_gib_per_call",
               "rfr.max_rows_per_call")  # fmt: skip
"""Options that trade device memory for time and leave the results the same up to float
rounding (tests/train/test_kto_trainer.py: remat and a chunked LM head train like the defaults
within 1e-4; tests/agents/test_rfr.py: RfR's datasets are the same however the rollouts are
split into calls). A run that ran out of memory continues with them."""

OPERATIONAL = (
    "run_dir",
    "resume",
    "log_level",
    "kto.progress",
    "kto.log_every",
    "prior.cache_dir",  # where the prior is cached, not which one (its hash leaves it out)
    "loop.final_actor",  # which iterate the run reports and exports; the iterates are the same
    *MEMORY_ONLY,
    *cli_common.REFLECTOR_OPERATIONAL,
)
"""Options that may change between runs in one RUN_DIR: they do not change results (the
:data:`MEMORY_ONLY` ones up to float rounding)."""


def memory_options(cfg: ExperimentConfig, prefix: str = "",
                   script: str = "experiments/sf_ranslicing.py") -> list[MemoryOption]:  # fmt: skip
    """What the CLI suggests when a run of ``cfg`` runs out of device memory (what ``cfg``
    already does is left out; the KTO options only for a KTO phase; :func:`cli_common.run_cli`).
    ``prefix``: where these options sit in another experiment's (``sf.`` in table3)."""
    o = f"--{prefix}"
    out = [device_memory.POOL] + ([] if cfg.kto.remat else [
        MemoryOption(f"{o}kto.remat", "recompute each decoder layer in the KTO step's "
                     "backward pass", same_results=True, applies_to="kto")])  # fmt: skip
    out += [
        MemoryOption(f"{o}kto.logits-chunk-tokens N", "the KTO step's LM head + log-softmax "
                     "over N completion tokens at a time (0, automatic: 64 MiB of logits)",
                     same_results=True, applies_to="kto"),
        MemoryOption(f"{o}rfr.max-cache-gib-per-call G", "less KV cache per RfR rollout call "
                     f"(more calls; also {o}rfr.max-rows-per-call N)", same_results=True,
                     applies_to="kto"),
        MemoryOption(f"python -m sfjax.parallel --fsdp N -- {script} ...", "the model and "
                     "its programs sharded over N devices (docs/PARALLEL.md)", same_results=True),
        MemoryOption(f"{o}kto.micro-batch-size N {o}kto.grad-accum-steps M", "fewer rows per "
                     "KTO forward pass, the same optimizer batch; KTO's KL estimate z comes "
                     "from each micro-batch (N >= 2)", same_results=False, applies_to="kto"),
        MemoryOption(f"{o}kto.max-prompt-length N", "train on the last N prompt tokens only",
                     same_results=False, applies_to="kto"),
    ]
    if cfg.model.dtype != "bfloat16":
        out.append(MemoryOption(f"{o}model.dtype bfloat16", "half the weight memory of "
                                f"{cfg.model.dtype}", same_results=False))  # fmt: skip
    return out


EARLIER = {"rfr.improved_examples": False, "kto.token_kl_coef": 0.0}
"""Options added since runs were written, with the value those runs had in effect (before
``--rfr.improved-examples`` existed every run built Algorithm 2's datasets, before
``--kto.token-kl-coef`` every run trained on the KTO loss alone): a run dir whose config.json
lacks the key continues as the same run (:func:`cli_common.prepare_run_dir`)."""


def _ran_iterations(run_dir: Path) -> tuple[int, int] | None:
    """(SF iterations, KTO iterations each) of the run in RUN_DIR (its config.json), None when
    unknown (no config.json, or a damaged one: :func:`cli_common.prepare_run_dir` names it)."""
    try:
        saved = atomic.read_json(run_dir / "config.json", "the run's config")
        ran = (saved["loop"]["sf_iterations"], saved["rfr"]["kto_iterations"])
    except (FileNotFoundError, atomic.DamagedFile, KeyError, TypeError):
        return None
    return ran if all(isinstance(n, int) for n in ran) else None


def _prepare_run_dir(cfg, run_dir: Path):
    """RUN_DIR's identity check (:func:`cli_common.prepare_run_dir`); a run is there once a
    phase checkpoint is. A run of fewer SF iterations and otherwise the same config (or any,
    with ``--resume``) is extended (:mod:`sfjax.agents.extend`); fewer than the run's are
    refused (with ``--resume``: the run's own number). A run with results whose checkpoints
    were removed is refused (:func:`sfjax.agents.extend.results_without_checkpoints`)."""
    from sfjax.agents.extend import (
        extension_refusal,
        fewer_refusal,
        phase_steps,
        results_without_checkpoints,
    )
    from sfjax.baselines.heldout import adopt_unnamed_after

    has_run = bool(phase_steps(run_dir / "checkpoints"))
    ran, kto = _ran_iterations(run_dir) or (None, None)
    asked = cfg.loop.sf_iterations
    # a phase has ended once summary.json is written, even if its checkpoint is gone
    started = has_run or (run_dir / "summary.json").exists()
    if started and not has_run and (ran is None or asked <= ran):
        why = results_without_checkpoints(run_dir)  # refused before anything is written
        if why:
            raise cli_common.RunDirTaken(why)
    if ran is None or ran == asked or not started or (asked < ran and cfg.resume):
        resume, cfg = cli_common.prepare_run_dir(cfg, run_dir, OPERATIONAL, has_run=has_run,
                                                 earlier=EARLIER, noted=MEMORY_ONLY)
        if ran is not None and started:
            adopt_unnamed_after(run_dir, cfg.loop.sf_iterations)
        return resume, cfg
    # refused before anything is written
    why = fewer_refusal(run_dir, ran, asked) if asked < ran else extension_refusal(run_dir, ran, kto)
    if why:
        raise cli_common.RunDirTaken(why)
    as_ran = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, sf_iterations=ran))
    # every other option as for any rerun: the same, or the run's own with --resume
    _, used = cli_common.prepare_run_dir(as_ran, run_dir, OPERATIONAL, has_run=has_run,
                                         announce=False, earlier=EARLIER, noted=MEMORY_ONLY)
    adopt_unnamed_after(run_dir, ran)
    used = dataclasses.replace(used, loop=dataclasses.replace(used.loop, sf_iterations=asked))
    atomic.write_json(run_dir / "config.json", cli_common.as_json(used), indent=2)
    logging.getLogger(__name__).info(
        "extending the run in %s from %d to %d SF iterations (its phases are restored from "
        "its checkpoints, the held-out 'after' evaluation is of the final Actor)", run_dir, ran,
        asked)  # fmt: skip
    return True, used


def tiny_actor(path: Path, seed: int) -> Path:
    """The smoke preset's tiny random Actor at ``path``, written whole (temporary directory,
    then rename) unless a complete one is there: config, weights and tokenizer. A partial one
    (an older version wrote config.json first and checked only it) is rebuilt."""
    from sfjax.testing import write_tiny_checkpoint

    complete = all(
        any(path.glob(pattern)) for pattern in ("config.json", "*.safetensors", "tokenizer*")
    )
    try:
        complete = complete and bool(atomic.read_json(path / "config.json"))
    except atomic.DamagedFile:
        complete = False
    if not complete:
        if path.exists():
            logging.getLogger(__name__).warning("rebuilding the incomplete tiny Actor in %s", path)
        with atomic.replace_dir(path) as tmp:
            write_tiny_checkpoint(tmp, seed=seed, dtype="float32")
    return path


def base_model_id(checkpoint) -> str:
    """What the adapter names as its base model: a local checkpoint as an absolute path (so
    ``peft.AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` works from any directory),
    a hub id as it is."""
    path = Path(checkpoint)
    return str(path.resolve()) if path.exists() else str(checkpoint)


def _save_adapter(finetuner, out_dir: Path, base_model: str | None = None) -> None:
    """The final LoRA as a PEFT adapter naming ``base_model``, written by process 0.

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
        with atomic.replace_dir(out_dir) as tmp:  # a kill mid-export keeps the old adapter
            trainer.save_adapter(tmp, base_model_name_or_path=base_model)

    parallel.on_main_process(write)


def base_checkpoint(cfg: ExperimentConfig, prompt_cfg=None) -> str:
    """The Actor's base checkpoint: ``--model.prior``'s cached one (built first when missing),
    ``--model.tiny``'s in RUN_DIR/tiny_actor (written once) or ``--model.checkpoint``. One
    writer (process 0); ``prompt_cfg``: the env-derived prompt (computed when not given)."""
    from sfjax import parallel

    if cfg.model.prior:
        from sfjax.agents.prior import ensure_prior

        if prompt_cfg is None:
            from sfjax.baselines.llm_agent import prompt_config_for_env
            from sfjax.envs.ran import RanSlicingEnv

            prompt_cfg = prompt_config_for_env(RanSlicingEnv(cfg.env), cfg.actor.prompt)
        # built once for this prior/env/prompt config and cached; the path as JSON to all
        return parallel.on_main_process(lambda: str(ensure_prior(cfg.prior, cfg.env, prompt_cfg)))
    if cfg.model.tiny:
        path = Path(cfg.run_dir) / "tiny_actor"
        parallel.on_main_process(lambda: str(tiny_actor(path, cfg.model.tiny_seed)))
        return str(path)
    if cfg.model.checkpoint:
        return cfg.model.checkpoint
    raise ValueError("set --model.checkpoint PATH_OR_HUB_ID (or --model.tiny or --model.prior)")


def run(cfg: ExperimentConfig, *, on_phase_end=None, progress: bool = True) -> dict:
    """Build every component from ``cfg`` and run (or resume) Algorithm 1.

    In a multi-process run every process calls this; process 0 checks RUN_DIR, writes the
    files and prints the table, the others wait for it where they must (see the module doc).
    """
    from sfjax import parallel
    from sfjax.agents.actor import Actor
    from sfjax.agents.env import JaxRanRunner
    from sfjax.agents.finetune import KTOFineTuner
    from sfjax.agents.loop import SelfFinetuningLoop
    from sfjax.agents.reflector import make_reflector
    from sfjax.agents.reflectors.broadcast import build_on_process_0
    from sfjax.agents.summary import format_sf_summary
    from sfjax.baselines.llm_agent import check_given_action_range, prompt_config_for_env
    from sfjax.models import qwen3
    from sfjax.models.lora import adapters_disabled
    from sfjax.parallel import summary_writer
    from sfjax.sampling import Sampler
    from sfjax.tokenizer import load_tokenizer

    check_config(cfg, rules=RULES)  # every value, before anything is written
    env = JaxRanRunner(cfg.env, cfg.loop.trajectory_steps)
    check_given_action_range(cfg.actor.prompt, env.env)
    local = Path(cfg.model.checkpoint) / "config.json"
    if not (cfg.model.prior or cfg.model.tiny) and cfg.model.checkpoint and local.exists():
        # a damaged or unsupported local checkpoint is named before RUN_DIR is touched
        qwen3.Qwen3Config.from_hf(atomic.read_json(local, "the Actor checkpoint's config"))
    run_dir = Path(cfg.run_dir)
    cli_common.make_run_dir(run_dir)
    parallel.check_shared_directory(run_dir)  # multi-host: one directory for every host
    # process 0 decides (and writes config.json) before any process reads further; the config
    # to run travels as JSON (every process, one or several, takes the same path)
    def decide():
        resume, used = _prepare_run_dir(cfg, run_dir)
        return resume, cli_common.as_json(used)

    resume, used = parallel.on_main_process(decide)
    cfg = cli_common.with_values(cfg, used)

    t0 = time.perf_counter()
    # action range, slices and the scoring objective in words, all from the env
    prompt_cfg = prompt_config_for_env(env.env, cfg.actor.prompt)
    ckpt = base_checkpoint(cfg, prompt_cfg)
    actor_cfg = dataclasses.replace(cfg.actor, prompt=prompt_cfg)
    # fail early on the reflector (missing key / checkpoint) before loading the Actor
    build = lambda: make_reflector(  # noqa: E731
        cfg.reflector, prompt_cfg, run_dir / "reflector_cache", progress=progress
    )
    # host-side backends are called on process 0 only (the loop broadcasts their labels), so
    # only process 0 builds them: the API key is needed on its host alone
    reflector = build() if cfg.reflector.backend == "local" else build_on_process_0(build)

    model = qwen3.from_pretrained(
        ckpt, dtype=_dtype(cfg.model.dtype), scan_layers=cfg.model.scan_layers
    )
    if cfg.model.scan_decode:  # an execution layout, not a checkpoint property
        model.config = dataclasses.replace(model.config, scan_decode=True)
    tokenizer = load_tokenizer(ckpt)
    writer = summary_writer(run_dir / "tb")  # process 0 only; None on other hosts
    try:  # closed however the run ends (an open writer's thread fails at exit)
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
                **({"actor_prior": PRIOR_LABEL, "actor_prior_build": prior_fingerprint(ckpt)}
                   if cfg.model.prior else {}),
                "actions": f"RBGs for the controlled slice in [{env.action_lo}, {env.action_hi}]",
            },
        )  # fmt: skip
        heldout = HeldOutEval(cfg.heldout, cfg.env, actor, run_dir)
        # the Actor before any fine-tuning (LoRA B = 0); cached, so a resume reuses it
        t_held = time.perf_counter()
        with device_memory.during("the held-out evaluation before fine-tuning"):
            heldout.before(untrained=loop.ckpt.latest_step() is None,
                           adapters_off=lambda: adapters_disabled(model))
        held_s = time.perf_counter() - t_held
        summary = loop.run(resume=resume)
        summary["timings_s"]["setup"] = setup_s
        t_held = time.perf_counter()
        # of the final Actor (the iterate --loop.final-actor keeps): an extended run's shorter
        # run had its own "after"
        with device_memory.during("the held-out evaluation after fine-tuning"):
            loop.run_info["held_out"] = heldout.after_and_report(loop.final_actor["iteration"])
        write_heldout_scalars(writer, loop.run_info["held_out"])
        summary["timings_s"]["held_out"] = held_s + time.perf_counter() - t_held
        summary = loop.write_summary()
        _save_adapter(finetuner, run_dir / "adapter", base_model_id(ckpt))
    finally:
        if writer is not None:
            writer.close()
    if not parallel.is_main_process():
        return summary
    print(
        format_sf_summary(
            summary, run_dir, trajectory_steps=cfg.loop.trajectory_steps,
            num_envs=cfg.loop.num_envs, tiny_actor=cfg.model.tiny,
            same_env_seeds=cfg.loop.same_env_seeds,
        )  # fmt: skip
    )
    if cfg.model.prior:
        print(f"Actor: {PRIOR_LABEL}.\n{PRIOR_DEMO_NOTE}")
    return summary


def main(argv=None) -> None:
    cfg = cli_common.run_cli(cli_common.parse, PRESETS, argv, __doc__)
    configure_logging(cfg.log_level)
    compile_cache.enable()
    cli_common.run_cli(run, cfg, memory=memory_options(cfg))


if __name__ == "__main__":
    sys.exit(main())
