"""Locate and (re)build the ns-3 scenario ``ns3/ran_slicing.cc``, and write its input files.

The scenario compiles with g++ against the system ns-3 (Debian/Ubuntu ``libns3-dev``, 3.37);
``ns3/build.sh`` does the work and reports missing packages by name. The binary is cached in
``ns3/build/`` (git-ignored) and rebuilt when a source is newer. Concurrent callers (parallel
test workers, several envs) serialise on a lock file so the binary is built once.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

import numpy as np

from sfjax.envs.ns3gym.bridge import Ns3Error

SOURCES = ("ran_slicing.cc", "messages.proto", "build.sh")


class Ns3BuildError(Ns3Error):
    """The ns-3 scenario could not be built (missing packages or a compiler error)."""


def ns3_dir() -> Path:
    """The ``ns3/`` folder with the scenario sources ($SFJAX_NS3_DIR overrides)."""
    env = os.environ.get("SFJAX_NS3_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[3] / "ns3"
    if not (path / "ran_slicing.cc").is_file():
        raise Ns3BuildError(
            f"The ns-3 scenario sources are not at {path}. Run from a checkout of sfjax (pip "
            "install -e .) or point SFJAX_NS3_DIR at its ns3/ folder."
        )
    return path


def build_dir() -> Path:
    """Where the binary, generated code and traces go ($SFJAX_NS3_BUILD_DIR overrides)."""
    env = os.environ.get("SFJAX_NS3_BUILD_DIR")
    return Path(env) if env else ns3_dir() / "build"


def binary_path() -> Path:
    return build_dir() / "ran_slicing"


def _stale(binary: Path, src: Path) -> bool:
    if not binary.exists():
        return True
    built = binary.stat().st_mtime
    return any((src / name).stat().st_mtime > built for name in SOURCES)


def ensure_built(force: bool = False, timeout_s: float = 900.0) -> Path:
    """Return the scenario binary, building it first when missing or out of date."""
    src = ns3_dir()
    out = build_dir()
    binary = out / "ran_slicing"
    if not force and not _stale(binary, src):
        return binary
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not force and not _stale(binary, src):
                return binary  # another process built it while we waited
            env = dict(os.environ, NS3_BUILD_DIR=str(out))
            proc = subprocess.run(
                ["bash", str(src / "build.sh")],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        if proc.returncode == 3:
            raise Ns3BuildError(
                "ns-3 development packages are missing, so the ns-3 scenario cannot be built.\n"
                f"{tail}\nOn Debian/Ubuntu: make ns3-deps (or the apt-get line above)."
            )
        raise Ns3BuildError(f"Building the ns-3 scenario failed (exit {proc.returncode}):\n{tail}")
    return binary


def write_drop_file(path: Path, x_m, y_m, los, shadowing_db) -> None:
    """One UE per line: ``x_m y_m los(0/1) shadowing_dB`` (the scenario's ``--dropFile``)."""
    rows = np.stack(
        [np.asarray(x_m, float), np.asarray(y_m, float), np.asarray(los, float),
         np.asarray(shadowing_db, float)],
        axis=1,
    )
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    np.savetxt(tmp, rows, fmt="%.6f")
    os.replace(tmp, path)
