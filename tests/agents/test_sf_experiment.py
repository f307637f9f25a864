"""The smoke preset end to end (shortened): real tiny Qwen3 Actor + sampler + KTO on LoRA, the
JAX RAN env and the rule reflector; summary.json, TensorBoard events, PEFT adapter; and a
kill after a phase + ``--resume`` equal to the uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from experiment_scripts import BENCHMARKS, experiment  # tests/experiment_scripts.py
from run_dirs import json_artefacts  # tests/run_dirs.py


def _experiment():
    return experiment("sf_ranslicing")


def _short(mod, run_dir, **kw):
    s = mod.SMOKE
    return dataclasses.replace(
        s,
        run_dir=str(run_dir),
        # the machinery on a tiny random Actor (the preset's behavioural prior takes minutes
        # to build: tests/agents/test_prior_sf.py)
        model=dataclasses.replace(s.model, prior=False, tiny=True),
        heldout=dataclasses.replace(s.heldout, seeds=(0, 1), num_steps=10),
        loop=dataclasses.replace(s.loop, sf_iterations=1, num_envs=2, trajectory_steps=4),
        rfr=dataclasses.replace(s.rfr, kto_iterations=1, num_rollouts=2),
        kto=dataclasses.replace(s.kto, micro_batch_size=4),
        **kw,
    )


def _strip(summary):
    s = json.loads(json.dumps(summary))
    s.pop("timings_s")
    s.pop("actor")  # the tiny checkpoint's path, inside each run dir
    for r in s["iterations"]:
        r.pop("wall_s", None)
    return s


def _scalar_events(tb_dir):
    """(tag, step, value) of the run's TensorBoard events (tensorboard's own reader)."""
    from sfjax.baselines.report import read_scalar_events

    return read_scalar_events(tb_dir)


def _adapter(run_dir):
    from safetensors.numpy import load_file

    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_smoke_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    mod = _experiment()
    full_dir = tmp_path / "full"
    summary = mod.run(_short(mod, full_dir), progress=False)

    # the closing summary: what ran, before/after with units, artefacts, TensorBoard
    printed = capsys.readouterr().out
    assert "=== Self-finetuning: summary ===" in printed and "bit/s/Hz" in printed
    assert "Before -> after fine-tuning" in printed
    for name in ("summary.json", "tb", "adapter", "trajectories", "checkpoints"):
        assert str(full_dir / name) in printed
    assert f"tensorboard --logdir {full_dir / 'tb'}" in printed
    # the run's wall time counts the held-out evaluations too, in the print and summary.json
    assert "held-out evaluation" in printed.split("Wall time: ")[1].splitlines()[0]
    written = json.loads((full_dir / "summary.json").read_text())["timings_s"]
    assert written["held_out"] > 0 and written["setup"] > 0
    # the adapter names its base model (AutoPeftModel loads it: test_adapter_loads_with_...)
    adapter_cfg = json.loads((full_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str((full_dir / "tiny_actor").resolve())

    # summary.json per the issue: iteration 0 = before fine-tuning
    on_disk = json.loads((full_dir / "summary.json").read_text())
    its = on_disk["iterations"]
    assert [r["iteration"] for r in its] == [0, 1]
    for key in ("avg_se", "reconfigurations", "violations", "utility", "parse_failures"):
        assert all(np.isfinite(r[key]) for r in its)
    assert its[0]["parse_failures"] == 0  # constrained decoding: every output parses
    assert its[0]["n_desirable"] + its[0]["n_undesirable"] > 0
    assert "rule" in on_disk["reflector"] and "no LLM" in on_disk["reflector"]
    assert np.isfinite(its[0]["kto_iterations"][0]["kto/loss"])

    # trajectories persisted with full prompts and valid actions
    traj = json.loads((full_dir / "trajectories" / "iter_0.json").read_text())
    assert len(traj) == 2 and len(traj[0]["steps"]) == 4
    assert all(1 <= s["action"] <= 12 for t in traj for s in t["steps"])
    assert "<|im_start|>assistant" in traj[0]["steps"][0]["prompt"]
    assert "utility" not in traj[0]["steps"][0]["feedback"]  # the agent never sees the reward

    # TensorBoard events with the KTO and env tags
    tags = {tag for tag, _, _ in _scalar_events(full_dir / "tb")}
    for tag in (
        "train/rewards/chosen",
        "train/rewards/rejected",
        "train/kl",
        "train/kl_unclamped",
        "train/rewards/margins",
        "kto_iter/rewards/chosen",
        "kto_iter/kl",
        "env/utility",
        "env/avg_se",
        "rfr/n_desirable",
        "heldout/utility",
        "heldout/utility_diff",
    ):
        assert tag in tags, sorted(tags)

    # the adapter moved away from its zero-B init
    adapter = _adapter(full_dir)
    assert any(np.abs(v).max() > 0 for k, v in adapter.items() if "lora_B" in k)

    # the two diagnostics read a real run dir: the policy profile per SF iteration, and the
    # target rates before / after on the labelled prompts (benchmarks/sf_target_match.py)
    from sfjax.agents.policy_profile import run_profiles

    profiles = run_profiles(full_dir, block_steps=2)
    assert [p.label for p in profiles] == ["before SF", "after SF 1"]
    assert profiles[0].steps == 8 and profiles[0].by_block[0].asked_more >= 0
    assert profiles[1].by_block[0].asked_more == -1  # the final collect is not labelled
    capsys.readouterr()
    experiment("sf_target_match", BENCHMARKS).main([str(full_dir), "--samples", "2"])
    out = capsys.readouterr().out
    assert "target rate before" in out and "effective" in out
    # the label audit replays the run's collect from its config.json (a wrong env config or key
    # would stop it with a replay mismatch, exit 1) and scores every labelled step
    audit_cli = experiment("label_audit", BENCHMARKS)
    args = [str(full_dir), "--horizons", "1", "--primary-horizon", "1", "--max-hold", "2",
            "--no-progress", "--save", str(tmp_path / "audit.json")]  # fmt: skip
    assert audit_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "SF iteration 0: 2 trajectories x 4 steps" in out and "[hold] class" in out
    saved = json.loads((tmp_path / "audit.json").read_text())["iterations"]
    assert list(saved) == ["0"] and len(saved["0"]["steps"]) == 8
    assert audit_cli.main([str(tmp_path / "nowhere")]) == 2
    # another labeller setting scored on the saved counterfactuals (the run dir read from them)
    again = ["--from", str(tmp_path / "audit.json"), "--rule"]
    assert audit_cli.main(again + ["proven-levels=false"]) == 0
    assert "with proven_levels=False, relabelled here" in capsys.readouterr().out
    for bad, says in (("proven_levels=2", "takes a bool"), ("up_step=0", "--reflector.rule.up-step"),
                      ("rule5=false", "has no field 'rule5'")):  # fmt: skip
        assert audit_cli.main(again + [bad]) == 2
        assert says in capsys.readouterr().err
    # labels from a file: the run's own give its table; labels of other steps are refused
    # before anything is simulated
    own = full_dir / "reflections" / "iter_0.json"
    assert audit_cli.main(again[:2] + ["--iteration", "0", "--reflections", str(own)]) == 0
    assert f"labels: {own}" in capsys.readouterr().out
    half = tmp_path / "half.json"
    half.write_text(json.dumps(json.loads(own.read_text())[:1]))
    assert audit_cli.main([str(full_dir), "--iteration", "0", "--reflections", str(half)]) == 2
    assert "not of this iteration's 8 steps" in capsys.readouterr().err
    # another Reflector on the run's trajectories, outside the loop (benchmarks/reflect_run.py):
    # the run's own (the rule labeller, defaults) gives its file; a fake DeepSeek-R1 endpoint's
    # labels are read, written and scored by the audit
    reflect = experiment("reflect_run", BENCHMARKS)
    mine = tmp_path / "rule_again.json"
    reflect.main([str(full_dir), "--iteration", "0", "--out", str(mine)])
    assert json.loads(mine.read_text()) == json.loads(own.read_text())
    import fake_r1  # benchmarks/ (on sys.path through the scripts above)

    monkeypatch.setenv(fake_r1.KEY_ENV, fake_r1.DUMMY_KEY)
    r1 = tmp_path / "r1" / "labels.json"
    with fake_r1.FakeR1() as server:
        reflect.main([str(full_dir), "--iteration", "0", "--out", str(r1), "--reflector.backend",
                      "api", "--reflector.api.base-url", server.url])  # fmt: skip
    assert len(server.requests) == 2 and not server.errors  # one request per trajectory
    cached = list((tmp_path / "r1" / "labels_cache").glob("*.json"))  # for a resumed call
    assert len(cached) == 2
    assert fake_r1.DUMMY_KEY not in "".join(f.read_text() for f in [r1, *cached]) + \
        capsys.readouterr().out
    assert audit_cli.main(again[:2] + ["--iteration", "0", "--reflections", str(r1)]) == 0
    assert f"labels: {r1}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # a run dir without that iteration: one error line
        reflect.main([str(full_dir), "--iteration", "3", "--out", str(mine)])
    assert e.value.code == 2 and "iter_3.json not found" in capsys.readouterr().err

    # kill after the KTO phase, resume, and compare with the uninterrupted run
    class Killed(Exception):
        pass

    def kill(phase):
        if phase.kind == "kto":
            raise Killed

    res_dir = tmp_path / "resumed"
    from sfjax import parallel

    writers = []

    def recorded(path):  # the run's TensorBoard writer, to see it closed after the crash
        writers.append(real_writer(path))
        return writers[-1]

    real_writer = parallel.summary_writer
    with monkeypatch.context() as m:
        m.setattr(parallel, "summary_writer", recorded)
        with pytest.raises(Killed):
            mod.run(_short(mod, res_dir), on_phase_end=kill, progress=False)
    # closed by the run, not left to interpreter exit (where its thread fails, a second traceback)
    assert len(writers) == 1 and writers[0].file_writer is None
    other = _short(mod, res_dir)
    other = dataclasses.replace(other, loop=dataclasses.replace(other.loop, seed=7))
    with pytest.raises(FileExistsError, match=r"another config: loop\.seed \(0 in the run, 7 now\)"):
        mod.run(other, progress=False)
    resumed = mod.run(_short(mod, res_dir, resume=True), progress=False)
    assert _strip(resumed) == _strip(summary)
    a, b = _adapter(full_dir), _adapter(res_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # a finished run with the same config is reported, not rerun (`make demo` twice)
    again = mod.run(_short(mod, res_dir), progress=False)
    assert _strip(again) == _strip(summary)


def _iterations(cfg, n):
    return dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, sf_iterations=n))


def _checkpoint_meta(run_dir):
    """The JSON item of the run's newest phase checkpoint (orbax's layout: <step>/meta)."""
    from sfjax.agents.extend import phase_steps

    step = phase_steps(Path(run_dir) / "checkpoints")[-1]
    return step, json.loads((Path(run_dir) / "checkpoints" / str(step) / "meta" /
                             "metadata").read_text())  # fmt: skip


def test_out_of_memory_names_the_phase_and_the_run_continues_with_less(tmp_path, capsys,
                                                                     caplog, monkeypatch):
    """A phase that runs out of device memory (XLA's error, raised here in the KTO phase)
    ends the CLI with one error naming the phase and the options that lower memory, no
    traceback, the phases before it saved; the same command with --kto.remat and a chunked LM
    head continues from there, and an option that changes results is still refused."""
    import functools
    import logging

    import jax

    from sfjax.agents.loop import SelfFinetuningLoop

    mod = _experiment()
    import cli_common

    def out_of_memory(self, phase):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 34359738368 bytes.\n"
            "BufferAssignment OOM Debugging.\nallocation 0: size 34359738368")

    run_dir = tmp_path / "r"
    cfg = _short(mod, run_dir)
    with monkeypatch.context() as m:
        m.setattr(SelfFinetuningLoop, "_kto", out_of_memory)
        with pytest.raises(SystemExit) as e:
            cli_common.run_cli(functools.partial(mod.run, progress=False), cfg,
                               memory=mod.memory_options(cfg))  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert err.startswith(
        "error: out of device memory in phase iter0/kto_0 (RfR rollouts of the current Actor, "
        "then KTO on the LoRA weights): RESOURCE_EXHAUSTED: Out of memory while trying to "
        f"allocate 34359738368 bytes.\n{cli_common.INTERRUPTED}\nTo lower memory, run the same "
        "command with")  # fmt: skip
    assert "\n  --kto.remat  " in err and "--kto.micro-batch-size N --kto.grad-accum-steps M" in err
    assert "Traceback" not in err and "BufferAssignment" not in err
    from sfjax.agents.extend import phase_steps

    assert phase_steps(run_dir / "checkpoints") == [0, 1]  # collect and reflect are kept

    lower = dataclasses.replace(cfg, kto=dataclasses.replace(cfg.kto, remat=True,
                                                             logits_chunk_tokens=8))  # fmt: skip
    ran = []
    caplog.set_level(logging.INFO)
    summary = mod.run(lower, on_phase_end=ran.append, progress=False)
    assert [p.name for p in ran] == ["iter0/kto_0", "iter1/collect"]
    assert "kto.remat: False in the run so far, True from now on" in caplog.text
    assert [r["iteration"] for r in summary["iterations"]] == [0, 1]
    assert np.isfinite(summary["iterations"][0]["kto_iterations"][0]["kto/loss"])
    assert json.loads((run_dir / "config.json").read_text())["kto"]["remat"] is True
    from cli_common import RunDirTaken

    with pytest.raises(RunDirTaken, match=r"kto\.micro_batch_size \(4 in the run, 2 now\)"):
        mod._prepare_run_dir(
            dataclasses.replace(lower, kto=dataclasses.replace(lower.kto, micro_batch_size=2)),
            run_dir)  # fmt: skip


@pytest.mark.slow
def test_more_sf_iterations_extend_a_run_to_the_fresh_runs_result(tmp_path, caplog, monkeypatch,
                                                                   capsys):
    """1 SF iteration, then the same command with 2: the first run's phases are restored (not
    run again, their files untouched), the new ones run, and the run dir ends as a fresh run
    of 2 leaves it: adapter, trajectories, labels, datasets, summary (held-out "after" of the
    final Actor included), TensorBoard points, the checkpointed KTO history. Rerun with
    --loop.final-actor best keeping iterate 1, it reports and exports iterate 1's Actor."""
    import logging

    mod = _experiment()
    fresh_dir, ext = tmp_path / "fresh", tmp_path / "ext"
    fresh = mod.run(_iterations(_short(mod, fresh_dir), 2), progress=False)

    one = mod.run(_short(mod, ext), progress=False)
    one_adapter = (ext / "adapter" / "adapter_model.safetensors").read_bytes()
    # the phases' files, held-out results and base model (adapter/ is the final Actor's: new)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(ext.glob("*/*.json"))
              if p.parent.name not in ("adapter", "checkpoints")}  # fmt: skip
    assert ext / "heldout" / "after_iter_1.json" in before
    ran = []
    caplog.set_level(logging.INFO)
    caplog.clear()  # what the extension logs
    got = mod.run(_iterations(_short(mod, ext), 2), on_phase_end=ran.append, progress=False)
    assert f"extending the run in {ext} from 1 to 2 SF iterations" in caplog.text
    assert [p.name for p in ran] == ["iter1/reflect", "iter1/kto_0", "iter2/collect"]
    for p, (data, mtime) in before.items():  # nothing of the first run was computed again
        assert (p.read_bytes(), p.stat().st_mtime_ns) == (data, mtime), p

    # the held-out "after" is the final Actor's, measured again; "before" is the first run's
    # (the tiny random Actor's held-out numbers hardly move: the log says what was measured)
    assert "held-out evaluation (after 2 SF iteration(s))" in caplog.text
    assert "held-out evaluation (before" not in caplog.text
    assert (ext / "heldout" / "after_iter_2.json").read_bytes() == \
        (fresh_dir / "heldout" / "after_iter_2.json").read_bytes()  # fmt: skip
    assert got["held_out"] == fresh["held_out"] and one["held_out"]["metrics"]
    assert _strip(got) == _strip(fresh)
    assert _strip(json.loads((ext / "summary.json").read_text())) == _strip(fresh)
    assert [r["iteration"] for r in got["iterations"]] == [0, 1, 2]
    assert (ext / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (fresh_dir / "adapter" / "adapter_model.safetensors").read_bytes()  # fmt: skip
    assert json_artefacts(ext) == json_artefacts(fresh_dir)
    assert sorted(_scalar_events(ext / "tb")) == sorted(_scalar_events(fresh_dir / "tb"))
    (step, meta), (fresh_step, fresh_meta) = _checkpoint_meta(ext), _checkpoint_meta(fresh_dir)
    assert step == fresh_step == 6
    for r in meta["iterations"] + fresh_meta["iterations"]:
        r.pop("wall_s")
    # arrays_sha256: LoRA params, optimizer state and RNG key, bit for bit
    for key in ("kto_history", "iterations", "trajectories", "reflections", "dataset",
                "kto_steps", "artefacts", "arrays_sha256"):
        assert meta[key] == fresh_meta[key], key

    # the finished run rerun keeping its iterate 1 (forced: the tiny Actor's utilities are
    # noise): nothing trains, the held-out "after" of iterate 1 is the cached one, the adapter
    # is iterate 1's again
    monkeypatch.setattr("sfjax.agents.loop.best_iteration", lambda its: 1)
    caplog.clear()
    two = _iterations(_short(mod, ext), 2)
    best = dataclasses.replace(two, loop=dataclasses.replace(two.loop, final_actor="best"))
    kept = mod.run(best, on_phase_end=ran.append, progress=False)
    assert kept["final_actor"] == {"rule": "best", "iteration": 1} and len(ran) == 3
    assert kept["held_out"]["after_iteration"] == 1
    assert kept["held_out"]["metrics"] == one["held_out"]["metrics"]
    assert "held-out evaluation (after" not in caplog.text
    assert (ext / "adapter" / "adapter_model.safetensors").read_bytes() == one_adapter
    mod.run(two, progress=False)  # back to the last iterate
    assert (ext / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (fresh_dir / "adapter" / "adapter_model.safetensors").read_bytes()  # fmt: skip

    # sf_target_match between iterates: iterate 2's LoRA from its checkpoint samples as the
    # final adapter does (same prompts, same keys); iterate 1 is loaded as "before"
    stm = experiment("sf_target_match", BENCHMARKS)
    saved = {}
    for name, extra in (("final", []), ("iterates", ["--before-iterate", "1", "--iteration", "0",
                                                    "--after-iterate", "2"])):  # fmt: skip
        saved[name] = tmp_path / f"{name}.json"
        stm.main([str(fresh_dir), "--samples", "2", "--save", str(saved[name]), *extra])
    final, iterates = (json.loads(saved[n].read_text())["steps"] for n in ("final", "iterates"))
    assert len(final) > 0 and [x["after"] for x in iterates] == [x["after"] for x in final]
    assert "before (after 1 SF iteration(s)) / after (after 2 SF iteration(s))" in \
        capsys.readouterr().out  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        stm.main([str(fresh_dir), "--after-iterate", "3"])
    assert exit_.value.code == 2 and "the run has iterates 0..2" in capsys.readouterr().err

    # kto_replay: iteration 1's KTO again, from iterate 1 on the recorded datasets with the
    # loop's keys, is iterate 2 bit for bit (held-out result included); another setting is not
    replay = experiment("kto_replay", BENCHMARKS)
    replay.main([str(fresh_dir), "--iteration", "1", "--samples", "2", "--out",
                 str(tmp_path / "r0")])  # fmt: skip
    assert "LoRA against the run's iterate 2: bit-identical" in capsys.readouterr().out
    rec = json.loads((tmp_path / "r0" / "replay.json").read_text())
    assert rec["max_abs_lora_diff_to_run"] == 0.0 and rec["kto_changes"] == {}
    assert rec["heldout"]["replay"] == rec["heldout"]["run_iterate"]
    replay.main([str(fresh_dir), "--iteration", "1", "--samples", "2", "--kto", "beta=0.5",
                 "--reference", "iterate", "--improved-examples", "--no-heldout",
                 "--out", str(tmp_path / "r1")])  # fmt: skip
    out = capsys.readouterr().out
    assert "kto.beta 0.1 -> 0.5" in out and "reference iterate" in out
    rec = json.loads((tmp_path / "r1" / "replay.json").read_text())
    assert f"+{rec['improved_examples']} improved-action examples per dataset" in out
    recorded = json.loads((fresh_dir / "datasets" / "iter_1_kto_0.json").read_text())
    assert rec["kto"][0]["examples"] == len(recorded) + rec["improved_examples"]
    assert rec["max_abs_lora_diff_to_run"] > 0 and "heldout" not in rec
    assert rec["kto_changes"] == {"beta": 0.5, "precompute_ref_log_probs": True}
    # the token-KL anchor to the iterate: its reference forward runs in the step (no table)
    replay.main([str(fresh_dir), "--iteration", "1", "--samples", "2", "--kto",
                 "token_kl_coef=0.1", "--reference", "iterate", "--no-heldout",
                 "--out", str(tmp_path / "r2")])  # fmt: skip
    out = capsys.readouterr().out
    assert "kto.token_kl_coef 0.0 -> 0.1" in out and ", token KL " in out
    rec = json.loads((tmp_path / "r2" / "replay.json").read_text())
    assert rec["kto_changes"] == {"token_kl_coef": 0.1}
    assert all(k["token_kl"] >= 0.0 for k in rec["kto"]) and rec["max_abs_lora_diff_to_run"] > 0
    # --restart: the LoRA starts from iterate 0; at iteration 0 that is the run itself, at
    # iteration 1 another training than the run's (which continued from iterate 1)
    replay.main([str(fresh_dir), "--iteration", "0", "--restart", "--samples", "2",
                 "--no-heldout", "--out", str(tmp_path / "r3")])  # fmt: skip
    out = capsys.readouterr().out
    assert "LoRA restarted from iterate 0" in out and "iterate 1: bit-identical" in out
    replay.main([str(fresh_dir), "--iteration", "1", "--restart", "--samples", "2",
                 "--no-heldout", "--out", str(tmp_path / "r4")])  # fmt: skip
    rec = json.loads((tmp_path / "r4" / "replay.json").read_text())
    cont = json.loads((tmp_path / "r0" / "replay.json").read_text())
    assert rec["restart"] and rec["max_abs_lora_diff_to_run"] > 0
    assert rec["kto"][0]["examples"] == cont["kto"][0]["examples"]  # the same data
    assert rec["kto"][0]["loss"] != cont["kto"][0]["loss"]  # from other adapters
    # --aggregate: every KTO iteration trains on SF iterations 0 and 1's datasets together
    replay.main([str(fresh_dir), "--iteration", "1", "--restart", "--aggregate", "--samples",
                 "2", "--no-heldout", "--out", str(tmp_path / "r5")])  # fmt: skip
    rec = json.loads((tmp_path / "r5" / "replay.json").read_text())
    sizes = [[len(json.loads((fresh_dir / "datasets" / f"iter_{i}_kto_{k}.json").read_text()))
              for i in (0, 1)] for k in range(len(rec["kto"]))]  # fmt: skip
    assert rec["aggregate"] and [k["examples"] for k in rec["kto"]] == [sum(n) for n in sizes]
    # --labels rebuild: the datasets built again by RfR from the run's labels (rollouts of the
    # Actor being trained, the loop's keys) give iterate 2 bit for bit, as the recorded ones do;
    # the held-out result is paired against iterate 1 too
    replay.main([str(fresh_dir), "--iteration", "1", "--labels", "rebuild", "--samples", "2",
                 "--out", str(tmp_path / "r6")])  # fmt: skip
    out = capsys.readouterr().out
    assert "datasets rebuilt by RfR from the run's labels" in out and "bit-identical" in out
    rec = json.loads((tmp_path / "r6" / "replay.json").read_text())
    assert [k["examples"] for k in rec["kto"]] == [
        len(json.loads((fresh_dir / "datasets" / f"iter_1_kto_{k}.json").read_text()))
        for k in range(len(rec["kto"]))]  # fmt: skip
    assert "'before' = the run's iterate 1" in out and "paired_vs_start" in rec["heldout"]
    # --labels file: the same from labels in a file (here the run's own, so iterate 2 again);
    # a file of other steps is refused before the model loads
    own = fresh_dir / "reflections" / "iter_1.json"
    replay.main([str(fresh_dir), "--iteration", "1", "--labels", "file", "--reflections",
                 str(own), "--samples", "2", "--no-heldout", "--out", str(tmp_path / "r6f")])  # fmt: skip
    out = capsys.readouterr().out
    assert "from the labels of --reflections" in out and "bit-identical" in out
    half = tmp_path / "half.json"
    half.write_text(json.dumps(json.loads(own.read_text())[:1]))
    for args in (["--labels", "file", "--reflections", str(half)], ["--reflections", str(own)]):
        with pytest.raises(SystemExit):
            replay.main([str(fresh_dir), "--iteration", "1", *args, "--out", str(tmp_path / "r8")])
    err = capsys.readouterr().err
    assert "not of this iteration's 8 steps" in err and "go together" in err
    # labels of the same steps whose improved actions do not fit the actions taken (another
    # iteration's trajectories: eq. 7 ties a*_t to a_t) are refused too
    moved = json.loads(own.read_text())
    x = moved[0]["labels"][0]
    x["label"], x["improved_action"] = "effective", x["improved_action"] % 12 + 1
    if x["improved_action"] == json.loads((fresh_dir / "trajectories" / "iter_1.json").read_text(
            ))[0]["steps"][0]["action"]:  # fmt: skip
        x["improved_action"] = x["improved_action"] % 12 + 1
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    with pytest.raises(SystemExit):
        replay.main([str(fresh_dir), "--iteration", "1", "--labels", "file", "--reflections",
                     str(tmp_path / "moved.json"), "--out", str(tmp_path / "r8")])  # fmt: skip
    assert "1 of its labels do not fit" in capsys.readouterr().err
    # --labels hindsight: the best actions in hindsight as labels (a diagnostic)
    replay.main([str(fresh_dir), "--iteration", "1", "--labels", "hindsight", "--samples", "2",
                 "--hindsight-tie", "1e9", "--no-heldout", "--out", str(tmp_path / "r7")])  # fmt: skip
    out = capsys.readouterr().out
    assert "hindsight labels (tie 1000000000.0): 0 of 8 steps" in out  # nothing gains that much
    assert "from the best actions in hindsight" in out
    hs = json.loads((tmp_path / "r7" / "hindsight_reflections.json").read_text())
    assert len(hs) == 2 and all(len(r["labels"]) == 4 for r in hs)
    assert all(x["label"] == "effective" for r in hs for x in r["labels"])
    assert all("hindsight oracle" in r["backend"] for r in hs)
    with pytest.raises(SystemExit):
        replay.main([str(fresh_dir), "--iteration", "1", "--labels", "hindsight", "--aggregate",
                     "--out", str(tmp_path / "r8")])  # fmt: skip
    assert "does not combine" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        replay.main([str(fresh_dir), "--iteration", "1", "--hindsight-tie", "15",
                     "--out", str(tmp_path / "r8")])  # fmt: skip
    assert "--hindsight-tie needs --labels hindsight" in capsys.readouterr().err

    # taken back to fewer: refused, naming both numbers, nothing touched
    from cli_common import RunDirTaken

    config = (ext / "config.json").read_bytes()
    with pytest.raises(RunDirTaken, match=r"holds a run of 2 SF iteration\(s\) and "
                       r"--loop\.sf-iterations 1 asks for fewer \(2 in the run, 1 now\)"):  # fmt: skip
        mod.run(_short(mod, ext), progress=False)
    assert (ext / "config.json").read_bytes() == config


def test_cli_help_lists_presets(capsys):
    mod = _experiment()
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    out = capsys.readouterr().out
    assert "smoke" in out and "paper" in out


def test_paper_preset_needs_key_before_loading_model(tmp_path, monkeypatch):
    mod = _experiment()
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    cfg = dataclasses.replace(
        mod.PAPER,
        run_dir=str(tmp_path / "p"),
        model=dataclasses.replace(mod.PAPER.model, checkpoint=str(tmp_path / "missing")),
    )
    from sfjax.agents.reflector import ReflectorError

    with pytest.raises(ReflectorError, match="DEEPSEEK_API_KEY"):
        mod.run(cfg, progress=False)


def test_adapter_loads_with_auto_peft_model(tmp_path, tiny_checkpoint):
    """The exported adapter names its base checkpoint: AutoPeftModel needs nothing else."""
    import jax.numpy as jnp
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from sfjax.agents.finetune import KTOFineTuner
    from sfjax.models import qwen3
    from sfjax.models.lora import LoRAConfig
    from sfjax.tokenizer import load_tokenizer
    from sfjax.train.kto import KTOConfig

    mod = _experiment()
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    ft = KTOFineTuner(model, load_tokenizer(tiny_checkpoint), KTOConfig(progress=False),
                      LoRAConfig(rank=4, alpha=8.0))  # fmt: skip
    out = tmp_path / "adapter"
    mod._save_adapter(ft, out, mod.base_model_id(tiny_checkpoint))
    auto = AutoPeftModelForCausalLM.from_pretrained(str(out))
    manual = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), out)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, manual(ids).logits)
    assert mod.base_model_id("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B"  # a hub id stays as it is


# -- CLI values, run-dir identity (issue 21 items 5, 6, 8; issue 19 "CLI") ---------------------


def _cli(mod, capsys, *args):
    with pytest.raises(SystemExit) as e:
        mod.main(["smoke", *args])
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "opt,value,line",
    [
        ("--loop.sf-iterations", "-1", "--loop.sf-iterations -1: must be >= 1"),
        ("--loop.keep-checkpoints", "0", "--loop.keep-checkpoints 0: must be >= 2"),
        ("--loop.trajectory-steps", "0", "--loop.trajectory-steps 0: must be >= 1"),
        ("--reflector.api.context-tokens", "10", "--reflector.api.context-tokens 10: must be >"),
        ("--reflector.api.timeout-s", "0", "--reflector.api.timeout-s 0.0: must be > 0 seconds"),
        ("--actor.top-p", "0", "--actor.top-p 0.0: must be in (0, 1]"),
    ],
)
def test_bad_cli_value_is_one_line_before_anything_is_written(tmp_path, capsys, opt, value, line):
    code, err = _cli(_experiment(), capsys, "--run-dir", str(tmp_path / "r"), opt, value)
    assert code == 2 and err.startswith(f"error: {line}"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("preset, args, line", [
    # the smoke preset's Actor is the prior: a checkpoint given with it used to be ignored
    ("smoke", ["--model.checkpoint", "/ckpt"], "--model.checkpoint '/ckpt': must be '' with "
     "--model.prior (one Actor): add --model.no-prior to load this checkpoint"),
    ("paper", ["--model.tiny"], "--model.checkpoint 'Qwen/Qwen3-4B': must be '' with "
     "--model.tiny (one Actor): add --model.no-tiny to load this checkpoint, or "
     "--model.checkpoint '' for the tiny model"),
])  # fmt: skip
def test_checkpoint_with_the_prior_or_tiny_actor_is_refused(tmp_path, capsys, preset, args, line):
    with pytest.raises(SystemExit) as e:
        _experiment().main([preset, "--run-dir", str(tmp_path / "r"), *args])
    code, err = e.value.code, capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {line}"), err
    assert not (tmp_path / "r").exists()


def test_scan_decode_needs_scan_layers_and_reaches_the_model(tmp_path, capsys, monkeypatch):
    mod = _experiment()
    code, err = _cli(mod, capsys, "--run-dir", str(tmp_path / "r"), "--model.scan-decode")
    assert code == 2 and err.startswith(
        "error: --model.scan-decode True: must be used with --model.scan-layers"), err
    assert not (tmp_path / "r").exists()
    # with scan_layers it is the loaded model's execution layout (the run is stopped right
    # after the model is built)
    seen = {}

    class Stop(Exception):
        pass

    def fake_tokenizer(path):
        raise Stop

    import sfjax.tokenizer
    from sfjax.models import qwen3

    real = qwen3.from_pretrained

    def spy(*a, **kw):
        m = real(*a, **kw)
        seen["model"] = m
        return m

    monkeypatch.setattr(qwen3, "from_pretrained", spy)
    monkeypatch.setattr(sfjax.tokenizer, "load_tokenizer", fake_tokenizer)
    cfg = _short(mod, tmp_path / "s")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=True,
                                                             scan_decode=True))
    with pytest.raises(Stop):
        mod.run(cfg, progress=False)
    c = seen["model"].config
    assert c.scan_layers and c.scan_decode


