"""KTO fine-tuning of a Qwen3's LoRA adapters: one jitted, donated train step (paper §IV-C).

Refine-from-Reflection fine-tunes the Actor with KTO (paper eq. 8–13) on its LoRA weights; the
reference policy πref is the same model with the adapters switched off
(:func:`sfjax.models.lora.adapters_disabled`), so the base weights exist once and never change.

One optimizer step = one call of a jitted function (donating the LoRA params and the optimizer
state) that scans over ``grad_accum_steps`` micro-batches; per micro-batch it runs

1. the reference forward (adapters off) on the matched and the KL (mismatched) rows — or,
   with ``precompute_ref_log_probs``, nothing: they were computed once for the dataset,
2. the policy forward + backward on the matched rows, :func:`sfjax.losses.kto.kto_loss`,
3. the policy forward on the KL rows without gradient (``z`` is stop-gradient), continuing
   from the matched rows' prompt pass (each prompt runs once per model, KV prefix),

(prompts left-padded, completions right-padded, so the LM head runs only on the completion
positions, in chunks that never hold ``[B, T, V]`` logits; ``remat`` recomputes each layer in
the backward pass: :mod:`sfjax.train.forward`), then clips the accumulated gradient by global
norm, applies AdamW with warmup and a linear / cosine / constant schedule
(:mod:`sfjax.train.step`), and keeps the old params and optimizer state if the gradient or
loss is not finite (counted in ``skipped_steps``). Log-probs are summed over completion tokens
only, in float32. Metrics are fetched one step late so the host never stalls the device, and
written to TensorBoard under TRL's tag names (``train/loss``, ``train/rewards/chosen``,
``train/kl`` …) at ``trainer.global_step``, which keeps counting across ``train()`` calls
(and ``state_dict`` / ``load_state_dict``), so the curves of successive SF iterations line up.

Usage::

    trainer = KTOTrainer(model, tokenizer, KTOConfig(epochs=2), lora_config=LoRAConfig(rank=16))
    history = trainer.train([KTOExample(prompt, completion, desirable), ...], key, writer=logdir)
    # `model` now holds the trained adapters (updated in place); save them for PEFT with
    # lora.save_adapter(model, out_dir, trainer.lora_config)

Shape legend: ``A`` micro-batches per step, ``B`` micro-batch size, ``P`` / ``C`` bucketed
prompt / completion length, ``T = P + C``, ``D`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfjax.losses.kto import LOSS_TYPES, kto_class_weights
from sfjax.models import lora as lora_lib
from sfjax.train.data import (
    Batch,
    KTOExample,
    TokenizedExample,
    collate_step,
    default_buckets,
    epoch_order,
    fixed_kl_partners,
    plan_steps,
    tokenize_examples,
)
from sfjax.train.forward import sequence_logps
from sfjax.train.step import (
    _step_spec,
    lr_schedule,
    make_optimizer,
    make_train_step,
    reference_logps,
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
    share_prompt_forward: bool = True
    """Run each prompt once (its keys / values shared as a prefix) for its matched and KL
    completions, in the policy and the reference passes; False runs every (prompt, completion)
    row separately. Same values."""
    precompute_ref_log_probs: bool = False
    """Compute the reference log-probs (adapters off; they never change) once per dataset and
    reuse them every epoch and every train() call on the same examples, instead of a reference
    forward in every step (TRL's ``precompute_ref_log_probs``). As in TRL, each example's KL
    completion is then fixed once (rolled within consecutive groups of micro_batch_size in
    dataset order) rather than re-drawn from its micro-batch every epoch; with shuffle=False the
    two coincide and the losses equal the default path's."""
    remat: bool = False
    """Recompute each decoder layer in the backward pass (activation memory O(layers x tokens x
    hidden) instead of O(layers x attention maps)); for long prompts on large models."""
    logits_chunk_tokens: int = 0
    """Completion tokens per chunk of the LM head + log-softmax (each chunk recomputed in the
    backward pass), so [B, T, V] float32 logits never exist; 0 = automatic (chunks of at most
    64 MiB of logits: one chunk for small vocabularies, ~110 tokens for Qwen3's 151936)."""
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
        if self.logits_chunk_tokens < 0:
            raise ValueError(
                f"logits_chunk_tokens must be >= 0 (0 = automatic), got {self.logits_chunk_tokens}"
            )
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
        self.global_step = 0
        self.skipped_steps = 0
        self._step_fn = None
        self._logps_fn = None
        self._ref_fn = None
        self._ref_table: tuple[Any, np.ndarray, np.ndarray] | None = None

    @property
    def trace_count(self) -> int:
        """Compilations of the current train step (one per sequence bucket used)."""
        return 0 if self._step_fn is None else len(self._step_fn.trace_count)

    # ------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Checkpointable pytree: adapters, optimizer state, step, global step, skip counter."""
        return {
            "lora": nnx.to_pure_dict(lora_lib.lora_state(self.model)),
            "opt_state": self.opt_state,
            "step": self.step,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; then ``train(..., resume=True)`` continues the run."""
        lora_state = lora_lib.lora_state(self.model)
        nnx.replace_by_pure_dict(lora_state, state["lora"])
        nnx.update(self.model, lora_state)
        self.opt_state = state["opt_state"]
        self.step = int(state["step"])
        # State dicts written before the global step existed: it equalled the call's step.
        self.global_step = int(state.get("global_step", state["step"]))
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
            counter start afresh (the schedule spans this call's steps); ``global_step`` (the
            TensorBoard x axis) always continues, so curves of successive calls line up.

        Returns:
          One dict per logged step: ``step`` (of this call), ``global_step`` (across calls and
          restores, the TensorBoard step), ``epoch``, ``learning_rate``, ``grad_norm``,
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
        partners = ref_table = None
        if c.precompute_ref_log_probs:
            partners = fixed_kl_partners(tokenized, c.micro_batch_size) if c.with_kl else None
            ref_table = self.reference_logps(tokenized, partners)
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
        self._running = RunningRewards()  # the progress bar's margin over this call so far
        pending = None
        bar = _progress(total, c.progress, initial=self.step)
        opt_state = self.opt_state
        call_step = 0
        try:
            for epoch, plan in enumerate(plans):
                for i, step_members in enumerate(plan):
                    call_step += 1
                    if call_step <= self.step:
                        continue  # resumed: already taken
                    batch = collate_step(
                        tokenized, step_members, micro_batch_size=c.micro_batch_size,
                        grad_accum_steps=c.grad_accum_steps,
                        prompt_buckets=c.prompt_bucket_sizes,
                        completion_buckets=c.completion_bucket_sizes,
                        pad_token_id=self.pad_token_id, with_kl=c.with_kl, kl_partner=partners,
                    )  # fmt: skip
                    arrays = batch.arrays()
                    if ref_table is not None:
                        arrays.update(_gather_rows(ref_table, step_members, arrays["valid_AB"]))
                    skey = jax.random.fold_in(step_key, call_step)
                    lr = float(host_lr(call_step - 1))  # as HF: the schedule advances every step
                    lora, opt_state, finite, metrics = self._step_fn(
                        lora, opt_state, frozen, rng_state, arrays, skey, weights, np.float32(lr),
                    )  # fmt: skip
                    self.global_step += 1
                    # Metrics one step late: read step k after step k+1 is dispatched.
                    if pending is not None:
                        self._absorb(pending, window, history, writer, bar)
                    pending = (call_step, self.global_step, epoch + (i + 1) / len(plan), lr,
                               finite, metrics)  # fmt: skip
                    self.step = call_step
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
        step, tb_step, epoch, lr, finite, metrics = pending
        finite = bool(jax.device_get(finite))
        if not finite:
            self.skipped_steps += 1
        host = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
        window.append(host)
        if step % self.config.log_every and not final:
            return
        live = np.concatenate([w["live"] for w in window]) > 0
        self._running.add(window, live)
        entry: dict[str, float] = {
            "step": step, "global_step": tb_step, "epoch": round(epoch, 4), "learning_rate": lr,
        }  # fmt: skip
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
                if name not in ("step", "global_step"):
                    writer.add_scalar(f"train/{name}", value, tb_step)
        bar.update(step - bar.n)
        bar.set_postfix(progress_postfix(entry, self._running), refresh=False)

    # ------------------------------------------------------------------------- evaluation
    def _rows_fn(self, fn):
        """``fn(state, rows)`` jitted; under a mesh with the train step's explicit shardings
        (state by the rules, rows split over (data, fsdp), results replicated)."""
        if self.mesh is None:
            return jax.jit(fn)
        from sfjax import parallel as par

        return par.jit_sharded(
            fn, self.mesh, (par.PARAMS, par.batch_split(0)), (par.REPLICATED, par.REPLICATED)
        )

    def _micro_batches(self, tokenized, partners=None):
        """Consecutive micro-batches of the examples in order: ``(members, [B, ...] arrays)``."""
        c = self.config
        B = c.micro_batch_size
        for start in range(0, len(tokenized), B):
            members = np.arange(start, min(start + B, len(tokenized)))
            batch: Batch = collate_step(
                tokenized, [members], micro_batch_size=B, grad_accum_steps=1,
                prompt_buckets=c.prompt_bucket_sizes, completion_buckets=c.completion_bucket_sizes,
                pad_token_id=self.pad_token_id, with_kl=partners is not None, kl_partner=partners,
            )  # fmt: skip
            yield members, {k: v[0] for k, v in batch.arrays().items()}

    def completion_logps(self, examples: Sequence[KTOExample]) -> tuple[np.ndarray, np.ndarray]:
        """Per-example ``(log πθ(y|x), log πref(y|x))`` for the current adapters (float32)."""
        c = self.config
        tokenized = self.tokenize(examples)
        graphdef, state = nnx.split(self.model)
        if self._logps_fn is None or self._logps_fn[0] != graphdef:
            chunk = c.logits_chunk_tokens

            def fn(state, mb):
                model = nnx.merge(graphdef, state)
                rows = (mb["prompt_ids_ABP"], mb["prompt_mask_ABP"], mb["completion_ids_ABC"],
                        mb["completion_mask_ABC"])  # fmt: skip
                pol = sequence_logps(model, *rows, chunk=chunk)
                with lora_lib.adapters_disabled(model):
                    ref = sequence_logps(model, *rows, chunk=chunk)
                return pol, ref

            self._logps_fn = (graphdef, self._rows_fn(fn))
        policy, reference = [], []
        for members, mb in self._micro_batches(tokenized):
            pol, ref = _to_host(self._logps_fn[1](state, mb))
            policy.append(pol[: len(members)])
            reference.append(ref[: len(members)])
        return np.concatenate(policy), np.concatenate(reference)

    def reference_logps(self, tokenized: Sequence[TokenizedExample],
                        partners: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """``(log πref(y_i|x_i), log πref(y'_i|x_i))`` per example, ``y'_i`` the completion of
        ``partners[i]`` (None: no KL term, zeros); adapters off. Cached per (examples, partners):
        the reference never changes, so later epochs and train() calls reuse it."""
        c = self.config
        key = (tuple(tokenized), None if partners is None else tuple(partners.tolist()),
               c.share_prompt_forward, c.prompt_bucket_sizes, c.completion_bucket_sizes)  # fmt: skip
        if self._ref_table is not None and self._ref_table[0] == key:
            return self._ref_table[1], self._ref_table[2]
        graphdef, state = nnx.split(self.model)
        spec = _step_spec(c)
        if self._ref_fn is None or self._ref_fn[0] != (graphdef, spec):

            def fn(state, mb):
                return reference_logps(nnx.merge(graphdef, state), mb, spec)

            self._ref_fn = ((graphdef, spec), self._rows_fn(fn))
        ref, ref_kl = [], []
        for members, mb in self._micro_batches(tokenized, partners):
            r, r_kl = _to_host(self._ref_fn[1](state, mb))
            ref.append(r[: len(members)])
            ref_kl.append(r_kl[: len(members)])
        table = (np.concatenate(ref).astype(np.float32), np.concatenate(ref_kl).astype(np.float32))
        self._ref_table = (key, *table)
        return table


def _to_host(tree):
    from sfjax import parallel as par

    return par.to_host(tree)


def _gather_rows(table, step_members, valid_AB) -> dict[str, np.ndarray]:
    """The precomputed reference values of one step's rows, ``[A, B]`` (filler rows 0)."""
    ref, ref_kl = table
    out_ref, out_kl = np.zeros(valid_AB.shape, np.float32), np.zeros(valid_AB.shape, np.float32)
    for a, members in enumerate(step_members):
        out_ref[a, : len(members)] = ref[members]
        out_kl[a, : len(members)] = ref_kl[members]
    return {"ref_logps_AB": out_ref, "ref_kl_logps_AB": out_kl}


def _open_writer(writer):
    if writer is None or hasattr(writer, "add_scalar"):
        return writer, False
    if jax.process_index() != 0:  # multi-host: only process 0 writes TensorBoard events
        return None, False
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(writer)), True


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


class RunningRewards:
    """Sums of ``β·r`` per class over the logged steps of one ``train()`` call.

    A logged step's ``rewards/margins`` needs both classes in its own micro-batches, which a
    small or unbalanced batch often lacks; the progress bar shows the margin of the running
    class means instead, defined as soon as each class has been seen once.
    """

    def __init__(self):
        self.sums = {"chosen": 0.0, "rejected": 0.0}
        self.counts = {"chosen": 0.0, "rejected": 0.0}

    def add(self, window: list[dict[str, np.ndarray]], live: np.ndarray) -> None:
        for cls in self.sums:
            means = np.concatenate([w[f"rewards/{cls}"] for w in window])[live]
            counts = np.concatenate([w[f"count/{cls}"] for w in window])[live]
            seen = counts > 0
            self.sums[cls] += float(np.sum(means[seen] * counts[seen]))
            self.counts[cls] += float(np.sum(counts[seen]))

    def mean(self, cls: str) -> float:
        return self.sums[cls] / self.counts[cls] if self.counts[cls] else float("nan")

    def margin(self) -> str:
        if not self.counts["chosen"] or not self.counts["rejected"]:
            missing = "undesirable" if self.counts["chosen"] else "desirable"
            return f"n/a (no {missing} example yet)"
        return f"{self.mean('chosen') - self.mean('rejected'):.3f}"


def progress_postfix(entry: dict[str, float], running: RunningRewards) -> dict[str, str]:
    """The KTO bar's fields: loss of the last logged step, the running reward margin
    (desirable minus undesirable mean of ``β·r`` so far), ``kl`` (z, clamped at 0 as the
    loss uses it) and ``kl_raw`` (the estimate before the clamp; negative means the policy
    sits below the reference on the mismatched pairs)."""
    return {
        "loss": _fmt(entry.get("loss")),
        "margin": running.margin(),
        "kl": _fmt(entry.get("kl")),
        "kl_raw": _fmt(entry.get("kl_unclamped")),
    }


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    # One bar per run, not one per host.
    enabled = enabled and jax.process_index() == 0
    return tqdm(total=total, initial=initial, disable=not enabled, desc="KTO", unit="step")


__all__ = [
    "KTOConfig",
    "KTOExample",
    "KTOTrainer",
    "lr_schedule",
    "make_optimizer",
    "make_train_step",
    "sequence_logps",
]
