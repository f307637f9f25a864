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


def test_per_shape_weights_are_views_of_one_draw_per_shape():
    """The big-checkpoint draw: random_hf_weights' names, shapes and scales; one block per
    distinct shape, each layer's tensor a shifted view of it (no copy; layers still differ)."""
    import ml_dtypes

    cfg = testing.hf_config({"num_hidden_layers": 3})
    one_by_one = testing.random_hf_weights(cfg)
    w = testing.per_shape_hf_weights(cfg, seed=1, dtype="bfloat16")
    assert list(w) == list(one_by_one)  # names in checkpoint order
    assert {k: a.shape for k, a in w.items()} == {k: a.shape for k, a in one_by_one.items()}
    assert all(a.dtype == ml_dtypes.bfloat16 and a.flags.c_contiguous for a in w.values())
    down = [w[f"model.layers.{i}.mlp.down_proj.weight"] for i in range(3)]  # a unique shape
    assert np.shares_memory(down[0], down[2]) and not np.array_equal(down[0], down[1])
    flat = [a.astype(np.float32).ravel() for a in down]
    shift = testing.PER_SHAPE_SHIFT
    np.testing.assert_array_equal(flat[0][shift:], flat[1][:-shift])
    # k_proj and v_proj share a shape (one block); their values still differ
    assert not np.array_equal(w["model.layers.0.self_attn.k_proj.weight"],
                              w["model.layers.0.self_attn.v_proj.weight"])
    dense = np.concatenate([a.astype(np.float32).ravel() for k, a in w.items()
                            if not k.endswith("norm.weight")])
    norms = np.concatenate([a.astype(np.float32).ravel() for k, a in w.items()
                            if k.endswith("norm.weight")])
    assert abs(dense.std() - 0.02) < 0.002 and abs(norms.mean() - 1.0) < 0.05
    again = testing.per_shape_hf_weights(cfg, seed=1, dtype="bfloat16")
    assert all(np.array_equal(w[k], again[k]) for k in w)


def test_transformers_loads_a_per_shape_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import Qwen3ForCausalLM

    cfg = {"num_hidden_layers": 3}
    path = testing.write_tiny_checkpoint(tmp_path / "ckpt", cfg, seed=2, dtype="bfloat16",
                                         max_shard_bytes=60_000, per_shape=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    expected = testing.per_shape_hf_weights(testing.hf_config(cfg), seed=2, dtype="bfloat16")
    state = model.state_dict()
    assert set(index["weight_map"]) == set(expected)
    for name, arr in expected.items():
        np.testing.assert_array_equal(state[name].float().numpy(), arr.astype(np.float32),
                                      err_msg=name)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()
