"""benchmarks/kto_replay.py's option parsing and refusals. (Its replay of a real run, bit-identical
to the run's next iterate with no change, is in tests/agents/test_sf_experiment.py.)"""

from __future__ import annotations

import pytest
from experiment_scripts import BENCHMARKS, experiment, refused  # tests/experiment_scripts.py


@pytest.fixture(scope="module")
def replay():
    return experiment("kto_replay", BENCHMARKS)


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


@pytest.mark.parametrize("flag, value, says", [
    ("--batch", "0", "argument --batch: must be >= 1, got 0"),
    ("--samples", "-2", "argument --samples: must be >= 1, got -2"),
    ("--iteration", "-1", "argument --iteration: must be >= 0, got -1"),
    ("--iteration", "one", "argument --iteration: 'one' is not an int"),
])  # fmt: skip
def test_counts_and_iterations_are_checked_when_parsed(replay, capsys, tmp_path, flag, value,
                                                       says):
    """A zero batch used to pass until the first sampler call, after the KTO iterations had
    run (minutes lost): it is refused with the options, before anything is read."""
    args = {"--iteration": "0", "--out": str(tmp_path / "out"), flag: value}
    err = refused(lambda *a: replay.main(list(a)), capsys, str(tmp_path),
                  *[x for kv in args.items() for x in kv])  # fmt: skip
    assert says in err
    assert not (tmp_path / "out").exists()
