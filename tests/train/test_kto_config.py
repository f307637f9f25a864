"""KTOConfig refuses values that would train on nonsense (gradient ascent, a zero-scaled reward,
a flipped objective) or fail deep inside a run, at construction: the CLIs show the message
before anything runs."""

from __future__ import annotations

import pytest

from sfjax.train.kto_config import KTOConfig


@pytest.mark.parametrize("field, value, message", [
    ("beta", 0.0, "beta must be a finite value > 0"),
    ("learning_rate", -1.0, "learning_rate must be a finite value > 0"),
    ("adam_eps", 0.0, "adam_eps must be a finite value > 0"),
    ("max_grad_norm", -1.0, "max_grad_norm must be None or a finite value > 0"),
    ("class_weight_ratio", 0.0, r"class_weight_ratio must be in \[1, 4/3\]"),
    ("class_weight_ratio", 1.5, r"class_weight_ratio must be in \[1, 4/3\]"),
    ("adam_b1", 2.0, r"adam_b1 must be in \[0, 1\)"),
    ("adam_b2", 1.0, r"adam_b2 must be in \[0, 1\)"),
    ("weight_decay", -0.1, "weight_decay must be a finite value >= 0"),
    ("warmup_steps", -5, "warmup_steps must be None or >= 0"),
    ("max_prompt_length", 0, "max_prompt_length and max_completion_length must be >= 1"),
    ("max_completion_length", 0, "max_prompt_length and max_completion_length must be >= 1"),
])  # fmt: skip
def test_bad_values_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        KTOConfig(**{field: value})


def test_class_weights_must_both_be_positive():
    with pytest.raises(ValueError, match="desirable_weight must be None or a finite value > 0"):
        KTOConfig(desirable_weight=-1.0, undesirable_weight=1.0)
    with pytest.raises(ValueError, match="undesirable_weight must be None or a finite value > 0"):
        KTOConfig(desirable_weight=1.0, undesirable_weight=0.0)


def test_edges_that_are_allowed():
    KTOConfig(max_grad_norm=None, warmup_steps=0, class_weight_ratio=4 / 3, adam_b1=0.0,
              desirable_weight=1.0, undesirable_weight=1.33)  # fmt: skip
