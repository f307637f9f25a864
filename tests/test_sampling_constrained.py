"""The action-field state machine and the byte automata, against brute force references."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfjax.agents.prompts import _FIELD_RE
from sfjax.sampling import ActionConstraint, constrained
from sfjax.sampling.automata import (
    LINE_START,
    TokenBytes,
    header_dfa,
    run_dfa,
    string_dfa,
    token_bytes,
)
from sfjax.sampling.constrained import digit_mask

_digit_mask = jax.jit(digit_mask)
RANGES = [(0, 25), (3, 13), (1, 100), (7, 7), (0, 0), (10, 999), (95, 105), (0, 9), (19, 21)]


def brute_force(prefix: str, lo: int, hi: int):
    """Digits d such that prefix+d starts some str(x), x in [lo, hi]; and whether prefix ends."""
    strings = {str(x) for x in range(lo, hi + 1)}
    starts = {s[:i] for s in strings for i in range(1, len(s) + 1)}
    allowed = [prefix + str(d) in starts for d in range(10)]
    can_end = prefix in strings
    return allowed, can_end


@pytest.mark.parametrize("lo,hi", RANGES)
def test_digit_mask_matches_brute_force(lo, hi):
    prefixes = {""}
    for x in range(lo, hi + 1):
        s = str(x)
        prefixes.update(s[:i] for i in range(1, len(s) + 1))
    prefixes.update({"0", "00", "1", "9", "99", "1000"})  # some unreachable ones too
    prefixes = sorted(prefixes)
    B = 2048  # one padded shape so that all ranges share one compiled program
    num = np.zeros(B, np.int32)
    nd = np.zeros(B, np.int32)
    num[: len(prefixes)] = [int(p) if p else 0 for p in prefixes]
    nd[: len(prefixes)] = [len(p) for p in prefixes]
    allowed, can_end = _digit_mask(num, nd, np.full(B, lo, np.int32), np.full(B, hi, np.int32))
    allowed, can_end = np.asarray(allowed), np.asarray(can_end)
    for i, p in enumerate(prefixes):
        ref_allowed, ref_end = brute_force(p, lo, hi)
        if p.startswith("0") and len(p) > 1:  # unreachable (leading zeros): must stay closed
            assert not allowed[i].any(), (p, lo, hi)
            continue
        assert allowed[i].tolist() == ref_allowed, (p, lo, hi)
        assert bool(can_end[i]) == ref_end, (p, lo, hi)


def test_digit_mask_large_bounds_do_not_overflow():
    hi = 999_999_999
    num = jnp.asarray([99_999_999, 999_999_999, 123], jnp.int32)
    nd = jnp.asarray([8, 9, 3], jnp.int32)
    allowed, can_end = digit_mask(num, nd, jnp.zeros(3, jnp.int32), jnp.full(3, hi))
    assert np.asarray(allowed[0]).all() and not np.asarray(allowed[1]).any()
    assert np.asarray(allowed[2]).all() and np.asarray(can_end).all()


def parser_sees_action_header(text: str) -> bool:
    return _FIELD_RE["action"].search(text) is not None


@pytest.mark.parametrize(
    "text,accepted",
    [
        ("Action", True),
        ("foo\n**action", True),
        ("x Action", False),
        ("1. Action", True),
        ("- ACTION", True),
        ("reaction", False),
        ("> # __Action", True),
        ("12) *action", True),
        ("\n\n  \tactions", True),  # conservative: the parser would not read "actions:"
        ("an action", False),
        ("12action", False),
        ("Act\nion", False),
    ],
)
def test_header_dfa_covers_actor_parser(text, accepted):
    """Every header the Actor's parser reads reaches accept (so the sampler can ban it)."""
    dfa, accept = header_dfa("Action")
    got = run_dfa(dfa, LINE_START, text.encode()) == accept
    assert got == accepted, text
    if parser_sees_action_header(text + ": 5"):
        assert got, text


def test_string_dfa_finds_pattern_like_str_find():
    rng = np.random.default_rng(0)
    for _ in range(200):
        pattern = "".join(rng.choice(list("ab\n"), size=int(rng.integers(1, 5))))
        text = "".join(rng.choice(list("ab\n"), size=int(rng.integers(0, 12))))
        dfa = string_dfa(pattern.encode())
        assert (run_dfa(dfa, 0, text.encode()) == len(pattern)) == (pattern in text)


