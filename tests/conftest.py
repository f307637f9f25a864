"""Shared fixtures: tiny random Qwen3 checkpoints built locally (no network)."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _session_compilation_cache() -> None:
    """One persistent XLA compilation cache per test session, fresh each session.

    The suite compiles the same programs many times: in each pytest-xdist worker, in the
    subprocesses of the fault-injection, multi-host and 8-device tests, and in tests that
    rebuild identical jitted closures (the experiment runs). Set before JAX is imported, the
    directory is inherited by workers and subprocesses, so each program is compiled once and
    then loaded. Keys are the program, the devices and the flags, so nothing a test checks
    changes; starting empty, every program is still compiled (and can fail) in each session.
    Set JAX_COMPILATION_CACHE_DIR yourself to choose the directory.
    """
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="sfjax-test-jax-cache-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


_session_compilation_cache()

import pytest  # noqa: E402

from sfjax import testing  # noqa: E402


@pytest.fixture(autouse=True)
def _no_log_handler_outlives_its_test():
    """An experiment's ``main`` sets up logging (:func:`sfjax.console.configure_logging`): a
    root ``StreamHandler`` on the ``sys.stderr`` of that moment, which under ``capsys`` is the
    test's capture, closed when the test ends. Left in place, it makes every later test's log
    record print "--- Logging error ---" into that test's stderr. Drop it after the test."""
    yield
    import logging

    root = logging.getLogger()
    for handler in root.handlers[:]:
        if type(handler) is logging.StreamHandler:  # not pytest's own (subclasses)
            root.removeHandler(handler)


@pytest.fixture(autouse=True)
def _no_run_dir_lock_outlives_its_test():
    """An experiment run in the test's process locks its RUN_DIR (:mod:`sfjax.runlock`) until
    its ``run_cli`` returns; one called without it keeps the lock until the process ends.
    Release them after the test, so no lock holds a file open for the rest of the session."""
    yield
    from sfjax import runlock

    runlock.release()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Default tiny Qwen3 (tied head, GQA 2) with tokenizer, float32 weights."""
    return testing.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen3"), seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_untied(tmp_path_factory):
    """Tiny Qwen3 with a separate lm_head."""
    return testing.write_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny_qwen3_untied"),
        {"tie_word_embeddings": False},
        seed=1,
    )
