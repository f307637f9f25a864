"""RL and Table III closing summaries: what ran, units, artefacts, TensorBoard."""

from __future__ import annotations

from sfjax.baselines.report import MethodResult
from sfjax.baselines.summary import COLUMNS_LEGEND, format_rl_summary, format_table3_summary


def _row(name):
    s = {"mean_se": (5.2, 0.1), "reconfigurations": (40.0, 2.0), "violations": (12.0, 1.0),
         "utility": (22519.1, 100.0)}  # fmt: skip
    return MethodResult(name, s, 480_000, 600, 2)


def test_rl_summary(tmp_path):
    (tmp_path / "dqn").mkdir()
    (tmp_path / "tb").mkdir()
    text = format_rl_summary(
        [_row("DQN")], tmp_path, seeds=(0, 1), env_steps_per_seed=480_000, eval_seeds=(0, 1),
        eval_steps=300, wall_s={"DQN": 12.3},
    )  # fmt: skip
    assert "DQN (rejax)" in text and "2 training seed(s) x 480,000 env steps" in text
    assert "avg SE 5.200 bit/s/Hz, 40.0 reconfigurations, 12.0 violating steps" in text
    assert str(tmp_path / "dqn") in text and "DQN 12 s" in text
    assert f"tensorboard --logdir {tmp_path / 'tb'}" in text


def test_table3_summary(tmp_path):
    (tmp_path / "table3.md").write_text("x")
    text = format_table3_summary([_row("SF"), _row("DQN")], tmp_path, preset="smoke",
                                 actor_note="The SF row uses a tiny randomly ...")  # fmt: skip
    assert "Table III (preset smoke)" in text and "The SF row uses a tiny" in text
    assert COLUMNS_LEGEND in text and "bit/s/Hz" in COLUMNS_LEGEND
    assert str(tmp_path / "table3.md") in text and str(tmp_path / "fig3.png") not in text
    assert f"tensorboard --logdir {tmp_path}" in text
