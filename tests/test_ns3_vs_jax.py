"""``benchmarks/ns3_vs_jax.py --static --ns3-from``: ns-3's columns from stored files, checked
against the request (fast: tiny fake files, no ns-3, no JAX rollout)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import ns3_vs_jax as nj  # noqa: E402

STEPS = 300


def _fake(tmp_path, name: str, cell_violations, std=0.0, steps=STEPS, **over) -> Path:
    """A ``--static --out`` file of ns-3's columns for the default scenario."""
    cfg = nj.static_config(steps)
    n = cfg.num_actions
    rows = {k: [0.5] * n for k in ("se", "ctrl_viol_rate", "other_viol_rate", "utility",
                                     "offered_mbps", "other_offered_mbps")}
    rows["cell_violations"] = [float(cell_violations)] * n
    rows["cell_violations_std"] = [float(std)] * n
    res = {"prbs": list(cfg.prbs_per_action), "steps": steps, "ns3": rows,
           "ns3_scenario": nj.ns3_scenario(cfg), "ns3_seeds": [len(name)]} | over
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({k: v for k, v in res.items() if v is not None}))
    return path


def test_pools_matching_files(tmp_path):
    a = _fake(tmp_path, "a", 10, std=2.0)
    b = _fake(tmp_path, "bb", 20, std=4.0)
    out = nj.load_ns3([a, b], nj.static_config(STEPS))
    assert out["ns3_seeds"] == [1, 2] and out["ns3_scenario_unchecked"] == []
    assert out["ns3"]["cell_violations"][0] == 15.0
    # two equal groups: pooled variance = mean of (var + mean^2) - pooled mean^2
    assert out["ns3"]["cell_violations_std"][0] == pytest.approx(np.sqrt((4 + 16) / 2 + 25))
    assert [r["cell_violations"][0] for r in out["ns3_runs"]] == [10.0, 20.0]


def test_legacy_file_without_scenario_is_checked_on_prbs_and_steps(tmp_path, capsys):
    old = _fake(tmp_path, "old", 5, ns3_scenario=None, ns3_seeds=None)
    out = nj.load_ns3([old], nj.static_config(STEPS))
    assert out["ns3_scenario_unchecked"] == [str(old)] and out["ns3_seeds"] is None
    assert "records no ns-3 scenario" in capsys.readouterr().out
    with pytest.raises(ValueError, match="steps"):
        nj.load_ns3([old], nj.static_config(100))


@pytest.mark.parametrize("over, match", [
    ({"steps": 100}, "steps 100"),
    ({"prbs": [2, 4]}, "prbs"),
    ({"ns3": None}, "no ns-3 results"),
])
def test_refuses_files_that_do_not_match(tmp_path, over, match):
    bad = _fake(tmp_path, "bad", 5, **over)
    with pytest.raises(ValueError, match=match):
        nj.load_ns3([bad], nj.static_config(STEPS))


def test_refuses_another_ns3_scenario_naming_what_differs(tmp_path):
    other = nj.ns3_scenario(dataclasses.replace(nj.static_config(STEPS), buffer_bytes=20480))
    bad = _fake(tmp_path, "bad", 5, ns3_scenario=other)
    with pytest.raises(ValueError, match=r"--rlcBuffer=20480.*--rlcBuffer=10240"):
        nj.load_ns3([bad], nj.static_config(STEPS))


def test_refuses_repeated_or_unequal_seeds(tmp_path):
    a = _fake(tmp_path, "a", 5)
    with pytest.raises(ValueError, match="repeat"):
        nj.load_ns3([a, a], nj.static_config(STEPS))
    two = _fake(tmp_path, "two", 5, ns3_seeds=[7, 8])
    with pytest.raises(ValueError, match="equal numbers"):
        nj.load_ns3([a, two], nj.static_config(STEPS))


def test_cli_refuses_before_running_jax(tmp_path, capsys):
    bad = _fake(tmp_path, "bad", 5, steps=100)  # its scenario says --steps=100 too
    with pytest.raises(SystemExit):
        nj.main(["--static", "--steps", str(STEPS), "--ns3-from", str(bad)])
    assert "re-run ns-3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        nj.main(["--ns3-from", str(bad)])
    assert exit_.value.code == 2 and "--ns3-from needs --static" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_runs_only_jax_with_stored_ns3_columns(tmp_path, capsys, monkeypatch):
    """3-step episodes, one JAX seed (~20 s): the table prints, ns-3 is never launched."""
    monkeypatch.setattr(nj, "run_ns3", lambda *a, **k: pytest.fail("ns-3 must not run"))
    stored = _fake(tmp_path, "s0", 7, steps=3)
    out = tmp_path / "out.json"
    nj.main(["--static", "--steps", "3", "--jax-seeds", "1", "--ns3-from", str(stored),
             "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["ns3"]["cell_violations"] == [7.0] * len(res["prbs"])
    assert res["ns3_from"] == [str(stored)] and res["jax_seeds"] == [0]
    for sched in ("jax_pf_ns3", "jax_pf_buffer_aware"):
        assert all(0 <= v <= 3 for v in res[sched]["cell_violations"])
    printed = capsys.readouterr().out
    assert "| 22 | 0.50 / " in printed and "not re-run" in printed
