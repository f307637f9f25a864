r"""Rehearsal of the ``paper`` preset of experiments/sf_ranslicing.py on CPU, before an
accelerator session spends its minutes on it.

    PYTHONPATH=$PWD nice python benchmarks/paper_rehearsal.py             # the whole preset
    PYTHONPATH=$PWD nice python benchmarks/paper_rehearsal.py --steps 8   # a quick check

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
* the Reflector's endpoint is :class:`FakeR1`, an OpenAI-compatible server on 127.0.0.1 that
  answers like DeepSeek-R1: reasoning, ``</think>``, then the JSON list of labels, sometimes
  in a code fence or with prose after it, or with the reasoning in ``reasoning_content`` as
  DeepSeek's own API sends it. Its labels are meaningful: the project's offline rule
  labeller (:mod:`sfjax.agents.reflectors.rule`) applied to the steps it reads back from the
  request's text. The key is a dummy in ``DEEPSEEK_API_KEY`` (the preset's variable).

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

``--steps N`` shortens the trajectory and the held-out episodes to N steps (``--loop.
trajectory-steps N --heldout.num-steps N``), for a quick check only; the rehearsal is the
whole preset.

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

What it cannot tell: speed and memory at Qwen3-4B (benchmarks/gpu_*.py, bench_compile.py)
and how the real DeepSeek-R1 answers (tests/fake_openai.py injects its faults).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "sf_ranslicing.py"
if str(ROOT) not in sys.path:  # ``python benchmarks/paper_rehearsal.py`` from a bare checkout
    sys.path.insert(1, str(ROOT))

from sfjax.testing import LocalJSONServer, send_json  # noqa: E402

KEY_ENV = "DEEPSEEK_API_KEY"
"""The paper preset's key variable (``ApiReflectorConfig.api_key_env``); a dummy value here."""
DUMMY_KEY = "sk-rehearsal-dummy-key-0000"

