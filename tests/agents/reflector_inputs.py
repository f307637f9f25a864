"""What the Reflector tests feed a Reflector: R-MDP steps, random trajectories and the fake API
key (``test_reflector.py``, ``test_reflector_api.py``, ``test_loop.py``)."""

from __future__ import annotations

import random

from sfjax.agents.trajectory import Step, Trajectory

KEY_ENV = "SFJAX_TEST_REFLECTOR_KEY"
"""The environment variable the tests' API Reflector reads its key from."""

SECRET = "sk-test-DO-NOT-LEAK-8c1f2e"
"""The tests' API key: it must reach the (fake) server and nothing else -- no log line, error,
repr, cache file, checkpoint or TensorBoard event."""


def make_step(t, action, prev, *, violation=0, dropped=0.0, arrival=4e6, se=5.0, other=None):
    """Step ``t``: ``action`` after ``prev``, its feedback as the env gives it. With ``other``
    the per-slice flags are set too (``violation`` then means the cell-wide one)."""
    fb = {
        "se": se,
        "violation": float(violation),
        "reconfiguration": float(action != prev),
        "arrival_rate_bps": arrival,
        "queue_delta_bytes": 0.0,
        "dropped_bytes": dropped,
    }
    if other is not None:  # per-slice flags (the env's feedback): violation = cell-wide
        fb["slice_violation"] = float(violation)
        fb["other_violation"] = float(other)
        fb["violation"] = float(violation or other)
    state = {
        "prev_action": prev,
        "se": 5.0,
        "arrival_rate_bps": arrival,
        "queue_delta_bytes": 0.0,
        "dropped_bytes": 0.0,
    }
    return Step(t, state, f"prompt {t}", f"Action: {action}", "r", action, "a", True, fb)


def random_trajectory(n, seed=0, env_index=0, *, action_hi=13, arrival=None) -> Trajectory:
    """``n`` steps from action 7: each action uniform in ``[1, action_hi]``, a violation with
    probability 0.2, the arrival rate uniform in [2, 8] Mbit/s (or the constant ``arrival``)."""
    rng = random.Random(seed)
    steps, prev = [], 7
    for t in range(n):
        a = rng.randint(1, action_hi)
        violation = rng.random() < 0.2
        rate = rng.uniform(2e6, 8e6) if arrival is None else arrival
        steps.append(make_step(t, a, prev, violation=violation, arrival=rate))
        prev = a
    return Trajectory(env_index, seed, steps)
