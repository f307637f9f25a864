"""KTO data: unpaired examples -> tokenized rows -> bucketed, padded micro-batches with KL pairs.

An example is ``(prompt, completion, desirable)`` (paper §IV-C: Reflector-labelled steps and
RfR rollouts). The KL reference point ``z`` of KTO (paper eq. 10) is estimated from mismatched
pairs ``(x_i, y'_i)``; like TRL, ``y'_i`` is the completion of another example of the same
micro-batch, by rolling the completions one place (``y'_i = y_{i-1}``). Unlike a blind roll,
:func:`kl_pairing` picks the smallest roll that never pairs a prompt with a completion produced
for an identical prompt (RfR datasets hold several rollouts per prompt), when such a roll exists.

Rows are right-padded (as TRL's collator) to a bucketed length so that the jitted train step
compiles once per bucket, not once per batch.

Shape legend: ``A`` micro-batches per optimizer step (gradient accumulation), ``B`` examples per
micro-batch, ``T`` bucketed sequence length.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KTOExample:
    """One unpaired preference example.

    ``prompt`` / ``completion`` are text (tokenized by the trainer's tokenizer, the completion
    starting where ``prompt + completion`` diverges from ``prompt``, as TRL does) or token ids.
    """

    prompt: str | Sequence[int]
    completion: str | Sequence[int]
    desirable: bool


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one example after truncation."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    desirable: bool


@dataclass(frozen=True)
class Batch:
    """Numpy arrays of one optimizer step: ``A`` micro-batches of ``B`` rows of length ``T``.

    ``kl_*`` hold the mismatched pairs (prompt of row i, completion of row ``kl_source[i]``).
    ``valid`` is False on filler rows of a short last micro-batch / step.
    """

    input_ids_ABT: np.ndarray
    attention_mask_ABT: np.ndarray
    completion_mask_ABT: np.ndarray
    kl_input_ids_ABT: np.ndarray
    kl_attention_mask_ABT: np.ndarray
    kl_completion_mask_ABT: np.ndarray
    desirable_AB: np.ndarray
    valid_AB: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def tokenize_examples(
    examples: Sequence[KTOExample],
    tokenizer,
    *,
    max_prompt_length: int,
    max_completion_length: int,
    add_eos: bool = True,
) -> list[TokenizedExample]:
    """Tokenize and truncate examples.

    Text completions are split TRL's way: tokenize ``prompt`` and ``prompt + completion`` and
    start the completion where the two diverge. If ``add_eos``, the tokenizer's EOS id is
    appended to a completion that does not end with it (TRL does the same for plain text).
    Prompts keep their last ``max_prompt_length`` tokens (the end is what conditions the
    completion); completions keep their first ``max_completion_length`` tokens.
    Examples whose completion is empty are an error (nothing to learn from).
    """
    if max_prompt_length < 1 or max_completion_length < 1:
        raise ValueError("max_prompt_length and max_completion_length must be >= 1")
    eos_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, KTOExample):
            raise TypeError(f"example {i} is a {type(ex).__name__}, expected KTOExample")
        if isinstance(ex.prompt, str) or isinstance(ex.completion, str):
            if not (isinstance(ex.prompt, str) and isinstance(ex.completion, str)):
                raise TypeError(f"example {i}: prompt and completion must both be text or both ids")
            if tokenizer is None:
                raise ValueError("text examples need a tokenizer; pass one to KTOTrainer")
            prompt_ids = _encode(tokenizer, ex.prompt)
            full_ids = _encode(tokenizer, ex.prompt + ex.completion)
            n = _common_prefix(prompt_ids, full_ids)
            prompt_ids, completion_ids = prompt_ids[:n], full_ids[n:]
        else:
            prompt_ids, completion_ids = [int(t) for t in ex.prompt], [int(t) for t in ex.completion]
        if add_eos and eos_id is not None and (not completion_ids or completion_ids[-1] != eos_id):
            completion_ids = completion_ids + [int(eos_id)]
        if not completion_ids:
            raise ValueError(f"example {i} has an empty completion")
        prompt_ids = prompt_ids[-max_prompt_length:] if prompt_ids else []
        completion_ids = completion_ids[:max_completion_length]
        out.append(TokenizedExample(tuple(prompt_ids), tuple(completion_ids), bool(ex.desirable)))
    return out


def kl_pairing(prompts: Sequence[tuple[int, ...]]) -> np.ndarray:
    """Source index of the mismatched completion for each row of one micro-batch.

    Returns ``src`` with row ``i`` paired with the completion of row ``src[i]``:
    ``src[i] = (i - k) mod n`` for the smallest roll ``k >= 1`` such that no row gets a
    completion written for an identical prompt (``k = 1``, TRL's roll, when prompts differ).
    If no roll achieves that (e.g. every row has the same prompt), ``k = 1`` is used and a
    warning is emitted. Needs ``n >= 2``; ``src[i] != i`` always holds.
    """
    n = len(prompts)
    if n < 2:
        raise ValueError(
            "KTO's KL term needs at least 2 examples per micro-batch (the KL pairs are other "
            "examples' completions); set micro_batch_size >= 2"
        )
    idx = np.arange(n)
    for k in range(1, n):
        src = (idx - k) % n
        if all(prompts[i] != prompts[j] for i, j in zip(idx, src)):
            return src
    warnings.warn(
        "every roll of this micro-batch pairs some prompt with a completion of an identical "
        "prompt; the KL estimate uses them anyway (more distinct prompts per batch avoid this)",
        stacklevel=2,
    )
    return (idx - 1) % n


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= ``n`` (buckets sorted ascending); the largest if none fits."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"sequence length {n} exceeds the largest bucket {max(buckets)}")


def default_buckets(max_length: int, smallest: int = 32) -> tuple[int, ...]:
    """Powers of two from ``smallest`` up to (and ending with) ``max_length``."""
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        b *= 2
    out.append(max_length)
    return tuple(out)


def epoch_order(n_examples: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """Example order of one epoch (a permutation from ``seed`` when ``shuffle``)."""
    if not shuffle:
        return np.arange(n_examples)
    return np.random.default_rng(seed).permutation(n_examples)


def plan_steps(
    order: np.ndarray, micro_batch_size: int, grad_accum_steps: int, *, need_pairs: bool
) -> list[list[np.ndarray]]:
    """Split an epoch's order into optimizer steps of up to ``A`` micro-batches of ``B`` rows.

    The last micro-batch may be short; with ``need_pairs`` (KTO's KL term) a final micro-batch
    of a single example cannot be paired and is left out of this epoch (with a warning; it is
    in another place of the next epoch's shuffle).
    """
    micro = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    if need_pairs and micro and len(micro[-1]) == 1:
        warnings.warn(
            "dropping one example at the end of this epoch: a micro-batch of 1 has no KL pair "
            "(use a dataset size that is not 1 mod micro_batch_size to avoid this)",
            stacklevel=2,
        )
        micro = micro[:-1]
    return [micro[i : i + grad_accum_steps] for i in range(0, len(micro), grad_accum_steps)]


def collate_step(
    examples: Sequence[TokenizedExample],
    step: Sequence[np.ndarray],
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    buckets: Sequence[int],
    pad_token_id: int,
    with_kl: bool,
) -> Batch:
    """Pad one optimizer step's micro-batches into fixed ``[A, B, T]`` arrays (right padding).

    Missing rows / micro-batches are filler (``valid`` False, all padding, attention mask 0).
    ``T`` is the bucket of the longest row, main or KL.
    """
    A, B = grad_accum_steps, micro_batch_size
    rows, kl_rows = [], []  # (a, b, prompt, completion, desirable)
    for a, members in enumerate(step):
        exs = [examples[int(i)] for i in members]
        src = kl_pairing([e.prompt_ids for e in exs]) if with_kl else np.arange(len(exs))
        for b, e in enumerate(exs):
            rows.append((a, b, e.prompt_ids, e.completion_ids, e.desirable))
            kl_rows.append((a, b, e.prompt_ids, exs[int(src[b])].completion_ids, e.desirable))
    longest = max(len(p) + len(c) for *_, p, c, _ in rows + (kl_rows if with_kl else []))
    T = bucket_length(longest, buckets)

    def fill(entries):
        ids = np.full((A, B, T), pad_token_id, np.int32)
        attn = np.zeros((A, B, T), bool)
        comp = np.zeros((A, B, T), bool)
        for a, b, p, c, _ in entries:
            n = len(p) + len(c)
            ids[a, b, :n] = p + c
            attn[a, b, :n] = True
            comp[a, b, len(p) : n] = True
        return ids, attn, comp

    ids, attn, comp = fill(rows)
    kl_ids, kl_attn, kl_comp = fill(kl_rows) if with_kl else (ids, attn, comp)
    desirable = np.zeros((A, B), bool)
    valid = np.zeros((A, B), bool)
    for a, b, *_, d in rows:
        desirable[a, b] = d
        valid[a, b] = True
    return Batch(ids, attn, comp, kl_ids, kl_attn, kl_comp, desirable, valid)
