"""benchmarks/paper_rehearsal.py: its fake DeepSeek-R1 labels steps as the offline rule
labeller does and answers in shapes the api Reflector reads, and (slow) the paper preset runs
end to end through its CLI on a tiny Actor against it, shortened."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

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
    got = pr.rule_labels(reflection_system_prompt(cfg), user)
    want = RuleReflector(RuleReflectorConfig(), cfg).label(traj)
    assert [(x["step"], x["label"], x["improved_action"]) for x in got] == [
        (x.step, x.label, x.improved_action) for x in want
    ]
    assert 0 < sum(x.label == "suboptimal" for x in want) < 60
    steps, actions = [s.t for s in traj.steps], [s.action for s in traj.steps]
    for shape in pr.SHAPES:
        content, reasoning = pr.r1_reply(got, shape)
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

    monkeypatch.setenv(pr.KEY_ENV, pr.DUMMY_KEY)
    trajs = [_trajectory(30, s) for s in range(4)]
    for i, t in enumerate(trajs):
        t.env_index = i
    with pr.FakeR1() as server:
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

    monkeypatch.setenv(pr.KEY_ENV, pr.DUMMY_KEY)
    (tmp_path / "trajectories").mkdir()
    (tmp_path / "config.json").write_text(json.dumps(cli_common.as_json(sf_ranslicing.PAPER)))
    traj = _trajectory(8, 0)
    (tmp_path / "trajectories" / "iter_0.json").write_text(json.dumps([traj.to_json()]))
    with pr.FakeR1() as server:
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
