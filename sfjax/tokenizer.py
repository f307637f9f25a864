"""Qwen3 tokenizer loading and chat-template helpers.

The Actor's prompts (paper section IV-A) are chat turns rendered with the checkpoint's own
Qwen3 chat template; ``enable_thinking=False`` makes the template append an empty
``<think></think>`` block so the model answers directly, ``True`` lets it reason first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

_ROLES = ("system", "user", "assistant", "tool")


def load_tokenizer(path: str | os.PathLike):
    """The HF tokenizer of a checkpoint directory (``tokenizer.json`` + ``tokenizer_config.json``)
    or of a hub id (its tokenizer files only are fetched; offline they must be cached).

    Raises :class:`~sfjax.models.config.CheckpointUnavailable` (a ``FileNotFoundError``) naming
    the directory when it holds no tokenizer, and
    ``ValueError`` when the tokenizer has no chat template or no pad token can be chosen.
    """
    from transformers import AutoTokenizer

    from sfjax.models.config import CheckpointUnavailable
    from sfjax.models.weights import HUB_TOKENIZER_PATTERNS, resolve_checkpoint_dir

    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.exists():  # a hub id such as "Qwen/Qwen3-4B" (tokenizer files only)
        try:
            p = resolve_checkpoint_dir(path, HUB_TOKENIZER_PATTERNS)
        except FileNotFoundError as e:
            raise CheckpointUnavailable(f"tokenizer: {e}") from e
    if not p.is_dir():
        raise CheckpointUnavailable(f"tokenizer directory {str(p)!r} does not exist")
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise CheckpointUnavailable(
            f"{p} has no tokenizer.json / tokenizer_config.json; pass the checkpoint directory "
            "that holds the tokenizer (e.g. a local copy of Qwen/Qwen3-4B)"
        )
    tok = AutoTokenizer.from_pretrained(str(p))
    if tok.pad_token is None:
        # Qwen3 pads with <|endoftext|>; fall back to EOS so batched prompts can be padded.
        if "<|endoftext|>" in tok.get_vocab():
            tok.pad_token = "<|endoftext|>"
        elif tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            raise ValueError(f"tokenizer at {p} has neither a pad nor an eos token")
    tok.padding_side = "left"  # the model and sampler expect left padding
    return tok


def _check_messages(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    if isinstance(messages, str | bytes) or not len(messages):
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in _ROLES:
            raise ValueError(f"messages[{i}] has role {m['role']!r}; expected one of {_ROLES}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}]['content'] must be a string")
        out.append(dict(m))
    return out


def chat_prompt(
    tokenizer,
    messages: Sequence[Mapping[str, str]],
    *,
    enable_thinking: bool = False,
    add_generation_prompt: bool = True,
) -> str:
    """Render ``messages`` with the checkpoint's Qwen3 chat template (text, not ids).

    ``enable_thinking=False`` (the Actor's default) ends the generation prompt with an empty
    think block, as the Qwen3 template does.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat_template; load the tokenizer of a Qwen3 chat checkpoint"
        )
    return tokenizer.apply_chat_template(
        _check_messages(messages),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
    )
