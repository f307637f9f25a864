"""``pip install -e .`` alone must be enough for every experiment's ``smoke`` preset.

The test imports every experiment script and every ``sfjax`` module (and renders a chat
prompt, whose jinja2 transformers imports lazily) in a subprocess that sees only the
distributions ``pyproject.toml``'s ``[project] dependencies`` pull in (transitively, per the
installed packages' own metadata): a site-packages view of symlinks without the rest. A
module of any other installed distribution (a test extra such as torch, an optional extra
such as rejax, an undeclared transitive import such as gymnax's ``six``) is then missing as
it would be after ``pip install -e .`` in a fresh venv.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
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


def clean_site_packages(dest: Path) -> Path:
    """A view of this venv's site-packages holding only the declared closure (symlinks)."""
    allowed = declared_closure()
    owners = metadata.packages_distributions()
    site = Path(sysconfig.get_paths()["purelib"])
    dest.mkdir()
    for entry in site.iterdir():
        name = entry.name
        if name.endswith((".dist-info", ".egg-info")):
            dist = name.rsplit("-", 1)[0] if name.count("-") else name.split(".")[0]
            keep = canonicalize_name(dist.split("-")[0]) in allowed
        else:
            top = name.split(".")[0]
            dists = owners.get(top) or owners.get(name)
            keep = dists is None or any(canonicalize_name(d) in allowed for d in dists)
        if keep and name != "__pycache__" and not name.startswith("__editable__"):
            (dest / name).symlink_to(entry)
    return dest


CHILD = """
import importlib, pkgutil, site, sys
site.addsitedir({site!r})
sys.path[:0] = [{root!r}, {experiments!r}]
import sfjax
for info in pkgutil.walk_packages(sfjax.__path__, "sfjax."):
    if not info.name.startswith({optional!r}) and not info.name.endswith("__main__"):
        importlib.import_module(info.name)
for name in ("sf_ranslicing", "reflexion_ranslicing", "rl_baselines", "rl_search", "table3"):
    importlib.import_module(name)
# libraries imported lazily on the smoke path: transformers' chat template needs jinja2
import tempfile
from sfjax.testing import write_tiny_checkpoint
from sfjax.tokenizer import chat_prompt, load_tokenizer
with tempfile.TemporaryDirectory() as d:
    tok = load_tokenizer(write_tiny_checkpoint(d, dtype="float32"))
    chat_prompt(tok, [{{"role": "user", "content": "hi"}}])
print("ok")
"""


def test_declared_dependencies_import_every_experiment(tmp_path):
    code = textwrap.dedent(
        CHILD.format(
            site=str(clean_site_packages(tmp_path / "site")),
            root=str(ROOT),
            experiments=str(ROOT / "experiments"),
            optional=OPTIONAL_MODULES,
        )
    )
    # -S: no site-packages but the clean view (as after `pip install -e .` in a fresh venv)
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
        timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_demo_installs_no_test_extras():
    makefile = (ROOT / "Makefile").read_text()
    demo_install = [ln for ln in makefile.splitlines() if "install" in ln and "-e" in ln]
    assert any("'.'" in ln or " -e . " in ln + " " for ln in demo_install), demo_install
    assert "demo: $(BASE_STAMP)" in makefile
