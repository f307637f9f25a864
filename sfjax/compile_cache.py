"""JAX's persistent compilation cache, on by default for the experiment CLIs.

Every run of an experiment compiles the same programs again: the Actor's sampler per prompt
bucket, the KTO step, the reference log-probs, the RL baselines' training loops. At Qwen3-4B on
a GPU each of them compiles for tens of seconds (issue 18: the sampler's batch-1 program 37 s
on an H200, compile and run), and a run that resumes after a crash, or is extended by more SF
iterations, paid all of it again. With the cache, XLA's compiled programs are written to disk
and a later process with the same program, backend, device kind, XLA flags and jaxlib loads
them instead (JAX's own cache key; a program that compiles in under a second, JAX's
``jax_persistent_cache_min_compile_time_secs``, is not written: the small host-side programs
would cost more file reads than they save). A program loaded from the cache is the one that would be
compiled, so the results are the same bit for bit; the tests run with the cache on.

Where (:func:`enable`):

- ``JAX_COMPILATION_CACHE_DIR`` (or ``jax_compilation_cache_dir`` set before): the user's own
  choice, kept as it is;
- else ``SFJAX_COMPILE_CACHE``: a directory, or ``off`` (``0``, ``false``, ``no``, ``none``)
  for none;
- else ``~/.cache/sfjax/jax_compile/<cpu>`` (``$XDG_CACHE_HOME`` when set).

``<cpu>`` names the host CPU (a hash of its model and instruction-set flags): XLA:CPU compiles
for the host's instruction sets, and JAX's cache key names only the backend ("cpu"), so a cache
shared by machines with different CPUs (a home directory on a cluster's network file system)
could hand an AVX-512 program to a CPU without it. JAX evicts nothing by default: the directory
grows with every new program (set ``JAX_COMPILATION_CACHE_MAX_SIZE`` in bytes, or delete it).

Shape legend: none (host-side setup).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "SFJAX_COMPILE_CACHE"
"""A directory for the cache, or one of :data:`OFF` (any case) to keep it off."""
OFF = ("off", "0", "false", "no", "none")


def cpu_fingerprint(cpuinfo: str | None = None) -> str:
    """12 hex digits naming the host CPU: its model name and instruction-set flags (the first
    processor of ``/proc/cpuinfo``; ``platform``'s words where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    wanted = ("model name", "flags", "features", "cpu part", "cpu implementer")
    lines = []
    for line in cpuinfo.splitlines():
        if not line.strip():
            if lines:
                break  # the first processor's block is enough
            continue
        name = line.split(":", 1)[0].strip().lower()
        if name in wanted:
            lines.append(line.strip())
    if not lines:
        import platform

        lines = [platform.machine(), platform.processor(), platform.platform()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


def default_dir(environ=None) -> Path:
    """``$XDG_CACHE_HOME/sfjax/jax_compile/<cpu>`` (``~/.cache`` without it)."""
    environ = os.environ if environ is None else environ
    root = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "sfjax" / "jax_compile" / cpu_fingerprint()


def enable(environ=None) -> Path | None:
    """Turn JAX's persistent compilation cache on (module docstring); the directory it uses,
    None when it is off (logged at DEBUG: an experiment's first lines stay its own). Never
    stops a run: a directory that cannot be made is a warning and the cache left off."""
    import jax

    environ = os.environ if environ is None else environ
    chosen = jax.config.jax_compilation_cache_dir
    if chosen:  # JAX_COMPILATION_CACHE_DIR or the caller's own config: theirs
        log.debug("XLA compilation cache: %s (JAX's compilation cache dir, as set)", chosen)
        return Path(chosen)
    setting = (environ.get(ENV) or "").strip()
    if setting.lower() in OFF:
        log.debug("XLA compilation cache: off (%s=%s)", ENV, setting)
        return None
    path = Path(os.path.expanduser(setting)) if setting else default_dir(environ)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("XLA compilation cache off: cannot make %s (%s); set %s to another "
                    "directory", path, e, ENV)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    log.debug("XLA compilation cache: %s (%s=off to turn it off)", path, ENV)
    return path
