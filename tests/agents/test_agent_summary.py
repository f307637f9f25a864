"""The closing summaries say what ran, before/after with units, and where every artefact is."""

from __future__ import annotations

from sfjax.agents.summary import TINY_NOTE, format_reflexion_summary, format_sf_summary


def _it(i, utility, se, rec, vio, n_d=None, n_u=None, kto=0):
    return {"iteration": i, "utility": utility, "avg_se": se, "reconfigurations": rec,
            "violations": vio, "parse_failures": 0.0, "n_desirable": n_d, "n_undesirable": n_u,
            "kto_iterations": [{}] * kto}  # fmt: skip


SUMMARY = {
    "actor": "runs/demo/tiny_actor",
    "reflector": "rule (offline hindsight labeller, no LLM)",
    "iterations": [
        _it(0, -953.1, 5.446, 8.0, 6.0, 15, 136, kto=2),
        _it(1, -969.5, 5.387, 8.5, 6.0, 22, 108, kto=2),
        _it(2, -683.6, 5.393, 9.5, 5.0),
    ],
    "timings_s": {"collect": 96.4, "collect_cpu": 27.6, "kto": 118.3, "setup": 31.1},
}


def test_sf_summary_explains_the_run(tmp_path):
    for d in ("tb", "adapter", "trajectories"):
        (tmp_path / d).mkdir()
    (tmp_path / "summary.json").write_text("{}")
    text = format_sf_summary(SUMMARY, tmp_path, trajectory_steps=10, num_envs=2, tiny_actor=True)
    assert "2 self-finetuning iteration(s)" in text and "2 trajectory(ies) of 10 decisions" in text
    assert "2 KTO iteration(s)" in text and "rule (offline hindsight labeller" in text
    assert TINY_NOTE in text
    assert "iteration 0 = the Actor before any fine-tuning" in text
    assert "bit/s/Hz" in text and "steps/traj" in text  # units in the table header
    assert "utility (eq. 15, summed over the trajectory): -953.1 -> -683.6 (+269.5)" in text
    assert "avg SE: 5.446 -> 5.393 bit/s/Hz (-0.053)" in text
    assert "QoS violations: 6.0 -> 5.0 steps per trajectory (-1.0)" in text
    assert "(in-sample)" in text
    assert "  2 " in text and "- (eval)" in text  # the last row is evaluation only
    for name in ("summary.json", "tb", "adapter", "trajectories"):
        assert f"{tmp_path / name}" in text
    assert str(tmp_path / "checkpoints") not in text  # absent artefacts are not listed
    assert f"tensorboard --logdir {tmp_path / 'tb'}" in text
    assert "collect 96 s" in text and "collect_cpu" not in text
    assert "improved" not in text  # Algorithm 2's datasets: nothing to declare


def test_sf_summary_declares_improved_action_examples(tmp_path):
    its = [dict(r) for r in SUMMARY["iterations"]]
    its[0]["kto_iterations"] = [{"n_improved": 40}, {"n_improved": 38}]
    its[1]["kto_iterations"] = [{"n_improved": 30}, {}]
    text = format_sf_summary({**SUMMARY, "iterations": its}, tmp_path, trajectory_steps=10,
                             num_envs=2)  # fmt: skip
    assert "108 desirable copies" in text and "--rfr.improved-examples" in text
    assert "not Algorithm 2" in text
    assert "token-kl" not in text  # the KTO loss alone: nothing to declare


def test_sf_summary_declares_the_token_kl_anchor(tmp_path):
    its = [dict(r) for r in SUMMARY["iterations"]]
    its[0]["kto_iterations"] = [{"kto/token_kl": 0.25}, {"kto/token_kl": 0.0421}]
    text = format_sf_summary({**SUMMARY, "iterations": its}, tmp_path, trajectory_steps=10,
                             num_envs=2)  # fmt: skip
    assert "--kto.token-kl-coef" in text and "not the paper's or TRL's loss" in text
    assert "last KTO iteration: 0.042 nats" in text


def test_sf_summary_reports_the_held_out_comparison(tmp_path):
    from sfjax.baselines.paired import paired_report

    held = {"seeds": [100, 101], "num_steps": 300,
            "metrics": paired_report({"mean_se": [5.0, 5.2]}, {"mean_se": [5.3, 5.4]})}  # fmt: skip
    timings = {**SUMMARY["timings_s"], "held_out": 308.0}
    text = format_sf_summary({**SUMMARY, "held_out": held, "timings_s": timings}, tmp_path,
                             trajectory_steps=10, num_envs=2)  # fmt: skip
    assert "Held-out env seeds [100, 101] (300 decisions each" in text
    assert "kto 118 s, held-out evaluation 308 s" in text  # the run's wall time includes it
    assert "avg SE [bit/s/Hz]" in text and "+0.25" in text


def test_reflexion_summary_has_units_and_artefacts(tmp_path):
    (tmp_path / "tb").mkdir()
    m = {"utility": (100.0, 5.0), "mean_se": (5.1, 0.1), "reconfigurations": (3.0, 1.0),
         "violations": (2.0, 0.5)}  # fmt: skip
    text = format_reflexion_summary(
        m, tmp_path, provenance="actor X, evaluator/self-reflection rule", trials=2,
        num_trajectories=2, num_steps=300, trial_metrics=[m, m],
    )  # fmt: skip
    assert "2 Reflexion trial(s)" in text and "2 trajectory(ies) of 300 decisions" in text
    assert "avg SE: 5.100 ± 0.100 bit/s/Hz" in text
    assert "QoS violations: 2.0 ± 0.5 steps per trajectory" in text
    assert "trial 2: utility 100.0" in text and TINY_NOTE not in text
    assert f"tensorboard --logdir {tmp_path / 'tb'}" in text
    noted = format_reflexion_summary(
        m, tmp_path, provenance="actor X, evaluator/self-reflection rule", trials=2,
        num_trajectories=2, num_steps=300, actor_note="The Actor is a stand-in.",
    )  # fmt: skip
    assert "Actor and evaluator: actor X, evaluator/self-reflection rule.\nThe Actor is a " \
           "stand-in.\n" in noted and "The Actor is a stand-in." not in text  # fmt: skip


def test_sf_summary_names_the_kept_iterate_and_compares_with_it(tmp_path):
    kept = {**SUMMARY, "final_actor": {"rule": "best", "iteration": 1}}
    text = format_sf_summary(kept, tmp_path, trajectory_steps=10, num_envs=2)
    assert "Final Actor: iteration 1 of 0..2, the best mean utility above" in text
    assert "optimistic" in text
    # before -> after is of the kept iterate (1), not of the last row (2)
    assert "-953.1 -> -969.5 (-16.4)" in text and "-683.6" in text.split("Final Actor")[0]
    last = {**SUMMARY, "final_actor": {"rule": "last", "iteration": 2}}
    text = format_sf_summary(last, tmp_path, trajectory_steps=10, num_envs=2)
    assert "Final Actor" not in text and "-953.1 -> -683.6 (+269.5)" in text
