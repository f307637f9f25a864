"""experiments/rl_baselines.py's RUN_DIR: the same config runs again, another one is refused
with the keys named (``--resume`` runs with the run's own values), the log level may differ.
Training and evaluation are replaced by a stand-in (they are tested in test_rl.py)."""

from __future__ import annotations

import json

import pytest
from experiment_scripts import experiment


@pytest.fixture
def script(monkeypatch):
    """The script's CLI with the baselines' run replaced by a recorder: (cli, configs run)."""
    mod = experiment("rl_baselines")
    import cli_common

    ran = []

    def fake_run(rl_cfg, env, params, protocol, run_dir, writer=None):
        ran.append((rl_cfg, env.config))
        return {}

    monkeypatch.setattr(mod, "run_rl_baselines", fake_run)
    monkeypatch.setattr(mod, "write_table3", lambda path, *a, **k: path.write_text("table\n"))
    monkeypatch.setattr(mod, "plot_fig2", lambda *a, **k: None)

    def cli(*args):
        cfg = cli_common.parse(mod.PRESETS, ["smoke", *args], mod.__doc__)
        return cli_common.run_cli(mod.main, cfg)

    return cli, ran


def _saved(run_dir):
    return json.loads((run_dir / "config.json").read_text())


def test_same_config_runs_again_and_log_level_may_differ(tmp_path, script):
    cli, ran = script
    cli("--run-dir", str(tmp_path / "r"))
    cli("--run-dir", str(tmp_path / "r"), "--log-level", "WARNING")
    assert len(ran) == 2 and ran[0] == ran[1]
    assert _saved(tmp_path / "r")["rl"]["seeds"] == [0, 1]
    # each start appends where it ran (sfjax.provenance)
    starts = json.loads((tmp_path / "r" / "environment.json").read_text())["starts"]
    assert len(starts) == 2 and starts[0]["jax"]["backend"] == "cpu"


def test_other_config_is_refused_naming_the_key(tmp_path, script, capsys):
    cli, ran = script
    cli("--run-dir", str(tmp_path / "r"))
    with pytest.raises(SystemExit) as e:
        cli("--run-dir", str(tmp_path / "r"), "--rl.seeds", "0", "1", "2")
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(ran) == 1, err
    assert "holds a run of the RL baselines with another config: rl.seeds" in err
    assert "Add --resume" in err
    assert _saved(tmp_path / "r")["rl"]["seeds"] == [0, 1]
    # a refused start is not recorded
    assert len(json.loads((tmp_path / "r" / "environment.json").read_text())["starts"]) == 1


def test_resume_runs_with_the_runs_values(tmp_path, script):
    cli, ran = script
    cli("--run-dir", str(tmp_path / "r"))
    cli("--run-dir", str(tmp_path / "r"), "--rl.seeds", "5", "--env.cell.n-prb", "50", "--resume")
    rl_cfg, env_cfg = ran[1]
    assert rl_cfg.seeds == (0, 1) and env_cfg.cell.n_prb == 25
