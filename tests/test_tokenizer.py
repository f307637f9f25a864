"""Tokenizer loading and the Qwen3 chat template (tiny local tokenizer, Qwen3 specials)."""

from __future__ import annotations

import pytest

from sfjax.tokenizer import chat_prompt, load_tokenizer

MESSAGES = [
    {"role": "system", "content": "You control a slice."},
    {"role": "user", "content": "State: 12 PRBs"},
]


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


def test_special_tokens_and_padding(tok):
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        820,
        821,
        822,
    ]
    assert tok.pad_token_id == 820 and tok.eos_token_id == 822
    assert tok.padding_side == "left"
    batch = tok(["Action: 1", "Action: 12345"], padding=True)
    assert batch["input_ids"][0][0] == 820 and batch["attention_mask"][0][0] == 0
    # Every digit is its own token, as in Qwen3.
    ids = tok.encode("12345", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids] == list("12345")


def test_chat_prompt_without_thinking(tok):
    text = chat_prompt(tok, MESSAGES)
    assert text == (
        "<|im_start|>system\nYou control a slice.<|im_end|>\n"
        "<|im_start|>user\nState: 12 PRBs<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == 821 and ids.count(822) == 2 and 823 in ids and 824 in ids


def test_chat_prompt_with_thinking_and_no_generation_prompt(tok):
    thinking = chat_prompt(tok, MESSAGES, enable_thinking=True)
    assert thinking.endswith("<|im_start|>assistant\n") and "<think>" not in thinking
    closed = chat_prompt(tok, MESSAGES, add_generation_prompt=False)
    assert closed.endswith("State: 12 PRBs<|im_end|>\n")


def test_bad_inputs(tok, tmp_path):
    with pytest.raises(ValueError, match="role"):
        chat_prompt(tok, [{"content": "x"}])
    with pytest.raises(ValueError, match="expected one of"):
        chat_prompt(tok, [{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="non-empty list"):
        chat_prompt(tok, "hello")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_offline_hub_id_names_local_path_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="offline.*local directory"):
        load_tokenizer("Qwen/Qwen3-4B")
