"""The KTO trainer's forward passes: completion log-probs with a shared prompt prefix, optional
per-layer rematerialisation and a chunked LM head (paper §IV-C; log πθ(y|x), log πref(y|x)).

KTO (paper eq. 8–11) needs, per example, ``log π(y|x)`` summed over the completion tokens for
the policy and the reference, and the same for a mismatched completion ``y'`` of the same
prompt (the KL rows). This module computes them with the model's own pieces (:mod:`sfjax.models.qwen3`:
``embed``, ``rope``, the layer runner ``run_layers``, ``norm``, ``lm_logits``; plain or
``scan_layers``), without the sampler's KV cache, so that training can

* run the prompt once for several completions: :func:`prefix_states` returns each layer's
  keys / values of the prompt, :func:`continuation_states` continues any number of completions
  from them (the prompt's backward pass then serves the matched row only);
* recompute each decoder layer in the backward pass (``remat``): activation memory
  O(layers × tokens × hidden) instead of O(layers × attention maps), for Qwen3-4B prompts of
  a few thousand tokens;
* never hold ``[B, T, V]`` float32 logits: :func:`token_logps` runs the LM head and the
  log-softmax over chunks of completion tokens (each chunk recomputed in the backward pass),
  so a 151936-word vocabulary costs ``chunk × V`` floats at a time.

Every function here is pure given the model (the caller merges an ``nnx`` model inside its
jitted function) and equals the model's own forward (tests/train/test_forward.py).

Shape legend: ``B`` rows, ``P`` prompt length, ``C`` completion length, ``T`` query tokens of a
call, ``S`` key slots, ``D`` hidden, ``K`` kv heads, ``H`` head dim, ``V`` vocabulary, ``N``
flattened completion tokens, ``n`` chunks, ``c`` tokens per chunk.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from sfjax.losses.kto import target_logps
from sfjax.models import lora as lora_lib
from sfjax.models import qwen3

AUTO_CHUNK_BYTES = 64 * 2**20
"""Automatic LM-head chunk: as many tokens as fit this many bytes of float32 logits."""


def chunk_tokens(vocab_size: int, requested: int = 0) -> int:
    """Tokens per LM-head chunk: ``requested`` if > 0, else ``AUTO_CHUNK_BYTES / (4 V)``."""
    if requested > 0:
        return int(requested)
    return max(1, AUTO_CHUNK_BYTES // (4 * int(vocab_size)))


def _remat(model, remat: bool) -> bool:
    """Remat when asked, or when the model was built / set with ``remat=True``."""
    return bool(remat or getattr(model, "remat", False))


def _causal_inputs(model, ids_BT, mask_BT):
    """Embeddings, RoPE tables and causal visibility of one (left-padded) self-contained
    sequence batch: ``(x_BTD, cos_BTH, sin_BTH, visible_BTT, mask_BT)``."""
    x_BTD, mask_BT = model.embed(ids_BT, mask_BT)
    cos_BTH, sin_BTH = model.rope(qwen3.positions_from_mask(mask_BT))
    T = mask_BT.shape[1]
    visible_BTT = jnp.tril(jnp.ones((T, T), bool))[None] & mask_BT[:, None, :]
    return x_BTD, cos_BTH, sin_BTH, visible_BTT, mask_BT


def decoder_states(model, ids_BT, mask_BT, *, remat: bool = False):
    """Final normed hidden states ``[B, T, D]`` (``model.hidden_states``), optionally remat."""
    return model.hidden_states(ids_BT, mask_BT, remat=_remat(model, remat))


def prefix_states(model, ids_BP, mask_BP, *, remat: bool = False):
    """Run a (left-padded) prefix; returns ``(kv, mask_BP)`` with ``kv`` the layers' ``(k, v)``
    (:meth:`~sfjax.models.qwen3.Qwen3.run_layers`), for :func:`continuation_states`. The
    prefix's LM head is never computed (unrolled, XLA also drops the last layer's unused
    output)."""
    x_BPD, cos_BPH, sin_BPH, visible_BPS, mask_BP = _causal_inputs(model, ids_BP, mask_BP)
    _, kv = model.run_layers(x_BPD, cos_BPH, sin_BPH, visible_BPS, remat=_remat(model, remat))
    return kv, mask_BP


def continuation_states(model, prefix, ids_BT, mask_BT, *, remat: bool = False):
    """Final normed hidden states ``[B, T, D]`` of tokens that continue ``prefix`` (the output of
    :func:`prefix_states`): positions count on from the prefix's real tokens, and every query
    sees the prefix's real tokens plus the real tokens of this call up to itself."""
    kv, prefix_mask_BS = prefix
    x_BTD, mask_BT = model.embed(ids_BT, mask_BT)
    start_B = jnp.sum(prefix_mask_BS, axis=1, dtype=jnp.int32)
    cos_BTH, sin_BTH = model.rope(qwen3.positions_from_mask(mask_BT, start_B))
    T = mask_BT.shape[1]
    own_BTT = jnp.tril(jnp.ones((T, T), bool))[None] & mask_BT[:, None, :]
    prefix_BTS = jnp.broadcast_to(prefix_mask_BS[:, None, :], (mask_BT.shape[0], T, prefix_mask_BS.shape[1]))
    visible_BTS = jnp.concatenate([prefix_BTS, own_BTT], axis=2)
    x_BTD, _ = model.run_layers(x_BTD, cos_BTH, sin_BTH, visible_BTS, kv,
                                remat=_remat(model, remat), keep_kv=False)  # fmt: skip
    return model.norm(x_BTD)


