"""Constrained decoding of the Actor's ``Action: <integer>`` field (a per-row state machine).

The Actor (paper §IV, eq. 14 output format) writes a reflection, an ``Action: <int>`` line and an
analysis, in either order. :class:`ActionConstraint` makes the sampler guarantee that the output
holds exactly one action header, at the start of a line, followed by an integer in
``[lo, hi]`` — even from a random-weight model. Per row, a phase advances as tokens are drawn:

* ``FREE`` — free text before the field (reflection). Stop/EOS tokens are masked so the row cannot
  end before the action exists. A line-start header automaton (:func:`automata.header_dfa`, the
  same header syntax as the Actor's parser: decoration, list markers, any letter case) watches
  the text: a token completing the field's word (``Action``) exactly at its end switches to
  ``FORCE`` with the rest of the field (``": "``) queued; a token that would complete it in its
  middle is masked. After ``free_budget`` free tokens the whole ``"\\nAction: "`` is forced.
* ``FORCE`` — exactly one allowed token: the next one of the queued field tokens.
* ``DIGITS`` — only digit tokens that keep the number a prefix of some integer in ``[lo, hi]``
  (no leading zeros), and the newline token once the number is complete and in range.
* ``AFTER`` — free text (analysis) until a stop; a second action header is masked.

The "action first" order starts in ``FORCE`` with ``"Action: "`` queued. Rows of an
unconstrained call start (and stay) in ``AFTER`` with the header ban disabled.

Shape legend: B = batch rows, V = vocabulary, Q = header automaton states, F = forced tokens,
S = 3 forced sequences (after the word / whole field after a newline / whole field at start).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sfjax.sampling.automata import LINE_START

FREE, FORCE, DIGITS, AFTER = 0, 1, 2, 3
"""Phase codes."""

SEQ_REST, SEQ_BUDGET, SEQ_START = 0, 1, 2
"""Which forced sequence a ``FORCE`` phase plays."""

MAX_ACTION = 10**9 - 1
"""Largest supported upper bound (int32 arithmetic in the loop)."""


@dataclass(frozen=True)
class ActionConstraint:
    """Enforce a valid ``Action: <integer in [lo, hi]>`` line in every sampled completion."""

    lo: int
    """Smallest allowed action (>= 0)."""
    hi: int
    """Largest allowed action (inclusive)."""
    field: str = "Action:"
    """Header that opens the action line; must start with letters (the Actor's ACTION_FIELD)."""
    separator: str = " "
    """Text between the header and the integer."""
    action_first: bool = False
    """The completion starts with the action line (else it follows free text, e.g. a reflection)."""
    free_budget: int | None = None
    """Most free tokens before the field is forced; None: as late as ``max_new_tokens`` allows."""

    def __post_init__(self):
        if not 0 <= self.lo <= self.hi <= MAX_ACTION:
            raise ValueError(
                f"ActionConstraint needs 0 <= lo <= hi <= {MAX_ACTION}, got lo={self.lo}, "
                f"hi={self.hi}"
            )
        word = self.word
        if not word:
            raise ValueError(f"field must start with letters like 'Action:', got {self.field!r}")
        if self.free_budget is not None and self.free_budget < 0:
            raise ValueError(f"free_budget must be >= 0 or None, got {self.free_budget}")
        del word

    @property
    def word(self) -> str:
        """The leading letters of the field (what the header automaton matches)."""
        n = 0
        while n < len(self.field) and self.field[n].isascii() and self.field[n].isalpha():
            n += 1
        return self.field[:n]

    @property
    def max_digits(self) -> int:
        """Digits of ``hi``."""
        return len(str(self.hi))


class ConstraintTables(NamedTuple):
    """Traced inputs of the state machine (shared by all rows except the per-row bounds)."""

    header_QV: jax.Array
    """int16 header-automaton token transitions (see :mod:`sfjax.sampling.automata`)."""
    header_accept: jax.Array
    """int32 accept code of ``header_QV``; ``accept + 1`` means overshoot."""
    force_SF: jax.Array
    """int32 forced token sequences, padded."""
    force_len_S: jax.Array
    """int32 lengths of the forced sequences."""
    digit_ids_10: jax.Array
    """int32 token id of each digit 0..9."""
    newline_id: jax.Array
    """int32 id of the newline token that ends the action line."""
    lo_B: jax.Array
    hi_B: jax.Array
    budget_B: jax.Array
    """int32 step at which ``FREE`` gives way to the forced field."""
    enabled_B: jax.Array
    """bool: row is constrained."""


class ConstraintState(NamedTuple):
    """Per-row state carried through the decode loop."""

    phase_B: jax.Array
    header_B: jax.Array
    which_B: jax.Array
    pos_B: jax.Array
    num_B: jax.Array
    ndigits_B: jax.Array
    action_end_B: jax.Array
    """Completion length right after the action line's newline (0 until then)."""


def initial_state(tables: ConstraintTables, line_start: int, action_first: jax.Array):
    """Start state: ``FORCE`` (action first), ``FORCE`` (zero budget), ``FREE`` or ``AFTER``."""
    B = tables.lo_B.shape[0]
    zeros = jnp.zeros((B,), jnp.int32)
    force_now = action_first | (tables.budget_B <= 0)
    phase = jnp.where(tables.enabled_B, jnp.where(force_now, FORCE, FREE), AFTER)
    return ConstraintState(
        phase_B=phase.astype(jnp.int32),
        header_B=zeros + line_start,
        which_B=zeros + SEQ_START,
        pos_B=zeros,
        num_B=zeros,
        ndigits_B=zeros,
        action_end_B=zeros,
    )


def digit_mask(num_B, ndigits_B, lo_B, hi_B, max_digits: int = 9):
    """Which digits may follow, and whether the number may end here.

    Digit ``d`` is allowed iff ``c = 10·num + d`` (no leading zero) is a decimal prefix of some
    integer in ``[lo, hi]``: there is ``m >= 0`` with ``[c·10^m, (c+1)·10^m − 1] ∩ [lo, hi] ≠ ∅``.
    Returns ``(allowed_B10, can_end_B)``; all arithmetic stays inside int32.
    """
    d_10 = jnp.arange(10, dtype=jnp.int32)
    extendable_B = (num_B <= hi_B // 10) & ~((ndigits_B >= 1) & (num_B == 0))
    cand_B10 = jnp.where(extendable_B[:, None], num_B[:, None] * 10 + d_10[None, :], 0)
    ok_B10 = jnp.zeros(cand_B10.shape, bool)
    for m in range(max_digits + 1):
        p = 10**m
        fits = cand_B10 <= (hi_B // p)[:, None]
        reaches = cand_B10 + 1 >= ((lo_B + p) // p)[:, None]
        ok_B10 |= fits & reaches
    leading_zero_B10 = (ndigits_B == 0)[:, None] & (d_10 == 0)[None, :]
    ok_B10 = jnp.where(leading_zero_B10, (lo_B == 0)[:, None], ok_B10)
    allowed_B10 = extendable_B[:, None] & ok_B10
    can_end_B = (ndigits_B >= 1) & (num_B >= lo_B) & (num_B <= hi_B)
    return allowed_B10, can_end_B


def allowed_tokens(state: ConstraintState, tables: ConstraintTables, vocab_size: int):
    """``(allowed_BV, restrict_B)``: the token mask of each row's phase; unrestricted rows all True.

    Stop tokens are handled by the caller (masked unless the phase is ``AFTER``).
    """
    B = state.phase_B.shape[0]
    vocab_V = jnp.arange(vocab_size, dtype=jnp.int32)
    header_next_BV = tables.header_QV[state.header_B].astype(jnp.int32)
    accept = tables.header_accept
    overshoot_BV = header_next_BV > accept
    complete_BV = header_next_BV >= accept
    forced_B = tables.force_SF[state.which_B, jnp.minimum(state.pos_B, tables.force_SF.shape[1] - 1)]
    allowed_B10, can_end_B = digit_mask(state.num_B, state.ndigits_B, tables.lo_B, tables.hi_B)
    digit_BV = jnp.zeros((B, vocab_size), bool).at[:, tables.digit_ids_10].set(allowed_B10)
    digit_BV = digit_BV | ((vocab_V[None, :] == tables.newline_id) & can_end_B[:, None])
    phase = state.phase_B[:, None]
    allowed_BV = jnp.where(
        phase == FREE,
        ~overshoot_BV,
        jnp.where(
            phase == FORCE,
            vocab_V[None, :] == forced_B[:, None],
            jnp.where(phase == DIGITS, digit_BV, ~complete_BV),
        ),
    )
    return allowed_BV | ~tables.enabled_B[:, None]


def advance(state: ConstraintState, tables: ConstraintTables, token_B, step):
    """State after emitting ``token_B`` at completion index ``step`` (0-based)."""
    accept = tables.header_accept
    header_next_B = tables.header_QV[state.header_B, token_B].astype(jnp.int32)
    phase = state.phase_B
    # FREE: the model finished the field's word -> queue the rest; out of budget -> queue it all.
    trigger = (phase == FREE) & (header_next_B == accept)
    out_of_budget = (phase == FREE) & ~trigger & (step + 1 >= tables.budget_B)
    which = jnp.where(trigger, SEQ_REST, jnp.where(out_of_budget, SEQ_BUDGET, state.which_B))
    pos = jnp.where(trigger | out_of_budget, 0, state.pos_B)
    new_phase = jnp.where(trigger | out_of_budget, FORCE, phase)
    # FORCE: step through the queued tokens.
    pos = jnp.where(phase == FORCE, pos + 1, pos)
    # A sequence may be empty (e.g. no separator): then go straight to DIGITS.
    entering_force = new_phase == FORCE
    seq_done = entering_force & (pos >= tables.force_len_S[which])
    new_phase = jnp.where(seq_done, DIGITS, new_phase)
    # DIGITS: accumulate, end on the newline.
    is_digit_B10 = token_B[:, None] == tables.digit_ids_10[None, :]
    is_digit = (phase == DIGITS) & is_digit_B10.any(axis=1)
    digit = jnp.argmax(is_digit_B10, axis=1).astype(jnp.int32)
    num = jnp.where(is_digit, state.num_B * 10 + digit, state.num_B)
    ndigits = state.ndigits_B + is_digit.astype(jnp.int32)
    finished = (phase == DIGITS) & (token_B == tables.newline_id)
    new_phase = jnp.where(finished, AFTER, new_phase)
    action_end = jnp.where(finished, step + 1, state.action_end_B)
    header = jnp.where(finished, jnp.int32(LINE_START), jnp.minimum(header_next_B, accept))
    new_phase = jnp.where(tables.enabled_B, new_phase, AFTER)
    return ConstraintState(
        phase_B=new_phase.astype(jnp.int32),
        header_B=header,
        which_B=which.astype(jnp.int32),
        pos_B=pos.astype(jnp.int32),
        num_B=num,
        ndigits_B=ndigits,
        action_end_B=action_end.astype(jnp.int32),
    )
