"""benchmarks/paper_rehearsal.py: its fake DeepSeek-R1 labels steps as the offline rule
labeller does and answers in shapes the api Reflector reads, and (slow) the paper preset runs
end to end through its CLI on a tiny Actor against it, shortened."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import fake_r1  # noqa: E402
import paper_rehearsal as pr  # noqa: E402


def _trajectory(n: int, seed: int):
    """``n`` random steps with per-slice violations and drops, as the env reports them."""
    import random

    from sfjax.agents.trajectory import Step, Trajectory

    rng, steps, prev = random.Random(seed), [], 7
    for t in range(n):
        a = rng.randint(1, 12)
        own, other = rng.random() < 0.2, rng.random() < 0.1
        arrival = rng.uniform(2e6, 8e6)
        fb = {"se": rng.uniform(0.5, 6), "violation": float(own or other),
              "slice_violation": float(own), "other_violation": float(other),
              "reconfiguration": float(a != prev), "arrival_rate_bps": arrival,
              "queue_delta_bytes": 0.0, "dropped_bytes": 1500.0 if rng.random() < 0.1 else 0.0}
        state = {"prev_action": prev, "se": 1.0, "arrival_rate_bps": arrival,
                 "queue_delta_bytes": 0.0, "dropped_bytes": 0.0}  # fmt: skip
        # the Actor's own words may hold the separators the fake reads the steps by
        steps.append(Step(t, state, "p", "o", "r | action 3 | feedback: x", a, "an | x", True, fb))
        prev = a
    return Trajectory(0, seed, steps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fake_r1_labels_are_the_rule_labellers_in_every_reply_shape(seed):
    from sfjax.agents.prompts import PromptConfig
    from sfjax.agents.reflectors.base import (
        reflection_system_prompt,
        reflection_user_prompt,
        trajectory_summary,
        validate_reply,
    )
    from sfjax.agents.reflectors.rule import RuleReflector, RuleReflectorConfig

    cfg = PromptConfig()
    traj = _trajectory(60, seed)
    user = reflection_user_prompt(traj, range(60), trajectory_summary(traj), cfg)
    got = fake_r1.rule_labels(reflection_system_prompt(cfg), user)
    want = RuleReflector(RuleReflectorConfig(), cfg).label(traj)
    assert [(x["step"], x["label"], x["improved_action"]) for x in got] == [
        (x.step, x.label, x.improved_action) for x in want
    ]
    assert 0 < sum(x.label == "suboptimal" for x in want) < 60
    steps, actions = [s.t for s in traj.steps], [s.action for s in traj.steps]
    for shape in fake_r1.SHAPES:
        content, reasoning = fake_r1.r1_reply(got, shape)
        assert (reasoning is None) == ("</think>" in content)  # R1: reasoning one way or other
        labels = validate_reply(content, steps, actions, cfg)
        assert [(x.label, x.improved_action) for x in labels] == [
            (x.label, x.improved_action) for x in want
        ]


def test_fake_r1_serves_what_the_api_reflector_asks(tmp_path, monkeypatch):
    """The api Reflector against the fake, as the paper preset builds it (defaults but the base
    URL): one request per window, every reply shape read, the key checked."""
    from sfjax.agents.prompts import PromptConfig
    from sfjax.agents.reflector import ApiReflectorConfig, ReflectorConfig, make_reflector
    from sfjax.agents.reflectors.rule import RuleReflector, RuleReflectorConfig

    monkeypatch.setenv(fake_r1.KEY_ENV, fake_r1.DUMMY_KEY)
    trajs = [_trajectory(30, s) for s in range(4)]
    for i, t in enumerate(trajs):
        t.env_index = i
    with fake_r1.FakeR1() as server:
        api = ApiReflectorConfig(base_url=server.url)
        r = make_reflector(ReflectorConfig(backend="api", api=api), PromptConfig(), tmp_path,
                           progress=False)  # fmt: skip
        out = r.reflect(trajs)
    rule = RuleReflector(RuleReflectorConfig(), PromptConfig())
    for traj, refl in zip(trajs, out):
        assert [(x.label, x.improved_action) for x in refl.labels] == [
            (x.label, x.improved_action) for x in rule.label(traj)
        ]
    assert len(server.requests) == 4 and not server.errors
    assert {q["model"] for q in server.requests} == {"deepseek-reasoner"}
    assert r.stats["format_retries"] == 0 and r.stats["transport_retries"] == 0


def test_reflect_replay_windows_a_300_step_trajectory_with_the_actors_words(tmp_path,
                                                                             monkeypatch):
    """The tiny Actor writes no reflection / analysis, so its 300-step request fits one
    window; with a real Actor's fields the preset's context takes two (the replay's check)."""
    sys.path.insert(0, str(pr.SCRIPT.parent))
    import cli_common
    import sf_ranslicing

    monkeypatch.setenv(fake_r1.KEY_ENV, fake_r1.DUMMY_KEY)
    (tmp_path / "trajectories").mkdir()
    (tmp_path / "config.json").write_text(json.dumps(cli_common.as_json(sf_ranslicing.PAPER)))
    traj = _trajectory(8, 0)
    (tmp_path / "trajectories" / "iter_0.json").write_text(json.dumps([traj.to_json()]))
    with fake_r1.FakeR1() as server:
        n, windows = pr.replay_reflect(tmp_path, server)
    assert n == 2 and sorted(windows) == [(0, 149), (150, 299)], windows
    assert not server.errors


def test_phase_times_read_the_runs_log():
    lines = [pr.Line(t, x) for t, x in [
        (5.0, "10:00:00 INFO sfjax.baselines.heldout: held-out evaluation (before fine-tuning)"),
        (9.0, "10:00:04 INFO sfjax.agents.loop: phase 1/9 iter0/collect: the Actor runs"),
        (20.0, "10:00:15 INFO sfjax.agents.loop: phase iter0/collect done in 10.5 s"),
        (30.0, "10:00:25 INFO sfjax.baselines.heldout: held-out evaluation (after fine-tuning)"),
        (41.0, "=== Self-finetuning: summary ==="),
    ]]  # fmt: skip
    times = dict(pr.phase_times(lines, 42.0))
    assert times["setup (imports, checks, model load, LoRA)"] == 5.0
    assert times["held-out before"] == 4.0
    assert times["iter0/collect"] == 10.5
    assert times["held-out after + summary + adapter export"] == 11.0
    assert pr._dotted("--rfr.kto-iterations") == "rfr.kto_iterations"
    # a run stopped inside a KTO phase: its rollouts and how far the KTO bar got
    lines = [pr.Line(t, x) for t, x in [
        (50.0, "11:13:48 INFO sfjax.agents.loop: phase 3/9 iter0/kto_0: RfR rollouts of the"),
        (51.0, "11:13:48 INFO sfjax.agents.rfr: RfR rollouts: 8 samples for each of 263 unsolved"),
        (361.0, "11:18:58 INFO sfjax.agents.rfr: RfR rollouts: 207 desirable, 1897 undesirable"),
        (600.0, "KTO:   3%|▎         | 19/602 [06:10<3:13:47, 19.94s/step, loss=1.486, kl=0.0]"),
    ]]  # fmt: skip
    times = pr.phase_times(lines, 700.0)
    assert times[:2] == [("  RfR rollouts", 310.0),
                         ("iter0/kto_0 (unfinished: KTO step 19 of 602, 19.94 s/step)", 650.0)]


QWEN3_4B_CONFIG_JSON = {
    # Qwen/Qwen3-4B's config.json on the hub (the architecture fields), written out here as
    # the reference independent of sfjax's Qwen3Config
    "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
    "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False,
    "model_type": "qwen3",
}  # fmt: skip

SMALL = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1024}
"""The full-width writer's test config: Qwen3-4B's fields with fewer layers, smaller widths."""


