"""The jitted KTO train step and its optimizer (paper §IV-C, eq. 8–13), used by
:class:`sfjax.train.kto.KTOTrainer`.

Per micro-batch the step runs the reference forward (adapters off, no gradient) on the matched
and KL rows — or reads them from the batch with ``precompute_ref_log_probs`` — and the policy
forward + backward on the matched rows, whose prompt pass also serves the policy's KL rows
(continued under ``stop_gradient`` in a no-gradient copy of the model: ``z`` carries no
gradient, as TRL's ``no_grad`` KL pass). Prompts are left-padded and completions right-padded,
so the LM head runs only on the positions that predict completion tokens, in chunks
(:mod:`sfjax.train.forward`). The accumulated gradient is clipped, AdamW-updated with the
learning rate passed in, and the update is dropped when anything is not finite.

``token_kl_coef`` (not in the paper or TRL) adds ``coef ×`` the matched rows' summed per-token
KL to the reference: the reference pass then also returns its final hidden states, and the
policy's LM-head chunks compute the KL beside the log-probs
(:func:`sfjax.train.forward.token_logps_and_kl`). ``own_reference``: the reference is the model
with other adapter values (``ref_lora``), run in the step.

Shape legend: ``A`` micro-batches per step, ``B`` micro-batch size, ``P`` / ``C`` bucketed
prompt / completion length, ``T = P + C``, ``D`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sfjax.losses.kto import kto_loss
from sfjax.models import lora as lora_lib
from sfjax.train.forward import (
    scored_mask,
    sequence_logps,
    shared_prompt_logps,
    shared_prompt_states,
    token_logps,
    token_logps_and_kl,
)
from sfjax.train.kto_config import KTOConfig


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
    parts = (
        [] if config.max_grad_norm is None else [optax.clip_by_global_norm(config.max_grad_norm)]
    )
    parts += [
        optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps),
        optax.add_decayed_weights(config.weight_decay),
    ]
    return optax.chain(*parts)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


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
        share_prompt_forward=config.share_prompt_forward, remat=config.remat,
        logits_chunk_tokens=config.logits_chunk_tokens,
        precompute_ref_log_probs=config.precompute_ref_log_probs,
        token_kl_coef=config.token_kl_coef,
    )  # fmt: skip


def reference_logps(model, mb, config: KTOConfig, *, adapters_off: bool = True,
                    with_states: bool = False):  # fmt: skip
    """``(log πref(y|x), log πref(y'|x))`` of one micro-batch, no gradient; adapters off
    unless ``adapters_off=False``.

    ``mb`` holds the ``[B, ...]`` arrays of one micro-batch (:class:`sfjax.train.data.Batch`
    names); the KL values are zeros when the loss has no KL term. ``adapters_off=False``: the
    model as given, adapters on (a reference with its own LoRA values,
    :attr:`sfjax.train.kto.KTOTrainer.reference_lora`). ``with_states``: a third value, the
    reference's final hidden states ``[B, C, D]`` at the matched completions' positions (for
    ``token_kl_coef``; same log-probs).
    """
    fwd = dict(remat=False, chunk=config.logits_chunk_tokens)  # no backward: nothing to remat
    prompt = (mb["prompt_ids_ABP"], mb["prompt_mask_ABP"])
    comp = (mb["completion_ids_ABC"], mb["completion_mask_ABC"])
    kl_comp = (mb["kl_completion_ids_ABC"], mb["kl_completion_mask_ABC"])
    off = lora_lib.adapters_disabled(model) if adapters_off else contextlib.nullcontext()
    sg = jax.lax.stop_gradient
    with off:
        if with_states:
            comps = [comp, kl_comp] if config.with_kl else [comp]
            hs = shared_prompt_states(model, *prompt, comps, share=config.share_prompt_forward)
            logps = [token_logps(model, h, c[0], scored_mask(c[1], prompt[1]), chunk=fwd["chunk"])
                     for h, c in zip(hs, comps)]  # fmt: skip
            ref_kl = logps[1] if config.with_kl else jnp.zeros_like(logps[0])
            return sg(logps[0]), sg(ref_kl), sg(hs[0])
        if config.with_kl and config.share_prompt_forward:  # the prompt once for both
            ref, ref_kl = shared_prompt_logps(model, *prompt, [comp, kl_comp], **fwd)
        elif config.with_kl:  # one pass over matched + KL rows
            both = [jnp.concatenate([x, y]) for x, y in zip(prompt + comp, prompt + kl_comp)]
            ref, ref_kl = jnp.split(sequence_logps(model, *both, **fwd), 2)
        else:
            ref = sequence_logps(model, *prompt, *comp, **fwd)
            ref_kl = jnp.zeros_like(ref)
    return sg(ref), sg(ref_kl)


def _policy_with_token_kl(policy, nograd, ref_model, ref_h_BCD, prompt, comp, kl_comp,
                          config: KTOConfig, *, ref_adapters_off: bool = True):  # fmt: skip
    """``(log πθ(y|x), log πθ(y'|x) or None, kl_B)`` for ``token_kl_coef``: the policy's
    matched rows with their summed per-token KL to the reference (``ref_model``'s head, its
    adapters off unless ``ref_adapters_off=False``, at ``ref_h_BCD``), and with the shared
    prompt forward its KL rows from the same prefix pass in ``nograd`` (no gradient); None
    means the caller computes them."""
    shared = config.with_kl and config.share_prompt_forward
    comps = [comp, kl_comp] if shared else [comp]
    hs = shared_prompt_states(policy, *prompt, comps, remat=config.remat, nograd_model=nograd,
                              share=config.share_prompt_forward)  # fmt: skip
    chunk = config.logits_chunk_tokens
    logps, kl_B = token_logps_and_kl(policy, hs[0], ref_model, ref_h_BCD, comp[0],
                                     scored_mask(comp[1], prompt[1]), chunk=chunk,
                                     ref_adapters_off=ref_adapters_off)  # fmt: skip
    kl_logps = None
    if shared:
        kl_logps = jax.lax.stop_gradient(
            token_logps(nograd, hs[1], kl_comp[0], scored_mask(kl_comp[1], prompt[1]), chunk=chunk)
        )
    return logps, kl_logps, kl_B


@functools.lru_cache(maxsize=8)
def make_train_step(graphdef, config: KTOConfig, mesh=None, own_reference: bool = False):
    """The jitted step ``(lora, opt_state, frozen, rng_state, batch, key, weights, lr)``, plus
    ``ref_lora`` last with ``own_reference``: the reference forward then runs in the step with
    those adapter values (on), not with the adapters off
    (:attr:`sfjax.train.kto.KTOTrainer.reference_lora`).

    ``lora`` and ``opt_state`` are donated. ``batch`` holds the ``[A, B, T]`` arrays of
    :class:`sfjax.train.data.Batch` (plus ``ref_logps_AB`` / ``ref_kl_logps_AB`` with
    ``precompute_ref_log_probs``); ``weights`` is ``(λD, λU)``; ``lr`` the step's learning
    rate. Returns ``(lora, opt_state, finite, metrics)`` with per-micro-batch metrics ``[A]``
    and the pre-clipping ``grad_norm``. Cached per (model structure, step hyper-parameters);
    ``fn.trace_count`` lists one entry per compilation. With a ``mesh``
    (:mod:`sfjax.parallel`) the step runs with explicit in/out shardings: LoRA params, optimizer
    state and frozen weights by the sharding rules, micro-batch rows over (data, fsdp).
    """
    config = _step_spec(config)
    tx = make_optimizer(config)
    trace_count: list[int] = []
    fwd = dict(remat=config.remat, chunk=config.logits_chunk_tokens)

    def step(lora, opt_state, frozen, rng_state, batch, key, weights, lr, ref_lora=None):
        trace_count.append(1)  # runs at trace time only: counts compilations
        A = batch["valid_AB"].shape[0]
        n_live = jnp.maximum(jnp.sum(jnp.any(batch["valid_AB"], axis=1)), 1)

        def micro(grads, xs):
            mb, mkey = xs
            live = jnp.any(mb["valid_AB"])
            # Reference and KL rows: no gradient, adapters' dropout off (eval mode).
            model = nnx.merge(graphdef, jax.lax.stop_gradient(lora), rng_state, frozen)
            prompt = (mb["prompt_ids_ABP"], mb["prompt_mask_ABP"])
            comp = (mb["completion_ids_ABC"], mb["completion_mask_ABC"])
            kl_comp = (mb["kl_completion_ids_ABC"], mb["kl_completion_mask_ABC"])
            shared = config.share_prompt_forward
            token_kl = config.token_kl_coef > 0
            if config.precompute_ref_log_probs:
                ref_logps, ref_kl_logps = mb["ref_logps_AB"], mb["ref_kl_logps_AB"]
            else:
                ref = model if ref_lora is None else nnx.merge(graphdef, ref_lora, rng_state, frozen)
                out = reference_logps(ref, mb, config, adapters_off=ref_lora is None,
                                      with_states=token_kl)  # fmt: skip
                ref_logps, ref_kl_logps = out[:2]
                ref_h = out[2] if token_kl else None
            if config.with_kl and not shared:  # policy KL rows outside the differentiated pass
                policy_kl_logps = jax.lax.stop_gradient(
                    sequence_logps(model, *prompt, *kl_comp, remat=False, chunk=fwd["chunk"])
                )
            else:
                policy_kl_logps = jnp.zeros_like(ref_logps)

            def loss_fn(lora_params):
                policy = nnx.merge(graphdef, lora_params, _rekey(rng_state, mkey), frozen)
                if rng_state:
                    policy.train()  # LoRA dropout on for the differentiated forward only
                kl_logps = policy_kl_logps
                if token_kl:
                    # the reference head in a module made at this trace level (its adapters are
                    # switched off, which nnx allows only where the module was made)
                    ref_values = lora if ref_lora is None else ref_lora
                    ref_model = nnx.merge(graphdef, jax.lax.stop_gradient(ref_values), rng_state,
                                          frozen)  # fmt: skip
                    policy_logps, shared_kl_logps, token_kl_B = _policy_with_token_kl(
                        policy, model, ref_model, ref_h, prompt, comp, kl_comp, config,
                        ref_adapters_off=ref_lora is None,
                    )
                    if shared_kl_logps is not None:
                        kl_logps = shared_kl_logps
                elif config.with_kl and shared:
                    # The prompt runs once; the KL continuation reads its keys / values under
                    # stop_gradient in the no-gradient model, so no backward pass touches it.
                    policy_logps, kl_logps = shared_prompt_logps(
                        policy, *prompt, [comp, kl_comp], nograd_model=model, **fwd
                    )
                    kl_logps = jax.lax.stop_gradient(kl_logps)  # z carries no gradient
                else:
                    policy_logps = sequence_logps(policy, *prompt, *comp, **fwd)
                losses, metrics = kto_loss(
                    policy_logps, ref_logps, kl_logps, ref_kl_logps, mb["desirable_AB"],
                    beta=config.beta, desirable_weight=weights[0], undesirable_weight=weights[1],
                    loss_type=config.loss_type, valid=mb["valid_AB"],
                )  # fmt: skip
                n_valid = jnp.maximum(jnp.sum(mb["valid_AB"]), 1)
                loss = jnp.sum(losses) / n_valid
                if token_kl:
                    mean_kl = jnp.sum(jnp.where(mb["valid_AB"], token_kl_B, 0.0)) / n_valid
                    loss = loss + config.token_kl_coef * mean_kl
                    metrics = dict(metrics, token_kl=jax.lax.stop_gradient(mean_kl))
                return loss, metrics

            (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(lora)
            scale = jnp.where(live, 1.0 / n_live, 0.0)
            grads = jax.tree.map(lambda acc, x: acc + scale * x, grads, g)
            metrics = dict(metrics, live=live.astype(jnp.float32), loss=loss)
            return grads, metrics

        zeros = jax.tree.map(jnp.zeros_like, lora)
        keys = jax.random.split(key, A)
        grads, metrics = jax.lax.scan(micro, zeros, (batch, keys))
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = tx.update(grads, opt_state, lora)
        new_lora = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), lora, updates)
        finite = jnp.isfinite(grad_norm) & jnp.all(
            jnp.where(metrics["live"] > 0, jnp.isfinite(metrics["loss"]), True)
        )
        finite = finite & _all_finite(new_lora)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        metrics["grad_norm"] = grad_norm
        return keep(new_lora, lora), keep(new_opt_state, opt_state), finite, metrics

    if not own_reference:
        step = functools.partial(step, ref_lora=None)
    if mesh is None:
        fn = jax.jit(step, donate_argnums=(0, 1))
    else:
        from sfjax import parallel as par

        fn = par.jit_sharded(
            step, mesh,
            (par.PARAMS, par.PARAMS, par.PARAMS, par.PARAMS, par.batch_split(1), par.REPLICATED,
             par.REPLICATED, par.REPLICATED) + ((par.PARAMS,) if own_reference else ()),
            (par.like(0), par.like(1), par.REPLICATED, par.REPLICATED), donate_argnums=(0, 1),
        )  # fmt: skip
    fn.trace_count = trace_count
    return fn
