"""KTO data: unpaired examples -> tokenized rows -> bucketed, padded micro-batches with KL pairs.

An example is ``(prompt, completion, desirable)`` (paper §IV-C: Reflector-labelled steps and
RfR rollouts). The KL reference point ``z`` of KTO (paper eq. 10) is estimated from mismatched
pairs ``(x_i, y'_i)``; like TRL, ``y'_i`` is the completion of another example of the same
micro-batch, by rolling the completions one place (``y'_i = y_{i-1}``). Unlike a blind roll,
:func:`kl_pairing` picks the smallest roll that never pairs a prompt with a completion produced
for an identical prompt (RfR datasets hold several rollouts per prompt), when such a roll exists.

Layout: prompts are left-padded to a bucketed length ``P`` and completions right-padded to a
bucketed length ``C``, so every completion starts at column ``P``. The train step then needs
the LM head only on the ``C`` completion positions (not on the prompt, usually far longer),
and compiles once per ``(P, C)`` bucket pair, not once per batch. The KL rows reuse the prompt
arrays with the rolled completions.

Shape legend: ``A`` micro-batches per optimizer step (gradient accumulation), ``B`` examples per
micro-batch, ``P`` bucketed prompt length, ``C`` bucketed completion length.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sfjax.sampling.prefix import common_prefix_len

_log = logging.getLogger(__name__)


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
    """Numpy arrays of one optimizer step: ``A`` micro-batches of ``B`` rows.

    Row ``(a, b)`` is ``prompt_ids[a, b]`` (left-padded, ``prompt_mask`` marks real tokens)
    followed by ``completion_ids[a, b]`` (right-padded, ``completion_mask``); its KL row is the
    same prompt followed by ``kl_completion_ids[a, b]`` (another row's completion).
    ``valid`` is False on filler rows of a short last micro-batch / step.
    """

    prompt_ids_ABP: np.ndarray
    prompt_mask_ABP: np.ndarray
    completion_ids_ABC: np.ndarray
    completion_mask_ABC: np.ndarray
    kl_completion_ids_ABC: np.ndarray
    kl_completion_mask_ABC: np.ndarray
    desirable_AB: np.ndarray
    valid_AB: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def full_rows(self, kl: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, attention_mask, completion_mask)`` ``[A, B, P + C]`` of the whole rows."""
        comp_ids = self.kl_completion_ids_ABC if kl else self.completion_ids_ABC
        comp_mask = self.kl_completion_mask_ABC if kl else self.completion_mask_ABC
        ids = np.concatenate([self.prompt_ids_ABP, comp_ids], axis=-1)
        mask = np.concatenate([self.prompt_mask_ABP, comp_mask], axis=-1)
        comp = np.concatenate([np.zeros_like(self.prompt_mask_ABP), comp_mask], axis=-1)
        return ids, mask, comp


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
    Examples whose completion is empty are an error (nothing to learn from). Cutting is
    logged (a warning per call with counts and the longest length): a prompt cut from the left
    loses its system prompt, so the model trains on a prompt it never acts on.
    """
    if max_prompt_length < 1 or max_completion_length < 1:
        raise ValueError("max_prompt_length and max_completion_length must be >= 1")
    eos_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    out = []
    cut = {"prompt": [], "completion": []}
    text_cut = False  # a text completion was cut: it may re-tokenize longer than it was sampled
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
            n = common_prefix_len(prompt_ids, full_ids)
            prompt_ids, completion_ids = prompt_ids[:n], full_ids[n:]
        else:
            prompt_ids, completion_ids = [int(t) for t in ex.prompt], [int(t) for t in ex.completion]
        if add_eos and eos_id is not None and (not completion_ids or completion_ids[-1] != eos_id):
            completion_ids = completion_ids + [int(eos_id)]
        if not completion_ids:
            raise ValueError(f"example {i} has an empty completion")
        for what, ids, limit in (("prompt", prompt_ids, max_prompt_length),
                                 ("completion", completion_ids, max_completion_length)):
            if len(ids) > limit:
                cut[what].append(len(ids))
                text_cut |= what == "completion" and isinstance(ex.completion, str)
        prompt_ids = prompt_ids[-max_prompt_length:] if prompt_ids else []
        completion_ids = completion_ids[:max_completion_length]
        out.append(TokenizedExample(tuple(prompt_ids), tuple(completion_ids), bool(ex.desirable)))
    for what, end, limit in (("prompt", "start", max_prompt_length),
                             ("completion", "end", max_completion_length)):
        if cut[what]:
            _log.warning("%d of %d %ss are longer than max_%s_length %d (longest %d tokens) and "
                         "lose their %s; raise max_%s_length to train on what the model saw%s",
                         len(cut[what]), len(examples), what, what, limit, max(cut[what]), end,
                         what, _RETOKENIZED if what == "completion" and text_cut else "")
    return out


_RETOKENIZED = (
    " (text completions are tokenized again: a completion sampled within the limit comes back "
    "longer when its text is degenerate, e.g. repeated words or broken characters; read the "
    "completions before raising the limit)"
)


def _mismatch_roll(prompts: Sequence[tuple[int, ...]]) -> np.ndarray | None:
    """``src[i] = (i - k) mod n`` for the smallest roll ``k >= 1`` that pairs no row with a
    completion of an identical prompt, or None when no roll does."""
    n = len(prompts)
    idx = np.arange(n)
    for k in range(1, n):
        src = (idx - k) % n
        if all(prompts[i] != prompts[j] for i, j in zip(idx, src)):
            return src
    return None


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
    src = _mismatch_roll(prompts)
    if src is not None:
        return src
    warnings.warn(
        "every roll of this micro-batch pairs some prompt with a completion of an identical "
        "prompt; the KL estimate uses them anyway (more distinct prompts per batch avoid this)",
        stacklevel=2,
    )
    return (np.arange(n) - 1) % n


def _partners_outside(examples: Sequence[TokenizedExample], idx: np.ndarray) -> np.ndarray | None:
    """KL partners for the group ``idx`` (consecutive dataset positions) from the whole
    dataset: row ``i`` takes the nearest example before the group (cyclically) whose prompt
    differs from its own, unused by the group's earlier rows when possible; None when some
    row's prompt is the only prompt in the dataset."""
    n, start = len(examples), int(idx[0])
    order = [(start - 1 - d) % n for d in range(n)]  # before the group, nearest first
    used: set[int] = set()
    partner = np.empty(len(idx), np.int64)
    for r, i in enumerate(idx):
        own = examples[int(i)].prompt_ids
        first = None
        for j in order:  # stops at the first unused fit: K + a few steps on RfR data
            if j == i or examples[j].prompt_ids == own:
                continue
            first = j if first is None else first
            if j not in used:
                first = j
                break
        if first is None:
            return None
        partner[r] = first
        used.add(first)
    return partner


def fixed_kl_partners(
    examples: Sequence[TokenizedExample], micro_batch_size: int
) -> np.ndarray:
    """One fixed KL partner per example: ``partner[i]`` is the example whose completion is
    ``y'_i`` for prompt ``x_i``, for all epochs (TRL's precomputed-reference semantics).

    Pairs are drawn by :func:`kl_pairing` inside consecutive groups of ``micro_batch_size``
    examples in dataset order (a final lone example joins the group before it), so without
    shuffling they are exactly the pairs of the on-the-fly path. A group in which every roll
    pairs some prompt with a completion of an identical prompt (RfR's K rollouts of one
    prompt filling a group) takes its partners from the rest of the dataset instead
    (:func:`_partners_outside`): z is estimated from mismatched pairs (KTO eq. 10), not from
    matched ones. Needs >= 2 examples.
    """
    n = len(examples)
    if n < 2:
        raise ValueError("KL pairs need at least 2 examples")
    size = max(int(micro_batch_size), 2)
    starts = list(range(0, n, size))
    if n - starts[-1] == 1:
        starts.pop()
    partner = np.empty(n, np.int64)
    for k, start in enumerate(starts):
        stop = starts[k + 1] if k + 1 < len(starts) else n
        idx = np.arange(start, stop)
        prompts = [examples[i].prompt_ids for i in idx]
        src = _mismatch_roll(prompts)
        # RfR datasets hold K consecutive rollouts of one prompt: a group may have no
        # mismatching roll; its partners then come from the rest of the (fixed) dataset
        outside = _partners_outside(examples, idx) if src is None else None
        partner[idx] = outside if outside is not None else idx[kl_pairing(prompts)]
    return partner


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= ``n`` (buckets sorted ascending)."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")


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

    The last micro-batch may be short. With ``need_pairs`` (KTO's KL term) a final
    micro-batch of a single example has no KL partner: it takes one example from the
    micro-batch before it (sizes ``B - 1`` and ``2``; both are padded to ``B`` anyway, so no
    new shapes), and only with ``B = 2`` (nothing to borrow) or a one-example epoch is it left
    out of this epoch (a debug line; the next epoch's shuffle puts it elsewhere).
    """
    micro = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    if need_pairs and micro and len(micro[-1]) == 1:
        if len(micro) >= 2 and len(micro[-2]) >= 3:
            prev = micro[-2]
            micro[-2:] = [prev[:-1], np.concatenate([prev[-1:], micro[-1]])]
        else:
            _log.debug(
                "KTO epoch of %d examples in micro-batches of %d: the last example has no KL "
                "partner and is left out of this epoch", len(order), micro_batch_size,
            )  # fmt: skip
            micro = micro[:-1]
    return [micro[i : i + grad_accum_steps] for i in range(0, len(micro), grad_accum_steps)]


def collate_step(
    examples: Sequence[TokenizedExample],
    step: Sequence[np.ndarray],
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    prompt_buckets: Sequence[int],
    completion_buckets: Sequence[int],
    pad_token_id: int,
    with_kl: bool,
    kl_partner: np.ndarray | None = None,
) -> Batch:
    """Pad one optimizer step's micro-batches into fixed ``[A, B, P]`` / ``[A, B, C]`` arrays.

    ``P`` is the prompt bucket of the longest prompt (at least 1), ``C`` the completion bucket
    of the longest completion (matched or KL). Missing rows / micro-batches are filler
    (``valid`` False, all padding, masks 0). KL completions come from :func:`kl_pairing` within
    each micro-batch, or from ``kl_partner`` (:func:`fixed_kl_partners`) when given.
    """
    A, B = grad_accum_steps, micro_batch_size
    rows = []  # (a, b, prompt, completion, kl completion, desirable)
    for a, members in enumerate(step):
        exs = [examples[int(i)] for i in members]
        if with_kl and kl_partner is not None:
            kl_exs = [examples[int(kl_partner[int(i)])] for i in members]
        elif with_kl:
            kl_exs = [exs[int(j)] for j in kl_pairing([e.prompt_ids for e in exs])]
        else:
            kl_exs = exs
        for b, e in enumerate(exs):
            kl = kl_exs[b].completion_ids
            rows.append((a, b, e.prompt_ids, e.completion_ids, kl, e.desirable))
    P = bucket_length(max(max(len(r[2]) for r in rows), 1), prompt_buckets)
    C = bucket_length(max(max(len(r[3]), len(r[4])) for r in rows), completion_buckets)

    prompt_ids = np.full((A, B, P), pad_token_id, np.int32)
    prompt_mask = np.zeros((A, B, P), bool)
    comp_ids = np.full((A, B, C), pad_token_id, np.int32)
    comp_mask = np.zeros((A, B, C), bool)
    kl_ids = np.full((A, B, C), pad_token_id, np.int32)
    kl_mask = np.zeros((A, B, C), bool)
    desirable = np.zeros((A, B), bool)
    valid = np.zeros((A, B), bool)
    for a, b, p, c, k, d in rows:
        if p:
            prompt_ids[a, b, P - len(p) :] = p
            prompt_mask[a, b, P - len(p) :] = True
        comp_ids[a, b, : len(c)] = c
        comp_mask[a, b, : len(c)] = True
        kl_ids[a, b, : len(k)] = k
        kl_mask[a, b, : len(k)] = True
        desirable[a, b] = d
        valid[a, b] = True
    return Batch(prompt_ids, prompt_mask, comp_ids, comp_mask, kl_ids, kl_mask, desirable, valid)
