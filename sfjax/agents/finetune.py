"""The loop's KTO step: :class:`sfjax.train.kto.KTOTrainer` on the Actor's LoRA weights, with
the state the loop checkpoints (adapters, optimizer state, counters) and TensorBoard steps
that keep increasing across KTO iterations.

Each KTO iteration of RfR (paper IV-C, Fig. 3) is one ``KTOTrainer.train`` call on that
iteration's dataset: a fresh AdamW state and learning-rate schedule per iteration, as the
paper's "six successive KTO fine-tuning iterations" on six datasets. In the SF loop the
reference policy is the base model with the adapters off (``benchmarks/kto_replay.py
--reference iterate`` sets ``trainer.reference_lora`` instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from sfjax.agents.rfr import KTOExample
from sfjax.models import lora as lora_lib
from sfjax.train.data import KTOExample as TrainExample
from sfjax.train.kto import KTOConfig, KTOTrainer, make_optimizer


class KTOFineTuner:
    """:class:`sfjax.agents.loop.FineTuner` over :class:`KTOTrainer`."""

    def __init__(self, model, tokenizer, kto_cfg: KTOConfig, lora_cfg: lora_lib.LoRAConfig,
                 writer=None):  # fmt: skip
        self.trainer = KTOTrainer(model, tokenizer, kto_cfg, lora_config=lora_cfg)
        self.writer = writer
        if self.trainer.opt_state is None:
            # Materialise the optimizer-state structure so checkpoints have a fixed layout.
            lora = nnx.state(model, nnx.LoRAParam)
            self.trainer.opt_state = make_optimizer(kto_cfg).init(lora)

    def train(self, examples: Sequence[KTOExample], key: jax.Array, step_offset: int) -> dict:
        """One KTO iteration; returns the mean of the logged metrics plus ``num_steps``.

        ``step_offset`` is the loop's count of KTO steps so far (checkpointed with the loop):
        the trainer's TensorBoard step continues from it, so the curves of successive
        iterations line up, resumed runs included."""
        data = [TrainExample(e.prompt, e.completion, e.desirable) for e in examples]
        n_d = sum(e.desirable for e in data)
        # A short micro-batch is padded (its filler rows masked); KTO's KL pairs need only a
        # second example in it, apo_zero_unpaired none.
        need = 2 if self.trainer.config.with_kl else 1
        if len(data) < need:
            # No KL partner for the one example: nothing to learn this iteration.
            return {"num_steps": 0, "skipped_iteration": 1.0}
        self.trainer.global_step = int(step_offset)
        history = self.trainer.train(data, key, self.writer)
        out: dict[str, float] = {"num_steps": float(self.trainer.step)}
        keys = {k for h in history for k in h} - {"step", "global_step", "epoch"}
        for k in sorted(keys):
            vals = [h[k] for h in history if k in h and np.isfinite(h[k])]
            if vals:
                out[k] = float(np.mean(vals))
        out["n_desirable"] = float(n_d)
        out["n_undesirable"] = float(len(data) - n_d)
        return out

    def arrays(self) -> Any:
        s = self.trainer.state_dict()
        return {
            "lora": s["lora"],
            "opt_state": s["opt_state"],
            "step": np.asarray(s["step"], np.int64),
            "skipped_steps": np.asarray(s["skipped_steps"], np.int64),
        }

    def load_arrays(self, arrays: Any) -> None:
        self.trainer.load_state_dict(
            {
                "lora": arrays["lora"],
                "opt_state": arrays["opt_state"],
                "step": int(arrays["step"]),
                "skipped_steps": int(arrays["skipped_steps"]),
            }
        )
