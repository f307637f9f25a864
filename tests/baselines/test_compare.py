"""sfjax.baselines.compare: two rows of two run dirs, paired by evaluation and training seed."""

import json

import numpy as np
import pytest
from scipy import stats

from sfjax import provenance
from sfjax.baselines import compare
from sfjax.baselines.evaluation import Rollouts

PROTOCOL = {"seeds": [0, 1, 2, 3], "num_steps": 5, "key_offset": 1000003}
ENV = {"episode_steps": 300, "objective": {"se_definition": "allocated"}}


def _rollouts(rewards):
    """Rollouts whose per-step rewards are ``rewards`` ([..., S, T]); other records derived."""
    r = np.asarray(rewards, np.float32)
    return Rollouts(actions=np.zeros(r.shape, np.int32), rewards=r, se=r / 100.0,
                    reconfiguration=(r > 0).astype(np.float32),
                    violation=(r < 0).astype(np.float32))  # fmt: skip


def _run(tmp_path, name, rows, *, protocol=PROTOCOL, env=ENV, seeds=(0, 1, 2)):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(
        {"protocol": protocol, "env": env, "rl": {"seeds": list(seeds)}}))
    for row, rewards in rows.items():
        path = d / compare.ROW_FILES[row]
        path.parent.mkdir(exist_ok=True)
        _rollouts(rewards).save(path)
    return d


def _rl(rng, shift=0.0):
    return rng.normal(shift, 10.0, size=(3, 4, 5))  # 3 training seeds x 4 env seeds x 5 steps


def test_differences_and_intervals_match_a_hand_computation(tmp_path):
    rng = np.random.default_rng(0)
    ra, rb, rh = _rl(rng), _rl(rng, 3.0), rng.normal(0, 10, size=(4, 5))
    a = _run(tmp_path, "a", {"ppo": ra, "heuristic": rh})
    b = _run(tmp_path, "b", {"ppo": rb})
    row_a, row_b = compare.load_row(f"{a}:ppo"), compare.load_row(f"{b}:ppo")
    out = compare.compare(row_a, row_b)
    ua, ub = ra.astype(np.float32).sum(-1), rb.astype(np.float32).sum(-1)  # utility [3, 4]
    for unit, axis in (("evaluation seed", 0), ("training seed", 1)):
        d = ub.mean(axis) - ua.mean(axis)
        half = stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
        got = out[unit]["utility"]
        assert got["n"] == d.size
        np.testing.assert_allclose([got["diff"], got["ci_low"], got["ci_high"]],
                                   [d.mean(), d.mean() - half, d.mean() + half], rtol=1e-5)
    # a reference row has no training seeds: paired by evaluation seed only
    ref = compare.load_row(f"{a}:heuristic")
    out = compare.compare(ref, row_b)
    assert list(out) == ["evaluation seed"]
    d = ub.mean(0) - rh.astype(np.float32).sum(-1)
    np.testing.assert_allclose(out["evaluation seed"]["utility"]["diff"], d.mean(), rtol=1e-5)
    text = compare.format_compare(ref, row_b, out)
    assert "no pairing by training seed: a row without training seeds" in text
    assert "B − A paired by evaluation seed (4 pairs, 95 % t, df 3)" in text


def test_different_training_seeds_pair_by_evaluation_seed_only(tmp_path):
    rng = np.random.default_rng(1)
    a = _run(tmp_path, "a", {"sac": _rl(rng)})
    b = _run(tmp_path, "b", {"sac": _rl(rng)}, seeds=(5, 6, 7))
    row_a, row_b = compare.load_row(f"{a}:sac"), compare.load_row(f"{b}:sac")
    out = compare.compare(row_a, row_b)
    assert list(out) == ["evaluation seed"]
    assert "different training seeds" in compare.format_compare(row_a, row_b, out)


@pytest.mark.parametrize("what, other", [
    ("protocol", {**PROTOCOL, "seeds": [4, 5, 6, 7]}),
    ("env", {**ENV, "episode_steps": 100}),
])
def test_rows_of_other_protocols_or_envs_are_refused(tmp_path, what, other):
    rng = np.random.default_rng(2)
    a = _run(tmp_path, "a", {"dqn": _rl(rng)})
    b = _run(tmp_path, "b", {"dqn": _rl(rng)}, **{what: other})
    with pytest.raises(ValueError, match=f"different {what}s .*: their trajectories are not "):
        compare.compare(compare.load_row(f"{a}:dqn"), compare.load_row(f"{b}:dqn"))


