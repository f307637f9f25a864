"""One process's failure stops every process of a multi-process run, at once and by name.

Every process of a ``jax.distributed`` run executes the same program, so when one of them fails
(an exception, a CLI error, out of device memory on one host) the others wait for it in their
next collective. JAX itself ends that wait only through its shutdown barrier: measured with
two processes on this repository's launcher (JAX 0.10.2), one raising while the other entered
an all-gather, **both hung 305 s** (the barrier's 300 s timeout) and then **aborted with
SIGABRT** and pages of C++ stack traces, the real error buried above them. On a TPU pod slice
that is five minutes of every host, per failure.

:func:`together` (the launcher, ``python -m sfjax.parallel``, runs the script in it once
JAX's distributed runtime is up) starts a watcher thread on every process that waits on the
coordination service's key-value store. A process that fails calls :func:`stop_all`: it writes
its error under every other process's key and leaves with ``os._exit``; each other process's watcher
prints the error and leaves the same way, even from inside a collective. Process 0, which
hosts the coordination service, leaves last (a process that loses the service aborts). So
every process exits within seconds, each one naming the process that failed and its error.
Nothing is lost that a run keeps: sfjax's checkpoints are written synchronously, and the same
command resumes from the last one.

A normal end shuts JAX's runtime down while the watcher still watches (a process that failed
after this one finished still stops it), then joins the watcher before the interpreter
finalises. A process killed outright (``SIGKILL``, a preempted host) announces nothing: JAX's
heartbeat ends the others after ``heartbeat_timeout_seconds`` (100 s by default).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import NoReturn

import jax

log = logging.getLogger(__name__)

KEY = "sfjax/failfast"
"""Prefix of the coordination service keys: ``{KEY}/stop/{i}`` holds the error process ``i``
is stopped for, ``{KEY}/left/{i}`` says that process ``i`` is leaving."""
POLL_MS = 60_000
"""How long one watcher wait lasts before it waits again (a shutdown cancels it at once)."""
LEAVE_WAIT_MS = 10_000
"""How long process 0, stopping, waits for the others to leave before it leaves."""

_watcher: threading.Thread | None = None
_stopping = threading.Event()  # set once this process has finished: its watcher may stop
_failing = threading.Event()  # set once this process fails itself: it exits with its own status
_note: str | None = None


def _client():
    from jax._src import distributed

    return distributed.global_state.client


def active() -> bool:
    """Whether this process runs under :func:`install` (a multi-process run)."""
    return _watcher is not None


def install() -> None:
    """Start watching for another process's failure (no-op with one process, or twice).

    Call after ``jax.distributed.initialize``. Registers the normal-exit shutdown too: it runs
    before JAX's own (``atexit`` runs the last registered first) and leaves JAX's a no-op.
    """
    global _watcher
    if _watcher is not None or jax.process_count() == 1 or _client() is None:
        return
    _stopping.clear()
    _watcher = threading.Thread(target=_watch, args=(_client(), jax.process_index()),
                                name="sfjax-failfast", daemon=True)  # fmt: skip
    _watcher.start()
    atexit.register(_shutdown)


@contextlib.contextmanager
def together() -> Iterator[None]:
    """Run the block so that its failure stops every process (:func:`install` first; with one
    process, or without it, the block runs as is). An exception is printed with its traceback
    and sent as ``<type>: <message>`` (status 1; 130 for Ctrl-C); a non-zero ``sys.exit``
    sends the :func:`note`d line, if any, and keeps its status. The launcher runs the script
    in it; a script of your own that starts ``jax.distributed`` itself can too."""
    install()
    try:
        yield
    except SystemExit as e:
        code = _exit_status(e.code)
        if code and active():
            if isinstance(e.code, str):  # what Python would have printed
                print(e.code, file=sys.stderr)
            stop_all(code=code)
        raise
    except BaseException as e:
        if not active():
            raise
        traceback.print_exc()
        stop_all(f"{type(e).__name__}: {e}", code=130 if isinstance(e, KeyboardInterrupt) else 1)


def _exit_status(code: object) -> int:
    """The status ``sys.exit(code)`` exits with: 0 for None, 1 for a message, else the int."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def note(message: str) -> None:
    """Remember ``message`` as this process's error (one line), for :func:`stop_all` to send;
    an experiment's CLI notes the line it prints before it exits."""
    global _note
    _note = " ".join(str(message).split())


def stop_all(message: str | None = None, code: int = 1) -> NoReturn:
    """Stop every process of the run: send ``message`` (default: the :func:`note`d error) to
    the others, then exit with ``code`` without JAX's shutdown barrier (which would wait for
    processes that never come)."""
    _failing.set()
    me, n = jax.process_index(), jax.process_count()
    text = message or _note or f"exited with status {code}"
    client = _client()
    if client is not None:
        for i in range(n):
            if i == me:
                continue
            try:  # the first failure's message wins: a key already set is kept
                client.key_value_set(f"{KEY}/stop/{i}", f"process {me} of {n} failed: {text}")
            except Exception:  # noqa: BLE001 - already set, or the service is gone
                pass
    _exit(code)


def _watch(client, me: int) -> None:
    """The watcher thread: wait for this process's stop key; on it, log and exit."""
    while True:
        try:
            why = client.blocking_key_value_get(f"{KEY}/stop/{me}", POLL_MS)
        except Exception as e:  # noqa: BLE001
            if "DEADLINE_EXCEEDED" in str(e) and not _stopping.is_set():
                continue  # nothing yet: wait again
            if not _stopping.is_set():  # the service is unreachable: JAX's heartbeat decides
                log.warning("sfjax.parallel: stopped watching for failures of other "
                            "processes: %s", " ".join(str(e).split())[:200])  # fmt: skip
            return
        if _failing.is_set():  # failing too (e.g. the same bad config everywhere): its own exit
            return
        print(f"error: {why}; stopping process {me} too, so that no process waits for it "
              "(see that process's output for the details)", file=sys.stderr)  # fmt: skip
        _exit(1)


def _shutdown() -> None:
    """Normal exit: JAX's shutdown barrier while still watching, then join the watcher.

    It runs before JAX's own exit clean-up, which then finds the runtime shut down. JAX's
    order, the backends cleared first, kept a finished process from seeing a later failure
    (tried: it waited for the heartbeat timeout)."""
    global _watcher
    _stopping.set()
    jax.distributed.shutdown()  # cancels the watcher's wait
    if _watcher is not None:
        _watcher.join(timeout=10)
        _watcher = None


def _exit(code: int) -> NoReturn:
    """Flush what this process printed and logged, then leave at once (no ``atexit``).

    Process 0 hosts JAX's coordination service, and a process that loses it aborts (SIGABRT),
    so process 0 leaves last: every other process says it is leaving, then leaves; process 0
    waits up to :data:`LEAVE_WAIT_MS` for all of them."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    client, me = _client(), jax.process_index()
    if client is not None:
        try:
            if me != 0:
                client.key_value_set(f"{KEY}/left/{me}", "1")
            else:
                deadline = time.monotonic() + LEAVE_WAIT_MS / 1000
                for i in range(1, jax.process_count()):
                    left_ms = int(max(1.0, (deadline - time.monotonic()) * 1000))
                    client.blocking_key_value_get(f"{KEY}/left/{i}", left_ms)
                time.sleep(0.2)  # each leaves right after saying so
        except Exception:  # noqa: BLE001 - not all left in time, or the service is gone
            pass
    os._exit(code)