def test_key_typed_as_variable_name_is_refused_and_never_written(tmp_path, capsys):
    key = "sk-live-0123456789abcdefDO-NOT-WRITE"
    code, err = _cli(_experiment(), capsys, "--run-dir", str(tmp_path / "r"),
                     "--reflector.backend", "api", "--reflector.api.api-key-env", key)  # fmt: skip
    assert code == 2 and "--reflector.api.api-key-env (value not shown)" in err
    assert key not in err and not (tmp_path / "r").exists()


def test_action_range_is_the_envs(tmp_path):
    mod = _experiment()
    cfg = _short(mod, tmp_path / "r")
    bad = dataclasses.replace(
        cfg, actor=dataclasses.replace(
            cfg.actor, prompt=dataclasses.replace(cfg.actor.prompt, action_hi=9)),
    )  # fmt: skip
    from sfjax.configcheck import ConfigError

    with pytest.raises(ConfigError, match=r"--actor\.prompt\.action-hi 9: must be left unset; "
                       r"the action range comes from the env: \[1, 12\]"):  # fmt: skip
        mod.run(bad, progress=False)
    assert not (tmp_path / "r" / "config.json").exists()


def test_help_keeps_sentences_and_examples(capsys):
    """Field help was broken mid-sentence (tyro keeps a docstring's line break when the next
    line starts with a space or "("), and the examples lost their backslash continuations."""
    mod = _experiment()
    import cli_common
    from tyro import _strings

    assert _strings.remove_single_line_breaks is cli_common._join_lines
    doc = """How many phase checkpoints to keep (>= 2: the previous one is the
    fallback when the newest is damaged) and
    (a parenthesis) or ``code``.

    Examples:
        cmd --a \\
            --b
    - a bullet"""
    assert cli_common._join_lines(doc) == (
        "How many phase checkpoints to keep (>= 2: the previous one is the fallback when the "
        "newest is damaged) and (a parenthesis) or ``code``.\n\nExamples:\n    cmd --a \\\n"
        "        --b\n- a bullet"
    )
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    out = capsys.readouterr().out
    assert "--run-dir runs/paper \\\n" in out


