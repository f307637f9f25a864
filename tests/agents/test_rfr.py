"""Refine-from-Reflection dataset construction (Algorithm 2) on constructed labels."""

from __future__ import annotations

import jax
import pytest

from sfjax.agents import rfr
from sfjax.agents.prompts import PromptConfig, format_output
from sfjax.agents.trajectory import Reflection, Step, StepLabel, Trajectory

PCFG = PromptConfig(action_lo=1, action_hi=13)
FB = {
    "se": 5.0,
    "violation": 0.0,
    "reconfiguration": 0.0,
    "arrival_rate_bps": 1e6,
    "queue_delta_bytes": 0.0,
    "dropped_bytes": 0.0,
}


def _traj(env, actions, ok=None):
    ok = ok or [True] * len(actions)
    steps = [
        Step(t, {}, f"P{env}-{t}", f"out{env}-{t}", "", a, "", o, FB)
        for t, (a, o) in enumerate(zip(actions, ok))
    ]
    return Trajectory(env, 0, steps)


def _refl(env, labels):
    return Reflection(env, [StepLabel(t, lab, a, "") for t, (lab, a) in enumerate(labels)], "", "x")


def test_base_dataset_labels_and_targets():
    trajs = [_traj(0, [3, 4, 5], ok=[True, True, False]), _traj(1, [6, 7])]
    refls = [
        _refl(0, [("effective", 3), ("suboptimal", 2), ("effective", 5)]),
        _refl(1, [("suboptimal", 8), ("effective", 7)]),
    ]
    base, targets = rfr.base_dataset(trajs, refls[::-1])  # order of reflections does not matter
    assert [(e.prompt, e.completion, e.desirable, e.source) for e in base] == [
        ("P0-0", "out0-0", True, "base"),
        ("P0-1", "out0-1", False, "base"),
        ("P0-2", "out0-2", False, "base"),  # unusable output: undesirable even if 'effective'
        ("P1-0", "out1-0", False, "base"),
        ("P1-1", "out1-1", True, "base"),
    ]
    assert [(t.target_id, t.prompt, t.improved_action) for t in targets] == [
        ("0:1", "P0-1", 2),
        ("0:2", "P0-2", 5),
        ("1:0", "P1-0", 8),
    ]


def test_base_dataset_rejects_incomplete_reflection():
    with pytest.raises(ValueError, match="no complete reflection"):
        rfr.base_dataset([_traj(0, [3, 4])], [_refl(0, [("effective", 3)])])
    with pytest.raises(ValueError, match="no complete reflection"):
        rfr.base_dataset([_traj(0, [3])], [_refl(1, [("effective", 3)])])


def _out(a):
    return format_output("r", a, "a", PCFG)


def test_rollouts_tolerance_tau_and_skip():
    targets = [
        rfr.RolloutTarget("0:1", "PA", 5),
        rfr.RolloutTarget("0:2", "PB", 9),
        rfr.RolloutTarget("1:0", "PC", 2),
    ]
    base = [rfr.KTOExample("PA", "o", False, "base", 0, 1)]
    # per prompt, the actions the fake Actor samples in each of two KTO iterations
    plan = {
        0: {"PA": [5, 5, 6, 5], "PB": [9, 1, 2, 3], "PC": [3, 3, 3, None]},
        1: {"PB": [9, 9, 9, 10], "PC": [1, 2, 2, 3]},
    }
    calls = []

    def sample_fn(prompts, k, key):
        it = len(calls)
        calls.append(list(prompts))
        assert k == 4
        return [[_out(a) if a is not None else "garbage" for a in plan[it][p]] for p in prompts]

    cfg = rfr.RfRConfig(num_rollouts=4, tolerance=0, tau=0.5)
    state = rfr.RfRState()
    key = jax.random.key(0)
    ds, stats, state = rfr.build_dataset(base, targets, state, sample_fn, cfg, PCFG, key)
    assert calls[0] == ["PA", "PB", "PC"]
    assert ds[0] == base[0]
    roll = ds[1:]
    assert [e.desirable for e in roll] == [True, True, False, True] + [
        True,
        False,
        False,
        False,
    ] + [False] * 4
    assert all(e.source == "rollout" for e in roll)
    assert (roll[0].env_index, roll[0].step, roll[8].env_index, roll[8].step) == (0, 1, 1, 0)
    assert stats.n_rollout_desirable == 4 and stats.n_rollout_undesirable == 8
    assert stats.n_base_undesirable == 1 and stats.n_desirable == 4 and stats.n_undesirable == 9
    assert stats.rollout_parse_failures == 1
    assert stats.mean_match_rate == pytest.approx((0.75 + 0.25 + 0.0) / 3)
    assert state.solved == ["0:1"]  # 0.75 > tau; 0.25 and 0.0 are not
    assert stats.n_solved == 1 and stats.n_rolled_out == 3

    # next KTO iteration: the solved step is not rolled out again; tau is strict (> not >=)
    ds2, stats2, state = rfr.build_dataset(base, targets, state, sample_fn, cfg, PCFG, key)
    assert calls[1] == ["PB", "PC"]
    assert stats2.n_rolled_out == 2
    assert state.solved == ["0:1", "0:2"]  # PB: 3/4 > 0.5; PC: 2/4 = 0.5 is not > 0.5
    assert len(ds2) == 1 + 8


def test_rollout_tolerance():
    targets = [rfr.RolloutTarget("0:0", "P", 5)]
    samples = [[_out(a) for a in (3, 4, 5, 6, 7)]]
    for tol, want in ((0, [0, 0, 1, 0, 0]), (1, [0, 1, 1, 1, 0]), (2, [1] * 5)):
        ex, rates, _ = rfr.rollout_examples(targets, samples, rfr.RfRConfig(tolerance=tol), PCFG)
        assert [int(e.desirable) for e in ex] == want
        assert rates == [sum(want) / 5]


def test_no_rollouts_when_disabled_or_all_solved():
    targets = [rfr.RolloutTarget("0:0", "P", 5)]

    def boom(*a):
        raise AssertionError("must not sample")

    key = jax.random.key(0)
    ds, st, _ = rfr.build_dataset(
        [], targets, rfr.RfRState(), boom, rfr.RfRConfig(rollouts=False), PCFG, key
    )
    assert ds == [] and st.n_rolled_out == 0
    ds, st, _ = rfr.build_dataset(
        [], targets, rfr.RfRState(["0:0"]), boom, rfr.RfRConfig(), PCFG, key
    )
    assert st.n_solved == 1 and st.n_rolled_out == 0


def test_config_validation_and_json_round_trip():
    with pytest.raises(ValueError, match="tau"):
        rfr.RfRConfig(tau=1.5)
    with pytest.raises(ValueError):
        rfr.RfRConfig(num_rollouts=0)
    ex = [rfr.KTOExample("p", "c", True, "base", 1, 2)]
    assert rfr.examples_from_json(rfr.examples_to_json(ex)) == ex
