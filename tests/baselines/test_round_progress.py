"""Progress lines of a seed-vmapped rejax run: one per round once every seed reported it."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from sfjax.baselines.round_progress import RoundProgress

LOGGER = "sfjax.baselines.round_progress"


def test_a_round_closes_when_every_seed_reported(caplog):
    p = RoundProgress("dqn", n_seeds=3, rounds=4, every_s=0.0)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for round_values in ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]):
            for v in round_values:
                p(np.float32(v))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and p.lines == 2
    assert lines[0].startswith("dqn: round 1/4, utility of its trajectories 2 (mean of 3 seeds)")
    assert "left" not in lines[0]  # round 1's time holds the compile: no estimate from it
    assert lines[1].startswith("dqn: round 2/4, utility of its trajectories 5 ")
    assert "s left" in lines[1]


def test_lines_are_throttled_but_first_and_last_round_always_logged(caplog):
    p = RoundProgress("ppo", n_seeds=1, rounds=5, every_s=3600.0)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for v in range(5):
            p(float(v))
    rounds = [r.getMessage().split(",")[0] for r in caplog.records]
    assert rounds == ["ppo: round 1/5", "ppo: round 5/5"]


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="n_seeds"):
        RoundProgress("sac", n_seeds=0, rounds=3)

