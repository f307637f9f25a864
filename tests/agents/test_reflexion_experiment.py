"""experiments/reflexion_ranslicing.py's RUN_DIR: the same config runs again, another one is
refused with the keys named (``--resume`` runs with the run's own values), options that do not
change results may differ; an action range other than the env's is refused. The trials and the
evaluation are replaced by a stand-in (they are tested in test_reflexion.py)."""

from __future__ import annotations

import json

import pytest
from experiment_scripts import experiment

from sfjax.baselines.report import MethodResult


@pytest.fixture
def script(monkeypatch):
    """The script's CLI with ``run`` replaced by a recorder: returns (cli, the configs run)."""
    mod = experiment("reflexion_ranslicing")
    import cli_common

    ran = []

    def fake_run(cfg, env, writer=None):
        assert env.config == cfg.env  # the env of the config that runs
        ran.append(cfg)
        metrics = ("utility", "mean_se", "reconfigurations", "violations")
        row = MethodResult("Reflexion", {k: (1.0, 0.0) for k in metrics}, 10, 20, 1)
        return row, {"provenance": "stand-in", "trial_metrics": []}

    monkeypatch.setattr(mod, "run", fake_run)

    def cli(*args):
        cfg = cli_common.parse(mod.PRESETS, ["smoke", *args], mod.__doc__)
        return cli_common.run_cli(mod.main, cfg)

    return cli, ran


def test_same_config_runs_again(tmp_path, script):
    cli, ran = script
    cli("--run-dir", str(tmp_path / "r"))
    cli("--run-dir", str(tmp_path / "r"))
    assert len(ran) == 2 and ran[0] == ran[1]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["reflexion"]["trials"] == 2


def test_other_config_is_refused_naming_the_key(tmp_path, script, capsys):
    cli, ran = script
    cli("--run-dir", str(tmp_path / "r"))
    with pytest.raises(SystemExit) as e:
        cli("--run-dir", str(tmp_path / "r"), "--reflexion.trials", "3")
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(ran) == 1, err
    assert (
        "holds a Reflexion run with another config: reflexion.trials (2 in the run, 3 now)" in err
    )
    assert "Add --resume" in err and "choose a new --run-dir" in err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["reflexion"]["trials"] == 2


def test_resume_runs_with_the_runs_values(tmp_path, script, capsys):
    cli, ran = script
    cli("--run-dir", str(tmp_path / "r"))
    cli("--run-dir", str(tmp_path / "r"), "--reflexion.trials", "3", "--resume")
    assert ran[1].reflexion.trials == 2 and ran[1].resume
    # every value from the run, the env built from them too
    cli("--run-dir", str(tmp_path / "r"), "--env.cell.n-prb", "50", "--resume")
    assert ran[2].env.cell.n_prb == 25
    assert ran[1].reflexion.trial_seeds == (100,)  # tuples stay tuples
    assert "with its own values for: reflexion.trials" in capsys.readouterr().err


def test_operational_options_may_differ(tmp_path, script):
    cli, ran = script
    cli("--run-dir", str(tmp_path / "r"))
    cli("--run-dir", str(tmp_path / "r"), "--log-level", "WARNING",
        "--reflector.api.max-retries", "20", "--reflector.api.timeout-s", "30")  # fmt: skip
    assert len(ran) == 2 and ran[1].reflector.api.max_retries == 20


def test_damaged_config_is_named(tmp_path, script, capsys):
    cli, ran = script
    cli("--run-dir", str(tmp_path / "r"))
    (tmp_path / "r" / "config.json").write_text('{"run_dir": "x", "lo')
    with pytest.raises(SystemExit):
        cli("--run-dir", str(tmp_path / "r"))
    assert "config.json is damaged" in capsys.readouterr().err and len(ran) == 1
    cli("--run-dir", str(tmp_path / "r"), "--resume")
    assert len(ran) == 2 and json.loads((tmp_path / "r" / "config.json").read_text())["reflexion"]


def test_evaluation_seeds_are_not_trial_seeds(tmp_path, script):
    from sfjax.configcheck import ConfigError

    cli, ran = script
    with pytest.raises(ConfigError, match=r"^--protocol\.seeds \(0, 100\): must be disjoint from "
                       r"--reflexion\.trial-seeds: both hold \[100\]"):
        cli("--run-dir", str(tmp_path / "r"), "--protocol.seeds", "0", "100")
    assert not ran and not (tmp_path / "r").exists()


@pytest.mark.parametrize("hi", ["9", "13"])
def test_action_range_is_the_envs(tmp_path, script, capsys, hi):
    """A given range other than the env's is refused, 13 included: the PromptConfig default
    (which means "from the env") is the default env's own top action, 12, so an explicit 13 on
    the default env is no longer taken for "unset" and replaced."""
    cli, ran = script
    with pytest.raises(SystemExit) as e:
        cli("--run-dir", str(tmp_path / "r"), "--actor.prompt.action-hi", hi)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(
        f"error: --actor.prompt.action-hi {hi}: must be left unset; the action range comes from "
        "the env: [1, 12] with --env.cell.n-prb 25"), err  # fmt: skip
    assert not ran and not (tmp_path / "r").exists()
    cli("--run-dir", str(tmp_path / "r"), "--actor.prompt.action-hi", "12")  # the env's: fine
    assert len(ran) == 1
