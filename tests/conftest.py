"""Shared fixtures: tiny random Qwen3 checkpoints built locally (no network)."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from sfjax import testing  # noqa: E402


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
