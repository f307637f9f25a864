"""LoopCheckpointer: a checkpoint of another configuration is refused, not taken for damage."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sfjax.agents.checkpoint import CheckpointMismatch, LoopCheckpointer
from sfjax.configcheck import ConfigError


def _state(cols: int, extra: bool = False) -> dict:
    w = jnp.arange(4.0 * cols).reshape(4, cols)
    tree = {"w": w, "opt": optax.adam(1e-3).init({"w": w}), "step": np.int64(3)}
    return {**tree, "bias": jnp.zeros(2, jnp.bfloat16)} if extra else tree


def test_another_configuration_is_named_and_nothing_is_moved(tmp_path):
    """Before: orbax restored the checkpoint's (4, 3) arrays into a state built for (4, 5)
    without a word (their digest matches what is stored), so a run resumed with another LoRA rank
    failed later, somewhere else, or not at all; a checkpoint of another tree structure was
    taken for damage and moved aside."""
    ckpt = LoopCheckpointer(tmp_path / "checkpoints")
    for step in (0, 1):
        ckpt.save(step, _state(3), {"phase": step})
    with pytest.raises(CheckpointMismatch) as err:
        ckpt.restore_latest(_state(5))
    text = str(err.value)
    assert "checkpoint 1" in text and "another configuration" in text
    assert "w: checkpoint (4, 3) float32, this run (4, 5) float32" in text
    assert "opt/0/mu/w" in text  # the optimizer's moments, by their pytree path
    with pytest.raises(CheckpointMismatch, match=r"bias: missing from the checkpoint"):
        ckpt.restore_latest(_state(3, extra=True))
    assert isinstance(err.value, ConfigError)  # the CLIs print it as a user error, exit 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0", "1"]
    assert not (tmp_path / "checkpoints_damaged").exists()
    step, got, meta = ckpt.restore_latest(_state(3))  # the right configuration still resumes
    ckpt.close()
    assert step == 1 and meta == {"phase": 1}
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(_state(3)["w"]))
