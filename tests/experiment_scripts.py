"""Import a script of ``experiments/`` (or ``benchmarks/``) as a module (they are scripts, not a
package), once per process: ``experiment("sf_ranslicing")``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
BENCHMARKS = EXPERIMENTS.parent / "benchmarks"


def experiment(name: str, folder: Path = EXPERIMENTS):
    """The module of ``experiments/<name>.py`` (cached in ``sys.modules`` under ``name``);
    ``folder=BENCHMARKS`` for a script of ``benchmarks/``."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def refused(cli, capsys, *args) -> str:
    """``cli(*args)`` must exit with status 2 (a user's mistake); returns what it printed to
    stderr."""
    import pytest

    with pytest.raises(SystemExit) as e:
        cli(*args)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    return err
