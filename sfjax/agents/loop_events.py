"""The self-finetuning loop's TensorBoard events, kept in step with its checkpoints.

Before each phase checkpoint every queued event is written to disk (:func:`flush_events`) and
the size of every events file is recorded in the checkpoint (:func:`event_sizes`); a resumed
run cuts the files back to those sizes (:func:`trim_events`), since the phases after the
checkpoint are run again and write their events again: no lost and no duplicate points.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

_STARTED = time.time()  # files older than this were written by an earlier process


def event_files(writer) -> list[Path]:
    """The events files of ``writer``'s log directory (none without a writer)."""
    logdir = getattr(writer, "logdir", None)  # tensorboardX's SummaryWriter
    return sorted(Path(logdir).glob("events.out.tfevents.*")) if logdir else []


def event_sizes(writer) -> dict[str, int]:
    """Size of every TensorBoard events file (flushed before each checkpoint)."""
    return {p.name: p.stat().st_size for p in event_files(writer)}


def trim_events(writer, run_dir: Path, sizes: Mapping[str, int]) -> None:
    """Drop the events written after the restored checkpoint (the phases about to be
    rerun write them again): files are cut back to their checkpointed size, and files of a
    killed process created after it are moved to ``tb_discarded/``; no duplicate points."""
    for p in event_files(writer):
        if p.name in sizes:
            if p.stat().st_size > sizes[p.name]:
                with open(p, "r+b") as f:
                    f.truncate(sizes[p.name])
        elif p.stat().st_mtime < _STARTED:  # not this process's writer
            aside = run_dir / "tb_discarded"
            aside.mkdir(exist_ok=True)
            p.rename(aside / p.name)


def flush_events(writer) -> None:
    """Write every queued TensorBoard event to disk.

    tensorboardX's ``flush()`` flushes only what its worker thread has already taken off the
    queue: measured, a kill right after it lost the phase's last scalars. Its worker is
    stopped (it writes everything queued before the stop signal) and restarted on the same
    file; a writer without these internals gets the plain ``flush()``.
    """
    from tensorboardX.event_file_writer import _EventLoggerThread

    for fw in (getattr(writer, "all_writers", None) or {}).values():
        ev = getattr(fw, "event_writer", None)
        worker = getattr(ev, "_worker", None)
        if worker is None or getattr(ev, "_closed", True):
            continue
        worker.stop()
        ev._worker = _EventLoggerThread(ev._event_queue, ev._ev_writer, ev._flush_secs)
        ev._worker.start()
    writer.flush()
