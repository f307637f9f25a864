"""Progress lines reach stderr after ``import orbax.checkpoint`` and ``--log-level`` works."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sfjax.console import (
    artefact_lines,
    configure_logging,
    fmt_change,
    progress_bar,
    tensorboard_hint,
)

ROOT = Path(__file__).resolve().parents[1]

# sf_ranslicing.main with its run() replaced by one progress line of the loop's logger: what
# the user sees is decided by main()'s logging set-up alone.
CHILD = """
import logging, sys
import orbax.checkpoint  # installs a root handler at WARNING (through absl)
sys.path.insert(0, {experiments!r})
import sf_ranslicing
sf_ranslicing.run = lambda cfg, **kw: logging.getLogger("sfjax.agents.loop").info("PROGRESS-LINE")
sf_ranslicing.main(["smoke", "--run-dir", {run_dir!r}] + {extra!r})
"""


def _stderr_of_main(tmp_path, extra):
    code = textwrap.dedent(
        CHILD.format(experiments=str(ROOT / "experiments"), run_dir=str(tmp_path), extra=extra)
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


def test_progress_lines_show_after_orbax_import(tmp_path):
    assert "PROGRESS-LINE" in _stderr_of_main(tmp_path, [])


def test_log_level_option_is_honoured(tmp_path):
    assert "PROGRESS-LINE" not in _stderr_of_main(tmp_path, ["--log-level", "WARNING"])


def test_configure_logging_replaces_existing_root_handler(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logging.basicConfig(level=logging.WARNING, force=True)
        assert configure_logging("debug") == logging.DEBUG
        logging.getLogger("sfjax.test").debug("a debug line")
        assert "a debug line" in capsys.readouterr().err
        assert logging.getLogger("absl").level == logging.WARNING
        with pytest.raises(ValueError, match="unknown log level"):
            configure_logging("LOUD")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


@pytest.mark.parametrize("process", [0, 1])
def test_processes_other_than_0_log_warnings_only(capsys, monkeypatch, process):
    """A multi-process run logs its progress once, on process 0 (every host printed it)."""
    import jax

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_index", lambda: process)
    try:
        assert configure_logging("INFO") == logging.INFO
        logging.getLogger("sfjax.test").info("a progress line")
        logging.getLogger("sfjax.test").warning("a warning")
        err = capsys.readouterr().err
        assert ("a progress line" in err) == (process == 0) and "a warning" in err
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_http_request_lines_stay_out_of_the_log(capsys, monkeypatch):
    """openai 3 logs every HTTP request at INFO through httpx2, not httpx: the paper preset's
    log had two "HTTP Request: POST ..." lines per Reflector request (its client's and the
    deadline transport's inner client's) although QUIET_LOGGERS was meant to keep them out."""
    from fake_openai import FakeOpenAI  # tests/fake_openai.py

    from sfjax.agents.prompts import PromptConfig
    from sfjax.agents.reflector import ApiReflectorConfig, ReflectorConfig, make_reflector

    monkeypatch.setenv("SFJAX_TEST_CONSOLE_KEY", "EMPTY")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO")
        with FakeOpenAI() as server:
            api = ApiReflectorConfig(base_url=server.url, model="fake-r1",
                                     api_key_env="SFJAX_TEST_CONSOLE_KEY")  # fmt: skip
            reflector = make_reflector(ReflectorConfig(backend="api", api=api), PromptConfig(),
                                       None, progress=False)  # fmt: skip
            assert reflector.complete([{"role": "system", "content": "s"},
                                     {"role": "user", "content": "hi"}])
            assert len(server.bodies) == 1
        err = capsys.readouterr().err
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert "HTTP Request" not in err, err


def test_summary_helpers(tmp_path):
    (tmp_path / "tb").mkdir()
    lines = artefact_lines([(tmp_path / "tb", "TensorBoard"), (tmp_path / "missing", "x")])
    assert len(lines) == 1 and lines[0].strip().endswith("TensorBoard")
    assert tensorboard_hint(tmp_path / "a b").startswith(f"tensorboard --logdir '{tmp_path}/a b'")
    assert fmt_change(1.0, 3.5, "bit/s/Hz") == "1.0 -> 3.5 bit/s/Hz (+2.5)"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize(
    "stderr,kw,shown",
    [
        (_Terminal, {}, True),  # the collect / reflect bars on a terminal
        (io.StringIO, {}, False),  # ... in a log file or CI
        (_Terminal, {"enabled": False}, False),  # progress off, or off process 0
        (io.StringIO, {"terminal_only": False}, True),  # the KTO bar, in a log too
        (_Terminal, {"terminal_only": False, "enabled": False}, False),
    ],
)
def test_progress_bar_shows_on_a_terminal_unless_told(monkeypatch, stderr, kw, shown):
    stream = stderr()
    monkeypatch.setattr(sys, "stderr", stream)
    bar = progress_bar(3, "KTO", unit="step", initial=1, **kw)
    assert bool(bar.disable) == (not shown)  # before close(), which sets it
    bar.update(2)
    bar.close()
    assert ("KTO:  33%" in stream.getvalue()) == shown  # drawn from initial=1
    if shown:
        assert "step/s" in stream.getvalue() and not bar.leave