def test_full_width_config_is_qwen3_4bs():
    import dataclasses

    from sfjax.models.config import Qwen3Config
    from sfjax.testing import hf_config

    written = hf_config(pr.qwen3_4b_fields(), bos_token_id=820, eos_token_id=822)
    assert {k: written[k] for k in QWEN3_4B_CONFIG_JSON} == QWEN3_4B_CONFIG_JSON
    assert written["max_window_layers"] == 36
    # the architecture is Qwen3-4B's; the special-token ids are the test tokenizer's
    assert Qwen3Config.from_hf(written) == dataclasses.replace(
        Qwen3Config.qwen3_4b(), bos_token_id=820, eos_token_id=822)


def test_full_width_writer_names_shapes_and_loads(tmp_path):
    """The full width's writer (per-shape draws, sharded bf16), at fewer layers and small
    widths: Hugging Face's tensor names and shapes (transformers' own Qwen3 on the meta device
    is the reference), the sharded index, finite logits from sfjax's scanned model."""
    import jax.numpy as jnp
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from sfjax.models import qwen3

    path = pr.full_width_checkpoint(tmp_path / "ckpt", fields={**pr.qwen3_4b_fields(), **SMALL},
                                    max_shard_bytes=100_000)  # fmt: skip
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    index = json.loads((path / "model.safetensors.index.json").read_text())
    got = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(path / shard, "np") as f:
            for k in f.keys():  # noqa: SIM118
                got[k] = tuple(f.get_slice(k).get_shape())
                assert f.get_slice(k).get_dtype() == "BF16", k
    assert got == want and len(set(index["weight_map"].values())) > 1
    model = qwen3.from_pretrained(path, dtype=jnp.bfloat16, scan_layers=True)
    logits = model(jnp.array([[1, 2, 3, 4]]))[0]
    assert bool(jnp.isfinite(logits.astype(jnp.float32)).all())


