"""The jitted KTO train step and its optimizer (paper §IV-C, eq. 8–13), used by
:class:`sfjax.train.kto.KTOTrainer`.

Per micro-batch the step runs the reference forward (adapters off) on the matched and KL rows,
the policy forward on the KL rows without gradient (``z`` is stop-gradient) and the policy
forward + backward on the matched rows; prompts are left-padded and completions right-padded,
so the LM head runs only on the positions that predict completion tokens
(:func:`sequence_logps`). The accumulated gradient is clipped, AdamW-updated with the learning
rate passed in, and the update is dropped when anything is not finite.

Shape legend: ``A`` micro-batches per step, ``B`` micro-batch size, ``P`` / ``C`` bucketed
prompt / completion length, ``T = P + C``, ``D`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sfjax.losses.kto import kto_loss, target_logps
from sfjax.models import lora as lora_lib

if TYPE_CHECKING:
    from sfjax.train.kto import KTOConfig


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


def shared_prompt_logps(model, prompt_ids_BP, prompt_mask_BP, completions):
    """``[sequence_logps(model, prompt, *c) for c in completions]``, running the prompt once.

    The prompt minus its last column is prefilled into a KV cache (its LM-head output is
    unused, so XLA drops it); each completion then continues from that cache with the last
    prompt token prepended, giving the logits that predict its ``C`` tokens. KTO's matched and
    KL rows share their prompts, so this saves a decoder pass over every prompt per forward.
    ``completions`` is a list of ``(completion_ids_BC, completion_mask_BC)``.
    """
    from sfjax.models.qwen3 import init_cache

    P = prompt_ids_BP.shape[-1]
    if P < 2 or not hasattr(model, "config"):
        return [sequence_logps(model, prompt_ids_BP, prompt_mask_BP, *c) for c in completions]
    B, C = prompt_ids_BP.shape[0], completions[0][0].shape[-1]
    dtype = getattr(model, "dtype", jnp.float32)
    cache = init_cache(model.config, B, P - 1 + C, dtype)
    _, cache = model(prompt_ids_BP[:, :-1], attention_mask=prompt_mask_BP[:, :-1], cache=cache)
    last_mask_B1 = jnp.asarray(prompt_mask_BP[:, -1:], bool)
    out = []
    for ids_BC, mask_BC in completions:
        mask_BC = jnp.asarray(mask_BC, bool)
        cont_ids_BC = jnp.concatenate([prompt_ids_BP[:, -1:], ids_BC[:, :-1]], axis=1)
        cont_mask_BC = jnp.concatenate([last_mask_B1, mask_BC[:, :-1]], axis=1)
        logits_BCV, _ = model(cont_ids_BC, attention_mask=cont_mask_BC, cache=cache)
        # The first completion token of an empty prompt has no predecessor: not scored.
        scored_BC = mask_BC.at[:, 0].set(mask_BC[:, 0] & last_mask_B1[:, 0])
        out.append(target_logps(logits_BCV, ids_BC, scored_BC))
    return out


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
    from sfjax.train.kto import KTOConfig

    return KTOConfig(
        beta=config.beta, loss_type=config.loss_type, weight_decay=config.weight_decay,
        adam_b1=config.adam_b1, adam_b2=config.adam_b2, adam_eps=config.adam_eps,
        max_grad_norm=config.max_grad_norm, micro_batch_size=2, progress=False,
        share_prompt_forward=config.share_prompt_forward,
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
            comp = (mb["completion_ids_ABC"], mb["completion_mask_ABC"])
            kl_comp = (mb["kl_completion_ids_ABC"], mb["kl_completion_mask_ABC"])
            shared = config.share_prompt_forward
            with lora_lib.adapters_disabled(model):
                if config.with_kl and shared:  # the prompt once for both continuations
                    ref_logps, ref_kl_logps = shared_prompt_logps(model, *prompt, [comp, kl_comp])
                elif config.with_kl:  # one reference pass over matched + KL rows
                    both = [jnp.concatenate([x, y]) for x, y in zip(prompt + comp, prompt + kl_comp)]
                    ref_logps, ref_kl_logps = jnp.split(sequence_logps(model, *both), 2)
                else:
                    ref_logps = sequence_logps(model, *prompt, *comp)
                    ref_kl_logps = jnp.zeros_like(ref_logps)
            if config.with_kl and not shared:
                policy_kl_logps = sequence_logps(model, *prompt, *kl_comp)
            else:
                policy_kl_logps = jnp.zeros_like(ref_logps)

            def loss_fn(lora_params):
                policy = nnx.merge(graphdef, lora_params, _rekey(rng_state, mkey), frozen)
                if rng_state:
                    policy.train()  # LoRA dropout on for the differentiated forward only
                kl_logps = policy_kl_logps
                if config.with_kl and shared:
                    policy_logps, kl_logps = shared_prompt_logps(policy, *prompt, [comp, kl_comp])
                    kl_logps = jax.lax.stop_gradient(kl_logps)  # z carries no gradient
                else:
                    policy_logps = sequence_logps(policy, *prompt, *comp)
                losses, metrics = kto_loss(
                    policy_logps, ref_logps, kl_logps, ref_kl_logps, mb["desirable_AB"],
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
