"""The held-out evaluation's config is checked like every CLI value (one line, before writing)."""

from sfjax.baselines.heldout import HeldOutConfig
from sfjax.config_rules import RULES
from sfjax.configcheck import problems


def test_heldout_values_are_checked():
    assert problems(HeldOutConfig(), rules=RULES) == []
    assert problems(HeldOutConfig(seeds=()), rules=RULES) == []  # no evaluation at all
    for bad, what in ((HeldOutConfig(num_steps=0), "num_steps"),
                      (HeldOutConfig(seeds=(1, 1)), "distinct"),
                      (HeldOutConfig(seeds=(-1,)), "seeds in [0, 2**32)"),
                      (HeldOutConfig(sampling_seed=2**32), "sampling_seed")):
        found = problems(bad, rules=RULES)
        assert len(found) == 1 and what.split("_")[0] in found[0], found


class _Rollouts:
    """What evaluate_agent returns, reduced to per_episode(): utility = what the Actor has
    learnt + the seed's index."""

    def __init__(self, learnt: int, seeds: int):
        self.learnt, self.seeds = learnt, seeds

    def per_episode(self):
        import numpy as np

        return {"utility": self.learnt + np.arange(self.seeds, dtype=float)}


def _fake_evaluation(monkeypatch):
    """HeldOutEval with the Actor's evaluation replaced: the "Actor" is a namespace with the
    number of SF iterations it has learnt; returns the list of what was evaluated."""
    import sfjax.baselines.evaluation as evaluation
    import sfjax.baselines.llm_agent as llm_agent

    measured = []

    def evaluate_agent(agent, env, params, protocol):
        measured.append(agent.learnt)
        return _Rollouts(agent.learnt, len(protocol.seeds))

    monkeypatch.setattr(llm_agent, "LLMEnvAgent", lambda actor, *a: actor)
    monkeypatch.setattr(evaluation, "evaluate_agent", evaluate_agent)
    return measured


def test_after_is_the_final_actors_for_each_number_of_sf_iterations(tmp_path, monkeypatch):
    """A run extended from 1 to 2 SF iterations measures its final Actor: the 1-iteration run's
    cached "after" is never reported as the 2-iteration one's; "before" is measured once."""
    from types import SimpleNamespace

    from sfjax.baselines.heldout import HeldOutEval
    from sfjax.envs.scenario import RanSlicingConfig

    measured = _fake_evaluation(monkeypatch)
    cfg, actor = HeldOutConfig(seeds=(0, 1, 2), num_steps=3), SimpleNamespace(learnt=0)
    held = HeldOutEval(cfg, RanSlicingConfig(), actor, tmp_path)
    held.before(untrained=True)
    actor.learnt = 1
    one = held.after_and_report(1)
    actor.learnt = 2  # the extension, in a process of its own
    held = HeldOutEval(cfg, RanSlicingConfig(), actor, tmp_path)
    held.before(untrained=False)
    two = held.after_and_report(2)
    assert measured == [0, 1, 2]
    assert (one["metrics"]["utility"]["after"], two["metrics"]["utility"]["after"]) == (2, 3)
    assert one["metrics"]["utility"]["before"] == two["metrics"]["utility"]["before"] == 1
    assert held.after_and_report(2) == two and measured == [0, 1, 2]  # cached per Actor
    assert sorted(p.name for p in (tmp_path / "heldout").iterdir()) == [
        "after_iter_1.json", "after_iter_2.json", "before.json"]  # fmt: skip


def test_a_missing_before_of_a_trained_run_is_the_actor_with_adapters_off(tmp_path, monkeypatch,
                                                                          caplog):
    """heldout/before.json removed (or set aside as damaged) after the run trained: the
    untrained Actor is measured with its adapters off (B starts at 0: the base model), not
    skipped; the Actor is the trained one again after. Without that switch: skipped."""
    import contextlib
    from types import SimpleNamespace

    import pytest

    from sfjax.atomic import DamagedFile
    from sfjax.baselines.heldout import HeldOutEval
    from sfjax.envs.scenario import RanSlicingConfig

    measured = _fake_evaluation(monkeypatch)
    cfg, actor = HeldOutConfig(seeds=(0, 1, 2), num_steps=3), SimpleNamespace(learnt=2)

    @contextlib.contextmanager
    def adapters_off():
        learnt, actor.learnt = actor.learnt, 0
        try:
            yield
        finally:
            actor.learnt = learnt

    held = HeldOutEval(cfg, RanSlicingConfig(), actor, tmp_path)
    held.before(untrained=False)  # no switch: the comparison is skipped
    assert held.after_and_report(2) is None and "is skipped" in caplog.text
    assert measured == [] and not (tmp_path / "heldout").exists()
    held = HeldOutEval(cfg, RanSlicingConfig(), actor, tmp_path)
    held.before(untrained=False, adapters_off=adapters_off)
    report = held.after_and_report(2)
    assert measured == [0, 2] and actor.learnt == 2
    assert report["metrics"]["utility"]["before"] == 1 and report["metrics"]["utility"]["after"] == 3
    (tmp_path / "heldout" / "before.json").write_text("{")  # damaged: named, with the remedy
    with pytest.raises(DamagedFile, match=r"before\.json is damaged .*; remove it and run the same "
                       r"command again to measure that Actor anew"):  # fmt: skip
        held.after_and_report(2)