TINY_QWEN3_4B = {
    # Qwen3-4B's config.json with small widths: 32/8 heads -> 8/2 (GQA 4 as there), tied
    # embeddings, its RoPE base, norm epsilon and 40960-token position range
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1024,
    "max_position_embeddings": 40960,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


def rollout_budget_gib(layers: int, preset_gib: float) -> float:
    """The preset's KV budget of one RfR rollout call (``--rfr.max-cache-gib-per-call``),
    scaled from Qwen3-4B's KV bytes per token to the tiny Actor's, so that the calls hold as
    many prompts as they would at Qwen3-4B (see the module docstring)."""
    from sfjax.models.config import Qwen3Config

    big = Qwen3Config.qwen3_4b()
    tiny = layers * TINY_QWEN3_4B["num_key_value_heads"] * TINY_QWEN3_4B["head_dim"]
    return preset_gib * tiny / (big.num_layers * big.num_kv_heads * big.head_dim)


def tiny_paper_checkpoint(path: Path, layers: int, seed: int = 0) -> Path:
    """A tiny random Qwen3 in Qwen3-4B's layout (bf16 weights, :data:`TINY_QWEN3_4B`)."""
    from sfjax.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(
        path, {**TINY_QWEN3_4B, "num_hidden_layers": layers}, seed=seed, dtype="bfloat16"
    )


# -- the fake DeepSeek-R1 endpoint -------------------------------------------------------------

_STEP_RE = re.compile(r"^step (\d+): state: (.*?) \| action (\d+)(.*)$", re.M)
_RANGE_RE = re.compile(r"\d+ PRBs each, from (\d+) to (\d+)\)")
_NUM = r"([-+]?\d+(?:\.\d+)?)"

SHAPES = ("r1_content", "fenced", "prose_after", "reasoning_content")
"""How the fake's replies come, in turn: R1 served without a reasoning parser (reasoning,
``</think>`` with no opening tag, the list), a code fence around the list after ``<think>...
</think>``, prose with brackets after the list, and DeepSeek's API (reasoning in
``reasoning_content``, the list alone in ``content``)."""


def _number(pattern: str, text: str, default: float = 0.0) -> float:
    m = re.search(pattern.replace("#", _NUM), text)
    return float(m.group(1)) if m else default


def steps_from_request(user: str):
    """The steps of a reflection request, read back from its text as
    :func:`sfjax.agents.reflectors.base.reflection_user_prompt` writes them (state, action,
    feedback; the Actor's own words between them are skipped)."""
    from sfjax.agents.trajectory import Step

    steps = []
    for m in _STEP_RE.finditer(user):
        t, state, action, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        feedback = rest.rpartition(" | feedback: ")[2]
        where = re.search(r"QoS violation \(([^)]*)\)", feedback)
        violation = "QoS violation" in feedback and "no QoS violation" not in feedback
        arrival = _number(r"arrivals # Mb/s", state) * 1e6
        fb = {
            "se": _number(r"SE # bit/s/Hz", feedback),
            "violation": float(violation),
            "reconfiguration": float("not reconfigured" not in feedback),
            "arrival_rate_bps": arrival,
            "queue_delta_bytes": 0.0,
            "dropped_bytes": _number(r"dropped # kB", feedback) * 1e3,
        }
        if where is not None:
            fb["slice_violation"] = float("slice 0" in where.group(1))
            fb["other_violation"] = float("slice 1" in where.group(1))
        prev = int(_number(r"allocation # ", state))
        state_d = {"prev_action": prev, "se": 0.0, "arrival_rate_bps": arrival,
                   "queue_delta_bytes": 0.0, "dropped_bytes": 0.0}  # fmt: skip
        steps.append(Step(t, state_d, "", "", "", action, "", True, fb))
    return steps


def rule_labels(system: str, user: str) -> list[dict]:
    """The fake Reflector's verdicts: the offline rule labeller on the request's steps."""
    from sfjax.agents.prompts import PromptConfig
    from sfjax.agents.reflectors.rule import RuleReflector, RuleReflectorConfig
    from sfjax.agents.trajectory import Trajectory

    m = _RANGE_RE.search(system)
    lo, hi = (int(m.group(1)), int(m.group(2))) if m else (1, 12)
    steps = steps_from_request(user)
    labels = RuleReflector(RuleReflectorConfig(), PromptConfig(action_lo=lo, action_hi=hi)).label(
        Trajectory(0, 0, steps)
    )
    return [
        {"step": x.step, "label": x.label, "improved_action": x.improved_action,
         "reason": x.reason.removeprefix("[rule-based hindsight labeller] ")}
        for x in labels
    ]  # fmt: skip


def r1_reply(labels: list[dict], shape: str) -> tuple[str, str | None]:
    """(content, reasoning_content) of a reply in the given :data:`SHAPES` entry."""
    answer = json.dumps(labels, indent=1)
    n_sub = sum(x["label"] == "suboptimal" for x in labels)
    thinking = (
        f"Okay, let me go through the {len(labels)} steps [{labels[0]['step']}..."
        f"{labels[-1]['step']}] one by one. A step with a violation {{slice 0}} needs more; "
        f"a short dip that came back is [not worth] two reconfigurations. So {n_sub} are "
        "suboptimal. Let me write the list."
    )
    if shape == "r1_content":
        return f"{thinking}\n</think>\n\n{answer}", None
    if shape == "fenced":
        return f"<think>\n{thinking}\n</think>\n\n```json\n{answer}\n```", None
    if shape == "prose_after":
        return (f"{thinking}\n</think>\n\n{answer}\n\nNote: steps [{labels[0]['step']}] and "
                f"[{labels[-1]['step']}] were borderline {{see above}}."), None  # fmt: skip
    return answer, thinking


class FakeR1(LocalJSONServer):
    """``with FakeR1() as server: server.url``; ``server.requests`` lists what it served."""

    def __init__(self):
        self.requests: list[dict] = []
        self.errors: list[str] = []
        super().__init__(path="/v1")

    def handle_post(self, h, body: dict) -> None:
        try:
            code, reply = self.answer(h.path, h.headers, body)
        except Exception as e:  # a bug of the fake: a 500 the client retries, noted
            with self.lock:
                self.errors.append(f"{type(e).__name__}: {e}")
            code, reply = 500, {"error": {"message": f"fake R1 failed: {e}"}}
        send_json(h, code, reply)

    def answer(self, path: str, headers, body: dict) -> tuple[int, dict]:
        if path.rstrip("/") != "/v1/chat/completions":
            return 404, {"error": {"message": f"no route {path}"}}
        if headers.get("Authorization") != f"Bearer {DUMMY_KEY}":
            return 401, {"error": {"message": "Authentication Fails (wrong key)"}}
        messages = body["messages"]
        system, user = messages[0]["content"], messages[1]["content"]
        labels = rule_labels(system, user)
        with self.lock:
            n = len(self.requests)
            self.requests.append({
                "model": body.get("model"), "max_tokens": body.get("max_tokens"),
                "messages": len(messages), "chars": sum(len(m["content"]) for m in messages),
                "steps": [x["step"] for x in labels],
            })  # fmt: skip
        if not labels:  # a request without steps (Reflexion's self-reflection): a lesson
            content, reasoning = "Thinking.\n</think>\n\nLesson: react to violations.", None
        else:
            content, reasoning = r1_reply(labels, SHAPES[n % len(SHAPES)])
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        return 200, {
            "id": f"fake-r1-{n}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }  # fmt: skip


# -- the run -----------------------------------------------------------------------------------

_PHASE_DONE = re.compile(r"phase (\S+) done in ([\d.]+) s")


@dataclasses.dataclass
class Line:
    t: float
    """Seconds since the run started, when the line arrived."""
    text: str


def run_preset(args: list[str], env: dict, echo: bool = True) -> tuple[int, list[Line]]:
    """``sf_ranslicing.py paper ARGS`` in a subprocess; its output lines with arrival times."""
    cmd = [sys.executable, str(SCRIPT), "paper", *args]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip
    lines = []
    for text in proc.stdout:
        lines.append(Line(time.perf_counter() - t0, text.rstrip("\n")))
        if echo:
            print(f"  | {text}", end="", flush=True)
    return proc.wait(), lines


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
    if before is not None:
        out.append(("setup (imports, checks, model load, LoRA)", before))
        if first_phase is not None:
            out.append(("held-out before", first_phase - before))
    started, rollouts, bar = None, None, None
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
            started = None
    if started is not None and after is None:  # the run ended inside this phase
        name = f"{started[0]} (unfinished"
        if bar is not None:
            name += f": KTO step {bar.group(1)} of {bar.group(2)}, {bar.group(3)} s/step"
        out.append((name + ")", total_s - started[1]))
    if after is not None:
        end = summary if summary is not None else total_s
        out.append(("held-out after + summary + adapter export", end - after))
    out.append(("total (subprocess wall)", total_s))
    return out


def check_run(run_dir: Path, ckpt: Path, given: dict, server: FakeR1) -> list[str]:
    """What the run left, checked; a list of problems (empty: fine). ``given``: the dotted
    config keys set on the command line, with their values where known (else None)."""
    problems = []
    import cli_common
    import sf_ranslicing

    got = json.loads((run_dir / "config.json").read_text())
    preset = cli_common.as_json(sf_ranslicing.PAPER)
    changed = {k: b for k, _, b in cli_common._changed(preset, got)}
    if set(changed) != set(given):
        problems.append(f"config.json departs from the paper preset in {sorted(changed)}, the "
                        f"command line set {sorted(given)}")  # fmt: skip
    wrong = [k for k, v in given.items() if v is not None and changed.get(k) != v]
    if wrong:
        problems.append(f"config.json holds other values for {wrong}")
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
    if not summary.get("held_out"):
        problems.append("summary.json has no held-out before/after")
    problems += _check_adapter(run_dir / "adapter", ckpt)
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


def _check_adapter(adapter: Path, ckpt: Path) -> list[str]:
    """The exported adapter names the checkpoint and loads with peft onto it."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    if cfg.get("base_model_name_or_path") != str(ckpt.resolve()):
        return [f"the adapter names {cfg.get('base_model_name_or_path')!r} as its base"]
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("(peft / torch not installed: the adapter's load is not checked)")
        return []
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    if not torch.isfinite(logits).all():
        return ["the adapter loaded with peft gives non-finite logits"]
    print(f"adapter loads with peft onto {ckpt.name}: r={cfg['r']}, "
          f"{len(cfg['target_modules'])} target modules")  # fmt: skip
    return []


def _dotted(option: str) -> str:
    """``--rfr.kto-iterations`` -> ``rfr.kto_iterations`` (a config key as config.json has it)."""
    return option.removeprefix("--").split("=")[0].replace("-", "_")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None,
                   help="shorten the trajectory and the held-out episodes to N steps (a quick "
                        "check; default: the preset's 300)")  # fmt: skip
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the tiny Actor (4)")
    p.add_argument("--work-dir", default=None,
                   help="where the checkpoint and the run dir go (default: a new "
                        "runs/paper_rehearsal-<time>; an existing run dir is continued, as the "
                        "CLI does)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="do not echo the run's output")
    p.add_argument("--unscaled-rollout-budget", action="store_true",
                   help="keep the preset's 32 GiB KV budget per RfR rollout call (at the tiny "
                        "Actor's KV size the full run's rollouts then go in one call whose "
                        "prefill needs ~30 GB on CPU)")  # fmt: skip
    p.add_argument("--no-replay", action="store_true",
                   help="skip the offline replay of the reflect phase at 300 steps with the "
                        "Actor's reflection / analysis written out")
    p.add_argument("extra", nargs="*",
                   help="after --: more options for sf_ranslicing.py paper, departures from the "
                        "preset (the tests' short version); the config check expects them")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    work = Path(a.work_dir or ROOT / "runs" / time.strftime("paper_rehearsal-%Y%m%d-%H%M%S"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, run_dir = work / "tiny_qwen3_4b_layout", work / "run"
    if not (ckpt / "config.json").exists():
        tiny_paper_checkpoint(ckpt, a.layers)
    os.environ[KEY_ENV] = DUMMY_KEY  # the run's and the replay's: only the fakes see it
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with FakeR1() as server:
        args = ["--model.checkpoint", str(ckpt), "--reflector.api.base-url", server.url,
                "--run-dir", str(run_dir)]  # fmt: skip
        given = {"run_dir": str(run_dir), "model.checkpoint": str(ckpt),
                 "reflector.api.base_url": server.url}  # fmt: skip
        if a.steps is not None:  # the quick version only
            args += ["--loop.trajectory-steps", str(a.steps), "--heldout.num-steps", str(a.steps)]
            given.update({"loop.trajectory_steps": a.steps, "heldout.num_steps": a.steps})
        if not a.unscaled_rollout_budget:  # the one departure for the CPU: see the docstring
            import sf_ranslicing

            gib = rollout_budget_gib(a.layers, sf_ranslicing.PAPER.rfr.max_cache_gib_per_call)
            args += ["--rfr.max-cache-gib-per-call", f"{gib:.6g}"]
            given["rfr.max_cache_gib_per_call"] = float(f"{gib:.6g}")
        args += a.extra
        given.update({_dotted(x): None for x in a.extra if x.startswith("--")})
        t0 = time.perf_counter()
        rc, lines = run_preset(args, env, echo=not a.quiet)
        total = time.perf_counter() - t0
    print(f"\n=== paper preset rehearsal ({'full' if a.steps is None else f'--steps {a.steps}'}"
          f", tiny Actor with {a.layers} layers, fake R1 at {server.url}) ===")  # fmt: skip
    for name, s in phase_times(lines, total):
        print(f"  {name:<64} {s:8.1f} s")
    windows = [(r["steps"][0], r["steps"][-1]) for r in server.requests if r["steps"]]
    print(f"  API requests served: {len(server.requests)}; windows (first-last step): "
          f"{windows}; request sizes (chars): {[r['chars'] for r in server.requests]}")
    if rc != 0:
        tail = "\n".join(x.text for x in lines[-30:])
        print(f"FAILED: the run exited with status {rc}; its last lines:\n{tail}")
        return 1
    problems = check_run(run_dir, ckpt, given, server)
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
    sys.exit(main())
