"""Which attention calls a forward makes: :func:`record_attention_calls` (``tests/models``,
``tests/train``)."""

from __future__ import annotations

from typing import NamedTuple


class AttentionCall(NamedTuple):
    query_len: int
    """T: the call's query positions."""
    key_len: int
    """S: its key positions (this call's keys, or the KV cache's slots)."""
    differentiable: bool
    """What the layer told the dispatcher: whether the call may be differentiated."""


def record_attention_calls(monkeypatch) -> list[AttentionCall]:
    """For the rest of the test, every call of :func:`sfjax.models.attention.attention` is
    appended to the returned list, then run as before. Under ``jax.jit`` the calls are
    recorded while tracing (once per compilation)."""
    from sfjax.models import attention as attn

    seen, real = [], attn.attention

    def recording(q_BTNH, k_BKSH, v_BKSH, visible_BTS, implementation=None, *,
                  differentiable=True):  # fmt: skip
        seen.append(AttentionCall(q_BTNH.shape[1], k_BKSH.shape[2], differentiable))
        return real(q_BTNH, k_BKSH, v_BKSH, visible_BTS, implementation,
                    differentiable=differentiable)  # fmt: skip

    monkeypatch.setattr(attn, "attention", recording)
    return seen
