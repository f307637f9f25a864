"""KTO fine-tuning of a Qwen3's LoRA adapters: one jitted, donated train step (paper §IV-C).

Refine-from-Reflection fine-tunes the Actor with KTO (paper eq. 8–13) on its LoRA weights; the
reference policy πref is the same model with the adapters switched off
(:func:`sfjax.models.lora.adapters_disabled`), so the base weights exist once and never change.

One optimizer step = one call of a jitted function (donating the LoRA params and the optimizer
state) that scans over ``grad_accum_steps`` micro-batches; per micro-batch it runs

1. the reference forward (adapters off) on the matched and the KL (mismatched) rows,
2. the policy forward on the KL rows without gradient (``z`` is stop-gradient),
3. the policy forward + backward on the matched rows, :func:`sfjax.losses.kto.kto_loss`,

(prompts left-padded, completions right-padded, so the LM head runs only on the completion
positions: :func:`sequence_logps`), then clips the accumulated gradient by global norm, applies AdamW with warmup and a linear /
cosine / constant schedule, and keeps the old params and optimizer state if the gradient or
loss is not finite (counted in ``skipped_steps``). Log-probs are summed over completion tokens
only, in float32. Metrics are fetched one step late so the host never stalls the device, and
written to TensorBoard under TRL's tag names (``train/loss``, ``train/rewards/chosen``,
``train/kl`` …).

Usage::

    trainer = KTOTrainer(model, tokenizer, KTOConfig(epochs=2), lora_config=LoRAConfig(rank=16))
    history = trainer.train([KTOExample(prompt, completion, desirable), ...], key, writer=logdir)
    # `model` now holds the trained adapters (updated in place); save them for PEFT with
    # lora.save_adapter(model, out_dir, trainer.lora_config)

Shape legend: ``A`` micro-batches per step, ``B`` micro-batch size, ``P`` / ``C`` bucketed
prompt / completion length, ``T = P + C``, ``D`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sfjax.losses.kto import LOSS_TYPES, kto_class_weights, kto_loss, target_logps
from sfjax.models import lora as lora_lib
from sfjax.train.data import (
    Batch,
    KTOExample,
    TokenizedExample,
    collate_step,
    default_buckets,
    epoch_order,
    plan_steps,
    tokenize_examples,
)


@dataclass(frozen=True)
class KTOConfig:
    """KTO training hyper-parameters (defaults follow TRL's KTOConfig / HF Trainer, LoRA lr)."""

    beta: float = 0.1
    """β: scale of the implied reward r = log πθ/πref inside the sigmoid (paper eq. 9–11)."""
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    """"kto" (with the KL reference point z) or "apo_zero_unpaired" (no z, no KL rows)."""
    desirable_weight: float | None = None
    """λD; None (with undesirable_weight None) = from the class counts (paper eq. 12–13)."""
    undesirable_weight: float | None = None
    """λU; None (with desirable_weight None) = from the class counts (paper eq. 12–13)."""
    class_weight_ratio: float = 1.0
    """Target λD·nD/(λU·nU) in [1, 4/3] when the weights come from the counts."""
    learning_rate: float = 5e-5
    """Peak AdamW learning rate (for LoRA params)."""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup: linear to 0, cosine to 0, or constant."""
    warmup_ratio: float = 0.1
    """Fraction of the optimizer steps of a train() call spent warming up linearly from 0."""
    warmup_steps: int | None = None
    """Warmup steps; overrides warmup_ratio when set."""
    weight_decay: float = 0.0
    """Decoupled AdamW weight decay on the LoRA params."""
    adam_b1: float = 0.9
    """AdamW β1."""
    adam_b2: float = 0.999
    """AdamW β2."""
    adam_eps: float = 1e-8
    """AdamW ε."""
    max_grad_norm: float | None = 1.0
    """Clip the accumulated gradient to this global norm (None: no clipping)."""
    micro_batch_size: int = 4
    """Examples per forward pass; >= 2 for loss_type "kto" (KL pairs come from the batch)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    epochs: int = 1
    """Passes over the dataset per train() call."""
    shuffle: bool = True
    """Shuffle the examples every epoch (deterministically from the train() key)."""
    max_prompt_length: int = 1024
    """Prompts keep their last this-many tokens."""
    max_completion_length: int = 512
    """Completions keep their first this-many tokens."""
    add_eos: bool = True
    """Append the tokenizer's EOS to completions that lack it (as TRL does)."""
    buckets: tuple[int, ...] | None = None
    """Padded prompt lengths (prompts are left-padded to the smallest that fits; one compile
    per (prompt, completion) bucket pair); None = powers of two from 32 to max_prompt_length."""
    completion_buckets: tuple[int, ...] | None = None
    """Padded completion lengths; None = powers of two from 16 to max_completion_length."""
    log_every: int = 1
    """Log (TensorBoard + returned history) every this-many optimizer steps."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.loss_type == "kto" and self.micro_batch_size < 2:
            raise ValueError(
                "loss_type='kto' needs micro_batch_size >= 2: the KL reference point z is "
                "estimated from other examples' completions in the same micro-batch (with one "
                "example it would equal the implied reward). Use micro_batch_size >= 2, or "
                "loss_type='apo_zero_unpaired'."
            )
        if self.micro_batch_size < 1 or self.grad_accum_steps < 1 or self.epochs < 1:
            raise ValueError("micro_batch_size, grad_accum_steps and epochs must be >= 1")
        if (self.desirable_weight is None) != (self.undesirable_weight is None):
            raise ValueError("set both desirable_weight and undesirable_weight, or neither (auto)")
        if self.lr_schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.log_every < 1:
            raise ValueError("log_every must be >= 1")
        for name, longest in (("buckets", self.max_prompt_length),
                              ("completion_buckets", self.max_completion_length)):  # fmt: skip
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(sorted(int(b) for b in value))
            object.__setattr__(self, name, value)
            if not value or value[0] < 1 or value[-1] < longest:
                raise ValueError(
                    f"{name}={value}: the largest must be >= {longest} (the longest "
                    f"{'prompt' if name == 'buckets' else 'completion'}); add a bucket of that size"
                )

    @property
    def max_length(self) -> int:
        """Longest possible row: max_prompt_length + max_completion_length."""
        return self.max_prompt_length + self.max_completion_length

    @property
    def prompt_bucket_sizes(self) -> tuple[int, ...]:
        """The padded prompt lengths in use."""
        if self.buckets is not None:
            return self.buckets
        return default_buckets(self.max_prompt_length)

    @property
    def completion_bucket_sizes(self) -> tuple[int, ...]:
        """The padded completion lengths in use."""
        if self.completion_buckets is not None:
            return self.completion_buckets
        return default_buckets(self.max_completion_length, smallest=16)

    @property
    def with_kl(self) -> bool:
        """Whether the loss needs the KL (mismatched) rows."""
        return self.loss_type == "kto"


def lr_schedule(config: KTOConfig, total_steps: int, xp=jnp) -> optax.Schedule:
    """HF-style schedule of the update count: linear warmup from 0, then linear/cosine/constant.

    ``xp`` is ``jnp`` (for optax, traced) or ``np`` (host-side logging, no device round trip).
    """
    warmup = (
        config.warmup_steps
        if config.warmup_steps is not None
        else math.ceil(config.warmup_ratio * total_steps)
    )
    peak, decay = config.learning_rate, max(total_steps - warmup, 1)

    def schedule(count):
        count = xp.asarray(count, xp.float32)
        warm = peak * count / max(warmup, 1)
        frac = xp.clip((count - warmup) / decay, 0.0, 1.0)
        if config.lr_schedule == "linear":
            after = peak * (1.0 - frac)
        elif config.lr_schedule == "cosine":
            after = peak * 0.5 * (1.0 + xp.cos(xp.pi * frac))
        else:
            after = xp.full_like(frac, peak)
        return xp.where(count < warmup, warm, after)

    return schedule


def make_optimizer(config: KTOConfig) -> optax.GradientTransformation:
    """Global-norm clipping + AdamW direction (Adam moments + decoupled weight decay).

    The learning rate is applied by the train step (``params -= lr · update``), with ``lr``
    from :func:`lr_schedule` passed in per step, so one compiled step serves every train()
    call whatever its length. Equivalent to ``optax.adamw(schedule, ...)`` after clipping.
    """
    parts = [] if config.max_grad_norm is None else [optax.clip_by_global_norm(config.max_grad_norm)]
    parts += [
        optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps),
        optax.add_decayed_weights(config.weight_decay),
    ]
    return optax.chain(*parts)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def sequence_logps(model, prompt_ids_BP, prompt_mask_BP, completion_ids_BC, completion_mask_BC):
    """``log π(y|x)`` per row for left-padded prompts followed by right-padded completions.

    Runs the decoder over the whole rows but the LM head only on the ``C`` positions that
    predict completion tokens (``model.hidden_states`` + ``model.lm_logits``; a model without
    them falls back to full logits). The first completion token of an empty prompt has no
    predecessor and is not scored (as in TRL). Float32.
    """
    P = prompt_ids_BP.shape[-1]
    ids_BT = jnp.concatenate([prompt_ids_BP, completion_ids_BC], axis=-1)
    mask_BT = jnp.concatenate([prompt_mask_BP, completion_mask_BC], axis=-1)
    scored_BC = jnp.asarray(completion_mask_BC, bool)
    scored_BC = scored_BC.at[:, 0].set(scored_BC[:, 0] & prompt_mask_BP[:, -1].astype(bool))
    if hasattr(model, "hidden_states") and hasattr(model, "lm_logits"):
        h_BCD = model.hidden_states(ids_BT, attention_mask=mask_BT)[:, P - 1 : -1]
        logits_BCV = model.lm_logits(h_BCD)
    else:
        logits_BCV = model(ids_BT, attention_mask=mask_BT)[:, P - 1 : -1]
    return target_logps(logits_BCV, completion_ids_BC, scored_BC)


def _rekey(rng_state, key):
    """Fresh, distinct dropout keys for every RNG stream (counts reset): one per micro-batch."""
    leaves, treedef = jax.tree.flatten(rng_state)
    new = []
    for i, leaf in enumerate(leaves):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            new.append(jax.random.fold_in(key, i))
        else:
            new.append(jnp.zeros_like(leaf))
    return jax.tree.unflatten(treedef, new)


def _step_spec(config: KTOConfig) -> KTOConfig:
    """The config with only the fields the compiled step depends on (a cache key)."""
    return KTOConfig(
        beta=config.beta, loss_type=config.loss_type, weight_decay=config.weight_decay,
        adam_b1=config.adam_b1, adam_b2=config.adam_b2, adam_eps=config.adam_eps,
        max_grad_norm=config.max_grad_norm, micro_batch_size=2, progress=False,
    )  # fmt: skip


@functools.lru_cache(maxsize=8)
def make_train_step(graphdef, config: KTOConfig, mesh=None):
    """The jitted step ``(lora, opt_state, frozen, rng_state, batch, key, weights, lr)``.

    ``lora`` and ``opt_state`` are donated. ``batch`` holds the ``[A, B, T]`` arrays of
    :class:`sfjax.train.data.Batch`; ``weights`` is ``(λD, λU)``; ``lr`` the step's learning
    rate. Returns ``(lora, opt_state, finite, metrics)`` with per-micro-batch metrics ``[A]``
    and the pre-clipping ``grad_norm``. Cached per (model structure, step hyper-parameters);
    ``fn.trace_count`` lists one entry per compilation. With a ``mesh``
    (:mod:`sfjax.parallel`) the step runs with explicit in/out shardings: LoRA params, optimizer
    state and frozen weights by the sharding rules, micro-batch rows over (data, fsdp).
    """
    config = _step_spec(config)
    tx = make_optimizer(config)
    trace_count: list[int] = []

    def step(lora, opt_state, frozen, rng_state, batch, key, weights, lr):
        trace_count.append(1)  # runs at trace time only: counts compilations
        A = batch["valid_AB"].shape[0]
        n_live = jnp.maximum(jnp.sum(jnp.any(batch["valid_AB"], axis=1)), 1)

        def micro(grads, xs):
            mb, mkey = xs
            live = jnp.any(mb["valid_AB"])
            # Reference and KL rows: no gradient, adapters' dropout off (eval mode, as TRL).
            model = nnx.merge(graphdef, jax.lax.stop_gradient(lora), rng_state, frozen)
            prompt = (mb["prompt_ids_ABP"], mb["prompt_mask_ABP"])
            matched = prompt + (mb["completion_ids_ABC"], mb["completion_mask_ABC"])
            mismatched = prompt + (mb["kl_completion_ids_ABC"], mb["kl_completion_mask_ABC"])
            with lora_lib.adapters_disabled(model):
                if config.with_kl:  # one reference pass over matched + KL rows
                    both = [jnp.concatenate([x, y]) for x, y in zip(matched, mismatched)]
                    ref_logps, ref_kl_logps = jnp.split(sequence_logps(model, *both), 2)
                else:
                    ref_logps = sequence_logps(model, *matched)
                    ref_kl_logps = jnp.zeros_like(ref_logps)
            if config.with_kl:
                policy_kl_logps = sequence_logps(model, *mismatched)
            else:
                policy_kl_logps = jnp.zeros_like(ref_logps)

            def loss_fn(lora_params):
                policy = nnx.merge(graphdef, lora_params, _rekey(rng_state, mkey), frozen)
                if rng_state:
                    policy.train()  # LoRA dropout on for the differentiated forward only
                policy_logps = sequence_logps(policy, *matched)
                losses, metrics = kto_loss(
                    policy_logps, ref_logps, policy_kl_logps, ref_kl_logps, mb["desirable_AB"],
                    beta=config.beta, desirable_weight=weights[0], undesirable_weight=weights[1],
                    loss_type=config.loss_type, valid=mb["valid_AB"],
                )  # fmt: skip
                return jnp.sum(losses) / jnp.maximum(jnp.sum(mb["valid_AB"]), 1), metrics

            (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(lora)
            scale = jnp.where(live, 1.0 / n_live, 0.0)
            grads = jax.tree.map(lambda acc, x: acc + scale * x, grads, g)
            metrics = dict(metrics, live=live.astype(jnp.float32), loss=loss)
            return grads, metrics

        zeros = jax.tree.map(jnp.zeros_like, lora)
        keys = jax.random.split(key, A)
        grads, metrics = jax.lax.scan(micro, zeros, (batch, keys))
        grad_norm = optax.global_norm(grads)
        updates, new_opt_state = tx.update(grads, opt_state, lora)
        new_lora = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), lora, updates)
        finite = jnp.isfinite(grad_norm) & jnp.all(
            jnp.where(metrics["live"] > 0, jnp.isfinite(metrics["loss"]), True)
        )
        finite = finite & _all_finite(new_lora)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        metrics["grad_norm"] = grad_norm
        return keep(new_lora, lora), keep(new_opt_state, opt_state), finite, metrics

    if mesh is None:
        fn = jax.jit(step, donate_argnums=(0, 1))
    else:
        from sfjax import parallel as par

        fn = par.jit_sharded(
            step, mesh,
            (par.PARAMS, par.PARAMS, par.PARAMS, par.PARAMS, par.batch_split(1), par.REPLICATED,
             par.REPLICATED, par.REPLICATED),
            (par.like(0), par.like(1), par.REPLICATED, par.REPLICATED), donate_argnums=(0, 1),
        )  # fmt: skip
    fn.trace_count = trace_count
    return fn


class KTOTrainer:
    """KTO on the LoRA adapters of an NNX model (see module docstring).

    Args:
      model: a Qwen3 (:mod:`sfjax.models.qwen3`). If it has no LoRA adapters yet they are
        added with ``lora_config`` (default :class:`LoRAConfig`). Only the adapters train; the
        model object is updated in place at the end of :meth:`train`.
      tokenizer: HF tokenizer (EOS / pad ids, text examples). May be None when every example
        is given as token ids; then pad id 0 and no EOS is appended.
      config: :class:`KTOConfig`.
      lora_config: adapter shape when the model has none; also what :meth:`save_adapter` writes.
      mesh: optional ``(data, fsdp, tp)`` mesh (:mod:`sfjax.parallel`): the model (adapters
        included) is placed on it by the sharding rules, in place, and the step runs sharded.
    """

    def __init__(self, model, tokenizer, config: KTOConfig | None = None, *, lora_config=None,
                 mesh=None):  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        self.config = config if config is not None else KTOConfig()
        has_adapters = any(True for _ in lora_lib.lora_modules(model))
        if not has_adapters:
            self.lora_config = lora_config if lora_config is not None else lora_lib.LoRAConfig()
            lora_lib.apply_lora(model, self.lora_config)
        else:
            self.lora_config = lora_config
        from sfjax import parallel

        self.mesh = parallel.resolve_mesh(mesh)  # `python -m sfjax.parallel` sets a default
        if self.mesh is not None:
            parallel.shard_model(model, self.mesh)
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad is None and tokenizer is not None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0
        self.opt_state = None
        self.step = 0
        self.skipped_steps = 0
        self._step_fn = None
        self._logps_fn = None

    @property
    def trace_count(self) -> int:
        """Compilations of the current train step (one per sequence bucket used)."""
        return 0 if self._step_fn is None else len(self._step_fn.trace_count)

    # ------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Checkpointable pytree: adapters, optimizer state, step and skip counters."""
        return {
            "lora": nnx.to_pure_dict(lora_lib.lora_state(self.model)),
            "opt_state": self.opt_state,
            "step": self.step,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; then ``train(..., resume=True)`` continues the run."""
        lora_state = lora_lib.lora_state(self.model)
        nnx.replace_by_pure_dict(lora_state, state["lora"])
        nnx.update(self.model, lora_state)
        self.opt_state = state["opt_state"]
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])

    def save_adapter(self, out_dir: str | os.PathLike, **kwargs):
        """Write the adapters in PEFT format (see :func:`sfjax.models.lora.save_adapter`)."""
        if self.lora_config is None:
            raise ValueError("pass lora_config= to KTOTrainer to save an adapter the model came with")
        return lora_lib.save_adapter(self.model, out_dir, self.lora_config, **kwargs)

    # ------------------------------------------------------------------------- data
    def tokenize(self, examples: Sequence[KTOExample]) -> list[TokenizedExample]:
        """Tokenize / truncate with this trainer's settings."""
        c = self.config
        return tokenize_examples(
            examples, self.tokenizer, max_prompt_length=c.max_prompt_length,
            max_completion_length=c.max_completion_length, add_eos=c.add_eos,
        )  # fmt: skip

    def class_weights(self, tokenized: Sequence[TokenizedExample]) -> tuple[float, float]:
        """(λD, λU): fixed from the config, or from the class counts (paper eq. 12–13)."""
        c = self.config
        if c.desirable_weight is not None:
            return float(c.desirable_weight), float(c.undesirable_weight)
        n_d = sum(e.desirable for e in tokenized)
        return kto_class_weights(n_d, len(tokenized) - n_d, c.class_weight_ratio)

    def _plan(self, n_examples: int, seed: int) -> list[list[np.ndarray]]:
        c = self.config
        order = epoch_order(n_examples, seed, c.shuffle)
        return plan_steps(order, c.micro_batch_size, c.grad_accum_steps, need_pairs=c.with_kl)

    # ------------------------------------------------------------------------- train
    def train(self, examples: Sequence[KTOExample], key: jax.Array, writer=None, *,
              resume: bool = False) -> list[dict[str, float]]:  # fmt: skip
        """Run ``config.epochs`` epochs of KTO over ``examples``; deterministic given ``key``.

        Args:
          examples: unpaired :class:`KTOExample` list (both classes may be present or not).
          key: PRNG key (shuffling and LoRA dropout).
          writer: None, a TensorBoard log directory, or a tensorboardX ``SummaryWriter``;
            scalars go under TRL's tags ``train/<metric>``.
          resume: continue after ``load_state_dict`` (same examples and key): keeps the loaded
            optimizer state and skips the steps already taken. Otherwise the optimizer and step
            counter start afresh (the schedule spans this call's steps).

        Returns:
          One dict per logged step: ``step``, ``epoch``, ``learning_rate``, ``grad_norm``,
          ``skipped_steps`` and the KTO metrics (``loss``, ``kl``, ``rewards/chosen`` … averaged
          over the micro-batches since the previous log, NaN-skipping like TRL).
        """
        c = self.config
        tokenized = self.tokenize(examples)
        need = 2 if c.with_kl else 1
        if len(tokenized) < need:
            raise ValueError(
                f"{len(tokenized)} example(s): loss_type={c.loss_type!r} needs at least {need} "
                "(the KL pairs of a micro-batch are other examples' completions)"
            )
        weights = jnp.asarray(self.class_weights(tokenized), jnp.float32)
        shuffle_key, step_key = jax.random.split(key)
        seeds = [
            int(jax.random.randint(jax.random.fold_in(shuffle_key, e), (), 0, 2**31 - 1))
            for e in range(c.epochs)
        ]
        plans = [self._plan(len(tokenized), s) for s in seeds]
        total = sum(len(p) for p in plans)

        graphdef, lora, rng_state, frozen = nnx.split(
            self.model, nnx.LoRAParam, nnx.RngState, ...
        )
        lora = jax.tree.map(jnp.copy, lora)  # donated below; the model keeps valid buffers
        self._step_fn = make_train_step(graphdef, _step_spec(c), self.mesh)
        if not resume or self.opt_state is None:
            self.opt_state = make_optimizer(c).init(lora)
            self.step = 0
            self.skipped_steps = 0
        host_lr = lr_schedule(c, total, xp=np)

        writer, own_writer = _open_writer(writer)
        history: list[dict[str, float]] = []
        window: list[dict[str, np.ndarray]] = []
        pending = None
        bar = _progress(total, c.progress, initial=self.step)
        opt_state = self.opt_state
        global_step = 0
        try:
            for epoch, plan in enumerate(plans):
                for i, step_members in enumerate(plan):
                    global_step += 1
                    if global_step <= self.step:
                        continue  # resumed: already taken
                    batch = collate_step(
                        tokenized, step_members, micro_batch_size=c.micro_batch_size,
                        grad_accum_steps=c.grad_accum_steps,
                        prompt_buckets=c.prompt_bucket_sizes,
                        completion_buckets=c.completion_bucket_sizes,
                        pad_token_id=self.pad_token_id, with_kl=c.with_kl,
                    )  # fmt: skip
                    skey = jax.random.fold_in(step_key, global_step)
                    lr = float(host_lr(global_step - 1))  # as HF: the schedule advances every step
                    lora, opt_state, finite, metrics = self._step_fn(
                        lora, opt_state, frozen, rng_state, batch.arrays(), skey, weights,
                        np.float32(lr),
                    )
                    # Metrics one step late: read step k after step k+1 is dispatched.
                    if pending is not None:
                        self._absorb(pending, window, history, writer, bar)
                    pending = (global_step, epoch + (i + 1) / len(plan), lr, finite, metrics)
                    self.step = global_step
            if pending is not None:
                self._absorb(pending, window, history, writer, bar, final=True)
        finally:
            bar.close()
            self.opt_state = opt_state
            nnx.update(self.model, lora)
            if own_writer:
                writer.close()
        return history

    def _absorb(self, pending, window, history, writer, bar, final=False):
        step, epoch, lr, finite, metrics = pending
        finite = bool(jax.device_get(finite))
        if not finite:
            self.skipped_steps += 1
        host = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
        window.append(host)
        if step % self.config.log_every and not final:
            return
        live = np.concatenate([w["live"] for w in window]) > 0
        entry: dict[str, float] = {"step": step, "epoch": round(epoch, 4), "learning_rate": lr}
        for name in window[0]:
            if name in ("live", "grad_norm"):
                continue
            values = np.concatenate([w[name] for w in window])[live]
            finite_values = values[~np.isnan(values)]
            if finite_values.size:
                entry[name] = float(finite_values.mean())
        entry["grad_norm"] = float(np.mean([w["grad_norm"] for w in window]))
        entry["skipped_steps"] = self.skipped_steps
        window.clear()
        history.append(entry)
        if writer is not None:
            for name, value in entry.items():
                if name != "step":
                    writer.add_scalar(f"train/{name}", value, step)
        bar.update(step - bar.n)
        bar.set_postfix(
            loss=f"{entry.get('loss', float('nan')):.4f}",
            margin=f"{entry.get('rewards/margins', float('nan')):.3f}",
            kl=f"{entry.get('kl', float('nan')):.3f}",
        )

    # ------------------------------------------------------------------------- evaluation
    def completion_logps(self, examples: Sequence[KTOExample]) -> tuple[np.ndarray, np.ndarray]:
        """Per-example ``(log πθ(y|x), log πref(y|x))`` for the current adapters (float32)."""
        c = self.config
        tokenized = self.tokenize(examples)
        graphdef, state = nnx.split(self.model)
        if self._logps_fn is None or self._logps_fn[0] != graphdef:

            @jax.jit
            def fn(state, *rows):
                model = nnx.merge(graphdef, state)
                pol = sequence_logps(model, *rows)
                with lora_lib.adapters_disabled(model):
                    ref = sequence_logps(model, *rows)
                return pol, ref

            self._logps_fn = (graphdef, fn)
        policy, reference = [], []
        B = c.micro_batch_size
        for start in range(0, len(tokenized), B):
            members = np.arange(start, min(start + B, len(tokenized)))
            batch: Batch = collate_step(
                tokenized, [members], micro_batch_size=B, grad_accum_steps=1,
                prompt_buckets=c.prompt_bucket_sizes, completion_buckets=c.completion_bucket_sizes,
                pad_token_id=self.pad_token_id, with_kl=False,
            )  # fmt: skip
            pol, ref = self._logps_fn[1](
                state, batch.prompt_ids_ABP[0], batch.prompt_mask_ABP[0],
                batch.completion_ids_ABC[0], batch.completion_mask_ABC[0],
            )  # fmt: skip
            policy.append(np.asarray(pol)[: len(members)])
            reference.append(np.asarray(ref)[: len(members)])
        return np.concatenate(policy), np.concatenate(reference)


def _open_writer(writer):
    if writer is None or hasattr(writer, "add_scalar"):
        return writer, False
    if jax.process_index() != 0:  # multi-host: only process 0 writes TensorBoard events
        return None, False
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(writer)), True


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="KTO", unit="step")


__all__ = [
    "KTOConfig",
    "KTOExample",
    "KTOTrainer",
    "lr_schedule",
    "make_optimizer",
    "make_train_step",
]
