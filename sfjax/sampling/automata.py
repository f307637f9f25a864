"""Byte-level automata over the vocabulary: stop strings and the action-field header, host side.

Token ids are matched against strings at the byte level, so a stop string or a field header is
found however the model happened to split it into tokens ("\\n\\n" as one token or two, a stop
string ending in the middle of a token). Each automaton is a DFA over bytes; it is lifted to a
table ``next_QV[q, v]`` = state after feeding all bytes of token ``v`` from state ``q``, which the
jitted decode loop applies with one gather per step. Two sentinel codes come back from a token:

* ``accept``: the pattern is complete exactly at the token's last byte;
* ``accept + 1`` (*overshoot*): the pattern completed inside the token and more bytes follow.

Built once per pattern with numpy (vectorised over the vocabulary, a few hundred ms for
Qwen3's 151k tokens) and cached by the sampler.

Shape legend: Q = automaton states, V = vocabulary, A = 256 byte values, L = token byte length.
"""

from __future__ import annotations

import functools

import numpy as np

# Characters the Actor parser (sfjax.agents.prompts) tolerates before a field name on its line.
_DECORATION = b" \t>*_#-"


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` (the alphabet of byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes each token id contributes to decoded text (``b""`` for ids beyond the tokenizer).

    Byte-level BPE tokens (Qwen, GPT-2 style) map exactly through the byte alphabet; added and
    special tokens contribute their literal content; other tokenizers fall back to decoding
    each id alone.
    """
    table = _unicode_to_byte()
    added = {int(i): t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    n_tok = min(len(tokenizer), vocab_size)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n_tok)))
    out: list[bytes] = []
    for i, piece in enumerate(pieces):
        if i in added:
            out.append(added[i].encode())
        elif piece is not None and all(ch in table for ch in piece):
            out.append(bytes(table[ch] for ch in piece))
        else:
            out.append(tokenizer.decode([i]).encode())
    out.extend(b"" for _ in range(vocab_size - n_tok))
    return out


class TokenBytes:
    """The vocabulary as a padded byte matrix, sorted by length for vectorised DFA runs."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces
        self.vocab_size = len(pieces)
        lengths = np.array([len(p) for p in pieces], np.int64)
        self.order = np.argsort(-lengths, kind="stable")
        self.len_sorted = lengths[self.order]
        max_len = int(lengths.max(initial=0))
        self.bytes_sorted = np.zeros((self.vocab_size, max(max_len, 1)), np.uint8)
        for row, v in enumerate(self.order):
            p = pieces[v]
            self.bytes_sorted[row, : len(p)] = np.frombuffer(p, np.uint8)

    def transitions(self, dfa_QA: np.ndarray, accept: int) -> np.ndarray:
        """``next_QV`` int16: state after each token from each state, with accept/overshoot codes.

        ``accept`` is absorbing: once a token completes the pattern, later bytes only decide
        between ``accept`` (none follow) and ``accept + 1`` (overshoot).
        """
        Q = dfa_QA.shape[0]
        V = self.vocab_size
        out_QV = np.empty((Q, V), np.int16)
        for q in range(Q):
            s_V = np.full(V, q, np.int64)
            over_V = np.zeros(V, bool)
            if q == accept:
                over_V[:] = self.len_sorted > 0
            for j in range(self.bytes_sorted.shape[1]):
                n = int(np.searchsorted(-self.len_sorted, -j, side="left"))  # rows with len > j
                if n == 0:
                    break
                s = s_V[:n]
                done = s == accept
                over_V[:n] |= done
                s_V[:n] = np.where(done, s, dfa_QA[s, self.bytes_sorted[:n, j].astype(np.int64)])
            codes = np.where(over_V, accept + 1, s_V)
            out_QV[q, self.order] = codes
        return out_QV


def string_dfa(pattern: bytes) -> np.ndarray:
    """KMP automaton ``[len+1, 256]`` recognising ``pattern`` as a suffix; state len = found."""
    L = len(pattern)
    if L == 0:
        raise ValueError("stop strings must be non-empty")
    dfa_QA = np.zeros((L + 1, 256), np.int64)
    dfa_QA[0, pattern[0]] = 1
    fallback = 0
    for q in range(1, L + 1):
        dfa_QA[q] = dfa_QA[fallback]
        if q < L:
            dfa_QA[q, pattern[q]] = q + 1
            fallback = dfa_QA[fallback, pattern[q]]
    dfa_QA[L] = L  # absorbing
    return dfa_QA


LINE_START = 1
"""State of :func:`header_dfa` at the start of a line (and of the completion)."""


def header_dfa(word: str) -> tuple[np.ndarray, int]:
    """DFA for ``word`` opening a line, case-insensitively, as the Actor's parser reads headers.

    Mirrors ``sfjax.agents.prompts``: the word may follow decoration (``**``, ``- ``, ``> ``,
    ``#``) and a list marker (``1.``/``2)``) on its line. States: 0 mid-line, 1 line start /
    decoration, 2 list digits, 3 after the marker, 4 after ``*``/``_`` following the marker,
    ``4 + k`` the first ``k`` letters matched; accept = ``4 + len(word)``. Returns
    ``(dfa_QA, accept)``.
    """
    w = word.lower().encode()
    if not w or not w.isalpha():
        raise ValueError(f"the field must start with letters (e.g. 'Action:'), got {word!r}")
    n = len(w)
    accept = 4 + n
    dfa_QA = np.zeros((accept + 1, 256), np.int64)
    nl = ord("\n")
    dfa_QA[:, nl] = LINE_START
    first = (w[0], ord(chr(w[0]).upper()))
    for b in _DECORATION:
        dfa_QA[1, b] = 1
    for d in b"0123456789":
        dfa_QA[1, d] = 2
        dfa_QA[2, d] = 2
    dfa_QA[2, ord(".")] = dfa_QA[2, ord(")")] = 3
    dfa_QA[3, ord(" ")] = dfa_QA[3, ord("\t")] = 3
    for q in (3, 4):
        dfa_QA[q, ord("*")] = dfa_QA[q, ord("_")] = 4
    for q in (1, 3, 4):
        for b in first:
            dfa_QA[q, b] = 5
    for k in range(1, n):
        for b in (w[k], ord(chr(w[k]).upper())):
            dfa_QA[4 + k, b] = 5 + k
    dfa_QA[accept] = accept
    return dfa_QA, accept


def run_dfa(dfa_QA: np.ndarray, state: int, data: bytes) -> int:
    """Feed ``data`` from ``state`` (reference for tests; the sampler uses token tables)."""
    for b in data:
        state = int(dfa_QA[state, b])
    return state
