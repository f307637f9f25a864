"""Process-0-only helpers for multi-host runs: logging / TensorBoard / file writes on process 0,
barriers, broadcasting host-side values decided on process 0, and a check that a run directory
is shared by every host.

Why these exist: every process runs the same program (SPMD) and must make the same sharded calls
with the same arguments. Anything a host computes on its own that may differ between hosts (an
API reply, a wall-clock reading, a socket-backed simulator) is therefore decided once, on
process 0, and broadcast (:func:`broadcast_object`, :func:`on_main_process`); files other than
orbax checkpoints are written by process 0 alone (:func:`is_main_process`); and orbax, which
writes each host's shards itself, needs a directory that every host sees
(:func:`check_shared_directory`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def is_main_process() -> bool:
    """Whether this process writes logs, TensorBoard events and files (process 0)."""
    return jax.process_index() == 0


def main_process_only(fn: Callable) -> Callable:
    """Decorator: run ``fn`` on process 0 only (returns None elsewhere)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper


def summary_writer(logdir: str | os.PathLike | None):
    """A tensorboardX ``SummaryWriter`` on process 0, None on the others (or without logdir)."""
    if logdir is None or not is_main_process():
        return None
    from tensorboardX import SummaryWriter

    # the pid in the name: tensorboardX names files by the second and opens them "wb", so a
    # process restarted within the same second (a resume after a kill) erased the last one's
    return SummaryWriter(str(logdir), filename_suffix=f".{os.getpid()}")


def sync(name: str) -> None:
    """Barrier across processes (no-op with one process), e.g. before reading what process 0
    wrote."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_object(obj: Any) -> Any:
    """Process 0's JSON-serialisable ``obj`` on every process (identity with one process).

    For host-side results that may differ between processes (an API reply, a wall-clock
    timestamp): every process must make the same sharded calls, so such values are decided once
    on process 0 and broadcast.
    """
    if jax.process_count() == 1:
        return obj
    import json

    from jax.experimental import multihost_utils

    payload = np.frombuffer(json.dumps(obj).encode() if is_main_process() else b"", np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int64(payload.size)))
    buf = np.zeros((n,), np.uint8)
    buf[: payload.size] = payload[:n]
    data = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return json.loads(data.tobytes().decode())


class MainProcessError(RuntimeError):
    """Raised on every process but 0 when the function :func:`on_main_process` ran on process
    0 failed there: the message is ``"on process 0: <type>: <error>"``, ``kind`` the error's
    type name and ``detail`` its message (so a CLI can print a user's mistake as one line)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"on process 0: {kind}: {detail}")
        self.kind, self.detail = kind, detail


def on_main_process(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run ``fn(*args, **kwargs)`` on process 0 only; return its result on every process.

    The result must be JSON-serialisable (it travels through :func:`broadcast_object`). If
    ``fn`` raises on process 0, process 0 re-raises the original exception and every other
    process raises :class:`MainProcessError` with its message, so no process is left waiting
    in a later collective. With one process this is ``fn(*args, **kwargs)``.
    """
    if jax.process_count() == 1:
        return fn(*args, **kwargs)
    import json

    error: BaseException | None = None
    payload: Any = None
    if is_main_process():
        try:
            payload = {"ok": fn(*args, **kwargs)}
            json.dumps(payload)  # a result that cannot travel fails here, on every process
        except Exception as e:  # broadcast, then re-raise below
            error = e
            payload = {"error": str(e), "kind": type(e).__name__}
    payload = broadcast_object(payload)
    if error is not None:
        raise error
    if "error" in payload:
        raise MainProcessError(payload["kind"], payload["error"])
    return payload["ok"]


def all_processes_agree(ok: bool) -> bool:
    """Whether ``ok`` is true on every process (a collective; ``ok`` itself with one process)."""
    if jax.process_count() == 1:
        return bool(ok)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(int(bool(ok)), np.int32))
    return bool(np.all(np.asarray(flags)))


def check_shared_directory(path: str | os.PathLike) -> None:
    """Fail early, on every process, unless ``path`` is one directory that every host sees.

    Orbax writes each host's shards of a checkpoint into the same directory and process 0 its
    metadata, so a multi-host run directory must be on a shared filesystem (NFS, Lustre, a
    gcsfuse-mounted bucket); with a per-host local directory the checkpoints would be
    incomplete everywhere. Process 0 writes a random token, every process reads it back. No-op
    with one process.
    """
    if jax.process_count() == 1:
        return
    import secrets
    from pathlib import Path

    marker = Path(path) / ".sfjax_shared_check"
    token = broadcast_object(secrets.token_hex(16) if is_main_process() else None)
    if is_main_process():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    sync(f"check_shared_directory:{token}:written")
    try:
        seen = marker.read_text() == token
    except OSError:
        seen = False
    agreed = all_processes_agree(seen)
    sync(f"check_shared_directory:{token}:read")
    if is_main_process():
        marker.unlink(missing_ok=True)
    if not agreed:
        raise RuntimeError(
            f"{path} is not shared by all {jax.process_count()} processes (process "
            f"{jax.process_index()} {'sees' if seen else 'does not see'} process 0's files): a "
            "multi-host run directory must be on a filesystem every host mounts (NFS, Lustre, "
            "gcsfuse), because orbax writes each host's checkpoint shards into it"
        )
