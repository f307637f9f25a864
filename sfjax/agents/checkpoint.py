"""Orbax checkpoints of the self-finetuning loop: arrays (LoRA params, optimizer state, RNG key
data) as one pytree item, everything else (loop position, trajectories, reflections, datasets,
RfR state, summary so far) as one JSON item.

One checkpoint is written after every phase of Algorithm 1 (collect, reflect, each KTO
iteration); its step number is the phase's index in the run's fixed phase sequence, so a resumed
run skips exactly the phases already done. Saves are synchronous: when ``save`` returns, the
checkpoint is on disk (a kill right after a phase never loses it). The last ``max_to_keep``
checkpoints are kept, and those of the ``preserve`` steps always (the loop's collect phases:
the Actor of every SF iteration, for ``LoopConfig.final_actor`` and extended runs).

Multi-host (``jax.distributed``): ``save`` and ``restore`` are collective -- every process
calls them with the same step. An array sharded over devices of several processes (LoRA params
and optimizer state on a mesh that spans hosts) is handed to orbax as the ``jax.Array`` it is
and written shard by shard, each host writing its own shards (one replica of each); it is
never gathered onto one host (``np.asarray`` of it would fail). ``restore`` reads every array
into the sharding of the matching array in ``arrays_like`` (the live state), so a checkpoint
also resumes on a different mesh or process count. Arrays this process holds whole (all of
them with one process) are saved from a host copy by process 0, which is ~2x faster than
orbax's per-shard writes on one host (``benchmarks/bench_sharding.py``), and placed back on
their shardings after the restore; ``host_gather=False`` sends them shard by shard too. The
JSON item is written by process 0. The directory must be shared by all hosts
(:func:`sfjax.parallel.check_shared_directory`).

Damage. Orbax finalises a checkpoint by renaming its temporary directory, so a kill during a
save leaves no half checkpoint behind. Damage from outside (a truncated or zeroed array file,
an emptied step directory, a corrupt JSON item) is caught on read: the meta item records the
SHA-256 of every array this process holds whole, and :meth:`LoopCheckpointer.restore_latest`
falls back to the newest intact checkpoint with a warning, moving each damaged one aside to
``<directory>_damaged/`` (kept, never deleted) so that its step can be written again.

Another configuration is not damage: a readable checkpoint whose arrays have other names, shapes
or dtypes than the live state (a different LoRA rank, model or optimizer) raises
:class:`CheckpointMismatch` naming the differences, and nothing is moved.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from sfjax.configcheck import ConfigError

log = logging.getLogger(__name__)

DIGEST_KEY = "arrays_sha256"
"""Meta entry holding the SHA-256 of the arrays saved whole (see the module docstring)."""


class CheckpointDamaged(RuntimeError):
    """A checkpoint whose arrays or meta cannot be read back intact."""


class CheckpointMismatch(ConfigError):
    """A readable checkpoint written for other arrays than the live state's (another
    configuration): resume with the configuration that wrote it, or use a new directory."""


class CheckpointMissing(ConfigError):
    """A checkpoint the run needs (named in the message) is not on disk."""


def _path_key(path) -> tuple[str, ...]:
    """A pytree path as strings, as orbax names it on disk (dict keys and indices alike)."""
    return tuple(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)


def _specs(tree: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each leaf as it is stored (typed PRNG keys as their key data)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _is_key(x):
            x = jax.eval_shape(jax.random.key_data, x)
        elif not hasattr(x, "dtype") or not hasattr(x, "shape"):
            x = np.asarray(x)
        out[_path_key(path)] = (tuple(x.shape), np.dtype(x.dtype))
    return out


def arrays_digest(arrays: Any) -> list[str | None]:
    """SHA-256 of each leaf's shape, dtype and bytes; None for a leaf that spans other
    processes' devices (not readable whole here): only leaves with a digest are checked."""
    out = []
    for x in jax.tree.leaves(arrays):
        x = jax.random.key_data(x) if _is_key(x) else x
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            out.append(None)
            continue
        a = np.ascontiguousarray(np.asarray(x))
        out.append(hashlib.sha256(f"{a.shape}{a.dtype}".encode() + a.tobytes()).hexdigest())
    return out


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _sharded_io(x, host_gather: bool) -> bool:
    """Whether orbax writes / reads ``x`` shard by shard: a ``jax.Array`` spanning devices of
    other processes always; one this process holds whole only without ``host_gather``."""
    return isinstance(x, jax.Array) and not (host_gather and x.is_fully_addressable)


