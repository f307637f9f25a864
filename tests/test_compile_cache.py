"""JAX's persistent compilation cache for the experiment CLIs (sfjax/compile_cache.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from sfjax import compile_cache

ROOT = Path(__file__).resolve().parents[1]

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Some CPU @ 2.00GHz
flags\t\t: fpu sse4_2 avx avx2 fma avx512f

processor\t: 1
model name\t: Some CPU @ 2.00GHz
flags\t\t: fpu sse4_2 avx avx2 fma
"""


def test_cpu_fingerprint_names_the_model_and_its_instruction_sets():
    fp = compile_cache.cpu_fingerprint(CPUINFO)
    assert len(fp) == 12 and int(fp, 16) >= 0
    assert compile_cache.cpu_fingerprint(CPUINFO) == fp
    # another processor number, speed-independent fields: the same CPU
    assert compile_cache.cpu_fingerprint(CPUINFO.replace("processor\t: 0", "processor\t: 3")) == fp
    # the first processor's block only; without AVX-512 it is another CPU, as is another model
    assert compile_cache.cpu_fingerprint(CPUINFO.replace(" avx512f\n", "\n", 1)) != fp
    assert compile_cache.cpu_fingerprint(CPUINFO.replace("Some CPU", "Other CPU", 1)) != fp
    arm = "processor\t: 0\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\nCPU part\t: 0xd40\n"
    assert compile_cache.cpu_fingerprint(arm) != compile_cache.cpu_fingerprint(
        arm.replace(" sve", ""))
    assert len(compile_cache.cpu_fingerprint("")) == 12  # no /proc/cpuinfo: platform's words


def test_default_dir_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    fp = compile_cache.cpu_fingerprint()
    assert compile_cache.default_dir({}) == tmp_path / "home" / ".cache/sfjax/jax_compile" / fp
    assert compile_cache.default_dir({"XDG_CACHE_HOME": str(tmp_path / "x")}) == \
        tmp_path / "x" / "sfjax" / "jax_compile" / fp  # fmt: skip


@pytest.fixture
def no_cache_dir():
    """JAX's cache dir unset for the test (the suite's own, set by conftest, restored after;
    JAX keeps using the cache it opened, whatever the option says)."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_enable_keeps_the_users_own_directory(tmp_path, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    ours = jax.config.jax_compilation_cache_dir  # the suite's (conftest)
    assert ours
    assert compile_cache.enable({compile_cache.ENV: str(tmp_path)}) == Path(ours)
    assert jax.config.jax_compilation_cache_dir == ours and not any(tmp_path.iterdir())
    assert f"XLA compilation cache: {ours}" in caplog.text


def test_enable_uses_the_variable_or_turns_off(tmp_path, no_cache_dir, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    for off in ("off", "0", "False"):
        assert compile_cache.enable({compile_cache.ENV: off}) is None
        assert jax.config.jax_compilation_cache_dir is None
    assert "XLA compilation cache: off (SFJAX_COMPILE_CACHE=off)" in caplog.text
    path = tmp_path / "a" / "b"
    assert compile_cache.enable({compile_cache.ENV: str(path)}) == path and path.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(path)


def test_enable_never_stops_a_run(tmp_path, no_cache_dir, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert compile_cache.enable({compile_cache.ENV: str(blocker / "cache")}) is None
    assert jax.config.jax_compilation_cache_dir is None
    assert "XLA compilation cache off: cannot make" in caplog.text


_PROBE = """
import json, sys
import jax, jax.numpy as jnp
from sfjax import compile_cache
events = []
jax.monitoring.register_event_listener(lambda e, **kw: events.append(e))
path = compile_cache.enable()
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
print(json.dumps({"dir": str(path), "value": float(f(jnp.ones((64, 64)))),
                  "hits": events.count("/jax/compilation_cache/cache_hits")}))
"""


def test_a_second_process_loads_the_first_ones_programs(tmp_path):
    """By default (no JAX variable set) the programs go to ~/.cache/sfjax/jax_compile/<cpu> and
    the next process loads them instead of compiling, with the same results."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION",
                                                                       "XDG_CACHE", "SFJAX_"))}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # small programs written too

    err = []

    def probe():
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                             text=True, timeout=300, check=True)  # fmt: skip
        err.append(out.stderr)
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = probe(), probe()
    where = tmp_path / ".cache" / "sfjax" / "jax_compile" / compile_cache.cpu_fingerprint()
    assert first["dir"] == second["dir"] == str(where) and any(where.iterdir())
    assert first["hits"] == 0 and second["hits"] >= 1
    assert first["value"] == second["value"]
    # entries cut short (a process killed while JAX wrote them): a warning, the program
    # compiled again, the same result (docs/CONFIG.md)
    for entry in where.iterdir():
        entry.write_bytes(entry.read_bytes()[:20])
    assert probe() == first
    assert "Error reading persistent compilation cache entry" in err[-1]
    env[compile_cache.ENV] = "off"
    assert probe() == {**first, "dir": "None"}


class _Stop(Exception):
    pass


@pytest.mark.parametrize("script", ["sf_ranslicing", "reflexion_ranslicing", "rl_baselines",
                                    "rl_search", "table3"])  # fmt: skip
def test_every_experiment_cli_turns_the_cache_on_first(script, tmp_path, monkeypatch):
    """Each experiment enables the cache right after logging is set up, before it builds or
    compiles anything (stopped there: nothing is written)."""
    from experiment_scripts import experiment

    mod = experiment(script)

    def stop():
        raise _Stop

    monkeypatch.setattr(mod.compile_cache, "enable", stop)
    with pytest.raises(_Stop):
        if script == "sf_ranslicing":
            mod.main(["smoke", "--run-dir", str(tmp_path / "run")])
        else:
            mod.main(mod.PRESETS["smoke"][1])
    assert not (tmp_path / "run").exists()
