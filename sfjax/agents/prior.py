"""A behavioural-prior Actor for the embedded default: a small Qwen3 that STANDS IN for a
pretrained LLM's prior, trained by this project (no download, no API).

The paper's Actor starts from Qwen3-4B, whose pretraining gives it a sensible but imperfect way
to allocate RBGs. A tiny random model has no such prior, so self-finetuning has nothing to
improve. This module builds one on a CPU in a few minutes (measured: 222 s of CPU time):

1. a *flawed teacher* -- :func:`sfjax.baselines.reference.demand_tracking_policy` with
   ``hysteresis_rbg = 0``: it sizes both slices from their observed arrival rates but follows
   every load change at once (down as well as up), so it reconfigures far more often than it
   needs to (the rule reflector's "needless increase" and hindsight "over-provisioned" rules
   label many of its steps suboptimal) -- drives the JAX env on training seeds disjoint from
   every evaluation seed;
2. every decision becomes a ``(prompt, completion)`` pair in the Actor's real format: the prompt
   from :func:`sfjax.agents.prompts.build_messages` with the run's :class:`PromptConfig` (the
   caller's preset decides style and history window), the completion from
   :func:`sfjax.agents.prompts.format_output` (short reflection, ``Action: <int>``, analysis);
3. a small Qwen3-architecture model with the local tiny tokenizer (:mod:`sfjax.testing`) is
   trained on them by cross-entropy (:mod:`sfjax.train.sft`) and written in Hugging Face layout
   (``qwen3.from_pretrained`` / ``transformers`` load it).

Built by ``python -m sfjax.agents.prior --out DIR`` or on first use (:func:`ensure_prior`),
deterministic from ``PriorConfig.seed``, cached under a hash of everything it depends on.
``PRIOR_COMPLETE.json`` (sha256 of every file) is written last: a directory without it or whose
files do not match is rebuilt with a warning, never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sfjax.agents.prompts import PromptConfig, format_output
from sfjax.configcheck import Bad, at_least, greater_than, problems, seeds
from sfjax.train.sft import SFTConfig

log = logging.getLogger(__name__)

PRIOR_LABEL = (
    "behavioural prior standing in for a pretrained LLM: a small Qwen3-architecture model "
    "trained by sfjax (supervised) to imitate a demand-tracking controller with a deliberate "
    "flaw (no hysteresis: follows every load change, many reconfigurations); not Qwen3-4B"
)
"""How every output that uses the prior names it."""
MARKER = "PRIOR_COMPLETE.json"
"""Written last by a build: the config hash and the sha256 of every other file."""
FORMAT_VERSION = 2
"""Bumped when the build procedure or the simulator's dynamics change (part of the cache key:
the teacher's data come from the env). 2: buffer-aware PF keeps a UE until its transport block
carries its queue, RLC buffers of 18 packets (ns-3's)."""


@dataclass(frozen=True)
class TeacherConfig:
    """The flawed controller the prior imitates (:class:`~sfjax.baselines.reference.
    HeuristicParams` with no hysteresis)."""

    kbps_per_prb: float = 250.0
    """Arrival rate one PRB of slice 0 is sized for, kb/s."""
    other_kbps_per_prb: float = 650.0
    """The same for slice 1."""
    hysteresis_rbg: int = 0
    """The flaw: 0 follows every load change at once (the tuned heuristic uses 2)."""
    queue_alarm: float = 0.02
    """Queue growth (fraction of the slice's buffers) that counts as under-provisioning."""

    def invalid(self) -> list[Bad]:
        return (greater_than(self, 0, "kbps_per_prb", "other_kbps_per_prb", "queue_alarm")
                + at_least(self, 0, "hysteresis_rbg"))


@dataclass(frozen=True)
class PriorConfig:
    """The behavioural-prior Actor: teacher, data, model size and supervised training."""

    seed: int = 0
    """Seed of the model's initial weights and of the example order."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The imitated controller."""
    data_seeds: tuple[int, ...] = tuple(range(2000, 2016))
    """Env seeds of the teacher's trajectories (disjoint from evaluation and SF seeds)."""
    data_steps: int = 200
    """Decisions per teacher trajectory."""
    hidden_size: int = 128
    """Model width."""
    num_layers: int = 2
    """Decoder layers."""
    num_heads: int = 4
    """Query heads (2 KV heads, head_dim = hidden / heads)."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised training on the teacher's decisions."""
    cache_dir: str = "~/.cache/sfjax/priors"
    """Built priors live in CACHE_DIR/<hash of this config, the env and the prompt>."""

    def invalid(self) -> list[Bad]:
        bad = at_least(self, 1, "data_steps", "hidden_size", "num_layers", "num_heads")
        bad += seeds(self, "seed", "data_seeds")
        heads = self.num_heads
        odd = heads > 1 and heads % 2
        if heads >= 1 and (odd or self.hidden_size % heads):
            bad.append(Bad("num_heads", "1 or an even number that divides --prior.hidden-size "
                                        "(half as many KV heads; head_dim = hidden / heads)"))
        return bad

    def model_overrides(self) -> dict:
        return {"hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads,
                "num_key_value_heads": max(1, self.num_heads // 2),
                "head_dim": self.hidden_size // self.num_heads,
                "intermediate_size": 2 * self.hidden_size}


def config_hash(cfg: PriorConfig, env_cfg, prompt_cfg: PromptConfig) -> str:
    """Hash of everything the built weights depend on (the cache dir is excluded)."""
    # the episode length of the caller's env does not change the teacher's data
    env_cfg = dataclasses.replace(env_cfg, episode_steps=cfg.data_steps)
    payload = {"version": FORMAT_VERSION,
               "prior": dataclasses.asdict(dataclasses.replace(cfg, cache_dir="")),
               "env": dataclasses.asdict(env_cfg), "prompt": dataclasses.asdict(prompt_cfg)}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ teacher data


def _reflection(action: int, prev: int) -> tuple[str, str]:
    # short (a few tokens of the tiny tokenizer) so the reflection fits the free budget
    if action == prev:
        return "load stable, keep.", "current traffic."
    return ("load high, increase." if action > prev else "load low, decrease."), "current traffic."


class _TeacherActor:
    """Writes the Actor's prompts (its real code path) and answers with the teacher's action."""

    def __init__(self, tokenizer, actor_cfg):
        from sfjax.agents.actor import Actor

        self._prompt_text = Actor(None, tokenizer, actor_cfg).prompt_text
        self.cfg = actor_cfg
        self.actions: list[int] = []

    def act(self, states, histories, step, key):
        from sfjax.agents.actor import ActorDecision

        out = []
        for s, h, a in zip(states, histories, self.actions):
            refl, ana = _reflection(int(a), int(s["prev_action"]))
            text = format_output(refl, int(a), ana, self.cfg.prompt)
            out.append(ActorDecision(self._prompt_text(s, h, step), text, refl, int(a), ana,
                                     True, None))
        return out


def controller_trajectories(env, prompt_cfg: PromptConfig, hp, tokenizer, protocol):
    """``(trajectories, rollouts)`` of :func:`~sfjax.baselines.reference.demand_tracking_policy`
    with constants ``hp`` driving ``env`` on ``protocol``'s seeds through the Actor's real
    prompt and output format (what a Reflector reads, and the prior's training data)."""
    import jax
    import jax.numpy as jnp

    from sfjax.agents.actor import ActorConfig
    from sfjax.baselines.evaluation import evaluate_agent
    from sfjax.baselines.llm_agent import LLMEnvAgent, action_offset
    from sfjax.baselines.reference import demand_tracking_policy

    policy = jax.jit(jax.vmap(lambda o: demand_tracking_policy(env, hp)(o, None)))
    offset = action_offset(env)
    teacher = _TeacherActor(tokenizer, ActorConfig(prompt=prompt_cfg))

    class Agent(LLMEnvAgent):
        def act(self, obs_S, infos):
            teacher.actions = [int(a) + offset for a in np.asarray(policy(jnp.asarray(obs_S)))]
            return super().act(obs_S, infos)

    agent = Agent(teacher, env, env.default_params, jax.random.key(0))
    rollouts = evaluate_agent(agent, env, env.default_params, protocol)
    return agent.trajectories, rollouts


def teacher_examples(cfg: PriorConfig, env_cfg, prompt_cfg: PromptConfig, tokenizer):
    """``(pairs, rollouts)``: the teacher's (prompt, completion) pairs on ``cfg.data_seeds`` and
    its evaluation records (Table III metrics of the teacher itself)."""
    from sfjax.baselines.evaluation import EvalProtocol
    from sfjax.baselines.reference import HeuristicParams
    from sfjax.envs.ran import RanSlicingEnv

    env = RanSlicingEnv(dataclasses.replace(env_cfg, episode_steps=cfg.data_steps))
    protocol = EvalProtocol(seeds=cfg.data_seeds, num_steps=cfg.data_steps, key_offset=77_777)
    trajectories, rollouts = controller_trajectories(
        env, prompt_cfg, HeuristicParams(**dataclasses.asdict(cfg.teacher)), tokenizer, protocol)
    pairs = [(s.prompt, s.output) for traj in trajectories for s in traj.steps]
    return pairs, rollouts


# ------------------------------------------------------------------------------------ cache


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name != MARKER)


def check_prior(directory: Path, expected_hash: str | None = None) -> str | None:
    """None when ``directory`` holds a complete, intact prior; else why not."""
    marker = directory / MARKER
    if not directory.is_dir():
        return "missing"
    if not marker.exists():
        return f"no {MARKER} (an interrupted build?)"
    try:
        record = json.loads(marker.read_text())
        files = record["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable {MARKER}: {e}"
    if expected_hash is not None and record.get("config_hash") != expected_hash:
        return f"config hash {record.get('config_hash')} != {expected_hash}"
    present = {p.name for p in _files(directory)}
    if present != set(files):
        return f"files differ from the marker's list: {sorted(present ^ set(files))}"
    for name, digest in files.items():
        if _sha256(directory / name) != digest:
            return f"{name} does not match its recorded sha256 (corrupt or changed)"
    return None


def build_prior(cfg: PriorConfig, env_cfg, prompt_cfg: PromptConfig, out: str | os.PathLike,
                log_every: int = 50) -> Path:
    """Build the prior into ``out`` (replaced if present); the marker is written last. The build
    runs in ``out.building-<pid>``, removed if it fails (and, if its process was killed, by the
    next build)."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    _remove_dead_builds(out)
    tmp = out.with_name(out.name + f".building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        return _build_into(tmp, out, cfg, env_cfg, prompt_cfg, log_every)
    except BaseException:  # a failed or interrupted build leaves nothing in the cache
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_dead_builds(out: Path) -> None:
    """Delete the ``.building-<pid>`` dirs of ``out`` whose process is gone (a killed build)."""
    for d in out.parent.glob(out.name + ".building-*"):
        try:
            os.kill(int(d.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            pass  # not ours to judge: another user's process, or not a pid


def _build_into(tmp: Path, out: Path, cfg, env_cfg, prompt_cfg, log_every) -> Path:
    """Teacher data, SFT, save and marker into ``tmp``, then rename it to ``out``."""
    import jax.numpy as jnp

    from sfjax.models import qwen3
    from sfjax.testing import write_tiny_checkpoint
    from sfjax.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    c0 = time.process_time()
    write_tiny_checkpoint(tmp, config=cfg.model_overrides(), seed=cfg.seed, dtype="float32")
    tokenizer = load_tokenizer(tmp)
    pairs, teacher = teacher_examples(cfg, env_cfg, prompt_cfg, tokenizer)
    t_data = time.perf_counter() - t0
    log.info("prior: %d teacher decisions in %.1f s; training %d SFT steps", len(pairs), t_data,
             cfg.sft.steps)
    model = qwen3.from_pretrained(tmp, dtype=jnp.float32)
    sft = dataclasses.replace(cfg.sft, seed=cfg.seed)
    losses = train_sft_logged(model, tokenizer, pairs, sft, log_every)
    qwen3.save_pretrained(model, tmp, dtype="float32")
    per = teacher.per_episode()
    info = {
        "label": PRIOR_LABEL,
        "config_hash": config_hash(cfg, env_cfg, prompt_cfg),
        "prior": dataclasses.asdict(cfg),
        "prompt": dataclasses.asdict(prompt_cfg),
        "examples": len(pairs),
        "sft_loss_first_last": [losses[0], float(np.mean(losses[-20:]))],
        "teacher_per_episode_mean": {k: float(np.mean(v)) for k, v in per.items()},
        "build_wall_s": time.perf_counter() - t0,
        "build_cpu_s": time.process_time() - c0,
        "built_on": build_machine(),
    }
    (tmp / "prior.json").write_text(json.dumps(info, indent=2, default=str))
    record = {"config_hash": info["config_hash"],
              "files": {p.name: _sha256(p) for p in _files(tmp)}}
    (tmp / MARKER).write_text(json.dumps(record, indent=2))  # last: the build is complete
    tmp.rename(out)
    log.info("prior built in %s (%.1f s wall, %.1f s CPU)", out, info["build_wall_s"],
             info["build_cpu_s"])
    return out


def build_machine() -> dict[str, str]:
    """What built a prior: the CPU, the platform and jax / jaxlib versions. The build is
    bit-for-bit deterministic on one machine (tested) but XLA:CPU may round differently on
    another CPU, and 300 SFT steps carry such differences into a visibly different prior
    (benchmarks/RESULTS.md, "The demo across machines and priors")."""
    import jax
    import jaxlib

    from sfjax import provenance

    cpu = provenance.cpu()["model"] or platform.machine()  # /proc/cpuinfo's model name
    return {"cpu": cpu, "platform": platform.platform(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "backend": jax.default_backend()}


def fingerprint(directory: str | os.PathLike) -> dict:
    """Which prior a run used: the sha256 of its weights and, for priors built since the
    record was added, the machine that built them (runs record it in summary.json)."""
    directory = Path(directory)
    files = json.loads((directory / MARKER).read_text())["files"]
    info = json.loads((directory / "prior.json").read_text())
    out = {"dir": str(directory), "weights_sha256": files["model.safetensors"],
           "sft_loss_last": info.get("sft_loss_first_last", [None, None])[-1]}
    if "built_on" in info:
        out["built_on"] = info["built_on"]
    return out


def train_sft_logged(model, tokenizer, pairs, sft: SFTConfig, log_every: int) -> list[float]:
    from sfjax.train.sft import train_sft

    return train_sft(model, tokenizer, pairs, sft, log_every=log_every, log=log.info)


def prior_dir(cfg: PriorConfig, env_cfg, prompt_cfg: PromptConfig) -> Path:
    """Where the prior for this config is cached."""
    root = Path(os.path.expanduser(cfg.cache_dir))
    return root / config_hash(cfg, env_cfg, prompt_cfg)


def ensure_prior(cfg: PriorConfig, env_cfg, prompt_cfg: PromptConfig) -> Path:
    """The cached prior's directory, built first when missing, incomplete or corrupt."""
    out = prior_dir(cfg, env_cfg, prompt_cfg)
    why = check_prior(out, out.name)
    if why is None:
        log.info("using the cached behavioural prior %s", out)
        return out
    if why != "missing":
        log.warning("cached prior %s is not usable (%s): rebuilding it", out, why)
    else:
        log.info("building the behavioural-prior Actor into %s (once; cached)", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return build_prior(cfg, env_cfg, prompt_cfg, out)


def main(argv=None) -> None:
    import argparse

    from sfjax.baselines.llm_agent import prompt_config_for_env
    from sfjax.envs.ran import RanSlicingEnv
    from sfjax.envs.scenario import RanSlicingConfig

    p = argparse.ArgumentParser(
        prog="python -m sfjax.agents.prior",
        description="Build the behavioural-prior Actor of `make demo` (" + PRIOR_LABEL + ") for "
        "the default env and the smoke preset's prompt. Other configs: run the experiment, "
        "which builds (and caches) the prior it needs.")
    p.add_argument("--out", default=None, help="output dir (default: the cache dir by hash)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and example order")
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    env_cfg = RanSlicingConfig()
    prompt_cfg = prompt_config_for_env(RanSlicingEnv(env_cfg), SMOKE_PROMPT)
    cfg = PriorConfig(seed=a.seed)
    if bad := problems(cfg):
        p.error("; ".join(bad))
    if a.out is None and not a.force:
        print(ensure_prior(cfg, env_cfg, prompt_cfg))
        return
    out = Path(a.out) if a.out else prior_dir(cfg, env_cfg, prompt_cfg)
    print(build_prior(cfg, env_cfg, prompt_cfg, out))


SMOKE_PROMPT = PromptConfig(history_window=0, max_field_chars=48, style="compact")
"""The smoke preset's prompt: the paper's prompt in its compact style without the history
window (the small model then learns in a few CPU-minutes; the window is a preset option)."""


if __name__ == "__main__":
    main()
