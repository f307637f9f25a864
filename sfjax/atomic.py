"""Files a run writes appear whole or not at all, and damage is named on read.

Every writer goes through a temporary name in the same directory and ``os.replace`` (atomic on
POSIX), so a kill mid-write leaves the previous version (or nothing) and a stray ``*.tmp``. A
directory (a model checkpoint, a PEFT adapter) is written under a temporary name and swapped in.
Readers raise :class:`DamagedFile` naming the file instead of a bare ``JSONDecodeError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path


class DamagedFile(RuntimeError):
    """A file the run wrote that cannot be read back (truncated, zeroed, edited)."""


UNREADABLE = (DamagedFile, OSError, ValueError, KeyError, TypeError, EOFError,
              zipfile.BadZipFile)
"""What reading back saved results may raise when a file is missing, cut short or not what was
written (JSON, ``.npz`` archives, the fields read from them): a caller that can measure them
again catches these and does."""


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically; returns its SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return hashlib.sha256(data).hexdigest()


def umask_mode(path: str | os.PathLike) -> None:
    """Give a file the mode a plain ``open`` gives it (0o666 less the process's umask).
    safetensors >= 0.8 creates its files 0o600, so a model, prior or adapter written on a shared
    machine could not be read by the group or other users that its neighbours (config.json,
    tokenizer) are readable by."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_text(path: str | os.PathLike, text: str) -> str:
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj, indent: int | None = None) -> str:
    """JSON to ``path`` atomically; returns the SHA-256 of the bytes written."""
    return write_text(path, json.dumps(obj, indent=indent))


def write_npz(path: str | os.PathLike, arrays: dict) -> str:
    """``numpy.savez`` of ``arrays`` to exactly ``path``, atomically; returns the SHA-256."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return write_bytes(path, buf.getvalue())


def read_json(path: str | os.PathLike, what: str = "file"):
    """Load JSON from ``path``; a damaged file raises :class:`DamagedFile` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedFile(f"{what} {path} is damaged ({type(e).__name__}: {e})") from None


def sha256_file(path: str | os.PathLike) -> str | None:
    """SHA-256 of a file's bytes, or None when it does not exist."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def replace_dir(path: str | os.PathLike) -> Iterator[Path]:
    """``with replace_dir(d) as tmp: write into tmp`` -- on success ``tmp`` becomes ``d``
    (a previous ``d`` is swapped out and removed after), on failure ``d`` is untouched. A kill
    between the two renames leaves no ``d``, which callers treat as not written yet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
