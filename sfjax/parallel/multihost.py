"""Process-0-only helpers for multi-host runs: logging / TensorBoard / file writes on process 0,
barriers, and broadcasting host-side values decided on process 0."""

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

    return SummaryWriter(str(logdir))


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