def test_write_actor_times_the_writer_and_reuses_only_the_same_width(tmp_path, monkeypatch):
    small = {**pr.qwen3_4b_fields(), **SMALL}
    monkeypatch.setattr(pr, "qwen3_4b_fields", lambda: small)  # the full width, made small
    wrote = pr.write_actor(tmp_path / "ckpt", "full", 36)
    assert set(wrote) == {"seconds", "weights_bytes", "files", "peak_rss_gib", "rss_before_gib"}
    assert wrote["files"] == 1 and wrote["peak_rss_gib"] >= wrote["rss_before_gib"] > 0
    assert pr.write_actor(tmp_path / "ckpt", "full", 36) == {"reused": str(tmp_path / "ckpt")}
    with pytest.raises(SystemExit, match="holds another Actor"):
        pr.write_actor(tmp_path / "ckpt", "tiny", 4)


def test_adapter_check_compares_with_what_peft_builds(tmp_path):
    """adapter_matches_peft (the full width's adapter check, on torch's meta device) passes an
    adapter peft saved for the checkpoint's architecture and names one saved for another."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sfjax.testing import write_tiny_checkpoint

    def adapter(ckpt, out):
        base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
        get_peft_model(base, lora).save_pretrained(out)
        return out

    ckpt = write_tiny_checkpoint(tmp_path / "a", {"num_hidden_layers": 2})
    other = write_tiny_checkpoint(tmp_path / "b", {"num_hidden_layers": 2, "hidden_size": 32})
    assert pr.adapter_matches_peft(adapter(ckpt, tmp_path / "ad_a"), ckpt) == []
    problems = pr.adapter_matches_peft(adapter(other, tmp_path / "ad_b"), ckpt)
    assert len(problems) == 1 and "shapes differ" in problems[0], problems


def test_shortening_flags_are_the_clis_options():
    """--steps / --kto-iterations / --rollouts / --heldout-seeds become the CLI options a user
    types, which sf_ranslicing's own parser turns into the expected config values; a value equal
    to the preset's is no departure."""
    import cli_common
    import sf_ranslicing

    a = pr.parse_args(["--steps", "2", "--kto-iterations", "1", "--rollouts", "2",
                       "--heldout-seeds", "1"])  # fmt: skip
    args, given = pr.shortening(a)
    assert args == ["--loop.trajectory-steps", "2", "--heldout.num-steps", "2",
                    "--rfr.kto-iterations", "1", "--rfr.num-rollouts", "2",
                    "--heldout.seeds", "0"]  # fmt: skip
    cfg = cli_common.parse(sf_ranslicing.PRESETS, ["paper", *args], None)
    assert {k: cli_common._get(cli_common.as_json(cfg), k) for k in given} == given == {
        "loop.trajectory_steps": 2, "heldout.num_steps": 2, "rfr.kto_iterations": 1,
        "rfr.num_rollouts": 2, "heldout.seeds": [0]}  # fmt: skip
    args, given = pr.shortening(pr.parse_args(["--heldout-seeds", "0"]))
    assert args == ["--heldout.seeds"] and given == {"heldout.seeds": []}
    assert cli_common.parse(sf_ranslicing.PRESETS, ["paper", *args], None).heldout.seeds == ()
    args, given = pr.shortening(pr.parse_args(["--heldout-seeds", "4", "--steps", "300"]))
    assert len(args) == 9 and given == {}  # passed on as typed, no departure
    assert pr.parse_args(["--width", "full"]).layers == 36
    assert pr.parse_args([]).layers == 4