def _per_token(fn, c: int, *arrays):
    """``fn`` over the flattened ``N = B·C`` positions of ``arrays`` (each ``[B, C, ...]``) in
    chunks of ``c`` inside a ``lax.map``, each chunk recomputed in the backward pass
    (``jax.checkpoint``); returns ``fn``'s per-position outputs reshaped to ``[B, C]``."""
    B, C = arrays[0].shape[:2]
    N = B * C
    n = -(-N // c)
    pad = n * c - N

    def split(x):
        x = jnp.asarray(x).reshape(N, *x.shape[2:])
        return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(n, c, *x.shape[1:])

    outs = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), tuple(split(x) for x in arrays))
    return tuple(o.reshape(n * c)[:N].reshape(B, C) for o in outs)


def token_logps(model, h_BCD, targets_BC, mask_BC, *, chunk: int = 0):
    """``sum_t mask · log softmax(lm_head(h))[target]`` per row, float32, in LM-head chunks.

    ``chunk`` tokens (0: automatic, :func:`chunk_tokens`) of the flattened ``B·C`` positions are
    projected to the vocabulary at a time inside a ``lax.map``; each chunk is recomputed in the
    backward pass (``jax.checkpoint``), so at most ``chunk × V`` logits exist at once. One chunk
    covering every token is the plain computation.
    """
    B, C, _ = h_BCD.shape
    c = chunk_tokens(model.config.vocab_size, chunk)
    if c >= B * C:
        return target_logps(model.lm_logits(h_BCD), targets_BC, mask_BC)

    def one(h_cD, t_c):
        logits_cV = model.lm_logits(h_cD[None])[0]
        return (target_logps(logits_cV[:, None, :], t_c[:, None], jnp.ones((c, 1), bool)),)

    (logps_BC,) = _per_token(one, c, h_BCD, targets_BC)
    return jnp.sum(jnp.where(jnp.asarray(mask_BC, bool), logps_BC, 0.0), axis=-1)


def token_logps_and_kl(model, h_BCD, ref_model, ref_h_BCD, targets_BC, mask_BC, *, chunk: int = 0,
                       ref_adapters_off: bool = True):  # fmt: skip
    """``(token_logps(model, h_BCD, ...), kl_B)`` with ``kl_B`` the summed per-token KL
    divergence ``sum_t mask · KL(p_model(· | h_t) ‖ p_ref(· | ref_h_t))`` over the whole
    vocabulary, float32, in the same LM-head chunks.

    ``ref_model`` is the reference (its adapters are switched off here, unless
    ``ref_adapters_off=False``: a reference with its own adapter values) and ``ref_h_BCD`` its
    final hidden states at the same positions (no gradient flows into them); the gradient of
    ``kl_B`` reaches ``model`` through ``h_BCD`` and the LM head. Used by
    :attr:`sfjax.train.kto_config.KTOConfig.token_kl_coef`.
    """
    if ref_adapters_off and ref_model is model:
        raise ValueError(
            "token_logps_and_kl: ref_model must be another module object than model (e.g. "
            "nnx.merge(*nnx.split(model))): its adapters are switched off while model's stay on"
        )
    B, C, _ = h_BCD.shape
    c = min(chunk_tokens(model.config.vocab_size, chunk), B * C)
    ref_h_BCD = jax.lax.stop_gradient(ref_h_BCD)

    def one(h_cD, ref_cD, t_c):
        logits_cV = model.lm_logits(h_cD[None])[0]
        ref_logits_cV = jax.lax.stop_gradient(ref_model.lm_logits(ref_cD[None])[0])
        logp_cV = jax.nn.log_softmax(logits_cV.astype(jnp.float32), axis=-1)
        ref_logp_cV = jax.nn.log_softmax(ref_logits_cV.astype(jnp.float32), axis=-1)
        target_c = jnp.take_along_axis(logp_cV, t_c[:, None], axis=-1)[:, 0]
        kl_c = jnp.sum(jnp.exp(logp_cV) * (logp_cV - ref_logp_cV), axis=-1)
        return target_c, kl_c

    # The switch is a Python attribute: flipped here, outside lax.map's trace, where nnx allows it.
    off = lora_lib.adapters_disabled(ref_model) if ref_adapters_off else contextlib.nullcontext()
    with off:
        logps_BC, kl_BC = _per_token(one, c, h_BCD, ref_h_BCD, targets_BC)
    mask_BC = jnp.asarray(mask_BC, bool)
    total = lambda x_BC: jnp.sum(jnp.where(mask_BC, x_BC, 0.0), axis=-1)  # noqa: E731
    return total(logps_BC), total(kl_BC)


