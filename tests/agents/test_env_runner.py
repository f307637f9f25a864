"""The JAX RAN env as the LLM agents see it: RBG actions, eq. 14 states, feedback without reward."""

from __future__ import annotations

import jax
import pytest

from sfjax.agents.env import JaxRanRunner
from sfjax.agents.prompts import FEEDBACK_KEYS, OTHER_STATE_KEYS, STATE_KEYS
from sfjax.envs.scenario import RanSlicingConfig


def test_runner_maps_rbgs_and_hides_reward():
    env = JaxRanRunner(RanSlicingConfig(), max_steps=5)
    assert (env.action_lo, env.action_hi) == (1, 12)  # 25 PRB: 13 RBGs, one kept per slice
    states = env.reset(jax.random.key(0), 3)
    assert len(states) == 3 and all(set(STATE_KEYS) <= set(s) for s in states)
    # the other slice's demand too: cell-wide violations need both slices observed
    assert all(set(OTHER_STATE_KEYS) <= set(s) for s in states)
    assert all(s["prev_action"] == env.initial_action + 1 for s in states)
    states, fb = env.step([1, 6, 12], jax.random.key(1))
    assert [s["prbs"] for s in states] == [2.0, 12.0, 24.0]
    assert [s["prev_action"] for s in states] == [1.0, 6.0, 12.0]
    assert [f["reconfiguration"] for f in fb] == [1.0, 0.0, 1.0]  # initial allocation is 6 RBGs
    for f in fb:
        assert set(FEEDBACK_KEYS) <= set(f)
        assert "utility" not in f and "reward" not in f
    _, fb = env.step([1, 6, 12], jax.random.key(2))
    assert [f["reconfiguration"] for f in fb] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="outside"):
        env.step([0, 6, 12], jax.random.key(3))
    with pytest.raises(ValueError, match="actions for"):
        env.step([6, 6], jax.random.key(3))
