"""Orbax checkpoints of the self-finetuning loop: arrays (LoRA params, optimizer state, RNG key
data) as one pytree item, everything else (loop position, trajectories, reflections, datasets,
RfR state, summary so far) as one JSON item.

One checkpoint is written after every phase of Algorithm 1 (collect, reflect, each KTO
iteration); its step number is the phase's index in the run's fixed phase sequence, so a resumed
run skips exactly the phases already done. Saves are synchronous: when ``save`` returns, the
checkpoint is on disk (a kill right after a phase never loses it). Only the last
``max_to_keep`` checkpoints are kept.

Multi-host (``jax.distributed``): ``save`` and ``restore`` are collective -- every process
calls them with the same step. Arrays are handed to orbax as they are, so an array sharded
over devices of several processes (LoRA params and optimizer state on a mesh whose ``fsdp`` or
``tp`` axis crosses hosts) is written shard by shard, each host writing its own shards and one
replica of each, and is never gathered onto one host. ``restore`` reads each array straight
into the sharding of the matching array in ``arrays_like`` (the live state), so a checkpoint
also resumes on a different mesh or process count. Host values (numpy, Python scalars, arrays
that live on this process only) are the same on every process and are written by process 0;
the JSON item likewise. The directory must be shared by all hosts
(:func:`sfjax.parallel.check_shared_directory`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_global(x) -> bool:
    """A ``jax.Array`` that orbax writes shard by shard and restores into its sharding: with one
    process every ``jax.Array``; with several, one whose devices span processes (a process-local
    array is a host value there: every process holds its own copy)."""
    return isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable)


def _saveable(x):
    if _is_key(x):
        x = jax.random.key_data(x)
    return x if _is_global(x) else np.asarray(x)


def _restore_target(x):
    if _is_key(x):
        x = jax.random.key_data(x)
    if _is_global(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return np.asarray(x)


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
        """Write checkpoint ``step`` (collective with several processes; see the module doc).

        ``arrays`` may hold sharded ``jax.Array`` s (kept sharded), typed PRNG keys (stored as
        their key data), numpy arrays and Python scalars; ``meta`` must be JSON-serialisable.
        """
        arrays = jax.tree.map(_saveable, arrays)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, arrays_like: Any) -> tuple[Any, dict]:
        """Restore checkpoint ``step`` into the structure, dtypes and shardings of ``arrays_like``.

        Each ``jax.Array`` leaf comes back as a ``jax.Array`` with that leaf's sharding (each
        process reading only its shards), a typed key leaf as a key of the same impl, anything
        else as numpy.
        """
        target = jax.tree.map(_restore_target, arrays_like)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        arrays = out["arrays"]
        if any(_is_key(x) for x in jax.tree.leaves(arrays_like)):
            arrays = jax.tree.map(
                lambda like, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(like))
                if _is_key(like) else x,
                arrays_like, arrays,
            )  # fmt: skip
        return arrays, out["meta"]

    def close(self) -> None:
        self.manager.close()
