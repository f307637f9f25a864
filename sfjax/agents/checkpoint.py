"""Orbax checkpoints of the self-finetuning loop: arrays (LoRA params, optimizer state, RNG key
data) as one pytree item, everything else (loop position, trajectories, reflections, datasets,
RfR state, summary so far) as one JSON item.

One checkpoint is written after every phase of Algorithm 1 (collect, reflect, each KTO
iteration); its step number is the phase's index in the run's fixed phase sequence, so a resumed
run skips exactly the phases already done. Saves are synchronous: when ``save`` returns, the
checkpoint is on disk (a kill right after a phase never loses it). Only the last
``max_to_keep`` checkpoints are kept.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class LoopCheckpointer:
    """Save / restore (arrays pytree, JSON metadata) pairs under ``directory``."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, arrays: Any, meta: dict) -> None:
        arrays = jax.tree.map(np.asarray, arrays)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, arrays_like: Any) -> tuple[Any, dict]:
        """Restore checkpoint ``step``; ``arrays_like`` gives the pytree structure and dtypes."""
        target = jax.tree.map(np.asarray, arrays_like)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        return out["arrays"], out["meta"]

    def close(self) -> None:
        self.manager.close()
