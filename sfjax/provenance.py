"""Where a run ran: the record each experiment CLI appends to its run dir's ``environment.json``.

A result is reproduced by its configuration *and* its environment: the same config gave Table
III's PPO row 4,693 on one machine and 5,228 on another (RESULTS, "Reproducibility across
machines"), and nothing in that run dir said what the first machine was. So every start of an
experiment (:func:`experiments.cli_common.prepare_run_dir`, after ``config.json``) appends one
record:

- the sfjax version and, in a git checkout, its commit and whether tracked files were modified
  (elsewhere the commit ``SFJAX_COMMIT`` gives, if set);
- Python and the versions of the packages that decide the numbers (JAX and its plugins, Flax,
  optax, rejax / distrax and its unpinned ``tfp-nightly``, transformers, ...);
- the CPU (model, usable cores, the vector extensions XLA:CPU compiles for), the JAX backend,
  its device kinds and process count;
- the environment variables that change compilation (``XLA_*``, ``JAX_*``, ``CUDA_VISIBLE_*``,
  ...), never one whose name says it holds a secret (``*KEY*``, ``*TOKEN*``, ...).

A resumed run appends another record, so a run continued on another machine says so.
:func:`differences` names what differs between two runs' records (``python -m
sfjax.baselines.compare`` prints it beside the paired rows; ``python -m sfjax.provenance
RUN_DIR [RUN_DIR_B]`` prints one run's records, or two runs' differences). Nothing here may
stop a run: a probe that fails is recorded as missing, a damaged ``environment.json`` is kept
aside under another name.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sfjax import atomic

FILE = "environment.json"
"""The record's name in a run dir."""
DESCRIPTION = "where it ran, per start: commit, package versions, CPU / devices, XLA flags"
"""What the file holds, in the experiments' closing list of artefacts."""

PACKAGES = (
    "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "rejax",
    "distrax", "tfp-nightly", "gymnax", "transformers", "tokenizers", "safetensors", "tyro",
    "openai",
)  # fmt: skip
"""Distributions whose version is recorded (those installed; sfjax's own is in ``sfjax``)."""
PLUGIN_PREFIXES = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")
"""Accelerator plugins of JAX, recorded whichever are installed."""
ENV_PREFIXES = ("XLA_", "JAX_", "CUDA_VISIBLE_", "NVIDIA_TF32", "TPU_", "LIBTPU_",
                "OMP_NUM_THREADS")  # fmt: skip
"""Environment variables that can change what XLA compiles or where it runs."""
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL", "AUTH")
"""A variable whose name contains one of these is never recorded, whatever its prefix."""
CPU_FEATURES = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni",
                "amx_bf16", "amx_tile", "asimd", "sve")  # fmt: skip
"""CPU flags (``/proc/cpuinfo``) recorded when present: the instruction sets XLA:CPU targets."""

log = logging.getLogger(__name__)