def test_bad_specs_name_what_is_wrong(tmp_path, capsys):
    rng = np.random.default_rng(3)
    a = _run(tmp_path, "a", {"dqn": _rl(rng)})
    with pytest.raises(ValueError, match="expected RUN_DIR:ROW"):
        compare.load_row(str(a))
    with pytest.raises(ValueError, match="unknown row 'td3'"):
        compare.load_row(f"{a}:td3")
    with pytest.raises(FileNotFoundError, match="did not evaluate row 'ppo'"):
        compare.load_row(f"{a}:ppo")
    with pytest.raises(FileNotFoundError, match="no .*config.json"):
        compare.load_row(f"{tmp_path / 'nowhere'}:dqn")
    (tmp_path / "sf_run").mkdir()
    (tmp_path / "sf_run" / "config.json").write_text(json.dumps({"heldout": {}}))
    with pytest.raises(ValueError, match=r"has no \['protocol', 'env'\]"):
        compare.load_row(f"{tmp_path / 'sf_run'}:sf")
    (a / "config.json").write_text(json.dumps({"protocol": PROTOCOL, "env": ENV,
                                               "rl": {"seeds": [0, 1]}}))
    with pytest.raises(ValueError, match=r"training seeds \(0, 1\)"):
        compare.load_row(f"{a}:dqn")
    with pytest.raises(SystemExit) as e:  # the CLI: exit 2 with the message, no traceback
        compare.main([f"{a}:td3", f"{a}:dqn"])
    assert e.value.code == 2
    assert "unknown row 'td3'" in capsys.readouterr().err


def test_cli_prints_both_tables(tmp_path, capsys):
    rng = np.random.default_rng(4)
    a = _run(tmp_path, "a", {"ppo": _rl(rng)})
    b = _run(tmp_path, "b", {"ppo": _rl(rng, 50.0)})
    compare.main([f"{a}:ppo", f"{b}:ppo"])
    out = capsys.readouterr().out
    assert "paired by evaluation seed (4 pairs" in out
    assert "paired by training seed (3 pairs, 95 % t, df 2; each the mean over 4" in out
    utility = [line for line in out.splitlines() if line.startswith("Utility")]
    assert len(utility) == 2 and all(line.rstrip().endswith("*") for line in utility)


def test_reference_rows_of_older_runs_are_found_under_their_old_names(tmp_path):
    rng = np.random.default_rng(5)
    a = _run(tmp_path, "a", {"static": rng.normal(size=(4, 5))})
    (a / "eval_static.npz").rename(a / "eval_best.npz")  # table3.py's name before 2026-12-06
    row = compare.load_row(f"{a}:static")
    assert row.per_episode["utility"].shape == (4,)


def test_where_the_runs_ran_is_said(tmp_path):
    rng = np.random.default_rng(6)
    a = _run(tmp_path, "a", {"ppo": _rl(rng)})
    b = _run(tmp_path, "b", {"ppo": _rl(rng)})
    row_a, row_b = compare.load_row(f"{a}:ppo"), compare.load_row(f"{b}:ppo")
    text = compare.format_compare(row_a, row_b, compare.compare(row_a, row_b))
    assert "environment: not recorded for A and B (a run dir from before" in text
    provenance.record_start(a)
    provenance.record_start(b)
    row_a, row_b = compare.load_row(f"{a}:ppo"), compare.load_row(f"{b}:ppo")
    text = compare.format_compare(row_a, row_b, compare.compare(row_a, row_b))
    assert "same environment: sfjax " in text
    starts = json.loads((b / provenance.FILE).read_text())["starts"]
    starts[0]["packages"]["jax"] = "0.4.0"
    (b / provenance.FILE).write_text(json.dumps({"starts": starts}))
    row_b = compare.load_row(f"{b}:ppo")
    text = compare.format_compare(row_a, row_b, compare.compare(row_a, row_b))
    assert "different environments" in text and "0.4.0 (B)" in text
    (b / provenance.FILE).write_text("{")
    row_b = compare.load_row(f"{b}:ppo")
    text = compare.format_compare(row_a, row_b, compare.compare(row_a, row_b))
    assert "environment: unknown for B (its environment.json is damaged)" in text