def _fake_run(mod, run_dir, cfg):
    """A run dir as a run leaves it (config.json + a checkpoint step), without running."""
    (run_dir / "checkpoints" / "3").mkdir(parents=True)
    mod._prepare_run_dir(cfg, run_dir)


def test_operational_options_may_change_on_resume(tmp_path):
    mod = _experiment()
    cfg = _short(mod, tmp_path / "r")
    _fake_run(mod, tmp_path / "r", cfg)
    api = dataclasses.replace(cfg.reflector.api, max_retries=20, timeout_s=30.0,
                              max_concurrency=1)  # fmt: skip
    moved = dataclasses.replace(
        cfg, run_dir=str(tmp_path / "r") + "/", log_level="DEBUG",
        reflector=dataclasses.replace(cfg.reflector, api=api),
        kto=dataclasses.replace(cfg.kto, progress=False),
        prior=dataclasses.replace(cfg.prior, cache_dir=str(tmp_path / "priors")),
        loop=dataclasses.replace(cfg.loop, final_actor="best"),  # chooses, never trains
    )  # fmt: skip
    resume, used = mod._prepare_run_dir(moved, tmp_path / "r")
    assert resume and used == moved


def test_memory_options_may_change_on_resume_and_are_recorded(tmp_path, caplog):
    """The options that trade memory for time (results the same up to float rounding) may
    change when continuing a run, each change logged and recorded with the start."""
    import logging

    mod = _experiment()
    cfg = _short(mod, tmp_path / "r")
    _fake_run(mod, tmp_path / "r", cfg)
    lower = dataclasses.replace(
        cfg, kto=dataclasses.replace(cfg.kto, remat=True, logits_chunk_tokens=8),
        rfr=dataclasses.replace(cfg.rfr, max_cache_gib_per_call=1.0, max_rows_per_call=4),
    )  # fmt: skip
    caplog.set_level(logging.WARNING)
    resume, used = mod._prepare_run_dir(lower, tmp_path / "r")
    assert resume and used == lower
    assert "kto.remat: False in the run so far, True from now on (memory and time only" in \
        caplog.text  # fmt: skip
    starts = json.loads((tmp_path / "r" / "environment.json").read_text())["starts"]
    assert "changed_options" not in starts[0]
    assert starts[1]["changed_options"] == {
        "kto.remat": [False, True], "kto.logits_chunk_tokens": [0, 8],
        "rfr.max_cache_gib_per_call": [32.0, 1.0], "rfr.max_rows_per_call": [0, 4]}  # fmt: skip
    caplog.clear()
    mod._prepare_run_dir(lower, tmp_path / "r")  # the same again: nothing changed
    assert "from now on" not in caplog.text
    assert "changed_options" not in json.loads(
        (tmp_path / "r" / "environment.json").read_text())["starts"][2]  # fmt: skip


