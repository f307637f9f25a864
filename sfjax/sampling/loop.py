"""The jitted sampling program: prefill, per-prompt cache copies, one ``lax.while_loop`` decode.

Pure function of (model graph, weights, cache, prompt arrays, per-row parameters, tables, key);
:class:`sfjax.sampling.Sampler` prepares the arrays on the host and jits
:func:`decode_program` with the cache donated. Each step: mask the logits (action-field
phase, no stop before the action), draw the token (:mod:`sfjax.sampling.distribution`), record
raw and sampling log-probs, advance the action state machine
(:mod:`sfjax.sampling.constrained`) and the per-row stop-string automata
(:mod:`sfjax.sampling.automata`), then run the model on the new token for the next logits. The
loop exits when every row is done or the new-token bucket is full.

Shape legend: B = prompts (bucketed), N = B·n rows, T = prompt bucket, M = new-token bucket,
P = slots of a cached prompt prefix (0 without), S = cache slots (P + T + M), V = vocabulary,
K = stop ids per row, Z = stop strings, Q = automaton states.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sfjax.models.kv_cache import with_rows, write_rows
from sfjax.models.qwen3 import KVCache
from sfjax.sampling import constrained as cons
from sfjax.sampling import distribution as dist
from sfjax.sampling.automata import LINE_START


def decode_loop(
    graphdef, n, state, cache, ids_BT, mask_BT, rows, tables, key, prefix=None, *, counter
):
    """The jitted program: prefill, copy for ``n``, decode until all rows are done.

    ``prefix`` (optional, :mod:`sfjax.sampling.prefix`): ``dict(k=, v=, length=)`` with the
    cached keys/values (one row of ``P`` slots, in the cache's layout) of a token prefix shared by every
    prompt and its length; the prompts in ``ids_BT`` are then only what follows it. The prefix
    fills slots ``[0, P)`` of every row, the prompts are prefilled after it.

    ``key`` holds one typed key per prompt ``[B]``; sample ``j`` of prompt ``b`` draws its token
    at step ``t`` with ``fold_in(fold_in(key[b], j), t)``, so a completion depends only on its
    prompt's key, never on the batch it was sampled in.
    """
    counter[0] += 1

    def forward(ids, mask, c):
        model = nnx.merge(graphdef, state)
        if hasattr(model, "eval"):
            model.eval()  # sampling never uses dropout (a copy: the caller's mode is untouched)
        return model(ids, attention_mask=mask, cache=c)

    B, T = ids_BT.shape
    N = B * n
    M = rows["tokens_init_NM"].shape[1]
    S = cache.max_len
    P = jax.tree.leaves(prefix["k"])[0].shape[-2] if prefix is not None else 0
    if n == 1:  # the donated cache is reused; stale slots are masked out
        work = cache.replace(
            slot_mask=jnp.zeros_like(cache.slot_mask),
            positions=jnp.zeros_like(cache.positions),
            index=jnp.zeros_like(cache.index),
        )
    else:  # prefill B rows over the prompt slots only, then copy each row n times (RfR)
        work = KVCache(
            k=with_rows(cache.k, B, P + T),
            v=with_rows(cache.v, B, P + T),
            slot_mask=jnp.zeros((B, P + T), bool),
            positions=jnp.zeros((B,), jnp.int32),
            index=jnp.zeros_like(cache.index),
        )
    if prefix is not None:  # cached prefix in slots [0, P) of every row, prompts after it
        work = work.replace(
            k=write_rows(work.k, prefix["k"]),
            v=write_rows(work.v, prefix["v"]),
            slot_mask=work.slot_mask.at[:, :P].set(jnp.arange(P)[None, :] < prefix["length"]),
            positions=jnp.full((B,), prefix["length"], jnp.int32),
            index=jnp.int32(P),
        )
    # Prompt minus its last column (its logits are never used, so XLA drops the LM head), then
    # the last column alone: only [B, 1, V] logits are ever materialised.
    if T > 1:
        _, work = forward(ids_BT[:, :-1], mask_BT[:, :-1], work)
    logits_B1V, work = forward(ids_BT[:, -1:], mask_BT[:, -1:], work)
    logits_NV = jnp.repeat(logits_B1V[:, 0], n, axis=0)
    if n == 1:
        cache = work
    else:  # written into the donated N-row cache: peak memory one N-row cache + B prompt rows
        cache = cache.replace(
            k=write_rows(cache.k, work.k, repeat=n),
            v=write_rows(cache.v, work.v, repeat=n),
            slot_mask=jnp.zeros((N, S), bool).at[:, : P + T].set(
                jnp.repeat(work.slot_mask, n, axis=0)
            ),
            positions=jnp.repeat(work.positions, n),
            index=work.index,
        )

    temperature_N, top_k_N, top_p_N = rows["temperature_N"], rows["top_k_N"], rows["top_p_N"]
    max_new_N, stop_ids_NK = rows["max_new_N"], rows["stop_ids_NK"]
    stop_ZQV, stop_accept_Z = tables["stop_ZQV"], tables["stop_accept_Z"]
    stop_on_NZ = rows["stop_on_NZ"]
    ctab = cons.ConstraintTables(**tables["constraint"], **rows["constraint"])
    V = logits_NV.shape[-1]
    Z = stop_accept_Z.shape[0]
    pad_id = tables["pad_id"]

    def id_mask(ids_NK):  # -1 padded id lists -> [N, V] membership
        cols_NK = jnp.where(ids_NK < 0, V, ids_NK)
        return jnp.zeros((N, V + 1), bool).at[jnp.arange(N)[:, None], cols_NK].set(True)[:, :V]

    is_stop_NV = id_mask(stop_ids_NK)
    # Before the action exists a row may neither stop nor open a <think> block (which the
    # Actor's parser strips, action included).
    free_ban_NV = id_mask(rows["free_ban_NK"])

    fold = jax.vmap(jax.random.fold_in)
    keys_N = fold(jnp.repeat(key, n), jnp.tile(jnp.arange(n), B))  # prompt key, sample index
    carry = dict(
        step=jnp.int32(0),
        logits_NV=logits_NV,
        cache=cache,
        tokens_NM=rows["tokens_init_NM"],
        logprob_NM=jnp.zeros((N, M), jnp.float32),
        sample_lp_NM=jnp.zeros((N, M), jnp.float32),
        done_N=~rows["active_N"],
        finish_N=jnp.zeros((N,), jnp.int32),
        length_N=jnp.zeros((N,), jnp.int32),
        cstate=cons.initial_state(ctab, LINE_START, tables["action_first"]),
        stop_state_NZ=jnp.zeros((N, Z), jnp.int32),
    )

    def cond(c):
        return (c["step"] < M) & ~jnp.all(c["done_N"])

    def body(c):
        step, cstate, done_N = c["step"], c["cstate"], c["done_N"]

        def constrain(logits_NV):
            allowed_NV = cons.allowed_tokens(cstate, ctab, V)
            allowed_NV &= ~(free_ban_NV & (cstate.phase_B == cons.FREE)[:, None])
            return jnp.where(allowed_NV, logits_NV, dist.NEG_INF)

        # Unconstrained calls skip the [N, V] mask work entirely.
        masked_NV = jax.lax.cond(
            jnp.any(ctab.enabled_B), constrain, lambda x: x, c["logits_NV"]
        )
        step_keys_N = fold(keys_N, jnp.broadcast_to(step, (N,)))
        tok_N, sample_lp_N = dist.sample(step_keys_N, masked_NV, temperature_N, top_k_N, top_p_N)
        tok_N = jnp.where(done_N, pad_id, tok_N)
        logprob_N = dist.token_logprob(c["logits_NV"], tok_N)
        after_N = cstate.phase_B == cons.AFTER
        new_cstate = cons.advance(cstate, ctab, tok_N, step)
        # Stop tokens and strings count only once the action line (if any) is written.
        hit_id_N = is_stop_NV[jnp.arange(N), tok_N] & after_N
        code_NZ = stop_ZQV[jnp.arange(Z)[None, :], c["stop_state_NZ"], tok_N[:, None]]
        code_NZ = code_NZ.astype(jnp.int32)
        hit_str_N = jnp.any((code_NZ >= stop_accept_Z[None, :]) & stop_on_NZ, axis=1) & after_N
        stop_state_NZ = jnp.where(
            after_N[:, None], jnp.minimum(code_NZ, stop_accept_Z[None, :]), 0
        )
        hit_len_N = step + 1 >= max_new_N
        ending_N = ~done_N & (hit_id_N | hit_str_N | hit_len_N)
        finish_N = jnp.where(ending_N, jnp.where(hit_id_N | hit_str_N, 1, 2), c["finish_N"])
        new_done_N = done_N | ending_N
        logits_N1V, cache = forward(tok_N[:, None], ~new_done_N[:, None], c["cache"])
        return dict(
            step=step + 1,
            logits_NV=logits_N1V[:, 0],
            cache=cache,
            tokens_NM=c["tokens_NM"].at[:, step].set(tok_N),
            logprob_NM=c["logprob_NM"].at[:, step].set(jnp.where(done_N, 0.0, logprob_N)),
            sample_lp_NM=c["sample_lp_NM"].at[:, step].set(jnp.where(done_N, 0.0, sample_lp_N)),
            done_N=new_done_N,
            finish_N=finish_N,
            length_N=jnp.where(done_N, c["length_N"], step + 1),
            cstate=jax.tree.map(lambda new, old: jnp.where(done_N, old, new), new_cstate, cstate),
            stop_state_NZ=stop_state_NZ,
        )

    out = jax.lax.while_loop(cond, body, carry)
    results = dict(
        tokens_NM=out["tokens_NM"],
        logprob_NM=out["logprob_NM"],
        sample_lp_NM=out["sample_lp_NM"],
        length_N=out["length_N"],
        finish_N=out["finish_N"],
        action_N=jnp.where(out["cstate"].action_end_B > 0, out["cstate"].num_B, -1),
        action_end_N=out["cstate"].action_end_B,
    )
    return results, out["cache"]



def decode_program(counter: list[int]):
    """``decode_loop`` with a trace counter (``counter[0]`` grows by one per trace), to be jitted
    with ``static_argnums=(0, 1)`` (graph, n) and ``donate_argnums=(3,)`` (cache)."""

    def program(graphdef, n, state, cache, ids_BT, mask_BT, rows, tables, key, prefix=None):
        return decode_loop(
            graphdef, n, state, cache, ids_BT, mask_BT, rows, tables, key, prefix,
            counter=counter,
        )  # fmt: skip

    return program