def scored_mask(completion_mask_BC, prompt_mask_BP):
    """The completion tokens that get a log-prob: the real ones, except the first when the
    prompt is empty (it has no predecessor; as TRL)."""
    scored_BC = jnp.asarray(completion_mask_BC, bool)
    return scored_BC.at[:, 0].set(scored_BC[:, 0] & jnp.asarray(prompt_mask_BP[:, -1], bool))


def completion_states(model, prompt_ids_BP, prompt_mask_BP, completion_ids_BC, completion_mask_BC,
                      *, remat: bool = False):  # fmt: skip
    """Final hidden states ``[B, C, D]`` at the positions that predict the completion tokens of
    left-padded prompts followed by right-padded completions (one decoder pass per row)."""
    P = prompt_ids_BP.shape[-1]
    ids_BT = jnp.concatenate([prompt_ids_BP, completion_ids_BC], axis=-1)
    mask_BT = jnp.concatenate([prompt_mask_BP, completion_mask_BC], axis=-1)
    return decoder_states(model, ids_BT, mask_BT, remat=remat)[:, P - 1 : -1]


def sequence_logps(model, prompt_ids_BP, prompt_mask_BP, completion_ids_BC, completion_mask_BC,
                   *, remat: bool = False, chunk: int = 0):  # fmt: skip
    """``log π(y|x)`` per row for left-padded prompts followed by right-padded completions.

    Runs the decoder over the whole rows but the LM head only on the ``C`` positions that
    predict completion tokens (in chunks, :func:`token_logps`). A model without Qwen3's
    sub-modules falls back to its full logits. Float32.
    """
    P = prompt_ids_BP.shape[-1]
    scored_BC = scored_mask(completion_mask_BC, prompt_mask_BP)
    if not hasattr(model, "layers"):
        ids_BT = jnp.concatenate([prompt_ids_BP, completion_ids_BC], axis=-1)
        mask_BT = jnp.concatenate([prompt_mask_BP, completion_mask_BC], axis=-1)
        logits_BCV = model(ids_BT, attention_mask=mask_BT)[:, P - 1 : -1]
        return target_logps(logits_BCV, completion_ids_BC, scored_BC)
    h_BCD = completion_states(model, prompt_ids_BP, prompt_mask_BP, completion_ids_BC,
                              completion_mask_BC, remat=remat)  # fmt: skip
    return token_logps(model, h_BCD, completion_ids_BC, scored_BC, chunk=chunk)


def _row_model(i: int, model, nograd_model):
    """The model that computes the ``i``-th completion of a shared prompt: the first in
    ``model`` (with gradient), the others in ``nograd_model`` when given."""
    return model if i == 0 or nograd_model is None else nograd_model


