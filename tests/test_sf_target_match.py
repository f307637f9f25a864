"""benchmarks/sf_target_match.py's table, from hand-made samples: target rates, the keep / move
split, the per-class change in mean action and the asked-more - asked-less contrast. (Its run on
a real run dir is in tests/agents/test_sf_experiment.py.)"""

from __future__ import annotations

import re
import types

import pytest
from experiment_scripts import BENCHMARKS, experiment, refused  # tests/experiment_scripts.py


@pytest.fixture(scope="module")
def stm():
    return experiment("sf_target_match", BENCHMARKS)


def _item(stm, cls, target, held):
    return stm.Item("p", target, cls, stm.KEEP if held == target else stm.MOVE, 0, held)


def _row(out: str, name: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.startswith(name))


def test_rates_and_keep_move_split(stm):
    items = [_item(stm, "asked more", 5, 5), _item(stm, "asked more", 6, 5),
             _item(stm, "effective", 3, 3)]  # fmt: skip
    before = [[4, 4, 5, 5], [5, 5, 5, None], [3, 3, 3, 3]]
    after = [[5, 5, 5, 5], [6, 5, 5, None], [3, 3, 3, 2]]
    out = stm.report(items, before, after)
    more = _row(out, "asked more")
    assert more[2:5] == ["2", "0.250", "0.625"]  # 2 steps; 2 of 8 samples hit before, 5 after
    keep = _row(out, "  keep")  # the first keep row is asked more's
    assert keep[1:4] == ["1", "0.500", "1.000"]
    move = _row(out, "  move")
    assert move[1:4] == ["1", "0.000", "0.250"]
    eff = _row(out, "effective")
    assert eff[2:4] == ["1.000", "0.750"]


def test_change_and_contrast(stm):
    """No training: every change is 0. Requests followed: the contrast is their distance."""
    items = [_item(stm, c, 5, 5) for c in ("asked more", "asked less") for _ in range(3)]
    same = [[4, 5, 6]] * 6
    out = stm.report(items, same, same)
    assert "asked more +0.00 [+0.00, +0.00]" in out
    assert re.search(r"asked more - asked less: [+-]0\.00", out)

    up = [[5, 6, 7], [5, 6, 6], [6, 6, 7]]
    down = [[3, 4, 5], [4, 4, 4], [3, 4, 4]]
    out = stm.report(items, same, up + down)
    changes = stm.action_changes(items, same, up + down)
    assert changes["asked more"] == pytest.approx([1.0, 2 / 3, 4 / 3])
    assert changes["asked less"] == pytest.approx([-1.0, -1.0, -4 / 3])
    m = re.search(r"asked more - asked less: \+(\d\.\d\d) \[\+(\d\.\d\d), \+(\d\.\d\d)\]", out)
    assert m and float(m[1]) == pytest.approx(2.11, abs=0.01)
    assert 0 < float(m[2]) < float(m[1]) < float(m[3])


def test_unparsable_only_prompts_are_left_out_of_the_change(stm):
    items = [_item(stm, "asked less", 2, 3), _item(stm, "asked less", 2, 3)]
    changes = stm.action_changes(items, [[None, None], [3, 3]], [[2, 2], [2, 3]])
    assert changes["asked less"] == [-0.5]


def test_step_targets_classes_and_kinds(stm):
    """A request to return to the allocation the step started from is `keep`; effective steps
    target the action taken; a suboptimal step asking for what it took is left out."""
    from sfjax.agents.trajectory import Reflection, StepLabel

    def step(t, action, held):
        return types.SimpleNamespace(t=t, action=action, prompt=f"p{t}",
                                     state={"prev_action": float(held)})  # fmt: skip

    traj = types.SimpleNamespace(env_index=0, steps=[step(0, 4, 6), step(1, 7, 4), step(2, 5, 5),
                                                     step(3, 5, 5)])  # fmt: skip
    labels = [StepLabel(0, "suboptimal", 6, ""), StepLabel(1, "suboptimal", 6, ""),
              StepLabel(2, "effective", 5, ""), StepLabel(3, "suboptimal", 5, "")]  # fmt: skip
    items = stm.step_targets([traj], [Reflection(0, labels, "", "rule")])
    got = [(x.prompt, x.target, x.cls, x.kind, x.taken, x.held) for x in items]
    assert got == [("p0", 6, "asked more", stm.KEEP, 4, 6),
                   ("p1", 6, "asked less", stm.MOVE, 7, 4),
                   ("p2", 5, "effective", stm.KEEP, 5, 5)]  # fmt: skip


