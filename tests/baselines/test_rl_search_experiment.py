"""experiments/rl_search.py: validation seeds that Table III reports on are refused, a bad grid
is refused before anything is written, the report pairs every candidate with its algorithm's
default and names the winners' table3.py options, finished candidates are not trained again,
RUN_DIR's identity as in rl_baselines.py; one tiny search with real training end to end.
Apart from that one, training is replaced by a stand-in with known utilities."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from experiment_scripts import experiment, refused

from sfjax.baselines import rl
from sfjax.baselines.evaluation import EvalProtocol, Rollouts
from sfjax.baselines.report import MethodResult
from sfjax.baselines.runner import RLRun, RLRunConfig
from sfjax.config_rules import RULES
from sfjax.configcheck import problems


def _cli(mod):
    import cli_common

    def cli(*args, preset="smoke"):
        cfg = mod.cli([preset, *args])
        return cli_common.run_cli(mod.main, cfg, preset)

    return cli


def _fake_run(cfg, name, protocol):
    """Utility of (training seed n, validation seed s) = 1e6 x learning rate + 10 n + s."""
    lr = cfg.algo_config(name).learning_rate
    n, s = len(cfg.seeds), len(protocol.seeds)
    u_NS = 1e6 * lr + 10.0 * np.arange(n)[:, None] + np.arange(s)[None, :]
    zeros = np.zeros((n, s, 1))
    rollouts = Rollouts(zeros.astype(np.int32), u_NS[..., None], zeros + 1.5, zeros, zeros)
    curves = {k: np.zeros((n, cfg.budget.rounds)) for k in (*rl.CURVE_KEYS, "episodes")}
    train = rl.TrainResult(name, None, None, curves, cfg.seeds, cfg.budget.total_steps, 1.0)
    row = MethodResult(name, rollouts.summary(), cfg.budget.total_steps, n * s, n * s)
    return RLRun(train, rollouts, row)


@pytest.fixture
def script(monkeypatch):
    """The CLI with training replaced by :func:`_fake_run`: (cli, [(rl config, algo,
    protocol)] of every candidate trained)."""
    mod = experiment("rl_search")
    trained = []

    def fake(cfg, name, env, env_params, protocol):
        trained.append((cfg, name, protocol))
        return _fake_run(cfg, name, protocol)

    monkeypatch.setattr(mod, "train_and_evaluate", fake)
    return _cli(mod), trained


def test_presets_hold_table3s_seeds_out():
    mod = experiment("rl_search")
    for _, preset in mod.PRESETS.values():
        assert problems(preset, rules=RULES) == []
        assert not set(preset.validation.seeds) & (set(range(16)) | set(EvalProtocol().seeds))
        assert not set(preset.rl.seeds) & set(RLRunConfig().seeds)
    paper = mod.PAPER
    assert paper.validation.seeds == tuple(range(100, 116)) and paper.rl.seeds == (100, 101, 102)
    assert paper.rl.budget == rl.Budget() and paper.validation.num_steps == 300
    assert paper.rl.dqn == rl.DQNConfig() and paper.rl.sac == rl.SACConfig()


@pytest.mark.parametrize(
    "args, shared",
    [
        (("--validation.seeds", "3", "100"), "[3]"),
        (("--validation.seeds", "15", "16"), "[15]"),  # the measured Table III's seeds 0-15
        (("--reported-seeds", "200", "--validation.seeds", "200", "201"), "[200]"),
        # table3.py's default --protocol.seeds stay held out whatever --reported-seeds says
        (("--reported-seeds", "50", "--validation.seeds", "4", "16"), "[4]"),
    ],
)
def test_validation_seeds_table3_reports_on_arerefused(tmp_path, script, capsys, args, shared):
    cli, trained = script
    err = refused(cli, capsys, "--run-dir", str(tmp_path / "s"), *args)
    assert "--validation.seeds" in err and "must be disjoint from the seeds Table III reports on" \
        in err and f"choosing on {shared} would tune on the test set" in err  # fmt: skip
    assert not trained and not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "grid, line",
    [
        ("dqn.lr=1e-3", "grid axis 'dqn.lr=1e-3': DQNConfig has no field 'lr'; its fields: "
         "learning_rate, gamma, batch_size"),
        ("ppo.ent_coef=0,x", "grid axis 'ppo.ent_coef=0,x': 'x' is not a float"),
        ("sac.learning_rate=1e-3", "sac is not searched (--rl.algos dqn ppo)"),
        # smoke's trajectories are 50 steps: a 30-step PPO rollout would fail hours in
        ("ppo.rollout_steps=25,30", "--grid: ppo candidate rollout_steps=30: PPO "
         "rollout_steps=30 must divide steps_per_trajectory=50"),
        # a value outside the config's range, which the grid's type check lets through
        ("ppo.gamma=0.9,5", "--grid: ppo candidate gamma=5.0: PPOConfig: --gamma 5.0: must be "
         "in [0, 1]"),
    ],
)  # fmt: skip
def test_a_bad_grid_is_refused_before_anything_is_written(tmp_path, script, capsys, grid, line):
    cli, trained = script
    err = refused(cli, capsys, "--run-dir", str(tmp_path / "s"), "--rl.algos", "dqn", "ppo",
                   "--grid", grid)  # fmt: skip
    assert line in err
    assert not trained and not (tmp_path / "s").exists()


def test_search_pairs_every_candidate_with_its_default_and_names_the_winners(
    tmp_path, script, capsys
):
    cli, trained = script
    out = cli("--run-dir", str(tmp_path / "s"), "--rl.algos", "dqn", "ppo")
    printed = capsys.readouterr().out
    # default grid: 1e-4, 3e-4 (the default), 9e-4 per algorithm, all on the same seeds
    assert [(name, cfg.algo_config(name).learning_rate) for cfg, name, _ in trained] == [
        (a, lr) for a in ("dqn", "ppo") for lr in (1e-4, 3e-4, 9e-4)]  # fmt: skip
    smoke = experiment("rl_search").SMOKE
    for cfg, name, protocol in trained:
        assert cfg.seeds == (100, 101) and protocol == smoke.validation
        lr = cfg.algo_config(name).learning_rate
        assert cfg.algo_config(name) == replace(smoke.rl.algo_config(name), learning_rate=lr)
    saved = json.loads((tmp_path / "s" / "search.json").read_text())
    assert saved == json.loads(json.dumps(out))
    rows = {r["id"]: r for r in saved["rows"]}
    assert len(rows) == 6 and len(list((tmp_path / "s" / "configs").glob("*.json"))) == 6
    best, default, low = rows["dqn-learning_rate=0.0009"], rows["dqn-learning_rate=0.0003"], \
        rows["dqn-learning_rate=0.0001"]  # fmt: skip
    # utility(n, s) = 1e6 lr + 10 n + s on 2 x 2 seeds: mean 1e6 lr + 5.5, per-seed 1e6 lr + 0.5, + 10.5
    assert best["utility"] == pytest.approx(905.5) and best["per_seed_utility"] == \
        pytest.approx([900.5, 910.5])  # fmt: skip
    assert best["utility_ci"][0] < 905.5 < best["utility_ci"][1]
    # paired: the same shift on every (training seed, validation seed): an exact interval
    d = best["vs_default"]
    assert (d["diff"], d["ci_low"], d["ci_high"], d["significant"]) == (
        pytest.approx(600), pytest.approx(600), pytest.approx(600), True)  # fmt: skip
    assert low["vs_default"]["diff"] == pytest.approx(-200) and default["vs_default"] is None
    assert default["is_default"] and (best["best"], default["best"], low["best"]) == (
        True, False, False)  # fmt: skip
    assert saved["winners"] == {
        "dqn": "dqn-learning_rate=0.0009",
        "ppo": "ppo-learning_rate=0.0009",
    }
    # the options that give the winners in table3.py's smoke preset (its RL base configs are
    # the smoke search's): the new rate only
    assert saved["table3_flags"]["dqn"] == ["--rl.dqn.learning-rate 0.0009"]
    assert saved["table3_command"] in printed and "--protocol.seeds $(seq 0 15)" in printed
    assert "experiments/table3.py smoke --methods dqn ppo " in saved["table3_command"]
    md = (tmp_path / "s" / "search.md").read_text()
    assert "**learning_rate=0.0009** (best)" in md and "+600 [600, 600] *" in md
    assert "**not the paper's**" in md and "Held out, never evaluated here: env seeds 0-15" in md
    assert saved["settings"]["paper_budget"] is False


def test_finished_candidates_are_not_trained_again(tmp_path, script, capsys):
    cli, trained = script
    run = ("--run-dir", str(tmp_path / "s"), "--rl.algos", "dqn")
    first = cli(*run)
    assert len(trained) == 3
    cli(*run, "--resume")
    cli(*run)  # the same settings continue without --resume too
    assert len(trained) == 3
    assert cli(*run)["rows"] == first["rows"]
    # --grid and --rl.algos choose candidates, not their results: a new value trains alone
    cli(*run[:2], "--rl.algos", "dqn", "ppo", "--grid", "dqn.learning_rate=3e-4,9e-4,2e-3")
    assert [(n, c.algo_config(n).learning_rate) for c, n, _ in trained[3:]] == [
        ("dqn", 2e-3), ("ppo", 1e-4), ("ppo", 3e-4), ("ppo", 9e-4)]  # fmt: skip
    assert "config 1/6 dqn learning_rate=0.0003 (default): finished in" in capsys.readouterr().err


def test_another_config_is_refused_and_resume_keeps_the_runs_values(tmp_path, script, capsys):
    cli, trained = script
    run = ("--run-dir", str(tmp_path / "s"), "--rl.algos", "dqn")
    cli(*run)
    err = refused(cli, capsys, *run, "--rl.seeds", "7", "8")
    assert "holds a hyperparameter search of the RL baselines with another config: rl.seeds " \
           "([100, 101] in the run, [7, 8] now)" in err and "Add --resume" in err  # fmt: skip
    cli(*run, "--rl.seeds", "7", "8", "--resume")
    assert len(trained) == 3 and all(c.seeds == (100, 101) for c, _, _ in trained)


def test_tiny_search_end_to_end_then_resumed(tmp_path, monkeypatch, capsys):
    """Real training (rejax PPO, 1 round of 2 x 50 steps, two learning rates), then a rerun
    with --resume that trains nothing and writes the same report."""
    mod = experiment("rl_search")
    cli = _cli(mod)
    run = ("--run-dir", str(tmp_path / "s"), "--rl.algos", "ppo", "--grid",
           "ppo.learning_rate=3e-4,3e-3", "--rl.budget.rounds", "1",
           "--rl.budget.trajectories-per-round", "2", "--rl.ppo.num-epochs", "1",
           "--validation.num-steps", "20", "--env.ttis-per-step", "10")  # fmt: skip
    first = cli(*run)
    assert len(first["rows"]) == 2 and first["rows"][0]["is_default"]
    for r in first["rows"]:
        rec = json.loads((tmp_path / "s" / "configs" / f"{r['id']}.json").read_text())
        ep = {k: np.asarray(v) for k, v in rec["per_episode"].items()}
        assert ep["utility"].shape == (2, 2)  # training seeds 100, 101 x validation seeds
        assert r["utility"] == pytest.approx(ep["utility"].mean())
        # the stored metrics are one trajectory's eq. 15: 15 T (SE + 1) - 15 c - 300 v
        eq15 = 15 * 20 * (ep["mean_se"] + 1) - 15 * ep["reconfigurations"] - 300 * ep["violations"]
        np.testing.assert_allclose(ep["utility"], eq15, rtol=1e-4, atol=1e-2)
        assert rec["train_samples"] == 100 and rec["settings"]["seeds"] == [100, 101]
    assert set(first["winners"]) == {"ppo"}

    def no_training(*a, **k):
        raise AssertionError("a finished candidate was trained again")

    monkeypatch.setattr(mod, "train_and_evaluate", no_training)
    again = cli(*run, "--resume")
    assert again["rows"] == first["rows"]
    assert json.loads((tmp_path / "s" / "search.json").read_text())["rows"] == first["rows"]
