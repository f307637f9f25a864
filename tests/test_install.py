"""``pip install -e .`` alone must be enough for every experiment's ``smoke`` preset.

The test imports every experiment script and every ``sfjax`` module the experiments reach in
a subprocess where only the distributions that ``pyproject.toml``'s ``[project]
dependencies`` pull in (transitively, per the installed packages' own metadata) are
importable: a module that belongs to any other installed distribution (a test extra such as
torch, an optional extra such as rejax, or an undeclared transitive import such as gymnax's
``six``) raises ``ModuleNotFoundError`` as it would in a clean ``pip install -e .``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# Modules that a smoke run never imports: the ns-3 bridge (``ns3`` extra) and the test helpers.
OPTIONAL_MODULES = ("sfjax.envs.ns3", "sfjax.envs.ns3gym", "sfjax.envs.gymnasium_env")


def declared_closure() -> set[str]:
    """Canonical names of the distributions ``pip install -e .`` installs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [Requirement(r) for r in requires]
    return seen


def blocked_modules() -> list[str]:
    """Top-level import names of installed distributions outside the declared closure."""
    allowed = declared_closure() | {"sfjax", "pip", "setuptools", "wheel"}
    blocked = set()
    for module, dists in metadata.packages_distributions().items():
        if not any(canonicalize_name(d) in allowed for d in dists):
            blocked.add(module)
    return sorted(blocked - {"sfjax", "_distutils_hack", "__editable__"})


CHILD = """
import importlib, pkgutil, sys
BLOCKED = set({blocked!r})

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not a declared dependency)",
                                      name=name)
        return None

sys.meta_path.insert(0, Block())
sys.path.insert(0, {experiments!r})
import sfjax
for info in pkgutil.walk_packages(sfjax.__path__, "sfjax."):
    if not info.name.startswith({optional!r}) and not info.name.endswith("__main__"):
        importlib.import_module(info.name)
for name in ("sf_ranslicing", "reflexion_ranslicing", "rl_baselines", "table3"):
    importlib.import_module(name)
print("ok")
"""


def test_declared_dependencies_import_every_experiment():
    code = textwrap.dedent(
        CHILD.format(
            blocked=blocked_modules(),
            experiments=str(ROOT / "experiments"),
            optional=OPTIONAL_MODULES,
        )
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_demo_installs_no_test_extras():
    makefile = (ROOT / "Makefile").read_text()
    demo_install = [ln for ln in makefile.splitlines() if "install" in ln and "-e" in ln]
    assert any("'.'" in ln or " -e . " in ln + " " for ln in demo_install), demo_install
    assert "demo: $(BASE_STAMP)" in makefile