def test_an_unnamed_after_is_named_by_its_runs_sf_iterations(tmp_path, monkeypatch):
    """heldout/after.json from before "after" was named by its Actor: it is the Actor after
    the SF iterations of its run's config.json, and serves a rerun of that run only."""
    import json
    from types import SimpleNamespace

    from sfjax.baselines.heldout import HeldOutEval, adopt_unnamed_after
    from sfjax.envs.scenario import RanSlicingConfig

    measured = _fake_evaluation(monkeypatch)
    held_dir = tmp_path / "heldout"
    held_dir.mkdir()
    (held_dir / "before.json").write_text(json.dumps({"utility": [0.0, 1.0]}))
    (held_dir / "after.json").write_text(json.dumps({"utility": [5.0, 6.0]}))
    adopt_unnamed_after(tmp_path, 1)
    assert not (held_dir / "after.json").exists()
    held = HeldOutEval(HeldOutConfig(seeds=(0, 1), num_steps=3), RanSlicingConfig(),
                       SimpleNamespace(learnt=7), tmp_path)  # fmt: skip
    assert held.after_and_report(1)["metrics"]["utility"]["after"] == 5.5 and measured == []
    assert held.after_and_report(2)["metrics"]["utility"]["after"] == 7.5 and measured == [7]
    adopt_unnamed_after(tmp_path, 1)  # nothing left to name: a no-op


class _Writer:
    """What write_heldout_scalars calls of a tensorboardX SummaryWriter."""

    def __init__(self):
        self.points = []

    def add_scalar(self, tag, value, step):
        self.points.append((tag, step, float(value)))


def test_heldout_means_go_to_tensorboard_on_the_sf_iteration_axis(tmp_path, monkeypatch):
    """heldout/<metric>: before at step 0, the final Actor at its SF iteration, with the paired
    difference and its interval there; iterate 0 kept (final-actor best): step 0 alone; one
    seed: no interval; no writer or no evaluation: nothing."""
    from types import SimpleNamespace

    from sfjax.baselines.heldout import HeldOutEval, write_heldout_scalars
    from sfjax.envs.scenario import RanSlicingConfig

    _fake_evaluation(monkeypatch)
    actor = SimpleNamespace(learnt=0)
    held = HeldOutEval(HeldOutConfig(seeds=(0, 1, 2), num_steps=3), RanSlicingConfig(), actor,
                       tmp_path)  # fmt: skip
    held.before(untrained=True)
    actor.learnt = 4
    report = held.after_and_report(2)
    w = _Writer()
    write_heldout_scalars(w, report)
    r = report["metrics"]["utility"]
    assert sorted(w.points) == sorted([
        ("heldout/utility", 0, 1.0), ("heldout/utility", 2, 5.0),
        ("heldout/utility_diff", 2, 4.0),
        ("heldout/utility_diff_ci_low", 2, r["ci_low"]),
        ("heldout/utility_diff_ci_high", 2, r["ci_high"]),
    ])  # fmt: skip
    assert r["ci_low"] == r["ci_high"] == 4.0  # every seed gained exactly 4

    kept_untrained = dict(report, after_iteration=0)
    w = _Writer()
    write_heldout_scalars(w, kept_untrained)
    assert w.points == [("heldout/utility", 0, 1.0)]

    one_seed = HeldOutEval(HeldOutConfig(seeds=(5,), num_steps=3), RanSlicingConfig(), actor,
                           tmp_path / "one")  # fmt: skip
    actor.learnt = 0
    one_seed.before(untrained=True)
    actor.learnt = 1
    w = _Writer()
    write_heldout_scalars(w, one_seed.after_and_report(1))
    assert sorted(w.points) == [("heldout/utility", 0, 0.0), ("heldout/utility", 1, 1.0),
                                ("heldout/utility_diff", 1, 1.0)]  # fmt: skip

    write_heldout_scalars(None, report)  # no writer (not process 0)
    w = _Writer()
    write_heldout_scalars(w, None)  # no held-out seeds
    assert w.points == []
