"""benchmarks/kto_replay.py's option parsing and refusals. (Its replay of a real run, bit-identical
to the run's next iterate with no change, is in tests/agents/test_sf_experiment.py.)"""

from __future__ import annotations

import pytest
from experiment_scripts import BENCHMARKS, experiment, refused  # tests/experiment_scripts.py

from sfjax.train.kto_config import KTOConfig


@pytest.fixture(scope="module")
def replay():
    return experiment("kto_replay", BENCHMARKS)


def test_kto_changes_parse_json_values_and_dashes(replay):
    got = replay.kto_changes(["beta=0.5", "lr-schedule=cosine", "buckets=[256, 512]",
                              "shuffle=false"], KTOConfig())  # fmt: skip
    assert got == {"beta": 0.5, "lr_schedule": "cosine", "buckets": [256, 512], "shuffle": False}


@pytest.mark.parametrize("bad, says", [("beta", "expected FIELD=VALUE"),
                                       ("=0.5", "expected FIELD=VALUE"),
                                       ("betta=0.5", "no field 'betta'")])  # fmt: skip
def test_kto_changes_refuse_what_is_no_field(replay, bad, says):
    with pytest.raises(ValueError, match=says) as e:
        replay.kto_changes([bad], KTOConfig())
    if "no field" in says:
        assert "beta" in str(e.value)  # the fields are listed


def test_a_dir_that_is_no_finished_run_is_refused(replay, capsys, tmp_path):
    err = refused(lambda *a: replay.main(list(a)), capsys, str(tmp_path), "--iteration", "0",
                  "--out", str(tmp_path / "out"))  # fmt: skip
    assert "config.json is missing" in err and "sf_ranslicing" in err
    assert not (tmp_path / "out").exists()


def test_improved_examples_on_a_run_that_had_them_is_refused_before_loading(replay, capsys,
                                                                             tmp_path):
    """The run's datasets already hold the copies: adding them again would double them."""
    import json

    for d in ("checkpoints", "trajectories", "reflections", "datasets"):
        (tmp_path / d).mkdir()
    for f in ("summary.json", "trajectories/iter_0.json", "reflections/iter_0.json",
              "datasets/iter_0_kto_0.json"):  # fmt: skip
        (tmp_path / f).write_text("[]")
    (tmp_path / "config.json").write_text(json.dumps({"rfr": {"improved_examples": True}}))
    err = refused(lambda *a: replay.main(list(a)), capsys, str(tmp_path), "--iteration", "0",
                  "--improved-examples", "--out", str(tmp_path / "out"))  # fmt: skip
    assert "already hold them" in err and "--rfr.improved-examples" in err
    assert not (tmp_path / "out").exists()
