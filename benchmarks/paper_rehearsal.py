r"""Rehearsal of the ``paper`` preset of experiments/sf_ranslicing.py, on CPU with a tiny Actor
before an accelerator session spends its minutes on it, or on the accelerator with a random
Qwen3-4B (``--width full``), shortened to fit its lease.

    PYTHONPATH=$PWD nice python benchmarks/paper_rehearsal.py             # the whole preset
    PYTHONPATH=$PWD nice python benchmarks/paper_rehearsal.py --steps 8   # a quick check
    python3 benchmarks/paper_rehearsal.py --width full --steps 2 --kto-iterations 1 \
        --rollouts 2 --heldout-seeds 1 --budget-s 270                    # on a GPU, ~5 min

The preset runs exactly as a user runs it -- ``python experiments/sf_ranslicing.py paper
--model.checkpoint CKPT --reflector.api.base-url URL --run-dir DIR`` in a subprocess, nothing
else on its command line -- with two things swapped:

* the Actor's checkpoint is a tiny random Qwen3 written here (:func:`tiny_paper_checkpoint`:
  Qwen3-4B's config with small widths, ``--layers`` decoder layers so that the preset's
  ``scan_layers`` scans more than one, bf16 weights as Qwen3-4B ships them, the test
  tokenizer with Qwen3's special tokens and chat template). Everything else of the preset is
  kept: bf16, scanned layers, LoRA r16, KTO at 2048 / 256 tokens with remat, the Actor's
  sampling config, RfR with K = 8 and 6 KTO iterations, one 300-step trajectory, the held-out
  protocol (4 env seeds x 300 steps) and the PEFT adapter export -- with one departure, for
  the tiny Actor's sake (below);
* the Reflector's endpoint is :class:`FakeR1` (benchmarks/fake_r1.py), an OpenAI-compatible
  server on 127.0.0.1 that answers like DeepSeek-R1: reasoning, ``</think>``, then the JSON
  list of labels, sometimes in a code fence or with prose after it, or with the reasoning in
  ``reasoning_content`` as DeepSeek's own API sends it. Its labels are meaningful: the
  project's offline rule labeller (:mod:`sfjax.agents.reflectors.rule`) applied to the steps
  it reads back from the request's text. The key is a dummy in ``DEEPSEEK_API_KEY`` (the
  preset's variable).

The departure: ``--rfr.max-cache-gib-per-call`` is scaled by the tiny Actor's KV bytes per
token over Qwen3-4B's (:func:`rollout_budget_gib`: 4 layers x 2 KV heads x 16 dims against
36 x 8 x 128, so 32 GiB -> 0.111 GiB). The preset's 32 GiB bounds the KV cache of one RfR
rollout call and is sized for Qwen3-4B (a handful of prompts x K = 8 per call). At the tiny
Actor's KV size it let all 263 unsolved prompts of the full run's 300-step trajectory into one
call, whose XLA program asked for a 30.5 GB buffer on this 23 GB machine and failed: the
budget counts the KV cache only (4.5 GiB there), not the prefill's float32 attention scores
(one layer's: prompt rows x heads x prompt bucket x slots x 4 B; 512 x 8 x 1024 x ~2k there),
which at Qwen3-4B are a tenth to a fifth of a prompt's KV bytes and at the tiny Actor ~8 times
them. Scaled, the calls hold as many prompts as they would at Qwen3-4B for the same
prompt lengths -- the chunked path the GPU run takes. ``--unscaled-rollout-budget`` keeps the
preset's value.

``--width full`` writes Qwen3-4B itself with random weights instead (:func:`full_width_checkpoint`:
its config exactly -- 36 layers, hidden 2560, 32/8 heads of 128, MLP 9728, vocabulary 151,936,
tied embeddings, RoPE base 1e6 --, 8.0 GB of bf16 weights under Hugging Face's names in three
shards as Qwen3-4B ships, drawn once per distinct shape; the same test tokenizer, whose ids are
all < 1,024). Nothing departs from the preset then: the rollout budget is the preset's, sized
for Qwen3-4B. Writing it took 47 s and 2.35 GiB peak RSS on this 2-core box at load 3.5 (the
draws 15 s, the rest writing 8 GB); the script prints both. The Actor's adapter is then checked
against what peft builds for its config on Qwen3-4B's architecture on torch's meta device
(names and shapes, seconds), not loaded onto the weights with torch on the CPU (16 GB in
float32 and minutes, on the lease's time).

Shortening, as a user would type it, each a departure the config check expects: ``--steps N``
(``--loop.trajectory-steps N --heldout.num-steps N``), ``--kto-iterations N``
(``--rfr.kto-iterations``), ``--rollouts K`` (``--rfr.num-rollouts``), ``--heldout-seeds N``
(``--heldout.seeds``: the preset's first N of 4; 0 skips the evaluation; 1 keeps it at batch 1,
the collection's programs, no compile of its own); anything else after ``--``.
``--budget-s S`` bounds the script's wall time: the run is stopped (SIGTERM to its process
group, SIGKILL 10 s later) S - 15 s after the script started, then the phases it finished, the
one it was in (with its KTO step, when in KTO), the fake's requests and the config check are
printed and the exit status is 3 (1: the run or a check failed, 2: bad arguments). The checks
after a run that finished are not counted in S (~10 s at full width).

On the lent GPU (no internet; tyro, openai, gymnax and tensorboardX are not installed there):
``bash benchmarks/device_wheels.sh`` here first (20 wheels, 7 MB, into ``.whl``), then one
``run`` with ``carry: [".whl"]`` and ``timeout_s: 300``::

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 benchmarks/paper_rehearsal.py --width full --steps 2 --kto-iterations 1 --rollouts 2 --heldout-seeds 1 --budget-s 270 --work-dir /tmp/rehearsal 2>&1 | tee $OUT/paper_rehearsal.log; rc=$?; cp /tmp/rehearsal/run/*.json $OUT/ 2>/dev/null; exit $rc

Its cost (estimated, nothing of it has run on a GPU): at most 270 s of the command plus
seconds of transfer on a warm machine (a fresh one: 1-2 min more) -- writing the checkpoint
~20-30 s; imports and loading 8 GB onto the GPU ~30-40 s; the sampler's batch-1 programs
(scanned prefill, unrolled decode) ~40-60 s (the H200 compiled and ran one in 37 s), shared by
held-out before / after, both collections; RfR rollouts a second sampler program ~40 s; the KTO
step's compile (scanned, remat, 2,048 + 256 tokens) ~60-120 s; two KTO steps, 8
decisions of <= 192 tokens and the export, seconds each. So it may well be cut in KTO: exit 3
then still gives every phase it finished, which is what the lease is for.

It prints the run's log as it comes, then each phase's wall time (the run's own "phase ...
done in" lines; setup and the held-out evaluations from the arrival times of its log lines),
the requests the fake served and the windows they covered, and the run's closing summary.
It checks the run dir: ``config.json`` is the paper preset but for the checkpoint and the
base URL (and the shortened steps), the reflections cover every step with the fake's labels,
and the PEFT adapter loads with peft onto the tiny checkpoint (when peft and torch are
installed). Then it replays the reflect phase offline (:func:`replay_reflect`) on the
collected steps tiled to 300, with the reflection and analysis a real Actor writes (the random
tiny Actor writes neither, so its own 300-step request is ~half the size and fits one
window): the preset's context then takes two windows, and every step must come back labelled
once. It exits non-zero when the run or a check fails.

What it cannot tell: speed and memory at Qwen3-4B on CPU (benchmarks/gpu_*.py,
bench_compile.py; ``--width full`` on a GPU), learning (the Actor is random) and how the real
DeepSeek-R1 answers (tests/fake_openai.py injects its faults).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "sf_ranslicing.py"
for _path in (ROOT, SCRIPT.parent):  # a bare checkout (no install); the CLI's modules
    if str(_path) not in sys.path:
        sys.path.insert(1, str(_path))

from fake_r1 import DUMMY_KEY, KEY_ENV, FakeR1  # noqa: E402

TINY_WIDTHS = {
    # Qwen3-4B's widths, small: 32/8 heads -> 8/2 (GQA 4 as there), head_dim 128 -> 16
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1024,
}
FULL_SHARD_BYTES = 4 * 10**9
"""Largest safetensors shard of the full-width checkpoint: a few ~4 GB files plus
``model.safetensors.index.json``, the sharded layout Qwen3-4B ships in."""


def qwen3_4b_fields() -> dict:
    """Qwen3-4B's ``config.json`` architecture: :meth:`Qwen3Config.qwen3_4b`'s
    :meth:`~Qwen3Config.to_hf` less what the writer sets itself (the special-token ids, which
    are the test tokenizer's; the dtype; ``max_window_layers``, the layer count) and the fields
    every Qwen3 has (``HF_FIXED_FIELDS``)."""
    from sfjax.models.config import HF_FIXED_FIELDS, Qwen3Config

    own = ("bos_token_id", "eos_token_id", "torch_dtype", "dtype", "max_window_layers")
    hf = Qwen3Config.qwen3_4b().to_hf()
    return {k: v for k, v in hf.items() if k not in own and k not in HF_FIXED_FIELDS}


def rollout_budget_gib(layers: int, preset_gib: float) -> float:
    """The preset's KV budget of one RfR rollout call (``--rfr.max-cache-gib-per-call``),
    scaled from Qwen3-4B's KV bytes per token to the tiny Actor's, so that the calls hold as
    many prompts as they would at Qwen3-4B (see the module docstring)."""
    from sfjax.models.config import Qwen3Config

    big = Qwen3Config.qwen3_4b()
    tiny = layers * TINY_WIDTHS["num_key_value_heads"] * TINY_WIDTHS["head_dim"]
    return preset_gib * tiny / (big.num_layers * big.num_kv_heads * big.head_dim)


def actor_fields(width: str, layers: int) -> dict:
    """The Actor's config fields at ``width``: Qwen3-4B's (``full``), or with
    :data:`TINY_WIDTHS` and ``layers`` decoder layers (``tiny``)."""
    tiny = {**TINY_WIDTHS, "num_hidden_layers": layers} if width == "tiny" else {}
    return qwen3_4b_fields() | tiny


def tiny_paper_checkpoint(path: Path, layers: int, seed: int = 0) -> Path:
    """A tiny random Qwen3 in Qwen3-4B's layout: its config with :data:`TINY_WIDTHS` and
    ``layers`` decoder layers, bf16 weights."""
    from sfjax.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(path, actor_fields("tiny", layers), seed=seed, dtype="bfloat16")


def full_width_checkpoint(path: Path, seed: int = 0, fields: dict | None = None,
                          max_shard_bytes: int = FULL_SHARD_BYTES) -> Path:
    """A random Qwen3-4B: its config (``fields``, default :func:`qwen3_4b_fields`; the tests
    pass fewer layers and smaller widths), bf16 weights under Hugging Face's names in
    :data:`FULL_SHARD_BYTES` shards, drawn once per distinct shape
    (:func:`sfjax.testing.per_shape_hf_weights`: 0.46 B random values instead of 4.0 B, and no
    copy of them: safetensors writes from the arrays). Normal weights with std 0.02, norms
    around 1: activations and logits of order 1-10, finite in bf16."""
    from sfjax.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(path, qwen3_4b_fields() if fields is None else fields,
                                 seed=seed, dtype="bfloat16", max_shard_bytes=max_shard_bytes,
                                 per_shape=True)  # fmt: skip


def _peak_rss_gib(children: bool = False) -> float:
    """Peak resident memory of this process, or of its largest waited-for child, GiB."""
    import resource

    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 2**20  # Linux reports KiB


def write_actor(ckpt: Path, width: str, layers: int) -> dict:
    """The Actor's checkpoint at ``width``, timed: seconds, bytes of weights, files, and this
    process's peak RSS before and after (the peak after is the writing's: nothing heavier ran
    before it). An existing checkpoint is reused if it has the width asked for."""
    want = actor_fields(width, layers)
    if (ckpt / "config.json").exists():
        got = json.loads((ckpt / "config.json").read_text())
        differ = sorted(k for k, v in want.items() if got.get(k) != v)
        if differ:
            raise SystemExit(f"{ckpt} holds another Actor ({differ} differ from --width "
                             f"{width}); use another --work-dir")  # fmt: skip
        return {"reused": str(ckpt)}
    rss0, t0 = _peak_rss_gib(), time.perf_counter()
    if width == "full":
        full_width_checkpoint(ckpt)
    else:
        tiny_paper_checkpoint(ckpt, layers)
    files = sorted(ckpt.glob("*.safetensors"))
    return {"seconds": round(time.perf_counter() - t0, 2),
            "weights_bytes": sum(f.stat().st_size for f in files),
            "files": len(files), "peak_rss_gib": round(_peak_rss_gib(), 2),
            "rss_before_gib": round(rss0, 2)}  # fmt: skip


# -- the run -----------------------------------------------------------------------------------

_PHASE_DONE = re.compile(r"phase (\S+) done in ([\d.]+) s")


@dataclasses.dataclass
class Line:
    t: float
    """Seconds since the run started, when the line arrived."""
    text: str


STOP_GRACE_S = 10.0
"""Seconds between SIGTERM and SIGKILL when the budget stops the run."""
EXIT_CUT = 3
"""Exit status when ``--budget-s`` stopped the run (1: the run or a check failed; 2: bad
arguments)."""


def run_preset(args: list[str], env: dict, echo: bool = True,
               deadline: float | None = None) -> tuple[int, list[Line], bool]:
    """``sf_ranslicing.py paper ARGS`` in a subprocess; (its exit status, its output lines with
    arrival times, whether ``deadline`` -- a ``time.perf_counter()`` value -- stopped it). At
    the deadline its process group gets SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`."""
    cmd = [sys.executable, str(SCRIPT), "paper", *args]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)  # its own group: stopped as a whole
    lines: list[Line] = []

    def pump():
        for text in proc.stdout:
            lines.append(Line(time.perf_counter() - t0, text.rstrip("\n")))
            if echo:
                print(f"  | {text}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    cut = False
    try:
        try:
            rc = proc.wait(None if deadline is None else max(deadline - time.perf_counter(), 0))
        except subprocess.TimeoutExpired:
            cut = True
            print(f"\n--budget-s: stopping the run after {time.perf_counter() - t0:.0f} s "
                  "(SIGTERM to its process group)", flush=True)  # fmt: skip
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
    except BaseException:  # e.g. Ctrl-C here: the run has its own session, stop it too
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    reader.join(timeout=10)
    return rc, lines, cut


_PHASE_START = re.compile(r"phase \d+/\d+ (\S+): ")
_KTO_BAR = re.compile(r"KTO:.*?(\d+)/(\d+) \[[^<]*<[^,]*, *([\d.]+)s/step")


def phase_times(lines: list[Line], total_s: float) -> list[tuple[str, float]]:
    """(phase, wall s): the run's own "phase ... done in" lines, and setup / held-out
    before / held-out after + adapter export from the arrival times of its log lines; RfR's
    rollouts inside each KTO phase; a phase the run did not finish, with how far it got."""
    out = []

    def first(pattern: str) -> float | None:
        return next((x.t for x in lines if re.search(pattern, x.text)), None)

    before = first(r"held-out evaluation \(before")
    first_phase = first(r"phase 1/\d+ ")
    after = first(r"held-out evaluation \(after")
    summary = first(r"=== Self-finetuning: summary ===")
    setup_end = before if before is not None else first_phase
    if setup_end is not None:
        out.append(("setup (imports, checks, model load, LoRA)", setup_end))
    if before is not None and first_phase is not None:
        out.append(("held-out before", first_phase - before))
    started, rollouts, bar, last_done = None, None, None, None
    for x in lines:
        if m := _PHASE_START.search(x.text):
            started, rollouts, bar = (m.group(1), x.t), None, None
        elif re.search(r"RfR rollouts: \d+ samples", x.text):
            rollouts = x.t
        elif re.search(r"RfR rollouts: \d+ desirable", x.text) and rollouts is not None:
            out.append(("  RfR rollouts", x.t - rollouts))
            rollouts = None
        elif m := _KTO_BAR.search(x.text):
            bar = m
        elif m := _PHASE_DONE.search(x.text):
            out.append((m.group(1), float(m.group(2))))
            started, last_done = None, x.t
    if started is not None and after is None:  # the run ended inside this phase
        name = f"{started[0]} (unfinished"
        if bar is not None:
            name += f": KTO step {bar.group(1)} of {bar.group(2)}, {bar.group(3)} s/step"
        out.append((name + ")", total_s - started[1]))
    end = summary if summary is not None else total_s
    if after is not None:
        out.append(("held-out after + summary + adapter export", end - after))
    elif started is None and last_done is not None and summary is not None:  # no held-out
        out.append(("summary + adapter export", end - last_done))
    out.append(("total (subprocess wall)", total_s))
    return out


def check_config(run_dir: Path, given: dict) -> list[str]:
    """``config.json`` departs from the paper preset in exactly the keys ``given`` (the dotted
    config keys the command line set, with their values where known, else None)."""
    import cli_common
    import sf_ranslicing

    got = json.loads((run_dir / "config.json").read_text())
    preset = cli_common.as_json(sf_ranslicing.PAPER)
    changed = {k: b for k, _, b in cli_common._changed(preset, got)}
    problems = []
    if set(changed) != set(given):
        problems.append(f"config.json departs from the paper preset in {sorted(changed)}, the "
                        f"command line set {sorted(given)}")  # fmt: skip
    wrong = [k for k, v in given.items() if v is not None and changed.get(k) != v]
    if wrong:
        problems.append(f"config.json holds other values for {wrong}")
    return problems


def check_run(run_dir: Path, ckpt: Path, given: dict, server: FakeR1, width: str) -> list[str]:
    """What the finished run left, checked; a list of problems (empty: fine)."""
    problems = check_config(run_dir, given)
    summary = json.loads((run_dir / "summary.json").read_text())
    refl = json.loads((run_dir / "reflections" / "iter_0.json").read_text())
    traj = json.loads((run_dir / "trajectories" / "iter_0.json").read_text())
    steps = [s["t"] for s in traj[0]["steps"]]
    if [x["step"] for x in refl[0]["labels"]] != steps:
        problems.append("the reflection does not label every step once")
    served = [s for r in server.requests for s in r["steps"]]
    if sorted(set(served)) != steps:
        problems.append(f"the fake was asked about steps {sorted(set(served))[:5]}..., not "
                        f"the trajectory's {len(steps)}")  # fmt: skip
    if server.errors:
        problems.append(f"the fake failed on {len(server.errors)} requests: {server.errors[:2]}")
    seeds = json.loads((run_dir / "config.json").read_text())["heldout"]["seeds"]
    if seeds and not summary.get("held_out"):
        problems.append("summary.json has no held-out before/after")
    problems += _check_adapter(run_dir / "adapter", ckpt, load=width == "tiny")
    return problems


FIELD_TEXT = ("the previous allocation kept slice 0 within its delay budget while slice 1 "
              "had room, so the load looks stable and a smaller change should be enough here")
"""An Actor's reflection / analysis as a real Qwen3-4B would write them (at least the 160
characters a reflection request shows of each); the tiny random Actor writes neither field."""


def replay_reflect(run_dir: Path, server: FakeR1, steps: int = 300) -> tuple[int, list]:
    """The reflect phase again, offline, on a trajectory as a real Actor leaves it: the run's
    collected steps tiled to ``steps`` (the preset's 300), each with a reflection and an
    analysis of :data:`FIELD_TEXT` (the tiny Actor's are empty, which keeps its requests
    small), through the run's own Reflector config against the fake. Returns (requests,
    windows as (first, last) step); nothing is cached or written. Raises if the labels do not cover every step once."""
    import cli_common
    import sf_ranslicing

    from sfjax.agents.reflector import make_reflector
    from sfjax.agents.trajectory import Step, Trajectory
    from sfjax.baselines.llm_agent import prompt_config_for_env
    from sfjax.envs.ran import RanSlicingEnv

    cfg = cli_common.with_values(sf_ranslicing.PAPER,
                                 json.loads((run_dir / "config.json").read_text()))  # fmt: skip
    prompt_cfg = prompt_config_for_env(RanSlicingEnv(cfg.env), cfg.actor.prompt)
    api = dataclasses.replace(cfg.reflector.api, base_url=server.url)  # this fake, not the run's
    got = json.loads((run_dir / "trajectories" / "iter_0.json").read_text())[0]["steps"]
    tiled = [Step(**{**got[t % len(got)], "t": t, "reflection": FIELD_TEXT,
                     "analysis": FIELD_TEXT}) for t in range(steps)]  # fmt: skip
    traj = Trajectory(0, 0, tiled)
    reflector = make_reflector(dataclasses.replace(cfg.reflector, api=api), prompt_cfg, None,
                               progress=False)  # fmt: skip
    before = len(server.requests)
    (reflection,) = reflector.reflect([traj])
    if [x.step for x in reflection.labels] != list(range(steps)):
        raise AssertionError("the replayed reflection does not label every step once")
    asked = server.requests[before:]
    return len(asked), [(r["steps"][0], r["steps"][-1]) for r in asked]


def _check_adapter(adapter: Path, ckpt: Path, load: bool = True) -> list[str]:
    """The exported adapter names the checkpoint, and has the tensors (names and shapes) peft
    builds for an adapter of its config on the checkpoint's architecture; with ``load``, it
    also loads with peft onto the checkpoint's weights and gives finite logits (torch on CPU:
    seconds at the tiny width, minutes and 16 GB for Qwen3-4B in float32, so not there)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    if cfg.get("base_model_name_or_path") != str(ckpt.resolve()):
        return [f"the adapter names {cfg.get('base_model_name_or_path')!r} as its base"]
    try:
        import torch  # noqa: F401
        from peft import PeftModel  # noqa: F401
    except ImportError:
        print("(peft / torch not installed: the adapter's tensors are not checked)")
        return []
    problems = adapter_matches_peft(adapter, ckpt)
    if problems:
        return problems
    if not load:
        print(f"adapter (r={cfg['r']}): its tensors are those peft builds on {ckpt.name}'s "
              "architecture (on torch's meta device); its load onto the weights is checked at "
              "the tiny width only")  # fmt: skip
        return []
    return _load_adapter(adapter, ckpt, cfg)


def adapter_matches_peft(adapter: Path, ckpt: Path) -> list[str]:
    """The adapter file's tensor names and shapes against those peft gives an adapter of its
    ``adapter_config.json`` on the checkpoint's architecture, built on torch's meta device (no
    weights read or allocated: as cheap for Qwen3-4B as for the tiny Actor)."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt))
        model = get_peft_model(base, LoraConfig.from_pretrained(adapter))
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    with safe_open(adapter / "adapter_model.safetensors", "np") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    problems = []
    if got.keys() != want.keys():
        problems.append(f"the adapter's tensors differ from peft's: {len(got)} against "
                        f"{len(want)}; only in the file {sorted(got.keys() - want.keys())[:3]}, "
                        f"only in peft's {sorted(want.keys() - got.keys())[:3]}")  # fmt: skip
    wrong = [k for k in got.keys() & want.keys() if got[k] != want[k]]
    if wrong:
        problems.append(f"the adapter's shapes differ from peft's for {len(wrong)} tensors, e.g. "
                        f"{wrong[0]}: {got[wrong[0]]} against {want[wrong[0]]}")  # fmt: skip
    return problems


def _load_adapter(adapter: Path, ckpt: Path, cfg: dict) -> list[str]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    if not torch.isfinite(logits).all():
        return ["the adapter loaded with peft gives non-finite logits"]
    print(f"adapter loads with peft onto {ckpt.name}: r={cfg['r']}, "
          f"{len(cfg['target_modules'])} target modules")  # fmt: skip
    return []


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="paper_rehearsal.py", description=__doc__.split("\n\n")[0],
        epilog=f"exit status: 0 ok, 1 the run or a check failed, 2 bad arguments, {EXIT_CUT} "
               "stopped by --budget-s")  # fmt: skip
    p.add_argument("--width", choices=("tiny", "full"), default="tiny",
                   help="the Actor: 'tiny' (Qwen3-4B's config with small widths, --layers "
                        "layers) or 'full' (Qwen3-4B's own config: 36 layers, hidden 2560, 8 GB "
                        "of random bf16 weights, for an accelerator; the rollout budget is then "
                        "the preset's)")  # fmt: skip
    p.add_argument("--layers", type=_positive, default=None, metavar="N",
                   help="decoder layers of the tiny Actor (default 4; not with --width full)")
    p.add_argument("--steps", type=_positive, default=None, metavar="N",
                   help="shorten the trajectory and the held-out episodes to N steps "
                        "(--loop.trajectory-steps, --heldout.num-steps; default: the preset's "
                        "300)")  # fmt: skip
    p.add_argument("--kto-iterations", type=_positive, default=None, metavar="N",
                   help="KTO iterations (--rfr.kto-iterations; default: the preset's 6)")
    p.add_argument("--rollouts", type=_positive, default=None, metavar="K",
                   help="RfR samples per unsolved prompt (--rfr.num-rollouts; default: the "
                        "preset's K = 8)")  # fmt: skip
    p.add_argument("--heldout-seeds", type=int, default=None, metavar="N",
                   help="held-out env seeds: the preset's first N (--heldout.seeds; 0 skips the "
                        "held-out evaluation; default: all 4)")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=None, metavar="S",
                   help="wall seconds for this script from its start: the run is stopped "
                        f"(SIGTERM, SIGKILL {STOP_GRACE_S:.0f} s later) in time to print what it "
                        f"measured by then, and the exit status is {EXIT_CUT}; the checks of a "
                        "run that finished are not counted in it")  # fmt: skip
    p.add_argument("--work-dir", default=None, metavar="DIR",
                   help="where the checkpoint and the run dir go (default: a new "
                        "runs/paper_rehearsal-<time>; an existing run dir is continued, as the "
                        "CLI does, and an existing checkpoint of the same width reused)")
    p.add_argument("--quiet", action="store_true", help="do not echo the run's output")
    p.add_argument("--unscaled-rollout-budget", action="store_true",
                   help="keep the preset's 32 GiB KV budget per RfR rollout call at the tiny "
                        "width (at the tiny Actor's KV size the full run's rollouts then go in "
                        "one call whose prefill needs ~30 GB on CPU); always so at full width")
    p.add_argument("--no-replay", action="store_true",
                   help="skip the offline replay of the reflect phase at 300 steps with the "
                        "Actor's reflection / analysis written out")
    p.add_argument("extra", nargs="*",
                   help="after --: more options for sf_ranslicing.py paper, departures from the "
                        "preset (the tests' short version); the config check expects them")
    a = p.parse_args(argv)
    if a.width == "full" and a.layers is not None:
        p.error("--layers sets the tiny Actor's depth; --width full is Qwen3-4B's 36 layers")
    a.layers = a.layers or (36 if a.width == "full" else 4)
    if a.heldout_seeds is not None and not 0 <= a.heldout_seeds <= len(_preset().heldout.seeds):
        p.error(f"--heldout-seeds takes 0 to {len(_preset().heldout.seeds)} (the preset's seeds "
                f"{list(_preset().heldout.seeds)}), got {a.heldout_seeds}")  # fmt: skip
    if a.budget_s is not None and a.budget_s <= STOP_GRACE_S + BUDGET_MARGIN_S:
        p.error(f"--budget-s must exceed {STOP_GRACE_S + BUDGET_MARGIN_S:.0f} s (the stop's grace "
                "and the closing report)")  # fmt: skip
    return a


BUDGET_MARGIN_S = 5.0
"""Seconds ``--budget-s`` keeps after the stop's grace for the closing report."""


def _preset():
    """The paper preset (experiments/sf_ranslicing.py ``PAPER``)."""
    import sf_ranslicing

    return sf_ranslicing.PAPER


def shortening(a) -> tuple[list[str], dict]:
    """The CLI options of the shortening flags, as a user types them, and the config keys and
    values they set (what :func:`check_config` expects)."""
    args, given = [], {}
    if a.steps is not None:
        args += ["--loop.trajectory-steps", str(a.steps), "--heldout.num-steps", str(a.steps)]
        given |= {"loop.trajectory_steps": a.steps, "heldout.num_steps": a.steps}
    if a.kto_iterations is not None:
        args += ["--rfr.kto-iterations", str(a.kto_iterations)]
        given["rfr.kto_iterations"] = a.kto_iterations
    if a.rollouts is not None:
        args += ["--rfr.num-rollouts", str(a.rollouts)]
        given["rfr.num_rollouts"] = a.rollouts
    if a.heldout_seeds is not None:
        seeds = list(_preset().heldout.seeds[: a.heldout_seeds])
        args += ["--heldout.seeds", *map(str, seeds)]
        given["heldout.seeds"] = seeds
    # a value equal to the preset's is no departure (config.json shows none)
    return args, {k: v for k, v in given.items() if _preset_value(k) != v}


def _preset_value(dotted: str):
    """The paper preset's value of a dotted config key, as config.json holds it."""
    import cli_common

    return cli_common._get(cli_common.as_json(_preset()), dotted)


def _dotted(option: str) -> str:
    """``--rfr.kto-iterations`` -> ``rfr.kto_iterations`` (a config key as config.json has it)."""
    return option.removeprefix("--").split("=")[0].replace("-", "_")


def main(argv=None) -> int:
    t_start = time.perf_counter()
    a = parse_args(argv)
    work = Path(a.work_dir or ROOT / "runs" / time.strftime("paper_rehearsal-%Y%m%d-%H%M%S"))
    work.mkdir(parents=True, exist_ok=True)
    name = "tiny_qwen3_4b_layout" if a.width == "tiny" else "random_qwen3_4b"
    ckpt, run_dir = work / name, work / "run"
    wrote = write_actor(ckpt, a.width, a.layers)
    print(f"Actor checkpoint {ckpt} ({a.width} width): {json.dumps(wrote)}", flush=True)
    os.environ[KEY_ENV] = DUMMY_KEY  # the run's and the replay's: only the fakes see it
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    deadline = None if a.budget_s is None else t_start + a.budget_s - STOP_GRACE_S - BUDGET_MARGIN_S
    with FakeR1() as server:
        args = ["--model.checkpoint", str(ckpt), "--reflector.api.base-url", server.url,
                "--run-dir", str(run_dir)]  # fmt: skip
        given = {"run_dir": str(run_dir), "model.checkpoint": str(ckpt),
                 "reflector.api.base_url": server.url}  # fmt: skip
        short_args, short_given = shortening(a)
        args += short_args
        given |= short_given
        if a.width == "tiny" and not a.unscaled_rollout_budget:  # see the docstring
            gib = rollout_budget_gib(a.layers, _preset().rfr.max_cache_gib_per_call)
            args += ["--rfr.max-cache-gib-per-call", f"{gib:.6g}"]
            given["rfr.max_cache_gib_per_call"] = float(f"{gib:.6g}")
        args += a.extra
        given.update({_dotted(x): None for x in a.extra if x.startswith("--")})
        t0 = time.perf_counter()
        rc, lines, cut = run_preset(args, env, echo=not a.quiet, deadline=deadline)
        total = time.perf_counter() - t0
    shortened = " ".join(short_args) or "none"
    actor = (f"tiny Actor with {a.layers} layers" if a.width == "tiny"
             else "random Qwen3-4B (full width)")  # fmt: skip
    print(f"\n=== paper preset rehearsal ({actor}; shortened: {shortened}; fake R1 at "
          f"{server.url}) ===")  # fmt: skip
    if "seconds" in wrote:
        print(f"  Actor checkpoint written in {wrote['seconds']:.1f} s: "
              f"{wrote['weights_bytes'] / 1e6:,.1f} MB of weights in {wrote['files']} "
              f"safetensors files; peak RSS {wrote['peak_rss_gib']} GiB "
              f"({wrote['rss_before_gib']} GiB before writing)")  # fmt: skip
    for phase, sec in phase_times(lines, total):
        print(f"  {phase:<64} {sec:8.1f} s")
    print(f"  peak RSS of the run: {_peak_rss_gib(children=True):.2f} GiB")
    windows = [(r["steps"][0], r["steps"][-1]) for r in server.requests if r["steps"]]
    print(f"  API requests served: {len(server.requests)}; windows (first-last step): "
          f"{windows}; request sizes (chars): {[r['chars'] for r in server.requests]}")
    if cut:
        problems = check_config(run_dir, given) if (run_dir / "config.json").exists() else []
        print("  config.json: " + ("; ".join(problems) if problems else "the preset but for what "
                                  "the command line set"))  # fmt: skip
        print(f"STOPPED by --budget-s {a.budget_s:g} after {time.perf_counter() - t_start:.0f} s "
              f"(the run's status {rc}); the phases above are what it measured")  # fmt: skip
        return EXIT_CUT
    if rc != 0:
        tail = "\n".join(x.text for x in lines[-30:])
        print(f"FAILED: the run exited with status {rc}; its last lines:\n{tail}")
        return 1
    problems = check_run(run_dir, ckpt, given, server, a.width)
    if not a.no_replay:
        with FakeR1() as replay_server:
            n, windows = replay_reflect(run_dir, replay_server)
        print(f"  reflect replay at 300 steps with the Actor's fields written out: {n} "
              f"requests, windows {windows}")
    summary = json.loads((run_dir / "summary.json").read_text())
    print("  reflector calls (summary.json):", json.dumps(summary.get("reflector_calls")))
    print("  timings_s (summary.json):", json.dumps(
        {k: round(v, 1) for k, v in summary["timings_s"].items() if not k.endswith("_count")}))
    if problems:
        print("FAILED checks:\n  " + "\n  ".join(problems))
        return 1
    start = next((i for i, x in enumerate(lines) if "=== Self-finetuning: summary ===" in x.text),
                 len(lines))
    print("\n" + "\n".join(x.text for x in lines[start:]))
    print(f"OK: run dir {run_dir}")
    return 0


if __name__ == "__main__":
    import jax

    # this process's own JAX work (the reflect replay's env) stays on the CPU: the run, a
    # child process, owns the accelerator
    jax.config.update("jax_platforms", "cpu")
    sys.exit(main())
