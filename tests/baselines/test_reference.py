"""Reference rows of Table III: best static, adaptive heuristic, hindsight beam search."""

import numpy as np
import pytest

from sfjax.baselines import reference as R
from sfjax.baselines.evaluation import EvalProtocol, evaluate_agent, evaluate_policy
from sfjax.baselines.report import HINDSIGHT_ROW, TABLE_ROWS, Table3Inputs, format_table3
from sfjax.envs.ran import RanSlicingConfig, RanSlicingEnv

STEPS = 40
EVAL = EvalProtocol(seeds=(0, 1), num_steps=STEPS)
SMALL_GRID = {"kbps_per_prb": (200.0, 300.0), "other_kbps_per_prb": (650.0,),
              "hysteresis_rbg": (2,)}


@pytest.fixture(scope="module")
def env():
    return RanSlicingEnv(RanSlicingConfig(episode_steps=STEPS))


class _Replay:
    """A Python agent that plays recorded action sequences (one per seed)."""

    def __init__(self, actions_ST):
        self.actions_ST, self.t = np.asarray(actions_ST), 0

    def reset(self, seeds):
        self.t = 0

    def act(self, obs_S, infos):
        self.t += 1
        return self.actions_ST[:, self.t - 1].tolist()


def test_bad_reference_values_are_named():
    from sfjax.configcheck import problems

    assert problems(R.ReferenceConfig()) == []
    assert problems(R.ReferenceConfig(beam_width=0, train_seeds=())) == [
        "--beam-width 0: must be >= 1", "--train-seeds (): must be at least one seed"]


def test_best_static_is_the_argmax_on_training_seeds(env):
    train = EvalProtocol(seeds=(100, 101), num_steps=STEPS)
    a, utilities = R.best_static_action(env, env.default_params, train)
    assert utilities.shape == (env.num_actions,) and a == int(np.argmax(utilities))
    direct = evaluate_policy(R.static_policy(a), env, env.default_params, train)
    assert float(direct.per_episode()["utility"].mean()) == pytest.approx(utilities[a], rel=1e-5)


def test_heuristic_reacts_to_both_slices(env):
    pol = R.demand_tracking_policy(env, R.HeuristicParams(250.0, 650.0, 2))
    prbs = np.asarray(env.config.prbs_per_action)
    peak_c, peak_o = env.ues.peak_rate_S

    def obs(cur_prbs, arr_c, arr_o, q_c=0.0, q_o=0.0):
        o = np.zeros(9, np.float32)
        o[0], o[2], o[6], o[3], o[7] = cur_prbs / 25, arr_c / peak_c, arr_o / peak_o, q_c, q_o
        return o

    act = lambda *a: int(pol(obs(*a), None))  # noqa: E731
    # 3 Mb/s of GBR traffic at 250 kb/s per PRB wants 12 PRB; slice 1 nearly idle
    assert prbs[act(12, 3e6, 1e6)] == 12
    # more GBR load: grows at once
    assert prbs[act(12, 5e6, 1e6)] == 20
    # slice 1 at 8 Mb/s needs 12.3 PRB at 650 kb/s: slice 0 is capped at 12 even if it wants 20
    assert prbs[act(20, 5e6, 8e6)] == 12
    # less GBR load shrinks only by the hysteresis (2 actions) or more
    assert prbs[act(12, 2.6e6, 1e6)] == 12 and prbs[act(16, 2.6e6, 1e6)] == 12
    # a growing queue of slice 0 asks for one more unit than the rate alone
    assert prbs[act(12, 3e6, 1e6, 0.05)] == 14
    # with a base allocation (the best static one) light load does not shrink below it, while
    # slice 1's need still does
    based = R.demand_tracking_policy(env, R.HeuristicParams(250.0, 650.0, 2, base_action=7))
    assert prbs[int(based(obs(16, 1e6, 1e6), None))] == 16
    assert prbs[int(based(obs(16, 1e6, 8e6), None))] == 12


def test_reference_rows_and_the_hindsight_bound(env, monkeypatch):
    monkeypatch.setattr(R, "HEURISTIC_GRID", SMALL_GRID)
    cfg = R.ReferenceConfig(train_seeds=(100, 101), beam_width=4)
    rows, rollouts, info = R.reference_rows(env, env.default_params, EVAL, cfg)
    assert [r.name for r in rows] == list(TABLE_ROWS[5:])
    assert info["static"]["prbs"] in env.config.prbs_per_action
    assert set(info["heuristic"]["best"]) == set(SMALL_GRID) | {"base_action"}
    assert info["heuristic"]["best"]["base_action"] == info["static"]["action"]
    u = {n: r.per_episode()["utility"] for n, r in rollouts.items()}
    # the bound carries the other rows' sequences: per seed it is never below them
    for name in TABLE_ROWS[5:7]:
        assert np.all(u[HINDSIGHT_ROW] >= u[name] - 1e-3)
    # its records are real: replaying its actions through the shared evaluation gives them back
    hind = rollouts[HINDSIGHT_ROW]
    replay = evaluate_agent(_Replay(hind.actions), env, env.default_params, EVAL)
    np.testing.assert_allclose(replay.rewards, hind.rewards, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(replay.violation, hind.violation)
    # the table shows every row's utility as a share of the bound
    text = format_table3(rows, Table3Inputs(protocol=EVAL, llm_provenance="-"))
    assert "% of hindsight" in text and "100.0 %" in text


def test_training_seeds_that_are_evaluation_seeds_are_refused(env):
    """The training protocol shares the evaluation's key stream: a training seed that is also
    an evaluation seed is the same trajectory, so the choice would be made on the test set."""
    cfg = R.ReferenceConfig(train_seeds=(100, EVAL.seeds[0]))
    with pytest.raises(ValueError, match=rf"share \[{EVAL.seeds[0]}\]"):
        R.reference_rows(env, env.default_params, EVAL, cfg)