def test_field_changes_parse_json_values_and_dashes(stm):
    from sfjax.agents.reflectors.rule import RuleReflectorConfig
    from sfjax.train.kto_config import KTOConfig

    got = stm.field_changes(["beta=0.5", "lr-schedule=cosine", "buckets=[256, 512]",
                             "shuffle=false"], KTOConfig(), "--kto")  # fmt: skip
    assert got == {"beta": 0.5, "lr_schedule": "cosine", "buckets": (256, 512), "shuffle": False}
    assert stm.field_changes(["proven-levels=false"], RuleReflectorConfig(), "--rule") == {
        "proven_levels": False}
    # values as the field holds them: an int for a float, None for an optional field
    got = stm.field_changes(["learning-rate=1", "desirable-weight=null", "warmup-steps=5"],
                            KTOConfig(), "--kto")  # fmt: skip
    assert got == {"learning_rate": 1.0, "desirable_weight": None, "warmup_steps": 5}
    assert type(got["learning_rate"]) is float


@pytest.mark.parametrize("bad, says", [
    ("epochs=two", "--kto 'epochs=two': epochs takes an int, got 'two'"),
    ("epochs=1.5", "epochs takes an int, got 1.5"),
    ("epochs=true", "epochs takes an int, got True"),
    ("beta=fast", "beta takes a float, got 'fast'"),
    ("shuffle=1", "shuffle takes a bool, got 1"),
    ("lr-schedule=step", "lr_schedule takes one of 'linear', 'cosine', 'constant', got 'step'"),
    ("buckets=256", "buckets takes a JSON list or None, got 256"),
    ("buckets=[256, \"x\"]", "buckets takes a JSON list"),
    ("desirable-weight=heavy", "desirable_weight takes a float or None, got 'heavy'"),
])  # fmt: skip
def test_field_changes_refuse_a_value_of_another_type(stm, bad, says):
    """A value of the wrong type is refused with the field's type in words (before this, a
    string for an int reached the config's check and failed there with a TypeError)."""
    from sfjax.train.kto_config import KTOConfig

    with pytest.raises(ValueError, match=re.escape(says)):
        stm.field_changes([bad], KTOConfig(), "--kto")


@pytest.mark.parametrize("bad, says", [("beta", "--kto 'beta': expected FIELD=VALUE"),
                                       ("=0.5", "expected FIELD=VALUE"),
                                       ("betta=0.5", "KTOConfig has no field 'betta'")])  # fmt: skip
def test_field_changes_refuse_what_is_no_field(stm, bad, says):
    from sfjax.train.kto_config import KTOConfig

    with pytest.raises(ValueError, match=says) as e:
        stm.field_changes([bad], KTOConfig(), "--kto")
    if "no field" in says:
        assert "beta" in str(e.value)  # the fields are listed


@pytest.mark.parametrize("flag, value, says", [
    ("--samples", "0", "argument --samples: must be >= 1, got 0"),
    ("--batch", "0", "argument --batch: must be >= 1, got 0"),
    ("--before-iterate", "-1", "argument --before-iterate: must be >= 0, got -1"),
    ("--after-iterate", "x", "argument --after-iterate: 'x' is not an int"),
])  # fmt: skip
def test_counts_and_iterates_are_checked_when_parsed(stm, capsys, tmp_path, flag, value, says):
    """``--samples 0`` used to end in a ValueError traceback from the sampler, after the models
    had loaded."""
    err = refused(lambda *a: stm.main(list(a)), capsys, str(tmp_path), flag, value)
    assert says in err
