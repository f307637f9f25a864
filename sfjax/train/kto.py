"""KTO fine-tuning of a Qwen3's LoRA adapters: one jitted, donated train step (paper §IV-C).

Refine-from-Reflection fine-tunes the Actor with KTO (paper eq. 8–13) on its LoRA weights; the
reference policy πref is the same model with the adapters switched off
(:func:`sfjax.models.lora.adapters_disabled`), so the base weights exist once and never change
(:attr:`KTOTrainer.reference_lora` makes it the model with other adapter values instead, e.g.
the previous SF iterate: with ``precompute_ref_log_probs`` their log-probs are tabled once per
dataset, otherwise the step's reference forward runs with them).

One optimizer step = one call of a jitted function (donating the LoRA params and the optimizer
state) that scans over ``grad_accum_steps`` micro-batches; per micro-batch it runs

1. the reference forward (adapters off, or :attr:`KTOTrainer.reference_lora`'s) on the matched
   and the KL (mismatched) rows — or, with ``precompute_ref_log_probs``, nothing: they were
   computed once for the dataset,
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
The hyper-parameters are :class:`~sfjax.train.kto_config.KTOConfig`; the TensorBoard writer and
the progress bar live in :mod:`sfjax.train.kto_logging`.

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfjax.console import progress_bar
from sfjax.losses.kto import kto_class_weights
from sfjax.models import lora as lora_lib
from sfjax.train.data import (
    Batch,
    KTOExample,
    TokenizedExample,
    collate_step,
    epoch_order,
    fixed_kl_partners,
    plan_steps,
    tokenize_examples,
)
from sfjax.train.forward import sequence_logps
from sfjax.train.kto_config import KTOConfig
from sfjax.train.kto_logging import RunningRewards, open_writer, progress_postfix
from sfjax.train.step import (
    _step_spec,
    lr_schedule,
    make_optimizer,
    make_train_step,
    reference_logps,
)


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
        self._reference_lora = None

    @property
    def reference_lora(self):
        """The reference policy's LoRA values (an ``nnx.State`` like
        ``nnx.state(model, nnx.LoRAParam)``), or None (default): πref is the model with its
        adapters off, the paper's "original frozen LLM". Set, πref is the model with these
        adapters, e.g. the previous SF iterate (iterative DPO's convention); a copy is kept.
        With ``precompute_ref_log_probs`` the table is computed with these values once per
        dataset; without it, the step's reference forward runs with them (and so does
        ``token_kl_coef``'s anchor)."""
        return self._reference_lora

    @reference_lora.setter
    def reference_lora(self, lora) -> None:
        self._reference_lora = None if lora is None else jax.tree.map(jnp.copy, lora)
        self._ref_table = None  # another reference: no cached table applies

    @property
    def trace_count(self) -> int:
        """Compilations of the current train step (one per sequence bucket used)."""
        return 0 if self._step_fn is None else len(self._step_fn.trace_count)

    # ------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Checkpointable pytree: adapters, optimizer state, step, global step, skip counter
        and, when one is set, the :attr:`reference_lora` (a resumed run keeps its πref)."""
        state = {
            "lora": nnx.to_pure_dict(lora_lib.lora_state(self.model)),
            "opt_state": self.opt_state,
            "step": self.step,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
        }
        if self._reference_lora is not None:
            state["reference_lora"] = nnx.to_pure_dict(self._reference_lora)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; then ``train(..., resume=True)`` continues the run."""
        nnx.update(self.model, self._lora_values(state["lora"]))
        self.opt_state = state["opt_state"]
        self.step = int(state["step"])
        # State dicts written before the global step existed: it equalled the call's step.
        self.global_step = int(state.get("global_step", state["step"]))
        self.skipped_steps = int(state["skipped_steps"])
        # Without the key the state was written with πref = the adapters off.
        ref = state.get("reference_lora")
        self.reference_lora = None if ref is None else self._lora_values(ref)

    def _lora_values(self, pure: dict) -> nnx.State:
        """An ``nnx.State`` shaped like the model's LoRA params holding the values in ``pure``
        (a :meth:`state_dict` entry); the model is not changed."""
        values = lora_lib.lora_state(self.model)
        nnx.replace_by_pure_dict(values, pure)
        return values

    def save_adapter(self, out_dir: str | os.PathLike, **kwargs):
        """Write the adapters in PEFT format (see :func:`sfjax.models.lora.save_adapter`)."""
        if self.lora_config is None:
            raise ValueError(
                "pass lora_config= to KTOTrainer to save an adapter the model came with"
            )
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

        graphdef, lora, rng_state, frozen = nnx.split(self.model, nnx.LoRAParam, nnx.RngState, ...)
        partners = ref_table = None
        if c.precompute_ref_log_probs:
            partners = fixed_kl_partners(tokenized, c.micro_batch_size) if c.with_kl else None
            ref_table = self.reference_logps(tokenized, partners)
        lora = jax.tree.map(jnp.copy, lora)  # donated below; the model keeps valid buffers
        in_step_ref = self._reference_lora is not None and not c.precompute_ref_log_probs
        self._step_fn = make_train_step(graphdef, _step_spec(c), self.mesh, in_step_ref)
        extra = (self._reference_lora,) if in_step_ref else ()
        if not resume or self.opt_state is None:
            self.opt_state = make_optimizer(c).init(lora)
            self.step = 0
            self.skipped_steps = 0
        host_lr = lr_schedule(c, total, xp=np)

        writer, own_writer = open_writer(writer)
        history: list[dict[str, float]] = []
        window: list[dict[str, np.ndarray]] = []
        self._running = RunningRewards()  # the progress bar's margin over this call so far
        pending = None
        # one bar per run, not one per host; shown in logs too, kept when done (its postfix)
        bar = progress_bar(
            total, "KTO", enabled=c.progress and jax.process_index() == 0, terminal_only=False,
            leave=True, unit="step", initial=self.step,
        )  # fmt: skip
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
                        *extra,
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
        ``partners[i]`` (None: no KL term, zeros); adapters off, or set to
        :attr:`reference_lora`. Cached per (examples, partners): the reference does not change
        during a train() call, so later epochs and calls reuse it."""
        c = self.config
        key = (tuple(tokenized), None if partners is None else tuple(partners.tolist()),
               c.share_prompt_forward, c.prompt_bucket_sizes, c.completion_bucket_sizes)  # fmt: skip
        if self._ref_table is not None and self._ref_table[0] == key:
            return self._ref_table[1], self._ref_table[2]
        own = self._reference_lora is not None
        current = jax.tree.map(jnp.copy, nnx.state(self.model, nnx.LoRAParam)) if own else None
        if own:  # the reference's adapters, for this computation only
            nnx.update(self.model, self._reference_lora)
        try:
            graphdef, state = nnx.split(self.model)
            spec = _step_spec(c)
            if self._ref_fn is None or self._ref_fn[0] != (graphdef, spec, own):

                def fn(state, mb):
                    return reference_logps(nnx.merge(graphdef, state), mb, spec,
                                           adapters_off=not own)  # fmt: skip

                self._ref_fn = ((graphdef, spec, own), self._rows_fn(fn))
            ref, ref_kl = [], []
            for members, mb in self._micro_batches(tokenized, partners):
                r, r_kl = _to_host(self._ref_fn[1](state, mb))
                ref.append(r[: len(members)])
                ref_kl.append(r_kl[: len(members)])
        finally:
            if own:
                nnx.update(self.model, current)
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


__all__ = [
    "KTOConfig",
    "KTOExample",
    "KTOTrainer",
    "lr_schedule",
    "make_optimizer",
    "make_train_step",
    "sequence_logps",
]
