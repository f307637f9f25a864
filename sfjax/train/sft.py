"""Supervised fine-tuning (behaviour cloning) of a whole Qwen3 on prompt/completion pairs.

Used to give the embedded default's small Actor a behavioural prior (:mod:`sfjax.agents.prior`):
it imitates a controller's decisions written in the Actor's own output format. The loss is the
mean token cross-entropy of the completion given the prompt,

    L(theta) = - (1 / sum_i |y_i|) * sum_i sum_t log pi_theta(y_{i,t} | x_i, y_{i,<t}),

over the micro-batch (prompt tokens are not scored; every parameter trains, no LoRA). Batches
are the KTO trainer's padded layout (:func:`sfjax.train.data.collate_step`: left-padded prompts,
right-padded completions, bucketed lengths), so the LM head runs only on completion positions
(:func:`sfjax.train.forward.sequence_logps`) and the step compiles once per bucket pair.

Shape legend: ``B`` rows, ``P`` / ``C`` bucketed prompt / completion length.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sfjax.configcheck import SEED_LIMIT, SEED_RANGE
from sfjax.train.data import KTOExample, collate_step, epoch_order, tokenize_examples
from sfjax.train.forward import sequence_logps


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning hyper-parameters."""

    learning_rate: float = 3e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay to 10 %)."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    steps: int = 300
    """Optimizer steps (examples are drawn in shuffled epochs)."""
    batch_size: int = 16
    """Examples per step."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    max_prompt_length: int = 512
    """Prompts keep their last this many tokens."""
    max_completion_length: int = 32
    """Completions keep their first this many tokens (EOS appended)."""
    prompt_buckets: tuple[int, ...] = (128, 192, 256, 384, 512)
    """Padded prompt lengths (one compilation each at most)."""
    completion_buckets: tuple[int, ...] = (16, 32)
    """Padded completion lengths."""
    seed: int = 0
    """Seed of the example order."""

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("SFTConfig.steps and batch_size must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError("SFTConfig.learning_rate must be > 0")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"SFTConfig.seed must be {SEED_RANGE}, got {self.seed}")


def sft_loss(model, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Mean completion-token NLL of a padded batch and the number of scored tokens."""
    logps_B = sequence_logps(model, batch["prompt_ids_BP"], batch["prompt_mask_BP"],
                             batch["completion_ids_BC"], batch["completion_mask_BC"])
    n_tokens = jnp.maximum(jnp.sum(batch["completion_mask_BC"]), 1)
    return -jnp.sum(logps_B) / n_tokens, n_tokens


def make_optimizer(cfg: SFTConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), max(cfg.steps, cfg.warmup_steps + 1),
        end_value=0.1 * cfg.learning_rate,
    )
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay))


@functools.lru_cache(maxsize=4)
def make_sft_step(graphdef, cfg: SFTConfig):
    """The jitted step ``(params, opt_state, rest, batch) -> (params, opt_state, loss)``;
    ``params`` and ``opt_state`` are donated. ``fn.trace_count`` grows once per compilation."""
    tx = make_optimizer(cfg)
    trace_count: list[int] = []

    def step(params, opt_state, rest, batch):
        trace_count.append(1)  # trace time only

        def loss_fn(p):
            return sft_loss(nnx.merge(graphdef, p, rest), batch)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    fn = jax.jit(step, donate_argnums=(0, 1))
    fn.trace_count = trace_count
    return fn


def _batch(tokenized, members, cfg: SFTConfig, pad_id: int) -> dict:
    b = collate_step(tokenized, [members], micro_batch_size=cfg.batch_size, grad_accum_steps=1,
                     prompt_buckets=cfg.prompt_buckets, completion_buckets=cfg.completion_buckets,
                     pad_token_id=pad_id, with_kl=False)
    return {"prompt_ids_BP": b.prompt_ids_ABP[0], "prompt_mask_BP": b.prompt_mask_ABP[0],
            "completion_ids_BC": b.completion_ids_ABC[0],
            "completion_mask_BC": b.completion_mask_ABC[0]}


def train_sft(model, tokenizer, pairs: Sequence[tuple[str, str]], cfg: SFTConfig,
              log_every: int = 0, log=print) -> list[float]:
    """Fine-tune ``model`` in place on ``(prompt, completion)`` text pairs; returns the loss of
    every step. Deterministic given the model, the pairs and ``cfg.seed``."""
    if not pairs:
        raise ValueError("train_sft: no examples")
    tokenized = tokenize_examples(
        [KTOExample(p, c, True) for p, c in pairs], tokenizer,
        max_prompt_length=cfg.max_prompt_length, max_completion_length=cfg.max_completion_length,
    )
    pad_id = int(tokenizer.pad_token_id)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    step = make_sft_step(graphdef, cfg)
    opt_state = make_optimizer(cfg).init(params)
    order, epoch, losses = np.zeros(0, np.int64), 0, []
    pending = None
    for _ in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order = np.concatenate([order, epoch_order(len(tokenized), cfg.seed + epoch)])
            epoch += 1
        members, order = order[: cfg.batch_size], order[cfg.batch_size :]
        params, opt_state, loss = step(params, opt_state, rest,
                                       _batch(tokenized, members, cfg, pad_id))
        if pending is not None:  # read one step late: the host never waits on the device
            losses.append(float(pending))
            if log_every and len(losses) % log_every == 0:
                log(f"sft step {len(losses)}/{cfg.steps}: loss {losses[-1]:.4f}")
        pending = loss
    losses.append(float(pending))
    nnx.update(model, params)
    return losses


__all__ = ["SFTConfig", "make_optimizer", "make_sft_step", "sft_loss", "train_sft"]
