"""run_rl_baselines continues a run: an algorithm whose results were saved for the same
identity is loaded, not trained again (a paper-budget run is ~15 min per algorithm on a CPU);
another identity, missing, old-format or damaged files train it again. Training is replaced by
a stand-in that counts its calls (the real one: test_rl.py)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from sfjax.baselines import rl, runner
from sfjax.baselines.evaluation import EvalProtocol, Rollouts
from sfjax.envs.ran import RanSlicingEnv

PROTOCOL = EvalProtocol(seeds=(0, 1), num_steps=5)


@pytest.fixture
def trained(monkeypatch):
    """train_and_evaluate replaced: results that depend on the algorithm and the budget; returns
    the list of algorithms trained."""
    calls = []

    def fake(cfg, name, env, env_params, protocol):
        calls.append(name)
        rng = np.random.default_rng([len(name), cfg.budget.rounds])
        n, s, t, r = len(cfg.seeds), len(protocol.seeds), protocol.num_steps, cfg.budget.rounds
        rollouts = Rollouts(
            actions=rng.integers(0, 25, (n, s, t)), rewards=rng.normal(size=(n, s, t)),
            se=rng.uniform(1, 2, (n, s, t)), reconfiguration=rng.integers(0, 2, (n, s, t)),
            violation=rng.integers(0, 2, (n, s, t)),
        )  # fmt: skip
        curves = {k: rng.normal(size=(n, r)) for k in (*rl.CURVE_KEYS, "episodes")}
        train = rl.TrainResult(name, object(), object(), curves, tuple(cfg.seeds), 1000, 12.5)
        row = runner.MethodResult(runner.ROW_NAMES[name], rollouts.summary(), 1000,
                                  rollouts.num_samples, n * s, f"{name} note")  # fmt: skip
        return runner.RLRun(train, rollouts, row)

    monkeypatch.setattr(runner, "train_and_evaluate", fake)
    return calls


def _run(tmp_path, cfg=None):
    cfg = cfg or runner.RLRunConfig(algos=("dqn", "ppo"), seeds=(0, 1), budget=rl.Budget(3, 2, 5))
    env = RanSlicingEnv()
    return runner.run_rl_baselines(cfg, env, env.default_params, PROTOCOL, tmp_path)


def _same(a: runner.RLRun, b: runner.RLRun):
    assert a.row == b.row and a.train.wall_time_s == b.train.wall_time_s
    assert a.train.seeds == b.train.seeds and a.train.env_samples == b.train.env_samples
    assert a.train.curves.keys() == b.train.curves.keys()
    for k in a.train.curves:
        np.testing.assert_array_equal(a.train.curves[k], b.train.curves[k])
    for f in dataclasses.fields(Rollouts):
        np.testing.assert_array_equal(getattr(a.rollouts, f.name), getattr(b.rollouts, f.name))


def test_a_finished_algorithm_is_loaded_not_trained_again(tmp_path, trained):
    first = _run(tmp_path)
    assert trained == ["dqn", "ppo"]
    again = _run(tmp_path)
    assert trained == ["dqn", "ppo"]  # nothing trained
    for name in first:
        _same(first[name], again[name])
        assert again[name].train.train_state is None  # the networks are not saved
    (tmp_path / "ppo" / "summary.json").unlink()  # killed before PPO's summary: PPO again
    _same(_run(tmp_path)["ppo"], first["ppo"])
    assert trained == ["dqn", "ppo", "ppo"]


def test_another_identity_or_unreadable_results_train_again(tmp_path, trained, caplog):
    _run(tmp_path)
    longer = runner.RLRunConfig(algos=("dqn", "ppo"), seeds=(0, 1), budget=rl.Budget(4, 2, 5))
    _run(tmp_path, longer)  # another budget: both trained again, and saved for it
    assert trained == ["dqn", "ppo"] * 2
    summary = tmp_path / "dqn" / "summary.json"
    saved = json.loads(summary.read_text())
    assert saved["identity"]["budget"]["rounds"] == 4
    del saved["identity"]  # written before identities were recorded
    summary.write_text(json.dumps(saved))
    npz = tmp_path / "ppo" / "eval_rollouts.npz"
    npz.write_bytes(npz.read_bytes()[:200])  # cut short
    _run(tmp_path, longer)
    assert trained[4:] == ["dqn", "ppo"]
    assert "ppo: its saved results in" in caplog.text and "it trains again" in caplog.text
    summary.write_text('{"row": ')  # damaged
    _run(tmp_path, longer)
    assert trained[6:] == ["dqn"] and "is damaged" in caplog.text
