"""One process per run directory: an exclusive lock on ``RUN_DIR/.sfjax.lock`` while it runs.

Two processes in one RUN_DIR (a command started twice, a job scheduler requeueing a job whose
first copy still runs) would interleave their checkpoints, overwrite each other's trajectories
and report whichever summary was written last. :func:`hold` takes an advisory ``flock`` on the
lock file, without waiting: the second process is refused with the holder's pid, host, start
time and command (which the holder writes into the file, less the value of any option whose
name says it holds a secret). The kernel releases the lock when its process ends however it
ends (``kill -9`` included), so a crashed run leaves no stale lock and its rerun continues from
the checkpoints as before; the file itself stays (nothing is deleted).

A process may hold several run dirs (table3.py holds RUN_DIR and RUN_DIR/sf) and take the same
one again (re-entrant). A filesystem without locks (some network mounts) gets a warning and no
lock. Only the process that writes (process 0 of a multi-host run) locks.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO

LOCK_NAME = ".sfjax.lock"

log = logging.getLogger(__name__)

_held: dict[str, IO] = {}
"""Locked run dirs of this process (resolved path -> the open lock file)."""


class RunDirInUse(RuntimeError):
    """Another process holds the run directory's lock."""


def _holder(path: Path) -> str:
    try:
        who = json.loads(path.read_text())
        return (f"pid {who['pid']} on {who['host']}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(who['started']))}: "
                f"{who['command']}")  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"


def command_line(argv) -> str:
    """``argv`` joined, with the value of every option whose name says it holds a secret
    (:data:`sfjax.provenance.SECRET_WORDS`: ``--reflector.api.api-key-env``, ...) masked: the
    lock file and the refusal that quotes it never carry one."""
    from sfjax.provenance import SECRET_WORDS

    def secret(opt: str) -> bool:
        return opt.startswith("-") and any(w in opt.upper() for w in SECRET_WORDS)

    out, mask_next = [], False
    for arg in argv:
        if mask_next and not arg.startswith("--"):
            out.append("***")
        elif "=" in arg and secret(arg.split("=", 1)[0]):
            out.append(arg.split("=", 1)[0] + "=***")
        else:
            out.append(arg)
        mask_next = secret(arg) and "=" not in arg
    return " ".join(out)


def hold(run_dir: str | os.PathLike) -> None:
    """Lock ``run_dir`` (an existing directory) for the rest of this process, or until
    :func:`release`; :class:`RunDirInUse` names the other process when it is taken."""
    key = str(Path(run_dir).resolve())
    if key in _held:
        return
    path = Path(key) / LOCK_NAME
    f = open(path, "a+")  # noqa: SIM115 (held open: the lock lives as long as the file)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise RunDirInUse(
            f"{run_dir} is in use by another process ({_holder(path)}); two runs in one RUN_DIR "
            "would mix their checkpoints and results. Wait for it to end, or stop it (its "
            "checkpoints let the same command continue it later), or choose another --run-dir"
        ) from None
    except OSError as e:  # no locks on this filesystem
        f.close()
        log.warning("cannot lock %s (%s): make sure no other process runs in it", run_dir, e)
        return
    f.seek(0)
    f.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
               "command": command_line(sys.argv)}, f)  # fmt: skip
    f.flush()
    _held[key] = f


def held() -> list[str]:
    """The run dirs this process holds (resolved paths)."""
    return list(_held)


def release(run_dirs=None) -> None:
    """Unlock ``run_dirs`` (resolved paths, as :func:`held` gives them; default: all)."""
    for key in list(_held) if run_dirs is None else run_dirs:
        f = _held.pop(key, None)
        if f is not None:
            f.close()  # closing the file releases its flock