def shared_prompt_states(model, prompt_ids_BP, prompt_mask_BP, completions, *,
                         remat: bool = False, nograd_model=None, share: bool = True):  # fmt: skip
    """``[completion_states(model, prompt, *c) for c in completions]``, running the prompt once.

    The prompt minus its last column runs once (:func:`prefix_states`); each completion then
    continues from its keys / values with the last prompt token prepended, which gives the
    hidden states that predict its ``C`` tokens. With ``nograd_model`` (the same weights under
    ``stop_gradient``), every completion after the first continues from a stop-gradient prefix
    in that model. ``share=False`` (``KTOConfig.share_prompt_forward``), or a prompt of one
    column, which has nothing to share: each (prompt, completion) row runs on its own.
    """
    P = prompt_ids_BP.shape[-1]
    if P < 2 or not share:
        return [completion_states(_row_model(i, model, nograd_model), prompt_ids_BP,
                                  prompt_mask_BP, *c, remat=remat)
                for i, c in enumerate(completions)]  # fmt: skip
    prefix_ids, prefix_mask = _even_width(prompt_ids_BP[:, :-1], prompt_mask_BP[:, :-1], "left")
    prefix = prefix_states(model, prefix_ids, prefix_mask, remat=remat)
    last_ids_B1 = prompt_ids_BP[:, -1:]
    last_mask_B1 = jnp.asarray(prompt_mask_BP[:, -1:], bool)
    out = []
    for i, (ids_BC, mask_BC) in enumerate(completions):
        m, pre = model, prefix
        if i > 0 and nograd_model is not None:
            m, pre = nograd_model, jax.lax.stop_gradient(prefix)
        mask_BC = jnp.asarray(mask_BC, bool)
        C = ids_BC.shape[1]
        cont_ids_BC = jnp.concatenate([last_ids_B1, ids_BC[:, :-1]], axis=1)
        cont_mask_BC = jnp.concatenate([last_mask_B1, mask_BC[:, :-1]], axis=1)
        cont = _even_width(cont_ids_BC, cont_mask_BC, "right")
        out.append(continuation_states(m, pre, *cont, remat=remat)[:, :C])
    return out


def shared_prompt_logps(model, prompt_ids_BP, prompt_mask_BP, completions, *, remat: bool = False,
                        chunk: int = 0, nograd_model=None):  # fmt: skip
    """``[sequence_logps(model, prompt, *c) for c in completions]``, running the prompt once
    (:func:`shared_prompt_states`). KTO's matched and KL rows share their prompts, so this saves
    a decoder pass over every prompt per forward. ``completions`` is a list of
    ``(completion_ids_BC, completion_mask_BC)``. With ``nograd_model`` (the same weights under
    ``stop_gradient``), every completion after the first is computed in that model from a
    stop-gradient prefix: KTO's policy KL rows, which carry no gradient (z is stop-gradient).
    """
    P = prompt_ids_BP.shape[-1]
    if P < 2 or not hasattr(model, "layers"):
        return [sequence_logps(model, prompt_ids_BP, prompt_mask_BP, *c, remat=remat, chunk=chunk)
                for c in completions]  # fmt: skip
    states = shared_prompt_states(model, prompt_ids_BP, prompt_mask_BP, completions, remat=remat,
                                  nograd_model=nograd_model)  # fmt: skip
    return [
        token_logps(_row_model(i, model, nograd_model), h_BCD, ids_BC,
                    scored_mask(mask_BC, prompt_mask_BP), chunk=chunk)
        for i, (h_BCD, (ids_BC, mask_BC)) in enumerate(zip(states, completions))
    ]  # fmt: skip


def _even_width(ids_BT, mask_BT, side: str):
    """``(ids, mask)`` with one masked column added on ``side`` when ``T`` is odd.

    The shared-prompt passes run the prompt minus its last column, then ``C`` tokens over
    ``P - 1 + C`` keys: with the even buckets of the KTO data both lengths would be odd, and
    cuDNN's flash attention refuses odd lengths in a differentiated call
    (:func:`sfjax.models.attention.cudnn_unsupported_reason`), leaving the step on the plain
    path's ``[T, S]`` float32 scores. A masked column changes nothing: positions come from the
    mask, and no query sees a masked key (the prefix is left-padded, the continuation
    right-padded, as the data are).
    """
    if ids_BT.shape[1] % 2 == 0:
        return ids_BT, mask_BT
    pad = ((0, 0), (1, 0) if side == "left" else (0, 1))
    return jnp.pad(ids_BT, pad), jnp.pad(jnp.asarray(mask_BT, bool), pad)


__all__ = [
    "AUTO_CHUNK_BYTES",
    "chunk_tokens",
    "completion_states",
    "continuation_states",
    "decoder_states",
    "prefix_states",
    "scored_mask",
    "sequence_logps",
    "shared_prompt_logps",
    "shared_prompt_states",
    "token_logps",
    "token_logps_and_kl",
]
