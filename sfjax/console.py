"""What an experiment prints: its log set-up and the pieces of its closing summary.

``configure_logging`` is the one place the experiments set up Python logging. It has to
*replace* the root handler rather than add to it: importing ``orbax.checkpoint`` (through
absl) already installs a root ``StreamHandler`` at WARNING, after which a plain
``logging.basicConfig`` does nothing, so every INFO progress line was lost and ``--log-level``
had no effect. In a multi-process run, processes other than 0 show warnings and errors only:
process 0 logs the run's progress once.

:func:`progress_bar` is the one tqdm bar of the package (the collect, API-reflect and KTO bars).

The summary helpers (:func:`artefact_lines`, :func:`tensorboard_hint`, :func:`fmt_change`)
are shared by :mod:`sfjax.agents.summary` and :mod:`sfjax.baselines.summary`.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Iterable
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATEFMT = "%H:%M:%S"

QUIET_LOGGERS = ("httpx", "httpcore", "httpx2", "httpcore2", "openai", "absl", "jax._src",
                 "orbax")
"""Third-party loggers kept at WARNING: HTTP request lines (openai >= 3 sends them through
httpx2, logged once by its client and once by the api Reflector's per-attempt inner client),
orbax's per-save INFO lines."""


def configure_logging(level: str | int = "INFO") -> int:
    """Send every record at ``level`` and above to stderr, whatever was installed before.

    ``level`` is a name (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``; any case) or a number.
    Returns the numeric level. Raises ``ValueError`` for an unknown name. On a process other
    than 0 of a multi-process run, records below WARNING are not shown.
    """
    if isinstance(level, str):
        value = logging.getLevelName(level.strip().upper())
        if not isinstance(value, int):
            raise ValueError(
                f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR"
            )
    else:
        value = int(level)
    # transformers logs "PyTorch was not found" at import: true and irrelevant here (JAX)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # a multi-process run logs its progress once, on process 0; the others warn and err only
    shown = max(value, logging.WARNING) if _other_process() else value
    # force=True: orbax/absl put a handler on the root logger at import time (see above)
    logging.basicConfig(level=shown, format=LOG_FORMAT, datefmt=LOG_DATEFMT, force=True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(shown, logging.WARNING))
    return value


def _other_process() -> bool:
    """Whether this is a process other than 0 of a started ``jax.distributed`` run (one
    process: False, without starting JAX's backend)."""
    import jax

    return jax.distributed.is_initialized() and jax.process_index() != 0


def progress_bar(
    total: int,
    desc: str,
    *,
    enabled: bool = True,
    terminal_only: bool = True,
    leave: bool = False,
    unit: str = "it",
    initial: int = 0,
):
    """A tqdm bar on stderr counting ``total`` ``unit`` s (from ``initial``), labelled ``desc``.

    ``enabled=False`` hides it (callers pass False off process 0: one bar per run, not one per
    host). ``terminal_only``: shown only when stderr is a terminal (tqdm's ``disable=None``),
    not in a log file or CI; False shows it wherever stderr goes. ``leave``: keep the finished
    bar on screen (the KTO bar, whose postfix holds the last loss, margin and KL) rather than
    erase it (the collect and reflect bars, whose results are logged).
    """
    from tqdm.auto import tqdm

    disable = True if not enabled else (None if terminal_only else False)
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, disable=disable)


def tensorboard_hint(tb_dir: str | Path) -> str:
    """The command that opens TensorBoard on ``tb_dir`` (quoted for a POSIX shell)."""
    return f"tensorboard --logdir {shlex.quote(str(tb_dir))}   # then open http://localhost:6006"


def artefact_lines(entries: Iterable[tuple[str | Path, str]]) -> list[str]:
    """``path  what it holds`` lines for the artefacts that exist (missing ones are skipped)."""
    rows = [(str(p), what) for p, what in entries if Path(p).exists()]
    width = max((len(p) for p, _ in rows), default=0)
    return [f"  {p:<{width}}  {what}" for p, what in rows]


def fmt_change(before: float, after: float, unit: str, digits: int = 1) -> str:
    """``before -> after unit (+delta)``."""
    d = after - before
    return f"{before:.{digits}f} -> {after:.{digits}f} {unit} ({d:+.{digits}f})".replace("  ", " ")