def test_real_mismatch_names_keys_and_resume_keeps_the_runs_values(tmp_path, caplog):
    mod = _experiment()
    cfg = _short(mod, tmp_path / "r")
    _fake_run(mod, tmp_path / "r", cfg)
    other = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, seed=7),
                                rfr=dataclasses.replace(cfg.rfr, tau=0.25))  # fmt: skip
    from cli_common import RunDirTaken

    with pytest.raises(RunDirTaken, match=r"loop\.seed \(0 in the run, 7 now\), rfr\.tau "
                       r"\(0\.5 in the run, 0\.25 now\)\. Add --resume"):  # fmt: skip
        mod._prepare_run_dir(other, tmp_path / "r")
    resume, used = mod._prepare_run_dir(dataclasses.replace(other, resume=True), tmp_path / "r")
    assert resume and used.loop.seed == 0 and used.rfr.tau == 0.5 and used.resume
    assert used.kto == cfg.kto and used.kto.buckets == cfg.kto.buckets  # tuples stay tuples
    assert used.env == cfg.env  # nested dataclasses in tuples (the slices) too
    assert "with its own values for: loop.seed" in caplog.text
    assert (tmp_path / "r" / "checkpoints" / "3").exists()  # nothing deleted


def test_resume_of_a_run_older_than_an_option_says_the_option_runs_as_given(tmp_path, caplog):
    """A run dir written before an option existed (its config.json lacks the key): without
    --resume the key is named as one the config predates; with --resume the run continues
    with the value given now and says so (it used to claim 'its own values' for it)."""
    mod = _experiment()
    cfg = _short(mod, tmp_path / "r")
    _fake_run(mod, tmp_path / "r", cfg)
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    del saved["rfr"]["tau"]  # as if rfr.tau had been added after this run
    (tmp_path / "r" / "config.json").write_text(json.dumps(saved))
    from cli_common import RunDirTaken

    with pytest.raises(RunDirTaken, match=r"another config: options its config\.json "
                       r"predates: rfr\.tau \(0\.5 now\)\. Add --resume"):  # fmt: skip
        mod._prepare_run_dir(cfg, tmp_path / "r")
    resume, used = mod._prepare_run_dir(dataclasses.replace(cfg, resume=True), tmp_path / "r")
    assert resume and used.rfr.tau == 0.5
    assert "before the option(s) rfr.tau (0.5 now) existed" in caplog.text
    assert "with its own values for" not in caplog.text


