"""Counterfactual audit of Reflector labels (sfjax.agents.label_audit): the replay reproduces a
collect, each counterfactual equals an independent rerun of the env runner with the changed
actions, a wrong key is refused, and the per-class figures from hand-made utilities."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

from sfjax.agents import label_audit as la
from sfjax.agents.actor import ActorDecision
from sfjax.agents.collect import collect, env_key_schedule
from sfjax.agents.env import JaxRanRunner
from sfjax.agents.prompts import PromptConfig, format_output
from sfjax.agents.reflectors.rule import RuleReflector, RuleReflectorConfig
from sfjax.agents.trajectory import Reflection, StepLabel
from sfjax.envs.scenario import RanSlicingConfig
from sfjax.metrics import UtilityWeights

STEPS, ENVS = 8, 2
PCFG = PromptConfig()
CFG = la.AuditConfig(horizons=(1, 2), primary_horizon=2, max_hold=3, batch=32)


class ScriptedActor:
    """Actions from a fixed table (with holds, so ``hold`` runs are longer than one step)."""

    table = np.asarray([[3, 3, 5, 5, 5, 2, 2, 9], [7, 6, 6, 6, 12, 12, 1, 1]])

    def act(self, states, histories, step, key):
        out = []
        for e, _ in enumerate(states):
            a = int(self.table[e, step])
            out.append(ActorDecision(f"t={step}", format_output("r", a, "a", PCFG), "r", a, "a",
                                     True, None))  # fmt: skip
        return out


@pytest.fixture(scope="module")
def collected():
    runner = JaxRanRunner(RanSlicingConfig(), STEPS)
    env_key = jax.random.key(7)
    trajs = collect(ScriptedActor(), runner, PCFG, ENVS, STEPS, env_key, jax.random.key(0),
                    progress=False)  # fmt: skip
    refls = RuleReflector(RuleReflectorConfig(), PCFG).reflect(trajs)
    return runner, env_key, trajs, refls


@pytest.fixture(scope="module")
def audited(collected):
    runner, env_key, trajs, refls = collected
    return la.audit(runner, env_key, trajs, refls, CFG, progress=False)


def _rerun(runner, env_key, actions_TE):
    """Per-step eq. 15 utility [T, E] of ``actions_TE`` through the runner's public API with
    collect's key schedule (independent of the audit's scan)."""
    reset_key, step_keys = env_key_schedule(env_key, actions_TE.shape[0])
    runner.reset(reset_key, actions_TE.shape[1])
    w = UtilityWeights()
    out = np.zeros(actions_TE.shape)
    for t, k in enumerate(step_keys):
        _, fb = runner.step(list(actions_TE[t]), k)
        for e, f in enumerate(fb):
            out[t, e] = (w.se_weight * (f["se"] + w.se_offset) - w.reconfig_penalty
                         * f["reconfiguration"] - w.violation_penalty * f["violation"])  # fmt: skip
    return out


def test_taken_action_reproduces_the_record(audited, collected):
    _, _, trajs, _ = collected
    w = UtilityWeights()
    per_step = {(t.env_index, s.t): (w.se_weight * (s.feedback["se"] + w.se_offset)
                                     - w.reconfig_penalty * s.feedback["reconfiguration"]
                                     - w.violation_penalty * s.feedback["violation"])
                for t in trajs for s in t.steps}  # fmt: skip
    assert len(audited.taken) == STEPS * ENVS
    for mode in la.MODES:
        for h in CFG.horizons:
            u_taken, _, u_best = audited.values(mode, h)
            assert (u_best >= u_taken - 1e-6).all()
            for n, (e, t) in enumerate(zip(audited.env_index, audited.t)):
                span = (1 if mode == "step" else int(audited.hold_length[n])) + h
                want = sum(per_step[(int(e), u)] for u in range(t, min(t + span, STEPS)))
                assert u_taken[n] == pytest.approx(want, abs=1e-2), (mode, h, e, t)


def test_hold_lengths(audited):
    table = ScriptedActor.table
    for n, (e, t) in enumerate(zip(audited.env_index, audited.t)):
        run = 1
        while t + run < STEPS and table[e, t + run] == table[e, t]:
            run += 1
        assert audited.hold_length[n] == min(run, CFG.max_hold)


@pytest.mark.parametrize("mode", la.MODES)
def test_counterfactuals_equal_an_independent_rerun(audited, collected, mode):
    runner, env_key, _, _ = collected
    table = ScriptedActor.table.T.copy()  # [T, E]
    h = CFG.primary_horizon
    col = {int(a): i for i, a in enumerate(audited.actions)}
    for n in (1, 5, 10):  # env 0 step 1, env 0 step 5, env 1 step 2
        e, t = int(audited.env_index[n]), int(audited.t[n])
        span = 1 if mode == "step" else int(audited.hold_length[n])
        for c in (1, 8, 12):
            acts = table.copy()
            acts[t : t + span, e] = c
            u = _rerun(runner, env_key, acts)
            want = u[t : min(t + span + h, STEPS), e].sum()
            got = audited.utility[(mode, h)][n, col[c]]
            assert got == pytest.approx(want, abs=1e-2), (mode, n, c)


def test_a_wrong_key_is_refused(collected):
    runner, _, trajs, refls = collected
    with pytest.raises(la.ReplayMismatch, match="replayed steps differ from the record"):
        la.audit(runner, jax.random.key(8), trajs, refls, CFG, progress=False)


def test_bad_inputs(collected):
    runner, env_key, trajs, refls = collected
    with pytest.raises(ValueError, match="primary_horizon"):
        la.audit(runner, env_key, trajs, refls, la.AuditConfig(horizons=(1,), primary_horizon=5))
    with pytest.raises(ValueError, match="no labelled steps"):
        la.audit(runner, env_key, trajs, [], CFG, progress=False)
    bad = [Reflection(r.env_index, [StepLabel(x.step, "suboptimal", 13, "x") for x in r.labels],
                      r.summary, r.backend) for r in refls]  # fmt: skip
    with pytest.raises(ValueError, match="outside the Actor's range"):
        la.audit(runner, env_key, trajs, bad, CFG, progress=False)


def _hand_audit():
    """Four steps of two trajectories, candidates 1..3, hand-set utilities."""
    u = np.asarray([[0.0, 10.0, 4.0],   # taken 1, asked more (2): right, +10, best +10
                    [5.0, 0.0, 0.0],    # taken 2, asked less (1): right, +5, best +5
                    [0.0, 0.0, -3.0],   # taken 2, asked more (3): wrong, -3, best 0
                    [1.0, 2.0, 0.0]])   # taken 1, effective: best +1 (larger)
    return la.Audit(
        env_index=np.asarray([0, 0, 1, 1]), t=np.asarray([0, 1, 0, 1]),
        label=["suboptimal", "suboptimal", "suboptimal", "effective"], reason=["r"] * 4,
        taken=np.asarray([1, 2, 2, 1]), improved=np.asarray([2, 1, 3, 1]),
        hold_length=np.ones(4, int), actions=np.asarray([1, 2, 3]),
        utility={("hold", 5): u, ("step", 5): u},
        config=la.AuditConfig(horizons=(5,)),
    )  # fmt: skip


def test_class_stats_from_hand_made_utilities():
    stats = {s.cls: s for s in la.class_stats(_hand_audit(), "hold", 5)}
    more, less, eff = stats["asked more"], stats["asked less"], stats["effective"]
    assert (more.n, more.right, more.wrong) == (2, 0.5, 0.5)
    assert more.mean_gain == pytest.approx(3.5) and more.mean_best == pytest.approx(5.0)
    assert more.captured == pytest.approx(7 / 10)
    # one step per trajectory: the interval is over the two trajectories' means (+10, -3)
    lo, hi = more.gain_ci
    assert lo < 3.5 < hi and hi - 3.5 == pytest.approx(3.5 - lo)
    assert (less.n, less.right, less.wrong, less.mean_gain) == (1, 1.0, 0.0, 5.0)
    assert math.isnan(less.gain_ci[0])  # one trajectory: no interval
    assert (eff.n, eff.mean_gain, eff.missed, eff.best_more) == (1, 0.0, 1.0, 1.0)
    assert math.isnan(eff.right)
    text = la.format_audit(_hand_audit(), "title")
    assert "asked more | 2 | 50 % | 50 % | +3.5" in text and text.startswith("title")


def test_pooled_row_and_json_round_trip(tmp_path, capsys):
    a = _hand_audit()
    pooled = la.class_stats(a, "hold", 5)[-1]
    assert pooled.cls == la.POOLED and pooled.n == 3
    assert pooled.mean_gain == pytest.approx((10 + 5 - 3) / 3) and pooled.wrong == pytest.approx(1 / 3)
    back = la.Audit.from_json(a.to_json())
    assert la.class_stats(back, "hold", 5) == la.class_stats(a, "hold", 5)
    assert back.config == a.config and back.label == a.label

    # the script prints a saved audit again without simulating; bad files exit 2
    from experiment_scripts import BENCHMARKS, experiment, refused  # tests/experiment_scripts.py

    from sfjax import atomic

    cli = experiment("label_audit", BENCHMARKS)
    atomic.write_json(tmp_path / "a.json", {"iterations": {"0": {"title": "== t", **a.to_json()}}})
    assert cli.main(["--from", str(tmp_path / "a.json"), "--tie", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("== t (from") and "tie = 4.0" in out
    assert "asked more | 2 | 50 % | 0 % |" in out  # -3 is within the tie now
    assert cli.main(["--from", str(tmp_path / "a.json"), "--primary-horizon", "2"]) == 2
    (tmp_path / "b.json").write_text("{}")
    assert cli.main(["--from", str(tmp_path / "b.json")]) == 2
    capsys.readouterr()
    # what --from cannot honour is refused, not ignored: simulation settings, absent iterations
    for args, says in ((["--horizons", "3"], "--horizons: set how the counterfactuals are simulated"),
                       (["--max-hold", "5", "--batch", "8"], "--max-hold --batch: set how")):  # fmt: skip
        assert says in refused(lambda *x: cli.main(list(x)), capsys, "--from", str(tmp_path / "a.json"), *args)
    assert cli.main(["--from", str(tmp_path / "a.json"), "--iteration", "0", "4"]) == 2
    assert "holds SF iteration(s) 0, not 4" in capsys.readouterr().err


def test_hindsight_labels_take_the_best_action_beyond_the_tie():
    a = _hand_audit()  # best actions 2, 1, 1 (tie 0 / 0 -> the first), 2
    refls = la.hindsight_reflections(a, "hold", 5)
    assert [r.env_index for r in refls] == [0, 1]
    labs = [x for r in refls for x in r.labels]
    assert [x.step for x in labs] == [0, 1, 0, 1]
    # step 3: the Actor's 2 is as good as the best (0 = 0): effective; step 4: 2 beats 1 by 1
    assert [(x.label, x.improved_action) for x in labs] == [
        ("suboptimal", 2), ("suboptimal", 1), ("effective", 2), ("suboptimal", 2)]
    assert all(r.backend == la.HINDSIGHT_BACKEND for r in refls)
    strict = dataclasses.replace(a, config=la.AuditConfig(horizons=(5,), tie=1.0))
    assert [x.label for r in la.hindsight_reflections(strict) for x in r.labels][3] == "effective"


def test_relabel_scores_other_labels_on_the_same_counterfactuals(audited, collected):
    runner, env_key, trajs, refls = collected
    # the rule labeller with rule 5 off: the same as auditing its labels from scratch
    off = RuleReflector(RuleReflectorConfig(proven_levels=False), PCFG).reflect(trajs)
    got = la.relabel(audited, off)
    assert got.label != audited.label  # rule 5 labelled some of these steps
    want = la.audit(runner, env_key, trajs, off, CFG, progress=False)
    assert got.label == want.label and got.reason == want.reason
    np.testing.assert_array_equal(got.improved, want.improved)
    for k in want.utility:
        np.testing.assert_array_equal(got.utility[k], want.utility[k])
    assert la.class_stats(got, "hold", 2) == la.class_stats(want, "hold", 2)
    assert la.relabel(audited, refls).label == audited.label  # its own labels: unchanged
    # other steps (one trajectory only) and actions outside the range are refused
    with pytest.raises(ValueError, match="other steps than the audit's"):
        la.relabel(audited, off[:1])
    bad = [Reflection(r.env_index, [StepLabel(x.step, "suboptimal", 0, "x") for x in r.labels],
                      r.summary, r.backend) for r in refls]  # fmt: skip
    with pytest.raises(ValueError, match="outside the Actor's range"):
        la.relabel(audited, bad)