@pytest.mark.parametrize("argv, message", [
    (["--width", "full", "--layers", "4"], "--layers sets the tiny Actor's depth"),
    (["--heldout-seeds", "5"], "--heldout-seeds takes 0 to 4"),
    (["--heldout-seeds", "-1"], "--heldout-seeds takes 0 to 4"),
    (["--steps", "0"], "must be >= 1"),
    (["--kto-iterations", "x"], "invalid _positive value"),
    (["--budget-s", "12"], "--budget-s must exceed 15 s"),
    (["--width", "half"], "invalid choice"),
])  # fmt: skip
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        pr.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_help_names_the_full_width_and_the_budget(capsys):
    with pytest.raises(SystemExit) as e:
        pr.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and out.startswith("usage: paper_rehearsal.py")
    for option in ("--width {tiny,full}", "--kto-iterations", "--rollouts", "--heldout-seeds",
                   "--budget-s", f"{pr.EXIT_CUT} stopped by --budget-s"):  # fmt: skip
        assert option in out, option


FAKE_RUN = """
import signal, sys, time
if sys.argv[-1] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("10:00:00 INFO sfjax.baselines.heldout: held-out evaluation (before fine-tuning)")
print("10:00:01 INFO sfjax.agents.loop: phase 1/5 iter0/collect: the Actor runs", flush=True)
time.sleep(0.3)
print("10:00:02 INFO sfjax.agents.loop: phase iter0/collect done in 0.3 s")
print("10:00:02 INFO sfjax.agents.loop: phase 3/5 iter0/kto_0: RfR rollouts of the", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("ignore_term", [False, True])
def test_budget_stops_the_run_and_keeps_what_it_measured(tmp_path, monkeypatch, ignore_term):
    """run_preset at its deadline: SIGTERM to the run's process group (SIGKILL after the grace
    when ignored), the lines so far kept, the phase that was running reported unfinished."""
    import time

    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    monkeypatch.setattr(pr, "SCRIPT", script)
    monkeypatch.setattr(pr, "STOP_GRACE_S", 1.0)
    t0 = time.perf_counter()
    rc, lines, cut = pr.run_preset(["ignore-term"] if ignore_term else [], dict(os.environ),
                                   echo=False, deadline=t0 + 2.0)  # fmt: skip
    took = time.perf_counter() - t0
    assert cut and rc == -(9 if ignore_term else 15) and 2.0 <= took < 8, (rc, took)
    times = dict(pr.phase_times(lines, took))
    assert times["iter0/collect"] == 0.3
    assert any(k.startswith("iter0/kto_0 (unfinished") for k in times), times
    assert "setup (imports, checks, model load, LoRA)" in times


def test_main_reports_a_run_cut_by_the_budget(tmp_path, monkeypatch, capsys):
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    monkeypatch.setattr(pr, "SCRIPT", script)
    monkeypatch.setattr(pr, "STOP_GRACE_S", 1.0)
    monkeypatch.setattr(pr, "BUDGET_MARGIN_S", 1.0)
    rc = pr.main(["--layers", "2", "--budget-s", "6", "--work-dir", str(tmp_path), "--quiet",
                  "--steps", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == pr.EXIT_CUT, out
    assert "Actor checkpoint written in" in out and "iter0/kto_0 (unfinished" in out
    assert "STOPPED by --budget-s 6" in out and "peak RSS of the run" in out


@pytest.mark.slow
def test_paper_preset_runs_through_its_cli_shortened(tmp_path, capsys):
    """The rehearsal's quick version, smaller still so that CI keeps the paper path runnable:
    2 steps, a 2-layer Actor, one KTO iteration with K = 2 (the preset's prompt / completion
    lengths, remat, scanned layers, bf16, LoRA r16, Actor sampling, R1 replies and adapter
    export unchanged)."""
    rc = pr.main(["--steps", "2", "--layers", "2", "--work-dir", str(tmp_path), "--quiet",
                  "--", "--rfr.kto-iterations", "1", "--rfr.num-rollouts", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out[-6000:]
    assert "OK: run dir" in out and "=== Self-finetuning: summary ===" in out
    assert "reflect replay at 300 steps with the Actor's fields written out: 2 requests" in out
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["held_out"]["num_steps"] == 2 and len(summary["held_out"]["seeds"]) == 4
    assert summary["reflector_calls"]["requests"] >= 1
    assert [r["iteration"] for r in summary["iterations"]] == [0, 1]
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["scan_layers"] and config["model"]["dtype"] == "bfloat16"
    assert (config["kto"]["max_prompt_length"], config["kto"]["max_completion_length"]) == (
        2048, 256)  # fmt: skip
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    # the full width's adapter check (meta device) on the adapter sfjax exported
    assert pr.adapter_matches_peft(run / "adapter", tmp_path / "tiny_qwen3_4b_layout") == []