def _git(package_dir: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True,
                             text=True, timeout=10, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


COMMIT_VARIABLE = "SFJAX_COMMIT"
"""Where no git checkout says the commit (a wheel, a copy of the tree on a TPU VM or a lent
GPU), the commit given in this environment variable is recorded, marked as given."""


def source(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The sfjax version and, when it runs from a git checkout of this project, the commit and
    whether tracked files differ from it; elsewhere the commit :data:`COMMIT_VARIABLE` gives
    (``commit_from``), else ``None``."""
    environ = os.environ if environ is None else environ
    package_dir = Path(__file__).resolve().parent
    out: dict[str, Any] = {"version": _version("sfjax"), "commit": None, "modified": None}
    top = _git(package_dir, "rev-parse", "--show-toplevel")
    # only this project's own checkout: a venv inside some other repository is not it
    if top and (Path(top).resolve() / "sfjax") == package_dir:
        out["commit"] = _git(package_dir, "rev-parse", "HEAD")
        status = _git(package_dir, "status", "--porcelain", "--untracked-files=no")
        out["modified"] = None if status is None else bool(status)
    if out["commit"] is None and environ.get(COMMIT_VARIABLE):
        out["commit"], out["commit_from"] = environ[COMMIT_VARIABLE].strip(), COMMIT_VARIABLE
    return out


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def packages() -> dict[str, str]:
    """Installed versions of :data:`PACKAGES` and of any JAX accelerator plugin."""
    out = {n: v for n in PACKAGES if (v := _version(n)) is not None}
    for dist in importlib.metadata.distributions():
        name = dist.metadata.get("Name") or ""
        if name.lower().startswith(PLUGIN_PREFIXES):
            out[name] = dist.version
    return dict(sorted(out.items()))


def cpu(cpuinfo: str | None = None) -> dict[str, Any]:
    """CPU model, core counts and :data:`CPU_FEATURES` present (``cpuinfo``: the text of
    ``/proc/cpuinfo``, read when not given; elsewhere only ``platform``'s words)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return {
        "model": fields.get("model name") or platform.processor() or None,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "features": [f for f in CPU_FEATURES if f in flags],
    }


def accelerator() -> dict[str, Any]:
    """JAX's backend, its device kinds with their counts, and the process count."""
    try:
        import jax

        kinds: dict[str, int] = {}
        for d in jax.devices():
            kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
        return {"backend": jax.default_backend(), "devices": kinds,
                "process_count": jax.process_count()}  # fmt: skip
    except Exception as e:  # noqa: BLE001 -- a backend that fails to start is recorded, not raised
        return {"backend": None, "error": f"{type(e).__name__}: {e}"}


def environment_variables(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The :data:`ENV_PREFIXES` variables set, less any whose name holds a :data:`SECRET_WORDS`."""
    environ = os.environ if environ is None else environ
    return {
        k: environ[k] for k in sorted(environ)
        if k.startswith(ENV_PREFIXES) and not any(w in k.upper() for w in SECRET_WORDS)
    }  # fmt: skip


def environment() -> dict[str, Any]:
    """One record of where this process runs (the module docstring lists what it holds)."""
    return {
        "recorded_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "sfjax": source(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": packages(),
        "cpu": cpu(),
        "jax": accelerator(),
        "env": environment_variables(),
    }


def read(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run dir, oldest first ([] when it has none: a run from before they
    were written). A damaged file raises :class:`sfjax.atomic.DamagedFile`."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return []
    data = atomic.read_json(path, "the run's environment record")
    starts = data.get("starts") if isinstance(data, dict) else None
    if not isinstance(starts, list) or not all(isinstance(s, dict) for s in starts):
        raise atomic.DamagedFile(f"the run's environment record {path} is damaged (no list "
                                 "of 'starts')")  # fmt: skip
    return starts


def record_start(run_dir: str | os.PathLike,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any] | None:  # fmt: skip
    """Append this process's :func:`environment` (with ``extra``'s items) to ``run_dir``'s
    ``environment.json`` and return it. Never raises: a damaged file is moved aside
    (``environment.json.damaged``) and a new one begun; a failed write is a warning (the run
    goes on without its record)."""
    path = Path(run_dir) / FILE
    try:
        record = {**environment(), **(extra or {})}
        try:
            starts = read(run_dir)
        except atomic.DamagedFile as e:
            aside = path.with_name(FILE + ".damaged")
            os.replace(path, aside)
            log.warning("%s; kept as %s, a new record begun", e, aside.name)
            starts = []
        atomic.write_json(path, {"starts": [*starts, record]}, indent=2)
        return record
    except Exception as e:  # noqa: BLE001 -- the record is auxiliary: never stop the run for it
        log.warning("could not record where this run runs in %s (%s: %s)", path,
                    type(e).__name__, e)  # fmt: skip
        return None


def fingerprint(record: dict[str, Any]) -> dict[str, str]:
    """What in a record can change a run's numbers, one readable string per item (the time,
    the platform string and the core counts are left out)."""
    src = record.get("sfjax") or {}
    commit = src.get("commit")
    given = f" (from {src['commit_from']})" if src.get("commit_from") else ""
    out = {"sfjax": (commit[:10] if commit else f"version {src.get('version')} (no commit)")
                    + (" (modified)" if src.get("modified") else "") + given}  # fmt: skip
    out["python"] = str(record.get("python"))
    out.update((name, str(v)) for name, v in (record.get("packages") or {}).items())
    c = record.get("cpu") or {}
    out["CPU"] = f"{c.get('model')} [{' '.join(c.get('features') or [])}]"
    j = record.get("jax") or {}
    devices = ", ".join(f"{n} x {k}" for k, n in (j.get("devices") or {}).items())
    out["devices"] = f"{j.get('backend')} ({devices})" if devices else str(j.get("backend"))
    out.update((k, str(v)) for k, v in (record.get("env") or {}).items())
    return out


def _merged(records: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Each item's values over a run's starts, in order, ' then '-joined where they changed."""
    out: dict[str, list[str]] = {}
    for rec in records:
        for k, v in fingerprint(rec).items():
            vals = out.setdefault(k, [])
            if v not in vals:
                vals.append(v)
    return {k: " then ".join(v) for k, v in out.items()}


def differences(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> list[str]:
    """The items of two runs' records (each a list of starts) that differ, as
    ``"jax: 0.10.1 (A) vs 0.10.2 (B)"``; an item one side lacks reads ``absent``."""
    fa, fb = _merged(a), _merged(b)
    return [
        f"{k}: {fa.get(k, 'absent')} (A) vs {fb.get(k, 'absent')} (B)"
        for k in [*fa, *(k for k in fb if k not in fa)]
        if fa.get(k) != fb.get(k)
    ]


def describe(records: Sequence[dict[str, Any]]) -> str:
    """One line: the sfjax commit, JAX, the CPU and devices of a run's starts."""
    f = _merged(records)
    return ", ".join(f"{k} {f[k]}" for k in ("sfjax", "jax", "CPU", "devices") if k in f)


def describe_run(run_dir: str | os.PathLike) -> str:
    """:func:`describe` of a run dir's records; "" when it has none or they are damaged."""
    try:
        return describe(read(run_dir))
    except atomic.DamagedFile:
        return ""



def main(argv: Sequence[str] | None = None) -> None:
    """``python -m sfjax.provenance RUN_DIR [RUN_DIR_B]``: where a run ran, start by start, or
    what differs between two runs' environments (any run dirs: SF runs too)."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m sfjax.provenance",
        description="Where a run ran (its environment.json), or what differs between two runs'.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="one run dir, or two to compare")
    args = p.parse_args(argv)
    if len(args.run_dirs) > 2:
        p.error("give one run dir, or two to compare")
    try:
        records = [read(d) for d in args.run_dirs]
    except atomic.DamagedFile as e:
        p.error(str(e))
    for d, recs in zip(args.run_dirs, records):
        if not recs:
            p.error(f"{d} has no {FILE} (not a run dir, or one from before runs recorded it)")
    if len(records) == 1:
        for k, rec in enumerate(records[0]):
            print(f"start {k + 1} ({rec.get('recorded_at')}):")
            print("\n".join(f"  {name}: {v}" for name, v in fingerprint(rec).items()))
        return
    diffs = differences(*records)
    print(f"A = {args.run_dirs[0]}\nB = {args.run_dirs[1]}")
    print("\n".join(diffs) if diffs else f"same environment: {describe(records[0])}")


if __name__ == "__main__":
    main()
