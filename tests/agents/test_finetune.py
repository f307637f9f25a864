"""The loop's KTO step (KTOFineTuner): TensorBoard steps continue across KTO iterations."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sfjax.agents.finetune import KTOFineTuner
from sfjax.agents.rfr import KTOExample
from sfjax.models import lora, qwen3
from sfjax.tokenizer import load_tokenizer
from sfjax.train.kto import KTOConfig


class Recorder:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step=None, *args, **kwargs):
        self.scalars.append((tag, float(value), step))


def examples(n):
    return [
        KTOExample(f"state {i} queue {i * 3}", f"Action: {i % 7 + 1}", bool(i % 2), "base", 0, i)
        for i in range(n)
    ]


def test_tensorboard_steps_continue_from_the_loops_count(tiny_checkpoint):
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    tok = load_tokenizer(tiny_checkpoint)
    writer = Recorder()
    cfg = KTOConfig(micro_batch_size=2, epochs=1, progress=False, learning_rate=1e-3)
    ft = KTOFineTuner(model, tok, cfg, lora.LoRAConfig(rank=4), writer)
    m1 = ft.train(examples(6), jax.random.key(0), step_offset=0)
    assert m1["num_steps"] == 3
    offset = 3 + 5  # e.g. the loop counted steps of an earlier, restored run too
    m2 = ft.train(examples(4), jax.random.key(1), step_offset=offset)
    assert m2["num_steps"] == 2
    steps = [s for t, _, s in writer.scalars if t == "train/loss"]
    assert steps == [1, 2, 3, offset + 1, offset + 2]
    assert "global_step" not in m2 and "train/global_step" not in {t for t, _, _ in writer.scalars}


def test_a_dataset_smaller_than_a_micro_batch_still_trains(tiny_checkpoint):
    """3 examples with micro_batch_size 4: one (padded) KL-paired micro-batch, which the trainer
    handles; the fine-tuner skipped the whole KTO iteration instead (its size check asked for a
    full micro-batch), so a small RfR dataset silently taught nothing."""
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    tok = load_tokenizer(tiny_checkpoint)
    cfg = KTOConfig(micro_batch_size=4, epochs=1, progress=False, learning_rate=1e-2,
                    warmup_ratio=0.0)
    ft = KTOFineTuner(model, tok, cfg, lora.LoRAConfig(rank=4))
    before = jax.tree.map(jnp.copy, ft.arrays()["lora"])
    m = ft.train(examples(3), jax.random.key(0), step_offset=0)
    assert m["num_steps"] == 1 and "skipped_iteration" not in m
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, ft.arrays()["lora"])
    assert any(jax.tree.leaves(moved))
    # one example has no KL partner: still nothing to learn
    assert ft.train(examples(1), jax.random.key(1), step_offset=1)["skipped_iteration"] == 1.0