@pytest.mark.parametrize("section, name, old, new, shown", [
    ("rfr", "improved_examples", False, True, r"rfr\.improved_examples \(False in the run, True now\)"),
    ("kto", "token_kl_coef", 0.0, 0.1, r"kto\.token_kl_coef \(0\.0 in the run, 0\.1 now\)"),
])  # fmt: skip
def test_a_run_older_than_an_option_is_the_same_run_without_it(tmp_path, caplog, section, name,
                                                                old, new, shown):  # fmt: skip
    """The options in EARLIER: a config.json written before one existed is read as the value
    those runs had (Algorithm 2's datasets; the KTO loss alone), so the run continues without
    --resume; asking for another value on it is a change, refused with the values named."""
    mod = _experiment()
    assert mod.EARLIER[f"{section}.{name}"] == old
    cfg = _short(mod, tmp_path / "r")
    _fake_run(mod, tmp_path / "r", cfg)
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    del saved[section][name]
    (tmp_path / "r" / "config.json").write_text(json.dumps(saved))
    resume, used = mod._prepare_run_dir(cfg, tmp_path / "r")
    assert resume and getattr(getattr(used, section), name) == old
    assert "predates" not in caplog.text and "before the option" not in caplog.text
    from cli_common import RunDirTaken

    (tmp_path / "r" / "config.json").write_text(json.dumps(saved))
    changed = dataclasses.replace(getattr(cfg, section), **{name: new})
    with pytest.raises(RunDirTaken, match=shown):
        mod._prepare_run_dir(dataclasses.replace(cfg, **{section: changed}), tmp_path / "r")


