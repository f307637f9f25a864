"""experiments/table3.py's RUN_DIR: the same config runs again, another one is refused with the
keys named (``--resume`` continues with the run's own values), options that do not change
results may differ, and the SF row's own check in RUN_DIR/sf agrees with table3's; the
Reflexion row's Actor is SF's; an LLM action range other than the env's is refused. The rows'
work is replaced by stand-ins (each is tested on its own)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from experiment_scripts import experiment, refused

from sfjax.baselines.report import MethodResult

METRICS = ("utility", "mean_se", "reconfigurations", "violations")


class Stop(Exception):
    """Ends the stand-in SF row once its RUN_DIR check has run."""


@pytest.fixture
def script(monkeypatch):
    """table3's CLI with the reference rows and the SF run replaced by recorders:
    returns (cli, {"reference": [(protocol, reference config)], "sf": [(resume, config)]})."""
    mod = experiment("table3")
    import cli_common

    sf = mod.sf_ranslicing
    seen = {"reference": [], "sf": []}

    def fake_reference_rows(env, params, protocol, reference, names):
        seen["reference"].append((protocol, reference))
        rows = [MethodResult(n.capitalize(), {k: (1.0, 0.0) for k in METRICS}, 0, 2, 1)
                for n in names]  # fmt: skip
        return rows, {}, {}

    def fake_sf_run(cfg, **kw):
        run_dir = Path(cfg.run_dir)  # what sf_ranslicing.run does first
        run_dir.mkdir(parents=True, exist_ok=True)
        resume, used = sf._prepare_run_dir(cfg, run_dir)
        (run_dir / "checkpoints" / "1").mkdir(parents=True, exist_ok=True)  # a phase done
        seen["sf"].append((resume, used))
        raise Stop

    monkeypatch.setattr(mod, "reference_rows", fake_reference_rows)
    monkeypatch.setattr(sf, "run", fake_sf_run)

    def cli(*args, preset="smoke"):
        cfg = cli_common.parse(mod.PRESETS, [preset, *args], mod.__doc__)
        return cli_common.run_cli(mod.main, cfg, preset)

    return cli, seen


def test_same_config_runs_again(tmp_path, script):
    cli, seen = script
    run = ("--run-dir", str(tmp_path / "t"), "--methods", "static")
    cli(*run)
    cli(*run)
    assert len(seen["reference"]) == 2 and seen["reference"][0] == seen["reference"][1]
    saved = json.loads((tmp_path / "t" / "config.json").read_text())
    assert saved["methods"] == ["static"] and (tmp_path / "t" / "results.json").exists()


def test_other_config_is_refused_naming_the_key(tmp_path, script, capsys):
    cli, seen = script
    run = ("--run-dir", str(tmp_path / "t"), "--methods", "static")
    cli(*run)
    results = (tmp_path / "t" / "results.json").read_text()
    err = refused(cli, capsys, *run, "--protocol.num-steps", "20")
    assert "holds a Table III run with another config: protocol.num_steps (300 in the run, " \
           "20 now). Add --resume" in err  # fmt: skip
    assert len(seen["reference"]) == 1  # nothing ran, nothing was overwritten
    assert (tmp_path / "t" / "results.json").read_text() == results
    assert json.loads((tmp_path / "t" / "config.json").read_text())["protocol"]["num_steps"] == 300


def test_resume_continues_with_the_runs_values(tmp_path, script, capsys):
    cli, seen = script
    run = ("--run-dir", str(tmp_path / "t"), "--methods", "static")
    cli(*run)
    cli(*run, "--protocol.num-steps", "20", "--reference.beam-width", "2", "--resume")
    protocol, reference = seen["reference"][1]
    assert protocol.num_steps == 300 and reference.beam_width == 4
    assert protocol.seeds == (0, 1)  # tuples stay tuples
    assert "with its own values for: protocol.num_steps" in capsys.readouterr().err


def test_operational_options_may_differ(tmp_path, script):
    cli, seen = script
    run = ("--run-dir", str(tmp_path / "t"), "--methods", "static")
    cli(*run)
    cli(*run, "--log-level", "WARNING", "--sf.reflector.api.max-retries", "20",
        "--reflexion.reflector.api.timeout-s", "30", "--sf.kto.no-progress")  # fmt: skip
    assert len(seen["reference"]) == 2


def test_sf_row_run_dir_agrees_with_table3s(tmp_path, script, capsys):
    """RUN_DIR/sf keeps its own check (sf_ranslicing's); table3's --resume reaches it."""
    cli, seen = script
    run = ("--run-dir", str(tmp_path / "t"), "--methods", "sf")
    with pytest.raises(Stop):
        cli(*run)
    with pytest.raises(Stop):  # same config: the SF row continues
        cli(*run)
    assert [r for r, _ in seen["sf"]] == [False, True]
    assert seen["sf"][1][1].run_dir == str(tmp_path / "t" / "sf")
    err = refused(cli, capsys, *run, "--sf.loop.seed", "7")
    assert "another config: sf.loop.seed (0 in the run, 7 now)" in err and len(seen["sf"]) == 2
    with pytest.raises(Stop):  # table3's --resume: the run's values, SF continues
        cli(*run, "--sf.loop.seed", "7", "--resume")
    resume, used = seen["sf"][2]
    assert resume and used.loop.seed == 0
    # without table3's record (an older table3) RUN_DIR/sf still refuses another SF config
    (tmp_path / "t" / "config.json").unlink()
    err = refused(cli, capsys, *run, "--sf.loop.seed", "7")
    assert f"{tmp_path / 't' / 'sf'} holds a run with another config: loop.seed" in err


@pytest.mark.parametrize(
    "args,line",
    [
        (["--reflexion.actor.prompt.action-lo", "2"], "--reflexion.actor.prompt.action-lo 2"),
        (["--sf.actor.prompt.action-hi", "9"], "--sf.actor.prompt.action-hi 9"),
    ],
)
def test_action_range_is_the_envs(tmp_path, script, capsys, args, line):
    cli, seen = script
    err = refused(cli, capsys, "--run-dir", str(tmp_path / "t"), *args)
    assert err.startswith(f"error: {line}: must be left unset; the action range comes from the "
                          "env: [1, 12] with --env.cell.n-prb 25"), err  # fmt: skip
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    "args,line",
    [
        (["--protocol.seeds", "0", "101"], "--protocol.seeds (0, 101): must be disjoint from "
         "--reference.train-seeds: both hold [101]"),
        (["--protocol.seeds", "7", "1", "--reflexion.reflexion.trial-seeds", "7"],
         "--protocol.seeds (7, 1): must be disjoint from --reflexion.reflexion.trial-seeds: "
         "both hold [7]"),
    ],
)  # fmt: skip
def test_evaluation_seeds_are_not_seeds_a_row_learns_on(tmp_path, script, args, line):
    """An evaluation seed shared with the reference rows' training seeds or Reflexion's trial
    seeds (the same key stream: the same trajectory) is refused before anything runs."""
    from sfjax.configcheck import ConfigError

    cli, seen = script
    with pytest.raises(ConfigError) as e:
        cli("--run-dir", str(tmp_path / "t"), *args)
    assert str(e.value).startswith(line), e.value
    assert not (tmp_path / "t").exists() and not seen["reference"] and not seen["sf"]
    # without the rows that learn on them, the same seeds are fine to evaluate on
    mod = experiment("table3")
    hindsight = mod.Config(methods=("hindsight",), protocol=mod.EvalProtocol(seeds=(100, 101)))
    assert [b for b in hindsight.invalid() if b.field == "protocol.seeds"]  # it learns on them too
    cfg = mod.Config(methods=("dqn",), protocol=mod.EvalProtocol(seeds=(100, 101)))
    assert not [b for b in cfg.invalid() if b.field == "protocol.seeds"]


def test_reflexion_row_uses_sfs_actor():
    mod = experiment("table3")
    import cli_common

    from sfjax.configcheck import ConfigError

    def parse(*args):
        return cli_common.parse(mod.PRESETS, ["paper", *args], mod.__doc__)

    sf = ("--sf.model.checkpoint", "/models/Qwen3-4B")
    assert mod.reflexion_checkpoint(parse(*sf)) == "/models/Qwen3-4B"  # unset: SF's
    same = parse(*sf, "--reflexion.checkpoint", "/models/Qwen3-4B")
    assert mod.reflexion_checkpoint(same) == "/models/Qwen3-4B"
    with pytest.raises(ConfigError, match=r"--reflexion\.checkpoint '/other': must be left unset "
                       r"\(or --sf\.model\.checkpoint's value\) with the SF row"):  # fmt: skip
        parse(*sf, "--reflexion.checkpoint", "/other")
    # without the SF row the given checkpoint is used; unset, SF's base Actor still is
    alone = parse("--methods", "reflexion", "--reflexion.checkpoint", "/other")
    assert mod.reflexion_checkpoint(alone) == "/other"
    assert mod.reflexion_checkpoint(parse("--methods", "reflexion", *sf)) == "/models/Qwen3-4B"
    # ... in the dtype of SF's: a Reflexion dtype of its own is refused while it uses that Actor
    with pytest.raises(ConfigError, match=r"--reflexion\.dtype 'float32': must be "
                       r"--sf\.model\.dtype's value \('bfloat16'\)"):  # fmt: skip
        parse(*sf, "--reflexion.dtype", "float32")
    both = parse(*sf, "--reflexion.dtype", "float32", "--sf.model.dtype", "float32")
    assert both.reflexion.dtype == both.sf.model.dtype == "float32"
    assert parse("--methods", "reflexion", "--reflexion.checkpoint", "/other",
                 "--reflexion.dtype", "float32").reflexion.dtype == "float32"  # fmt: skip


@pytest.mark.parametrize("methods", [("reflexion",), ("sf", "reflexion")])
def test_reflexion_row_says_its_actor_is_the_prior(tmp_path, script, monkeypatch, methods):
    """table3 prints its own lines: the Reflexion row runs with progress=False (before, its api
    Reflector's bar showed on a terminal). On SF's behavioural prior (smoke) it is told so, and
    table3.md says once what the prior is and what a Reflexion row on it means."""
    cli, seen = script
    mod = experiment("table3")
    from sfjax.agents import prior as prior_lib

    # the prior's cache directory, not built (the stand-in rows never load it)
    monkeypatch.setattr(prior_lib, "ensure_prior", prior_lib.prior_dir)
    calls = []

    def fake_reflexion_run(cfg, env, writer=None, **kw):
        calls.append((cfg, kw))
        row = MethodResult("Reflexion", {k: (1.0, 0.0) for k in METRICS}, 20, 600, 2)
        return row, {"provenance": f"actor {cfg.checkpoint}, evaluator/self-reflection rule"}

    def fake_run_sf(cfg, env, writer):
        row = MethodResult("SF", {k: (1.0, 0.0) for k in METRICS}, 400, 600, 2)
        return row, {"actor": "the prior", "reflector": "rule"}

    monkeypatch.setattr(mod.reflexion_ranslicing, "run", fake_reflexion_run)
    monkeypatch.setattr(mod, "run_sf", fake_run_sf)
    cli("--run-dir", str(tmp_path / "t"), "--methods", *methods)
    (cfg, kw), = calls
    assert kw == {"progress": False, "actor_prior": True}
    assert cfg.checkpoint == str(prior_lib.prior_dir(mod.SMOKE.sf.prior, mod.SMOKE.env,
                                                     cfg.actor.prompt))  # fmt: skip
    table = (tmp_path / "t" / "table3.md").read_text()
    assert table.count(prior_lib.PRIOR_LABEL) == 1, table
    assert table.count(mod.reflexion_ranslicing.REFLEXION_WITH_PRIOR) == 1, table
    assert "Ran on (environment.json): sfjax " in table  # where the rows ran


def test_reference_rows_records_are_named_by_row_and_read_by_compare(tmp_path, script,
                                                                     monkeypatch):
    """eval_<key>.npz per reference row (the --methods key), which sfjax.baselines.compare
    pairs by evaluation seed."""
    import numpy as np

    from sfjax.baselines import compare
    from sfjax.baselines.evaluation import Rollouts
    from sfjax.baselines.reference import REFERENCE_ROWS

    cli, _ = script
    mod = experiment("table3")

    def rows_with_records(env, params, protocol, reference, names):
        shape = (len(protocol.seeds), protocol.num_steps)
        out = {}
        for i, key in enumerate(names):
            r = np.full(shape, float(i), np.float32)
            out[REFERENCE_ROWS[key]] = Rollouts(np.zeros(shape, np.int32), r, r, r, r)
        return [MethodResult(n, r.summary(), 0, r.num_samples, shape[0])
                for n, r in out.items()], out, {}  # fmt: skip

    monkeypatch.setattr(mod, "reference_rows", rows_with_records)
    run = tmp_path / "t"
    cli("--run-dir", str(run), "--methods", "static", "heuristic", "--protocol.seeds", "0", "1")
    assert sorted(p.name for p in run.glob("eval_*.npz")) == ["eval_heuristic.npz",
                                                              "eval_static.npz"]
    a, b = compare.load_row(f"{run}:static"), compare.load_row(f"{run}:heuristic")
    report = compare.compare(a, b)["evaluation seed"]["utility"]
    assert report["n"] == 2 and report["diff"] == pytest.approx(mod.EvalProtocol().num_steps)
