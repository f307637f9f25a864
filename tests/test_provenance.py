"""sfjax.provenance: what a run records of where it ran, that it appends per start, keeps no
secret, survives a damaged file, and names the differences between two runs."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from sfjax import provenance

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 sha_ni

processor\t: 1
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 sha_ni
"""


def test_the_record_holds_versions_cpu_and_backend():
    rec = provenance.environment()
    assert rec["packages"]["jax"] == importlib.metadata.version("jax")
    assert rec["packages"]["rejax"] == importlib.metadata.version("rejax")
    assert rec["sfjax"]["version"] == importlib.metadata.version("sfjax")
    assert rec["jax"]["backend"] == "cpu" and sum(rec["jax"]["devices"].values()) >= 1
    assert rec["cpu"]["cores"] >= 1
    json.dumps(rec)  # every value is JSON


def test_cpu_model_and_only_the_listed_features_are_read():
    c = provenance.cpu(CPUINFO)
    assert c["model"] == "AMD EPYC 9654 96-Core Processor"
    assert c["features"] == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16"]


def test_compilation_variables_are_kept_and_secrets_never():
    environ = {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2", "JAX_ENABLE_X64": "1",
               "CUDA_VISIBLE_DEVICES": "0", "JAX_API_KEY": "sk-1", "XLA_AUTH_TOKEN": "t",
               "DEEPSEEK_API_KEY": "sk-2", "HOME": "/root", "TF_CLI_CONFIG_FILE": "x"}
    assert provenance.environment_variables(environ) == {
        "CUDA_VISIBLE_DEVICES": "0", "JAX_ENABLE_X64": "1", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}


def test_each_start_is_appended_and_no_secret_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_API_KEY", "sk-never-in-a-file")
    monkeypatch.setenv("JAX_PLATFORM_SECRET", "sk-never-either")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
    first = provenance.record_start(tmp_path)
    provenance.record_start(tmp_path)
    starts = provenance.read(tmp_path)
    assert len(starts) == 2 and starts[0] == first
    assert starts[1]["env"]["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=true"
    text = (tmp_path / provenance.FILE).read_text()
    assert "sk-never" not in text


def test_a_damaged_record_is_kept_aside_and_a_new_one_begun(tmp_path, caplog):
    (tmp_path / provenance.FILE).write_text('{"starts": [{"python": "3.1')
    with caplog.at_level(logging.WARNING, logger="sfjax.provenance"):
        assert provenance.record_start(tmp_path) is not None
    assert len(provenance.read(tmp_path)) == 1
    assert (tmp_path / (provenance.FILE + ".damaged")).read_text().startswith('{"starts"')
    assert "is damaged" in caplog.text and "environment.json.damaged" in caplog.text
    (tmp_path / provenance.FILE).write_text('{"starts": 3}')
    with pytest.raises(provenance.atomic.DamagedFile, match="no list of 'starts'"):
        provenance.read(tmp_path)


def test_a_failing_probe_never_stops_the_run(tmp_path, monkeypatch, caplog):
    def broken():
        raise RuntimeError("no /proc here")

    monkeypatch.setattr(provenance, "environment", broken)
    with caplog.at_level(logging.WARNING, logger="sfjax.provenance"):
        assert provenance.record_start(tmp_path) is None
    assert "could not record where this run runs" in caplog.text and "no /proc" in caplog.text
    assert not (tmp_path / provenance.FILE).exists()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_commit_is_this_checkouts_and_none_outside_one(monkeypatch):
    root = Path(provenance.__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                          text=True)  # fmt: skip
    if head.returncode != 0:
        pytest.skip("sfjax does not run from a git checkout here")
    src = provenance.source()
    assert src["commit"] == head.stdout.strip() and isinstance(src["modified"], bool)
    # a checkout that is not this project's (sfjax installed in a venv inside another repo)
    monkeypatch.setattr(provenance, "_git", lambda d, *a: "/some/other/repo")
    assert provenance.source({})["commit"] is None


def test_without_a_checkout_the_given_commit_is_recorded_as_given(monkeypatch):
    monkeypatch.setattr(provenance, "_git", lambda d, *a: None)  # no git, or no .git
    assert provenance.source({})["commit"] is None
    src = provenance.source({"SFJAX_COMMIT": " 194a70f\n"})
    assert src["commit"] == "194a70f" and src["commit_from"] == "SFJAX_COMMIT"
    assert provenance.fingerprint({"sfjax": src})["sfjax"] == "194a70f (from SFJAX_COMMIT)"


def _record(jax="0.10.2", cpu="AMD EPYC", features=("avx2", "avx512f"), xla=None):
    return {"sfjax": {"version": "0.1.0", "commit": "97035bc4ae6376d3", "modified": False},
            "python": "3.11.7", "packages": {"jax": jax, "rejax": "0.1.3"},
            "cpu": {"model": cpu, "features": list(features)},
            "jax": {"backend": "cpu", "devices": {"cpu": 1}},
            "env": {"XLA_FLAGS": xla} if xla else {}}  # fmt: skip


def test_differences_name_what_differs_and_nothing_else():
    a, b = [_record()], [_record(jax="0.10.1", features=("avx2",), xla="--x")]
    assert provenance.differences(a, a) == []
    assert provenance.differences(a, b) == [
        "jax: 0.10.2 (A) vs 0.10.1 (B)",
        "CPU: AMD EPYC [avx2 avx512f] (A) vs AMD EPYC [avx2] (B)",
        "XLA_FLAGS: absent (A) vs --x (B)",
    ]
    # a run resumed on another machine shows both
    assert provenance.differences(a, [_record(), _record(cpu="Intel Xeon")]) == [
        "CPU: AMD EPYC [avx2 avx512f] (A) vs AMD EPYC [avx2 avx512f] then Intel Xeon "
        "[avx2 avx512f] (B)"]
    assert provenance.describe_run("/nonexistent") == ""
    assert provenance.describe(a) == ("sfjax 97035bc4ae, jax 0.10.2, CPU AMD EPYC [avx2 "
                                      "avx512f], devices cpu (1 x cpu)")


def test_cli_prints_a_runs_starts_and_two_runs_differences(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, recs in ((a, [_record()]), (b, [_record(), _record(jax="0.10.1")])):
        d.mkdir()
        (d / provenance.FILE).write_text(json.dumps({"starts": recs}))
    provenance.main([str(b)])
    out = capsys.readouterr().out
    assert out.count("start ") == 2 and "  jax: 0.10.1" in out
    provenance.main([str(a), str(a)])
    assert "same environment: sfjax 97035bc4ae" in capsys.readouterr().out
    provenance.main([str(a), str(b)])
    assert "jax: 0.10.2 (A) vs 0.10.2 then 0.10.1 (B)" in capsys.readouterr().out
    for bad, says in (([str(tmp_path)], "has no environment.json"),
                      ([str(a), str(a), str(b)], "one run dir, or two")):
        with pytest.raises(SystemExit) as e:
            provenance.main(bad)
        assert e.value.code == 2 and says in capsys.readouterr().err