def test_more_sf_iterations_extend_the_run_and_fewer_are_refused(tmp_path, caplog):
    import logging

    mod = _experiment()  # puts experiments/ on sys.path
    from cli_common import RunDirTaken

    run = tmp_path / "r"
    cfg = _short(mod, run)  # 1 SF iteration of 1 KTO iteration: last phase 3
    _fake_run(mod, run, cfg)

    def saved():
        return json.loads((run / "config.json").read_text())

    # every other option must still match (the run's number of SF iterations is not named)
    other = _iterations(dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, seed=7)), 3)
    with pytest.raises(RunDirTaken, match=r"another config: loop\.seed \(0 in the run, 7 now\)\. "
                       r"Add --resume"):  # fmt: skip
        mod._prepare_run_dir(other, run)
    assert saved()["loop"]["sf_iterations"] == 1
    caplog.set_level(logging.INFO)
    caplog.clear()  # _fake_run's own "continuing" line, captured when an earlier test set INFO
    resume, used = mod._prepare_run_dir(_iterations(cfg, 3), run)
    assert resume and used == _iterations(cfg, 3) and saved()["loop"]["sf_iterations"] == 3
    assert f"extending the run in {run} from 1 to 3 SF iterations" in caplog.text
    assert "(same config)" not in caplog.text  # it is extended, not continued as it was

    config = (run / "config.json").read_bytes()
    with pytest.raises(RunDirTaken, match=r"holds a run of 3 SF iteration\(s\) and "
                       r"--loop\.sf-iterations 2 asks for fewer \(3 in the run, 2 now\)"):  # fmt: skip
        mod._prepare_run_dir(_iterations(cfg, 2), run)
    assert (run / "config.json").read_bytes() == config
    # --resume continues the run with its own values, its number of SF iterations included
    resume, used = mod._prepare_run_dir(_iterations(dataclasses.replace(cfg, resume=True), 2), run)
    assert resume and used.loop.sf_iterations == 3
    # ... and extends it with its own values for the others
    resume, used = mod._prepare_run_dir(_iterations(dataclasses.replace(other, resume=True), 4),
                                        run)  # fmt: skip
    assert resume and (used.loop.sf_iterations, used.loop.seed) == (4, 0)
    assert saved()["loop"]["sf_iterations"] == 4


