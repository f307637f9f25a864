"""The locally built tiny checkpoint behaves like a Qwen3 checkpoint for transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sfjax import testing


def test_tokenizer_loads_with_qwen3_special_tokens(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1, t
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "qwen3"
    assert cfg["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert len(tok) <= cfg["vocab_size"]


def test_digits_tokenize_one_per_token(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    for text in ("Action: 12345", "queue 9081726354 bytes", "0.5 Mb/s"):
        pieces = tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))
        digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
        assert all(len(p) == 1 for p in digit_pieces), pieces
        assert sum(c.isdigit() for c in text) == len(digit_pieces)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    digit_ids = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert len(set(digit_ids)) == 10 and tok.unk_token_id not in digit_ids


def test_chat_template_matches_qwen3_layout(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False)
    assert text == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    thinking = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert thinking.endswith("<|im_start|>assistant\n")


def test_tokenizer_build_is_deterministic():
    a = testing.build_tokenizer().to_str()
    b = testing.build_tokenizer().to_str()
    assert a == b


def test_weights_seeded_and_named(tiny_checkpoint_untied):
    cfg = testing.hf_config({"tie_word_embeddings": False})
    w0 = testing.random_hf_weights(cfg, seed=3)
    w1 = testing.random_hf_weights(cfg, seed=3)
    w2 = testing.random_hf_weights(cfg, seed=4)
    assert w0.keys() == w1.keys()
    assert all(np.array_equal(w0[k], w1[k]) for k in w0)
    assert not np.array_equal(w0["model.embed_tokens.weight"], w2["model.embed_tokens.weight"])
    assert "lm_head.weight" in w0
    assert w0["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 16, 64)


@pytest.mark.parametrize("sharded", [False, True])
def test_transformers_loads_checkpoint(tmp_path, sharded):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file
    from transformers import Qwen3ForCausalLM

    path = testing.write_tiny_checkpoint(
        tmp_path / "ckpt", {"tie_word_embeddings": False}, seed=7,
        max_shard_bytes=100_000 if sharded else None,
    )
    if sharded:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    model = Qwen3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    expected = testing.random_hf_weights(
        testing.hf_config({"tie_word_embeddings": False}), seed=7
    )
    state = model.state_dict()
    for name, arr in expected.items():
        np.testing.assert_array_equal(state[name].numpy(), arr, err_msg=name)
    if not sharded:
        stored = load_file(str(path / "model.safetensors"))
        assert stored.keys() == expected.keys()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 4, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_vocab_too_small_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        testing.write_tiny_checkpoint(tmp_path, {"vocab_size": 64})