def _sf_run(tmp_path, name, per_seed, *, seeds=(0, 1, 2, 3), num_steps=5, after_iteration=1):
    """A sf_ranslicing.py run dir: config.json, heldout/<name>.json, summary.json's held_out."""
    d = tmp_path / name
    (d / "heldout").mkdir(parents=True)
    env = {**ENV, "episode_steps": 300}  # the held-out evaluation cuts episodes to num_steps
    (d / "config.json").write_text(json.dumps(
        {"env": env, "heldout": {"seeds": list(seeds), "num_steps": num_steps,
                                 "sampling_seed": 1}}))  # fmt: skip
    for actor, utility in per_seed.items():
        u = np.asarray(utility, np.float32)
        (d / "heldout" / f"{actor}.json").write_text(json.dumps(
            {"mean_se": (u / 100).tolist(), "reconfigurations": [1.0] * len(u),
             "violations": [0.0] * len(u), "utility": u.tolist()}))  # fmt: skip
    (d / "summary.json").write_text(json.dumps({"held_out": {"after_iteration": after_iteration}}))
    return d


def test_sf_held_out_actors_pair_with_each_other_and_with_table3_rows(tmp_path):
    rng = np.random.default_rng(7)
    before, after1, after2 = (rng.normal(0, 100, 4) for _ in range(3))
    sf = _sf_run(tmp_path, "sf", {"before": before, "after_iter_1": after1,
                                  "after_iter_2": after2}, after_iteration=2)  # fmt: skip
    out = compare.compare(compare.load_row(f"{sf}:before"), compare.load_row(f"{sf}:after"))
    d = after2.astype(np.float32) - before.astype(np.float32)  # "after": the run's final Actor
    np.testing.assert_allclose(out["evaluation seed"]["utility"]["diff"], d.mean(), rtol=1e-5)
    assert list(out) == ["evaluation seed"]
    out = compare.compare(compare.load_row(f"{sf}:after-1"), compare.load_row(f"{sf}:after-2"))
    np.testing.assert_allclose(out["evaluation seed"]["utility"]["diff"],
                               (after2.astype(np.float32) - after1.astype(np.float32)).mean(),
                               rtol=1e-5)  # fmt: skip
    # a table3 run on the same seeds, steps and env: its rows pair with the SF Actors
    heuristic = rng.normal(0, 10, size=(4, 5))
    t3 = _run(tmp_path, "t3", {"heuristic": heuristic}, env={**ENV, "episode_steps": 5})
    out = compare.compare(compare.load_row(f"{t3}:heuristic"), compare.load_row(f"{sf}:after"))
    d = after2.astype(np.float32) - heuristic.astype(np.float32).sum(-1)
    np.testing.assert_allclose(out["evaluation seed"]["utility"]["diff"], d.mean(), rtol=1e-5)
    other = _sf_run(tmp_path, "other", {"before": before}, seeds=(4, 5, 6, 7))
    with pytest.raises(ValueError, match=r"different protocols \(keys \['seeds'\]\)"):
        compare.compare(compare.load_row(f"{sf}:before"), compare.load_row(f"{other}:before"))


def test_sf_rows_name_what_is_missing(tmp_path):
    sf = _sf_run(tmp_path, "sf", {"before": [1.0, 2.0, 3.0, 4.0]})
    with pytest.raises(FileNotFoundError, match="did not measure that Actor"):
        compare.load_row(f"{sf}:after")  # summary.json says after_iteration 1; no file
    (sf / "summary.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="reports no held-out 'after' yet"):
        compare.load_row(f"{sf}:after")
    a = _run(tmp_path, "a", {"dqn": _rl(np.random.default_rng(8))})
    with pytest.raises(ValueError, match="not a sf_ranslicing.py run's"):
        compare.load_row(f"{a}:before")
    with pytest.raises(ValueError, match="unknown row 'after-x'"):
        compare.load_row(f"{sf}:after-x")


def test_damaged_files_are_named_not_a_traceback(tmp_path, capsys):
    sf = _sf_run(tmp_path, "sf", {"before": [1.0, 2.0, 3.0, 4.0], "after_iter_1": [1.0] * 4})
    (sf / "heldout" / "after_iter_1.json").write_text('{"utility": [1.0, 2.0')
    with pytest.raises(SystemExit) as e:
        compare.main([f"{sf}:before", f"{sf}:after"])
    assert e.value.code == 2 and "held-out evaluation" in capsys.readouterr().err
    (sf / "heldout" / "after_iter_1.json").write_text('{"utility": [1.0, 2.0, 3.0, 4.0]}')
    with pytest.raises(SystemExit):
        compare.main([f"{sf}:before", f"{sf}:after"])
    assert "lacks ['mean_se', 'reconfigurations', 'violations']" in capsys.readouterr().err
    (sf / "config.json").write_text("{")
    with pytest.raises(SystemExit):
        compare.main([f"{sf}:before", f"{sf}:after"])
    assert "the run's config" in capsys.readouterr().err