def test_fewer_sf_iterations_are_one_line_on_the_command_line(tmp_path, capsys):
    mod = _experiment()  # puts experiments/ on sys.path
    import cli_common

    run = tmp_path / "r"
    args = ["smoke", "--run-dir", str(run)]
    _fake_run(mod, run, cli_common.parse(mod.PRESETS, [*args, "--loop.sf-iterations", "2"],
                                         mod.__doc__))  # fmt: skip
    code, err = _cli(mod, capsys, "--run-dir", str(run), "--loop.sf-iterations", "1")
    assert code == 2 and err.startswith(
        f"error: {run} holds a run of 2 SF iteration(s) and --loop.sf-iterations 1 asks for "
        "fewer (2 in the run, 1 now): a run is only extended"), err
    assert len(err.strip().splitlines()) == 1 and "--resume" in err


def test_a_run_is_extended_only_from_its_last_checkpoint(tmp_path):
    """The checkpoint of the shorter run's last phase must be there (LoopConfig.keep_checkpoints
    never prunes the newest): without it, a clear refusal, never a restart from scratch."""
    import shutil

    from cli_common import RunDirTaken

    mod = _experiment()
    run = tmp_path / "r"
    cfg = _short(mod, run)
    _fake_run(mod, run, cfg)  # its last phase, 3, is checkpointed
    (run / "trajectories").mkdir()
    (run / "trajectories" / "iter_1.json").write_text("[]")  # its final collect
    shutil.rmtree(run / "checkpoints" / "3")
    (run / "checkpoints" / "2").mkdir()
    config = (run / "config.json").read_bytes()
    with pytest.raises(RunDirTaken, match=r"reached its final collect \(iter_1\.json\) but the "
                       r"checkpoint of that last phase \(step 3\) is not in .* \(newest: step 2\)\. "
                       r"Run it once more with --loop\.sf-iterations 1"):  # fmt: skip
        mod._prepare_run_dir(_iterations(cfg, 2), run)
    shutil.rmtree(run / "checkpoints")
    (run / "summary.json").write_text("{}")  # a phase ended: this run has results
    other = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, seed=7))
    with pytest.raises(RunDirTaken, match=r"holds a run of 1 SF iteration\(s\) with results but no "
                       r"phase checkpoint"):  # fmt: skip
        mod._prepare_run_dir(_iterations(other, 2), run)
    assert (run / "config.json").read_bytes() == config  # refused before anything is written