class LoopCheckpointer:
    """Save / restore (arrays pytree, JSON metadata) pairs under ``directory``."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, *,
                 preserve: Sequence[int] = (), host_gather: bool = True):  # fmt: skip
        self.directory = Path(directory).absolute()
        self.host_gather = host_gather
        self.max_to_keep = max_to_keep
        self.preserve = tuple(sorted(set(preserve)))
        self.set_aside: list[Path] = []
        """Where :meth:`restore_latest` moved each damaged checkpoint it met."""
        self.manager = self._manager()

    def _manager(self) -> ocp.CheckpointManager:
        keep = policies.LatestN(self.max_to_keep)
        if self.preserve:
            keep = policies.AnyPreservationPolicy([keep, policies.CustomSteps(self.preserve)])
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=keep, enable_async_checkpointing=False, create=True
            ),
        )

    def all_steps(self) -> list[int]:
        """The steps of the checkpoints on disk, ascending."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, arrays: Any, meta: dict) -> None:
        """Write checkpoint ``step`` (collective with several processes; see the module doc).

        ``arrays`` may hold sharded ``jax.Array`` s (kept sharded), typed PRNG keys (stored as
        their key data), numpy arrays and Python scalars; ``meta`` must be JSON-serialisable.
        """

        def saveable(x):
            x = jax.random.key_data(x) if _is_key(x) else x
            return x if _sharded_io(x, self.host_gather) else np.asarray(x)

        arrays = jax.tree.map(saveable, arrays)
        meta = {**meta, DIGEST_KEY: arrays_digest(arrays)}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
        )
        self.manager.wait_until_finished()

    def check_matches(self, step: int, arrays_like: Any) -> None:
        """:class:`CheckpointMismatch` when checkpoint ``step``'s arrays (names, shapes, dtypes,
        from orbax's metadata) are not those of ``arrays_like``; nothing when its metadata
        cannot be read (:meth:`restore` then tells whether the checkpoint is damaged)."""
        try:
            saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "arrays")
            saved = _specs(getattr(saved, "tree", saved))
        except Exception:  # noqa: BLE001 -- unreadable metadata is restore()'s to judge
            return
        want = _specs(arrays_like)
        name = "/".join
        diffs = [f"{name(k)}: missing from the checkpoint" for k in want if k not in saved]
        diffs += [f"{name(k)}: in the checkpoint only" for k in saved if k not in want]
        diffs += [
            f"{name(k)}: checkpoint {saved[k][0]} {saved[k][1]}, this run {want[k][0]} {want[k][1]}"
            for k in want
            if k in saved and saved[k] != want[k]
        ]
        if diffs:
            more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
            raise CheckpointMismatch(
                f"checkpoint {step} in {self.directory} was written by another configuration: "
                + "; ".join(diffs[:5]) + more + ". Resume with the configuration that wrote "
                "it (its run directory's config.json), or choose a new run directory."
            )

    def restore(self, step: int, arrays_like: Any) -> tuple[Any, dict]:
        """Restore checkpoint ``step`` into the structure, dtypes and shardings of ``arrays_like``.

        Each ``jax.Array`` leaf comes back as a ``jax.Array`` with that leaf's sharding (each
        process reading only its shards), a typed key leaf as a key of the same impl, anything
        else as numpy. :class:`CheckpointMismatch` when the checkpoint holds other arrays.
        """
        self.check_matches(step, arrays_like)

        def target(x):
            x = jax.random.key_data(x) if _is_key(x) else x
            if _sharded_io(x, self.host_gather):
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            # a template only: no device-to-host copy of the live values
            return np.empty(x.shape, x.dtype) if isinstance(x, jax.Array) else np.asarray(x)

        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(jax.tree.map(target, arrays_like)),
                meta=ocp.args.JsonRestore(),
            ),
        )

        def place(like, x):
            if isinstance(like, jax.Array) and not isinstance(x, jax.Array):
                x = jax.device_put(x, like.sharding)  # held whole here: back on its devices
            return (
                jax.random.wrap_key_data(x, impl=jax.random.key_impl(like)) if _is_key(like) else x
            )

        flat_like, treedef = jax.tree.flatten(arrays_like)
        flat = treedef.flatten_up_to(out["arrays"])
        meta = dict(out["meta"])
        want = meta.pop(DIGEST_KEY, None)
        if want is not None:
            got = arrays_digest(flat)
            if len(got) != len(want) or any(
                w is not None and g is not None and g != w for g, w in zip(got, want)
            ):
                raise CheckpointDamaged(f"checkpoint {step}: its arrays do not match their SHA-256")
        return treedef.unflatten([place(a, b) for a, b in zip(flat_like, flat)]), meta

    def restore_latest(self, arrays_like: Any) -> tuple[int, Any, dict] | None:
        """The newest intact checkpoint as (step, arrays, meta), or None when there is none.

        A damaged checkpoint (unreadable, or arrays not matching their digest) is moved aside
        with a warning and the previous one is tried; one of another configuration raises
        :class:`CheckpointMismatch` and stays where it is.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                arrays, meta = self.restore(step, arrays_like)
            except CheckpointMismatch:
                raise
            except Exception as e:  # orbax raises many types for damaged files
                self._set_aside(step, e)
                continue
            return step, arrays, meta
        return None

    def _set_aside(self, step: int, err: Exception) -> None:
        aside = self.directory.with_name(self.directory.name + "_damaged")
        target = aside / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        log.warning(
            "checkpoint %d in %s is damaged (%s: %s); moved to %s, trying the previous one",
            step, self.directory, type(err).__name__, msg, target,
        )  # fmt: skip
        self.set_aside.append(target)
        self.manager.close()
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        self.manager = self._manager()

    def close(self) -> None:
        self.manager.close()