def test_token_transitions_match_byte_runs(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    pieces = token_bytes(tok, 1024)
    assert pieces[tok.convert_tokens_to_ids("Ċ")] == b"\n"
    # the 256 byte-level ids (not all valid UTF-8 alone, so tok.decode shows U+FFFD for some):
    # their byte through transformers' own alphabet; longer tokens decode as the tokenizer does
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    for v in range(256):
        assert pieces[v] == bytes(byte_of[c] for c in tok.convert_ids_to_tokens(v)), v
    for v in (256, 500, 800):
        assert pieces[v].decode("utf-8") == tok.decode([v])
    assert pieces[1000] == b""
    tb = TokenBytes(pieces)
    for dfa, accept in (header_dfa("Action"), (string_dfa(b"on\n"), 3)):
        table = tb.transitions(dfa, accept)
        for v in range(0, 1024, 7):
            for q in range(accept + 1):
                s, over = q, False
                for b in pieces[v]:
                    if s == accept:
                        over = True
                        break
                    s = int(dfa[s, b])
                ref = accept + 1 if over else s
                assert table[q, v] == ref, (q, v, pieces[v])


def test_constraint_validation():
    with pytest.raises(ValueError, match="lo <= hi"):
        ActionConstraint(5, 3)
    with pytest.raises(ValueError, match="letters"):
        ActionConstraint(0, 3, field=": x")
    assert ActionConstraint(0, 100).word == "Action"
    assert ActionConstraint(0, 100).max_digits == 3
    assert re.fullmatch(r"[A-Za-z]+", ActionConstraint(0, 1, field="PRBs =").word)


_allowed = jax.jit(constrained.allowed_tokens, static_argnums=2)
_advance = jax.jit(constrained.advance)


def _machine(tiny_checkpoint, c: ActionConstraint, budget: int):
    """Tables and start state as the Sampler builds them, for one row."""
    import types

    from transformers import AutoTokenizer

    from sfjax.sampling import Sampler
    from sfjax.sampling import constrained as cons

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    cfg = types.SimpleNamespace(vocab_size=1024, eos_token_id=None, max_position_embeddings=4096)
    s = Sampler(types.SimpleNamespace(config=cfg), tok)
    ft = {k: v for k, v in s._field_tables(c).items() if k != "reserve"}
    tables = cons.ConstraintTables(
        **ft,
        lo_B=jnp.asarray([c.lo]),
        hi_B=jnp.asarray([c.hi]),
        budget_B=jnp.asarray([budget]),
        enabled_B=jnp.asarray([True]),
    )
    state = cons.initial_state(tables, LINE_START, jnp.asarray(c.action_first))
    return tok, tables, state


def _run_script(tok, tables, state, pieces):
    """Feed the tokens of ``pieces``; return the allowed sets seen before each one."""

    seen = []
    for step, piece in enumerate(pieces):
        (tid,) = tok(piece, add_special_tokens=False)["input_ids"]
        allowed = np.asarray(_allowed(state, tables, 1024)[0])
        seen.append((int(state.phase_B[0]), allowed))
        assert allowed[tid], (piece, int(state.phase_B[0]))
        state = _advance(state, tables, jnp.asarray([tid]), jnp.int32(step))
    return state, seen


def test_state_machine_natural_trigger_digits_and_after(tiny_checkpoint):
    from sfjax.sampling import constrained as cons

    c = ActionConstraint(3, 13)
    tok, tables, state = _machine(tiny_checkpoint, c, budget=100)
    ids = {p: tok(p, add_special_tokens=False)["input_ids"][0] for p in [":", " ", "\n", "Action"]}
    digit = {d: tok(str(d), add_special_tokens=False)["input_ids"][0] for d in range(10)}
    script = ["the", "\n", "Action", ":", " ", "1", "2", "\n", "the", "\n"]
    state, seen = _run_script(tok, tables, state, script)
    phases = [p for p, _ in seen]
    assert phases == [cons.FREE] * 3 + [cons.FORCE] * 2 + [cons.DIGITS] * 3 + [cons.AFTER] * 2
    # Forced field tokens: exactly one allowed token each.
    assert seen[3][1].sum() == 1 and seen[3][1][ids[":"]]
    assert seen[4][1].sum() == 1 and seen[4][1][ids[" "]]
    # First digit of [3, 13]: 1 (10..13) or 3..9; no newline before a number.
    assert {d for d in range(10) if seen[5][1][digit[d]]} == {1, 3, 4, 5, 6, 7, 8, 9}
    assert seen[5][1].sum() == 8
    # After "1": 10..13 continue; "1" alone is out of range so no newline yet.
    assert {d for d in range(10) if seen[6][1][digit[d]]} == {0, 1, 2, 3}
    assert not seen[6][1][ids["\n"]]
    # After "12": complete; only the newline.
    assert seen[7][1].sum() == 1 and seen[7][1][ids["\n"]]
    assert int(state.num_B[0]) == 12 and int(state.action_end_B[0]) == 8
    # AFTER, at a line start: a second "Action" header is banned, other text is free.
    assert int(state.phase_B[0]) == cons.AFTER
    allowed = np.asarray(_allowed(state, tables, 1024)[0])
    assert not allowed[ids["Action"]] and allowed[ids[":"]]
    action_ids = tok("action", add_special_tokens=False)["input_ids"]
    if len(action_ids) == 1:
        assert not allowed[action_ids[0]]


def test_state_machine_budget_and_action_first(tiny_checkpoint):
    from sfjax.sampling import constrained as cons

    c = ActionConstraint(0, 25, free_budget=2)
    tok, tables, state = _machine(tiny_checkpoint, c, budget=2)
    forced = tok("\nAction: ", add_special_tokens=False)["input_ids"]
    state, seen = _run_script(tok, tables, state, ["the", "the", "\n", "Action", ":", " ", "0"])
    assert [p for p, _ in seen][:2] == [cons.FREE, cons.FREE]
    for (phase, allowed), tid in zip(seen[2:6], forced):
        assert phase == cons.FORCE and allowed.sum() == 1 and allowed[tid]
    # "0" is complete (no leading zeros): only the newline may follow.
    allowed = np.asarray(_allowed(state, tables, 1024)[0])
    assert allowed.sum() == 1 and allowed[tok("\n", add_special_tokens=False)["input_ids"][0]]

    c = ActionConstraint(0, 25, action_first=True)
    tok, tables, state = _machine(tiny_checkpoint, c, budget=10**6)
    assert int(state.phase_B[0]) == cons.FORCE
    state, seen = _run_script(tok, tables, state, ["Action", ":", " ", "2", "5", "\n"])
    assert int(state.num_B[0]) == 25 and int(state.phase_B[0]) == cons.AFTER