def test_a_run_with_results_but_no_checkpoints_is_not_run_again(tmp_path):
    """A finished run whose checkpoints/ was removed (or not copied) was taken for an empty run
    dir: its config.json was rewritten with the options given now and the run started over,
    overwriting its results. Now a clear refusal before anything is written, whatever the
    options, the config.json's state or --resume."""
    import shutil

    from cli_common import RunDirTaken

    mod = _experiment()
    run = tmp_path / "r"
    cfg = _short(mod, run)
    _fake_run(mod, run, cfg)
    (run / "summary.json").write_text("{}")  # a phase ended: this run has results
    shutil.rmtree(run / "checkpoints")
    config = (run / "config.json").read_bytes()
    other = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, seed=7))
    for asked in (cfg, other, dataclasses.replace(other, resume=True)):
        with pytest.raises(RunDirTaken, match=r"holds a run with results \(summary\.json\) but "
                           r"no phase checkpoint in .*checkpoints: running it again would start "
                           r"over and overwrite its files"):  # fmt: skip
            mod._prepare_run_dir(asked, run)
        assert (run / "config.json").read_bytes() == config
    (run / "config.json").write_text('{"run_dir": "x", "lo')  # damaged too: still refused
    with pytest.raises(RunDirTaken, match="no phase checkpoint"):
        mod._prepare_run_dir(dataclasses.replace(cfg, resume=True), run)
    (run / "config.json").write_bytes(config)
    (run / "checkpoints_damaged" / "3-20261207T000000").mkdir(parents=True)
    resume, _ = mod._prepare_run_dir(cfg, run)  # all damaged: starts again, as restore() says
    assert not resume


def test_damaged_run_config_is_named(tmp_path):
    mod = _experiment()
    cfg = _short(mod, tmp_path / "r")
    _fake_run(mod, tmp_path / "r", cfg)
    (tmp_path / "r" / "config.json").write_text('{"run_dir": "x", "lo')
    from sfjax.atomic import DamagedFile

    with pytest.raises(DamagedFile, match=r"config\.json is damaged .*pass --resume"):
        mod._prepare_run_dir(cfg, tmp_path / "r")
    resume, _ = mod._prepare_run_dir(dataclasses.replace(cfg, resume=True), tmp_path / "r")
    assert resume and json.loads((tmp_path / "r" / "config.json").read_text())["loop"]


def test_tiny_actor_is_written_whole(tmp_path, monkeypatch):
    """Issue 21 item 3: a kill while the tiny checkpoint was written left config.json without
    weights, and every later attempt failed ("FileNotFoundError ... convert .bin files")."""
    mod = _experiment()
    from sfjax import testing

    path = tmp_path / "tiny_actor"
    path.mkdir()
    (path / "config.json").write_text("{}")  # what the old writer left after a kill
    real = testing.write_tiny_checkpoint

    def killed(out, **kw):
        real(out, **kw)
        (Path(out) / "model.safetensors").unlink()
        raise KeyboardInterrupt  # a kill before the directory is swapped in

    monkeypatch.setattr(testing, "write_tiny_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        mod.tiny_actor(path, 0)
    assert (path / "config.json").read_text() == "{}"  # untouched: never half replaced
    monkeypatch.setattr(testing, "write_tiny_checkpoint", real)
    mod.tiny_actor(path, 0)
    from sfjax.models import qwen3

    qwen3.from_pretrained(str(path))  # complete now
    before = (path / "model.safetensors").stat().st_mtime_ns
    mod.tiny_actor(path, 0)  # complete: kept
    assert (path / "model.safetensors").stat().st_mtime_ns == before
