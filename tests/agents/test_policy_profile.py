"""sfjax.agents.policy_profile: the per-iteration profile of a run's Actor, on hand-built
trajectories whose numbers are worked out here."""

from __future__ import annotations

import math

import pytest

from sfjax.agents.policy_profile import format_profiles, main, profile, run_profiles, slope_and_corr
from sfjax.agents.trajectory import (
    Reflection,
    Step,
    StepLabel,
    Trajectory,
    save_json,
    save_trajectories,
)


def _traj(env_index: int, actions, loads_mbps, violations=None, reconfs=None) -> Trajectory:
    n = len(actions)
    violations = violations or [0.0] * n
    reconfs = reconfs or [0.0] * n
    steps = [
        Step(t=t, state={"arrival_rate_bps": x * 1e6}, prompt="p", output="o", reflection="",
             action=a, analysis="", parsed_ok=True,
             feedback={"violation": v, "reconfiguration": r, "se": 1.0})
        for t, (a, x, v, r) in enumerate(zip(actions, loads_mbps, violations, reconfs))
    ]  # fmt: skip
    return Trajectory(env_index, seed=env_index, steps=steps)


def test_slope_and_corr_of_exact_lines():
    assert slope_and_corr([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx((2.0, 1.0))
    assert slope_and_corr([0, 1, 2, 3], [7, 5, 3, 1]) == pytest.approx((-2.0, -1.0))
    # a constant policy: slope 0, correlation undefined
    slope, corr = slope_and_corr([0, 1, 2, 3], [4, 4, 4, 4])
    assert slope == 0.0 and math.isnan(corr)
    # constant load: neither is defined
    assert all(math.isnan(v) for v in slope_and_corr([2, 2, 2], [1, 2, 3]))
    with pytest.raises(ValueError, match="length"):
        slope_and_corr([1, 2], [1])


def test_profile_bins_blocks_and_requests():
    # env 0: loads 0.5, 2.0, 3.5, 7.0 Mb/s; env 1 the same loads, other actions
    t0 = _traj(0, [2, 4, 6, 8], [0.5, 2.0, 3.5, 7.0], violations=[1, 0, 0, 1], reconfs=[1, 1, 1, 0])
    t1 = _traj(1, [4, 4, 8, 8], [0.5, 2.0, 3.5, 7.0], violations=[0, 0, 1, 1], reconfs=[0, 0, 1, 0])
    refl = [
        Reflection(0, [StepLabel(0, "suboptimal", 5, "more"), StepLabel(1, "effective", 4, ""),
                       StepLabel(2, "suboptimal", 3, "less"), StepLabel(3, "effective", 8, "")],
                   "", "rule"),
        Reflection(1, [StepLabel(0, "effective", 4, ""), StepLabel(1, "suboptimal", 6, "more"),
                       StepLabel(2, "suboptimal", 8, "same action: no request"),
                       StepLabel(3, "suboptimal", 9, "more")], "", "rule"),
    ]  # fmt: skip
    p = profile([t0, t1], label="x", reflections=refl, load_bin_mbps=1.5, num_load_bins=3,
                block_steps=2)  # fmt: skip
    assert (p.trajectories, p.steps, p.mean_action) == (2, 8, pytest.approx(44 / 8))
    # load bins [0, 1.5), [1.5, 3), [3, inf)
    assert [(b.steps, b.mean_action) for b in p.by_load] == [(2, 3.0), (2, 4.0), (4, 7.5)]
    assert math.isinf(p.by_load[-1].hi)
    # blocks of 2 steps: t 0-1 and t 2-3, per trajectory counts
    b0, b1 = p.by_block
    assert (b0.steps, b0.mean_action, b0.violations, b0.reconfigurations) == (4, 3.5, 0.5, 1.0)
    assert (b1.steps, b1.mean_action, b1.violations, b1.reconfigurations) == (4, 7.5, 1.5, 1.0)
    # requests: block 0: +3 (env 0 t 0), +2 (env 1 t 1); block 1: -3 (env 0 t 2), +1 (env 1
    # t 3); env 1 t 2 asks for the action it took: no request
    assert (b0.asked_more, b0.asked_less, b0.asked_change) == (2, 0, pytest.approx(5 / 4))
    assert (b1.asked_more, b1.asked_less, b1.asked_change) == (1, 1, pytest.approx(-2 / 4))
    # without reflections there are no requests
    q = profile([t0, t1], block_steps=2)
    assert q.by_block[0].asked_more == -1 and math.isnan(q.by_block[0].asked_change)
    assert q.load_slope == pytest.approx(p.load_slope)


def test_a_constant_policy_has_no_load_slope():
    p = profile([_traj(0, [9] * 6, [0.1, 1, 2, 3, 4, 8])])
    assert p.load_slope == 0.0 and math.isnan(p.load_corr)
    assert "load slope [RBG per Mb/s]" in format_profiles([p])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="no steps"):
        profile([Trajectory(0, 0, [])], label="empty")
    with pytest.raises(ValueError, match="load_bin_mbps"):
        profile([_traj(0, [1], [1.0])], load_bin_mbps=0)


def test_run_profiles_reads_a_run_dir_in_iteration_order(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "trajectories").mkdir(parents=True)
    (run / "reflections").mkdir()
    before = _traj(0, [2, 4, 6, 8], [0.5, 2.0, 3.5, 5.0])
    after = _traj(0, [9, 9, 9, 9], [0.5, 2.0, 3.5, 5.0])
    save_trajectories(run / "trajectories" / "iter_0.json", [before])
    save_trajectories(run / "trajectories" / "iter_1.json", [after])
    # iter_10 sorts after iter_1 and iter_2 by number, not by name
    save_trajectories(run / "trajectories" / "iter_10.json", [before])
    save_trajectories(run / "trajectories" / "iter_2.json", [after])
    save_json(run / "reflections" / "iter_0.json",
              [Reflection(0, [StepLabel(0, "suboptimal", 3, "more")], "", "rule").to_json()])
    profiles = run_profiles(run)
    assert [p.label for p in profiles] == ["before SF", "after SF 1", "after SF 2", "after SF 10"]
    assert profiles[0].by_block[0].asked_more == 1  # reflections read for iter_0 only
    assert profiles[1].by_block[0].asked_more == -1
    assert profiles[0].load_slope > 0 and profiles[1].load_slope == 0.0

    main([str(run), "--block-steps", "2"])
    out = capsys.readouterr().out
    assert "before SF" in out and "after SF 10" in out and "Reflector asked more" in out
    assert "  0-1" in out and "  2-3" in out

    with pytest.raises(SystemExit):
        main([str(tmp_path / "not_a_run")])
    assert "no trajectories/iter_<i>.json" in capsys.readouterr().err
