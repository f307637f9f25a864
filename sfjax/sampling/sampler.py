"""Batched KV-cache sampler for the Flax Qwen3: one jitted prefill + ``lax.while_loop`` decode.

``Sampler(model, tokenizer).generate(prompts, SamplingParams(...), key)`` is the Actor's and
Refine-from-Reflection's hot loop (paper §IV-B, Algorithm 2 rollouts). One call is one jitted
program: prefill the left-padded prompts into a preallocated, donated KV cache, copy each
prompt's cache ``n`` times, then decode every row in lockstep until all rows are done or the
largest ``max_new_tokens`` is reached. Each step masks the logits (action constraint, stop
tokens before the action), draws from the temperature/top-k/top-p distribution
(:mod:`sfjax.sampling.distribution`), and advances per-row automata for stop strings and the
action field (:mod:`sfjax.sampling.automata`, :mod:`sfjax.sampling.constrained`).

No recompiles: the model's weights are an argument (``nnx.split``), never baked-in constants,
so KTO updates between calls reuse the program; sampling parameters, stop ids/strings and the
action range are traced arrays; prompt length, batch size and ``max_new_tokens`` are bucketed to
powers of two (prompt length >= ``min_prompt_bucket``, and in steps of 512 above 512;
new tokens >= 16). A compiled program is
keyed by (batch bucket, n, prompt bucket, new-token bucket, table buckets, model structure);
``Sampler.num_traces`` counts traces.

Outputs per completion: ``tokens`` (completion only; a stop *token* that ended the row is
included, text cut at a stop *string* is not), ``texts`` (stop token/string excluded, like
OpenAI/vLLM), ``logprobs`` (raw model log-softmax at temperature 1 of each token, what KTO/RfR
score) and ``sampling_logprobs`` (under the distribution actually sampled: constraint mask,
temperature, top-k, top-p; 0 for greedy and forced tokens), ``finish_reasons``
("stop" | "length") and, under an action constraint, the parsed ``actions``.

Shape legend: B = prompts (bucketed), N = B·n rows, T = prompt bucket, M = new-token bucket,
P = slots of a cached prompt prefix (0 without), S = cache slots (P + T + M), V = vocabulary,
K = stop ids per row, Z = stop strings, Q = automaton states.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfjax.models.qwen3 import init_cache
from sfjax.sampling import constrained as cons
from sfjax.sampling.automata import TokenBytes, header_dfa, string_dfa, token_bytes
from sfjax.sampling.constrained import ActionConstraint
from sfjax.sampling.distribution import row_keys
from sfjax.sampling.loop import decode_program
from sfjax.sampling.prefix import PrefixCache

_MIN_NEW_BUCKET = 16


def _bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


_PROMPT_STEP = 512


def _prompt_bucket(n: int, minimum: int = 1) -> int:
    """Prompt-length bucket: powers of two up to 512, then multiples of 512.

    Long prompts (the SF Actor's is ~2k tokens) would otherwise pad up to 2x: 2208 -> 2560
    instead of 4096, at the price of a few more compiled programs above 512 tokens.
    """
    if n <= _PROMPT_STEP:
        return _bucket(n, minimum)
    return max(minimum, -(-n // _PROMPT_STEP) * _PROMPT_STEP)


def cache_slots(prompt_len: int, max_new_tokens: int, min_prompt_bucket: int = 32) -> int:
    """KV-cache slots of one row of a call without a cached prefix: the prompt bucket of the
    longest prompt + the new-token bucket (with one, at most
    :data:`sfjax.sampling.prefix.MAX_EXTRA_SLOTS` more). Memory planners (RfR rollout chunks)
    use this, so the bucket rules live here only."""
    return _prompt_bucket(max(prompt_len, 1), _bucket(min_prompt_bucket)) + _bucket(
        max_new_tokens, _MIN_NEW_BUCKET
    )


def cache_rows(num_prompts: int, n: int) -> int:
    """KV-cache rows of a call: the prompt count's batch bucket times the samples per prompt."""
    return _bucket(num_prompts) * n


def _prompt_keys(key, P: int, B: int) -> jax.Array:
    """Typed keys ``[B]``, one per prompt row: ``fold_in(key, i)``, or the caller's ``[P]`` keys
    (padding rows get keys of their own; they are inactive)."""
    key = jnp.asarray(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key.astype(jnp.uint32))  # legacy PRNGKey data
    if key.ndim == 0:
        return row_keys(key, B)
    if key.shape != (P,):
        raise ValueError(f"key must be one key or one per prompt ({P}), got shape {key.shape}")
    if B == P:
        return key
    return jnp.concatenate([key, row_keys(key[0], B)[P:]])


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion (all numeric fields are traced: changing them is free)."""

    temperature: float = 1.0
    """Softmax temperature; 0 = greedy (argmax)."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 = off."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 = off."""
    max_new_tokens: int = 256
    """Most tokens generated per completion."""
    stop: tuple[str, ...] = ()
    """Stop strings: the completion ends at the first one, which is cut from the text."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end a completion (in addition to the EOS ids)."""
    ignore_eos: bool = False
    """Do not stop at the EOS ids (benchmarks, fixed-length sampling)."""

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")


@dataclass
class SamplerOutput:
    """Completions in prompt-major order: prompt i's samples are rows ``i*n .. i*n + n - 1``."""

    texts: list[str]
    tokens: list[list[int]]
    logprobs: list[list[float]]
    """Raw model log-probability (temperature 1, no filtering) of each token in ``tokens``."""
    sampling_logprobs: list[list[float]]
    """Log-probability under the distribution actually sampled from (0 if greedy/forced)."""
    finish_reasons: list[str]
    actions: list[int | None] = field(default_factory=list)
    """The constrained action of each completion (``None`` everywhere without a constraint)."""
    prompt_lengths: list[int] = field(default_factory=list)
    """Token count of each prompt (one entry per prompt, not per completion)."""


class Sampler:
    """Jit-compiled batched sampler over an NNX causal LM obeying the Qwen3 KV-cache contract.

    Args:
      model: ``sfjax.models.qwen3.Qwen3`` (possibly LoRA-wrapped); read afresh at every call,
        so weight updates between calls are seen without recompiling.
      tokenizer: its Hugging Face tokenizer.
      eos_token_ids: ids that end a completion; default: the tokenizer's EOS, the model config's
        EOS and ``<|im_end|>``/``<|endoftext|>`` when the vocabulary has them.
      pad_token_id: id written after a row ends; default: the tokenizer's pad (else first EOS).
      cache_dtype: KV-cache dtype; default: the model's compute dtype.
      min_prompt_bucket: smallest prompt-length bucket (a power of two).
      mesh: optional ``(data, fsdp, tp)`` :class:`jax.sharding.Mesh` (:mod:`sfjax.parallel`):
        the model is placed on it by the sharding rules (in place), prompts / rows / KV cache
        are split over the batch axes, and the program runs with explicit in/out shardings.
        With several processes every process must call ``generate`` with the same arguments.
      prefix_cache: keep the KV cache of the prompt prefix that consecutive calls share (the
        Actor's system prompt) and prefill only what follows it (:mod:`sfjax.sampling.prefix`);
        recomputed automatically when the weights change. Works under a ``mesh`` too (the
        prefix is kept sharded like a one-row KV cache).
      prefix_min_tokens: shortest shared prefix worth caching.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        eos_token_ids: Sequence[int] | None = None,
        pad_token_id: int | None = None,
        cache_dtype=None,
        min_prompt_bucket: int = 32,
        mesh=None,
        prefix_cache: bool = False,
        prefix_min_tokens: int = 128,
    ):
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "vocab_size"):
            raise TypeError("Sampler needs a model with a `.config` (e.g. sfjax.models.qwen3.Qwen3)")
        self.model = model
        self.tokenizer = tokenizer
        self._special_vocab: dict[str, int] | None = None
        self.config = config
        self.vocab_size = int(config.vocab_size)
        self.cache_dtype = jnp.dtype(cache_dtype or getattr(model, "dtype", jnp.float32))
        if eos_token_ids is None:
            eos = set()
            if tokenizer.eos_token_id is not None:
                eos.add(int(tokenizer.eos_token_id))
            cfg_eos = getattr(config, "eos_token_id", None)
            if cfg_eos is not None:
                eos.update(int(i) for i in np.atleast_1d(cfg_eos))
            vocab = self._vocab()
            eos.update(vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab)
            eos_token_ids = sorted(eos)
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        if pad_token_id is None:
            pad_token_id = tokenizer.pad_token_id
        if pad_token_id is None:
            pad_token_id = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.pad_token_id = int(pad_token_id)
        self.min_prompt_bucket = _bucket(min_prompt_bucket)
        self._counter = [0]
        self._program = jax.jit(
            decode_program(self._counter), static_argnums=(0, 1), donate_argnums=(3,)
        )
        self._caches: dict[tuple[int, int], object] = {}
        from sfjax import parallel

        self.mesh = parallel.resolve_mesh(mesh)  # `python -m sfjax.parallel` sets a default
        self._sharded_programs: dict[tuple, object] = {}
        if self.mesh is not None:
            parallel.shard_model(model, self.mesh)
        self._prefix_min_tokens = prefix_min_tokens
        self.prefix_cache: PrefixCache | None = None
        if prefix_cache:
            self.enable_prefix_cache()
        self._vocab_bytes: TokenBytes | None = None
        self._stop_tables: dict[tuple[str, ...], tuple[jax.Array, jax.Array]] = {}
        self._constraint_tables: dict[tuple[str, str], dict] = {}

    # ------------------------------------------------------------------------------ public
    @property
    def num_traces(self) -> int:
        """How many times the decode program was traced (one per distinct bucket/structure)."""
        return self._counter[0]

    def enable_prefix_cache(self, min_tokens: int | None = None) -> None:
        """Turn on prompt-prefix KV reuse (the ``prefix_cache`` constructor argument)."""
        if self.prefix_cache is None:
            self.prefix_cache = PrefixCache(
                self.config, self.cache_dtype, self.pad_token_id,
                min_tokens=min_tokens or self._prefix_min_tokens, mesh=self.mesh,
            )  # fmt: skip

    def release_cache(self) -> None:
        """Free the preallocated KV caches kept between calls (one per bucket) and the prefix."""
        self._caches.clear()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]] | str,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        key: jax.Array | None = None,
        *,
        n: int = 1,
        action_constraint: ActionConstraint | None = None,
    ) -> SamplerOutput:
        """Sample ``n`` completions for each prompt.

        Args:
          prompts: strings (tokenized without adding special tokens: apply the chat template
            first, e.g. ``sfjax.tokenizer.chat_prompt``) or token-id lists.
          params: one :class:`SamplingParams` for all prompts, or one per prompt.
          key: a ``jax.random`` key, required unless every row is greedy; or one key per prompt
            (``[len(prompts)]``). Prompt ``i`` samples with ``fold_in(key, i)`` (or its own
            key), sample ``j`` of it with ``fold_in(that, j)``: a completion depends only on
            its prompt's key, not on the batch it is sampled in (so callers may split a big
            batch into several calls and get the same samples).
          n: completions per prompt; they share one prefill.
          action_constraint: enforce an ``Action: <int in [lo, hi]>`` line in every completion.
        """
        prompt_ids = self._encode(prompts)
        P = len(prompt_ids)
        if params is None:
            params = SamplingParams()
        plist = [params] * P if isinstance(params, SamplingParams) else list(params)
        if len(plist) != P or not all(isinstance(p, SamplingParams) for p in plist):
            raise ValueError(f"pass one SamplingParams or a list of {P} (one per prompt)")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if key is None:
            if any(p.temperature > 0 for p in plist):
                raise ValueError("sampling with temperature > 0 needs a key: jax.random.key(seed)")
            key = jax.random.key(0)
        max_pos = getattr(self.config, "max_position_embeddings", None)
        for ids, p in zip(prompt_ids, plist):
            if max_pos is not None and len(ids) + p.max_new_tokens > max_pos:
                raise ValueError(
                    f"prompt of {len(ids)} tokens + max_new_tokens={p.max_new_tokens} exceeds "
                    f"the model's max_position_embeddings={max_pos}; shorten the prompt"
                )

        graphdef, state = nnx.split(self.model)
        weights = state
        # A weakly typed weight (e.g. set from a Python scalar) would otherwise retrace.
        state = jax.tree.map(lambda x: x.astype(x.dtype) if getattr(x, "weak_type", False)
                             else x, state)
        prefix = None
        if self.prefix_cache is not None:
            prefix = self.prefix_cache.plan(prompt_ids, graphdef, state, weights)
        skip = len(prefix.tokens) if prefix is not None else 0
        body_ids = [ids[skip:] for ids in prompt_ids]  # what the program prefills

        B = _bucket(P)
        T = _prompt_bucket(max(len(ids) for ids in body_ids), self.min_prompt_bucket)
        M = _bucket(max(p.max_new_tokens for p in plist), _MIN_NEW_BUCKET)
        N = B * n
        ids_BT = np.full((B, T), self.pad_token_id, np.int32)
        mask_BT = np.zeros((B, T), bool)
        for i, ids in enumerate(body_ids):
            ids_BT[i, T - len(ids):] = ids
            mask_BT[i, T - len(ids):] = True
        mask_BT[P:, -1] = True  # padding rows hold one real token so no row is empty

        rows, tables, row_meta = self._row_inputs(plist, P, B, n, M, action_constraint)
        key = _prompt_keys(key, P, B)
        S = T + M + (prefix.slots if prefix is not None else 0)
        cache_key = (N, S)
        cache = self._caches.pop(cache_key, None)
        if cache is None:
            cache = init_cache(self.config, N, S, self.cache_dtype, mesh=self.mesh)
        prefix_args = None
        if prefix is not None:
            prefix_args = dict(k=prefix.k_LyP, v=prefix.v_LyP, length=np.int32(skip))
        args = (state, cache, ids_BT, mask_BT, rows, tables, key, prefix_args)
        if self.mesh is None:
            out, cache = self._program(graphdef, n, *args)
        else:
            slots = prefix.slots if prefix is not None else None
            program, in_shardings = self._sharded_program(graphdef, state, B, N, slots)
            from sfjax.parallel import activation_sharding, put

            with activation_sharding(self.mesh):  # residual stream split over the batch axes
                out, cache = program(graphdef, n, *put(args, in_shardings))
        self._caches[cache_key] = cache
        out = jax.device_get(out)
        return self._finish(out, prompt_ids, plist, n, row_meta)

    # ------------------------------------------------------------------------------ sharding
    def _sharded_program(self, graphdef, state, B: int, N: int, prefix_slots: int | None):
        """The decode program with explicit in/out shardings for batch ``B`` / rows ``N``
        (and a cached prefix of ``prefix_slots`` slots, if any)."""
        from sfjax import parallel

        key = (graphdef, jax.tree.structure(state), B, N, prefix_slots)
        if key not in self._sharded_programs:
            mesh = self.mesh
            abstract = jax.eval_shape(lambda: init_cache(self.config, N, 1, self.cache_dtype))
            cache_sh = parallel.cache_shardings(abstract, mesh)
            prompts_sh = parallel.batch_sharding(mesh, (B,))  # a prefix: splits dim 0 only
            rows_sh = parallel.batch_sharding(mesh, (N,))
            rep = parallel.replicated(mesh)
            state_sh = parallel.state_shardings(state, mesh)
            prefix_sh = None
            if prefix_slots is not None:
                kv_sh = self.prefix_cache.kv_sharding(prefix_slots)
                prefix_sh = dict(k=kv_sh, v=kv_sh, length=rep)
            in_shardings = (state_sh, cache_sh, prompts_sh, prompts_sh, rows_sh, rep, rep,
                            prefix_sh)  # fmt: skip
            program = jax.jit(
                decode_program(self._counter), static_argnums=(0, 1), donate_argnums=(3,),
                in_shardings=in_shardings, out_shardings=(rep, cache_sh),
            )  # fmt: skip
            if len(self._sharded_programs) > 16:
                self._sharded_programs.pop(next(iter(self._sharded_programs)))
            self._sharded_programs[key] = (program, in_shardings)
        return self._sharded_programs[key]

    # ------------------------------------------------------------------------------ host side
    def _encode(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        out = []
        for p in prompts:
            if isinstance(p, str):
                ids = self.tokenizer(p, add_special_tokens=False)["input_ids"]
            else:
                ids = [int(i) for i in p]
            if not ids:
                raise ValueError("empty prompt: every prompt needs at least one token")
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise ValueError(f"prompt token ids must lie in [0, {self.vocab_size})")
            out.append(list(ids))
        return out

    def _vocab(self) -> dict[str, int]:
        """Added/special tokens by content (cheap: not the whole vocabulary)."""
        if self._special_vocab is None:
            added = getattr(self.tokenizer, "added_tokens_decoder", {})
            self._special_vocab = {t.content: int(i) for i, t in added.items()}
        return self._special_vocab

    def _bytes(self) -> TokenBytes:
        if self._vocab_bytes is None:
            self._vocab_bytes = TokenBytes(token_bytes(self.tokenizer, self.vocab_size))
        return self._vocab_bytes

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(
                f"action constraints need {text!r} to be a single token, the tokenizer gives {ids}"
            )
        return int(ids[0])

    def _stop_string_tables(self, stops: tuple[str, ...]):
        if stops not in self._stop_tables:
            V = self.vocab_size
            # Up to 4 stop strings of up to 14 bytes share one shape (no recompiles).
            Z = _bucket(len(stops), 4)
            Q = _bucket(max((len(s.encode()) + 2 for s in stops), default=1), 16)
            table_ZQV = np.zeros((Z, Q, V), np.int16)
            accept_Z = np.full((Z,), np.iinfo(np.int16).max, np.int32)
            for z, s in enumerate(stops):
                pattern = s.encode()
                table_ZQV[z, : len(pattern) + 1] = self._bytes().transitions(
                    string_dfa(pattern), len(pattern)
                )
                accept_Z[z] = len(pattern)
            if len(self._stop_tables) > 32:
                self._stop_tables.pop(next(iter(self._stop_tables)))
            self._stop_tables[stops] = (jnp.asarray(table_ZQV), jnp.asarray(accept_Z))
        return self._stop_tables[stops]

    def _field_tables(self, c: ActionConstraint | None) -> dict:
        word, field_, sep = (c.word, c.field, c.separator) if c else ("Action", "Action:", " ")
        cache_key = (field_, sep) if c else ("", "")
        if cache_key not in self._constraint_tables:
            V = self.vocab_size
            header_QV = np.zeros((16, V), np.int16)
            accept = 15
            seqs = [[], [], []]
            if c is not None:
                dfa, accept = header_dfa(word)
                if accept + 2 > 16:
                    raise ValueError(f"field word {word!r} is too long (at most 10 letters)")
                header_QV[: accept + 1] = self._bytes().transitions(dfa, accept)
                enc = self.tokenizer
                seqs = [
                    enc(field_[len(word):] + sep, add_special_tokens=False)["input_ids"]
                    if field_[len(word):] + sep else [],
                    enc("\n" + field_ + sep, add_special_tokens=False)["input_ids"],
                    enc(field_ + sep, add_special_tokens=False)["input_ids"],
                ]
            F = _bucket(max(len(s) for s in seqs), 8)
            force_SF = np.full((3, F), self.pad_token_id, np.int32)
            for i, s in enumerate(seqs):
                force_SF[i, : len(s)] = s
            digit_ids = (
                [self._single_token(str(d)) for d in range(10)] if c else list(range(10))
            )
            newline = self._single_token("\n") if c else 0
            self._constraint_tables[cache_key] = dict(
                header_QV=jnp.asarray(header_QV),
                header_accept=jnp.int32(accept),
                force_SF=jnp.asarray(force_SF),
                force_len_S=jnp.asarray([len(s) for s in seqs], jnp.int32),
                digit_ids_10=jnp.asarray(digit_ids, jnp.int32),
                newline_id=jnp.int32(newline),
                reserve=(len(seqs[cons.SEQ_BUDGET]), len(seqs[cons.SEQ_START])),
            )
        return self._constraint_tables[cache_key]

    def _row_inputs(self, plist, P, B, n, M, c: ActionConstraint | None):
        N = B * n
        prompt_of_N = np.minimum(np.arange(N) // n, P - 1)
        active_N = np.arange(N) // n < P
        rp = [plist[i] for i in prompt_of_N]
        stop_sets = [
            sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids)))
            for p in rp
        ]
        K = _bucket(max(len(s) for s in stop_sets), 8)
        stop_ids_NK = np.full((N, K), -1, np.int32)
        for r, s in enumerate(stop_sets):
            stop_ids_NK[r, : len(s)] = s
        think = [v for t, v in self._vocab().items() if t in ("<think>", "</think>")]
        ban_sets = [sorted(set(s) | set(think if c is not None else ())) for s in stop_sets]
        free_ban_NK = np.full((N, _bucket(max(len(s) for s in ban_sets), 8)), -1, np.int32)
        for r, s in enumerate(ban_sets):
            free_ban_NK[r, : len(s)] = s
        stops = tuple(sorted({s for p in plist for s in p.stop}))
        stop_ZQV, stop_accept_Z = self._stop_string_tables(stops)
        stop_on_NZ = np.zeros((N, stop_ZQV.shape[0]), bool)
        for r, p in enumerate(rp):
            for s in p.stop:
                stop_on_NZ[r, stops.index(s)] = True

        ft = self._field_tables(c)
        max_new_N = np.array([p.max_new_tokens for p in rp], np.int32)
        budget_N = np.full((N,), np.iinfo(np.int32).max, np.int32)
        if c is not None:
            seq_len = ft["reserve"][1] if c.action_first else ft["reserve"][0]
            need = seq_len + c.max_digits + 1
            if int(max_new_N.min()) < need:
                raise ValueError(
                    f"max_new_tokens={int(max_new_N.min())} leaves no room for the action line "
                    f"({need} tokens for {c.field!r} and up to {c.max_digits} digits); raise it"
                )
            if not c.action_first:
                room_N = max_new_N - need
                budget_N = room_N if c.free_budget is None else np.minimum(room_N, c.free_budget)
        enabled = c is not None
        lo, hi = (c.lo, c.hi) if enabled else (0, 0)
        rows = dict(
            temperature_N=jnp.asarray([p.temperature for p in rp], jnp.float32),
            top_k_N=jnp.asarray([p.top_k for p in rp], jnp.int32),
            top_p_N=jnp.asarray([p.top_p for p in rp], jnp.float32),
            max_new_N=jnp.asarray(max_new_N),
            stop_ids_NK=jnp.asarray(stop_ids_NK),
            free_ban_NK=jnp.asarray(free_ban_NK),
            stop_on_NZ=jnp.asarray(stop_on_NZ),
            active_N=jnp.asarray(active_N),
            tokens_init_NM=jnp.full((N, M), self.pad_token_id, jnp.int32),
            constraint=dict(
                lo_B=jnp.full((N,), lo, jnp.int32),
                hi_B=jnp.full((N,), hi, jnp.int32),
                budget_B=jnp.asarray(budget_N, jnp.int32),
                enabled_B=jnp.full((N,), enabled, bool),
            ),
        )
        tables = dict(
            stop_ZQV=stop_ZQV,
            stop_accept_Z=stop_accept_Z,
            constraint={k: v for k, v in ft.items() if k != "reserve"},
            action_first=jnp.asarray(bool(c.action_first) if c else False),
            pad_id=jnp.int32(self.pad_token_id),
        )
        meta = dict(stop_sets=stop_sets)
        return rows, tables, meta

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(
            [int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def _finish(self, out, prompt_ids, plist, n, meta) -> SamplerOutput:
        res = SamplerOutput([], [], [], [], [], [], [len(ids) for ids in prompt_ids])
        for i, p in enumerate(plist):
            for j in range(n):
                r = i * n + j
                L = int(out["length_N"][r])
                toks = [int(t) for t in out["tokens_NM"][r, :L]]
                lps = [float(x) for x in out["logprob_NM"][r, :L]]
                slps = [float(x) for x in out["sample_lp_NM"][r, :L]]
                finish = "stop" if int(out["finish_N"][r]) == 1 else "length"
                action_end = int(out["action_end_N"][r])
                text_len = L
                if finish == "stop" and L > action_end and toks[-1] in meta["stop_sets"][r]:
                    text_len = L - 1  # the stop token ends the row but is not text
                text = self._decode(toks[:text_len])
                if p.stop:
                    offset = len(self._decode(toks[:action_end])) if action_end else 0
                    hits = [text.find(s, offset) for s in p.stop]
                    hits = [h for h in hits if h >= 0]
                    if hits:
                        text = text[: min(hits)]
                        k = text_len
                        while k > action_end and not text.startswith(self._decode(toks[:k])):
                            k -= 1
                        toks, lps, slps = toks[:k], lps[:k], slps[:k]
                        finish = "stop"
                action = int(out["action_N"][r])
                res.texts.append(text)
                res.tokens.append(toks)
                res.logprobs.append(lps)
                res.sampling_logprobs.append(slps)
                res.finish_reasons.append(finish)
                res.actions.append(action if action >= 0 else None)
        return res
