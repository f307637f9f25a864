"""LoRA adapters: init like PEFT, switch-off is the base model bit for bit, merge, PEFT parity."""

from __future__ import annotations

import contextlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfjax.models import lora, qwen3

IDS = np.array([[5, 17, 300, 42, 9, 811, 77, 3], [820, 820, 12, 64, 128, 256, 600, 1]])
MASK = np.array([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]])  # second row left-padded


def _randomize_b(model, key, scale=0.05):
    """Non-zero B everywhere, so adapter tests can fail."""
    for _, module in lora.lora_modules(model):
        key, sub = jax.random.split(key)
        module.lora_b[...] = scale * jax.random.normal(sub, module.lora_b[...].shape)


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    return qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)


def test_init_like_peft_and_only_lora_is_trainable(tiny_checkpoint):
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    ref = model(IDS, attention_mask=MASK)
    cfg = lora.LoRAConfig(rank=8, alpha=16)
    lora.apply_lora(model, cfg, rngs=nnx.Rngs(3))
    names = [n for n, _ in lora.lora_modules(model)]
    assert len(names) == 7 * model.config.num_layers
    assert "model.layers.1.mlp.down_proj" in names and "model.layers.0.self_attn.q_proj" in names
    for _, m in lora.lora_modules(model):
        a = np.asarray(m.lora_a[...])
        bound = 1 / math.sqrt(m.in_features)
        assert a.shape == (m.in_features, 8) and np.abs(a).max() <= bound
        assert np.abs(a).max() > 0.8 * bound  # actually uniform over the range, not tiny
        np.testing.assert_array_equal(np.asarray(m.lora_b[...]), 0.0)
        assert m.scaling == 2.0
    # B = 0: the adapted model is the base model.
    np.testing.assert_array_equal(np.asarray(model(IDS, attention_mask=MASK)), np.asarray(ref))
    trainable = lora.lora_state(model)
    n_lora = sum(x.size for x in jax.tree.leaves(trainable))
    c = model.config
    d, f, h = c.hidden_size, c.intermediate_size, c.head_dim
    per_layer = 8 * (
        (d + c.num_heads * h) * 2 + (d + c.num_kv_heads * h) * 2 + (d + f) * 3
    )
    assert n_lora == per_layer * c.num_layers
    # Base kernels are shared with the wrapped modules, not copied.
    assert isinstance(model.layers[0].self_attn.q_proj.base, qwen3.Linear)


def test_target_subset_and_errors(tiny_checkpoint):
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    lora.apply_lora(model, lora.LoRAConfig(rank=2, target_modules=("q_proj", "v_proj")))
    names = {n.rsplit(".", 1)[-1] for n, _ in lora.lora_modules(model)}
    assert names == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply_lora(model, lora.LoRAConfig())
    fresh = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    with pytest.raises(ValueError, match="no Linear projection"):  # a regex matching none
        lora.apply_lora(fresh, lora.LoRAConfig(target_modules=r".*\.qproj"))
    # names are checked when the config is made, before any model is loaded
    with pytest.raises(ValueError, match=r"target_modules \['qproj'\]: a name or dotted suffix"):
        lora.LoRAConfig(target_modules=("q_proj", "qproj"))
    lora.LoRAConfig(target_modules=("self_attn.q_proj", "model.layers.0.mlp.up_proj", "lm_head"))
    with pytest.raises(ValueError, match="rank"):
        lora.LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="alpha must be a finite value > 0"):
        lora.LoRAConfig(alpha=0.0)
    with pytest.raises(ValueError, match="param_dtype must be one of"):
        lora.LoRAConfig(param_dtype="foo")
    # tiny_checkpoint ties its embeddings (as Qwen3-4B): an lm_head target used to be dropped
    # silently, the other targets adapted
    assert fresh.config.tie_word_embeddings and fresh.lm_head is None
    with pytest.raises(ValueError, match="ties its output head"):
        lora.apply_lora(fresh, lora.LoRAConfig(target_modules=("q_proj", "lm_head")))
    assert not list(lora.lora_modules(fresh))  # nothing applied


def test_adapter_off_is_bit_identical_to_base(tiny_checkpoint, base):
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    lora.apply_lora(model, lora.LoRAConfig(rank=4))
    _randomize_b(model, jax.random.key(0))
    base_logits = np.asarray(base(IDS, attention_mask=MASK))
    on = np.asarray(model(IDS, attention_mask=MASK))
    assert np.abs(on - base_logits).max() > 1e-3  # the adapter does something
    with lora.adapters_disabled(model):
        off = np.asarray(model(IDS, attention_mask=MASK))
    np.testing.assert_array_equal(off, base_logits)
    # Under jit too: the switched-off graph is the base graph (weights passed as arguments).
    def forward(graphdef, disabled):
        @jax.jit
        def f(state, ids, mask):
            m = nnx.merge(graphdef, state)
            with lora.adapters_disabled(m) if disabled else contextlib.nullcontext():
                return m(ids, attention_mask=mask)

        return f

    off_j = forward(nnx.graphdef(model), True)(nnx.state(model), IDS, MASK)
    base_j = forward(nnx.graphdef(base), False)(nnx.state(base), IDS, MASK)
    np.testing.assert_array_equal(np.asarray(off_j), np.asarray(base_j))
    on_j = forward(nnx.graphdef(model), False)(nnx.state(model), IDS, MASK)
    np.testing.assert_allclose(np.asarray(on_j), on, atol=1e-5)
    assert all(m.enabled for _, m in lora.lora_modules(model))


def test_merge_equals_adapter_forward(tiny_checkpoint):
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=12, target_modules=lora.DEFAULT_TARGETS))
    _randomize_b(model, jax.random.key(1))
    adapted = np.asarray(model(IDS, attention_mask=MASK))
    lora.merge_lora(model)
    assert not list(lora.lora_modules(model))
    assert isinstance(model.layers[0].mlp.up_proj, qwen3.Linear)
    merged = np.asarray(model(IDS, attention_mask=MASK))
    np.testing.assert_allclose(merged, adapted, rtol=0, atol=2e-5)


def test_export_import_roundtrip(tiny_checkpoint, tmp_path):
    cfg = lora.LoRAConfig(rank=4, alpha=8, target_modules=("q_proj", "o_proj", "up_proj"))
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    lora.apply_lora(model, cfg, rngs=nnx.Rngs(5))
    _randomize_b(model, jax.random.key(2))
    lora.save_adapter(model, tmp_path / "adapter", cfg, base_model_name_or_path="tiny")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["r"] == 4 and written["lora_alpha"] == 8 and written["peft_type"] == "LORA"
    # a path object as the base model is written as its string (PEFT reads a str)
    lora.save_adapter(model, tmp_path / "adapter2", cfg, base_model_name_or_path=tmp_path / "b")
    written = json.loads((tmp_path / "adapter2" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(tmp_path / "b")
    # the weights readable as their config is (safetensors >= 0.8 alone writes them 0o600)
    mask = os.umask(0)
    os.umask(mask)
    mode = lambda p: (tmp_path / "adapter" / p).stat().st_mode & 0o777  # noqa: E731
    assert mode(lora.ADAPTER_WEIGHTS) == mode("adapter_config.json") == 0o666 & ~mask

    other = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    loaded_cfg = lora.load_adapter(other, tmp_path / "adapter")
    assert loaded_cfg.rank == 4 and loaded_cfg.scaling == cfg.scaling
    want = jax.tree.leaves(lora.lora_state(model))
    got = jax.tree.leaves(lora.lora_state(other))
    assert len(want) == len(got) == 6 * model.config.num_layers
    for w, g in zip(want, got):
        np.testing.assert_array_equal(np.asarray(w), np.asarray(g))
    np.testing.assert_array_equal(
        np.asarray(model(IDS, attention_mask=MASK)), np.asarray(other(IDS, attention_mask=MASK))
    )
    # mismatched rank is refused with a clear message
    wrong = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    lora.apply_lora(wrong, lora.LoRAConfig(rank=2, alpha=4, target_modules=cfg.target_modules))
    with pytest.raises(ValueError, match="shapes"):
        lora.load_adapter(wrong, tmp_path / "adapter")


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_export_with_same_logits(tiny_checkpoint_untied, tmp_path, rslora):
    """sfjax adapter -> peft.PeftModel over transformers Qwen3 -> same logits (atol 1e-4)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

    targets = lora.DEFAULT_TARGETS + (("lm_head",) if rslora else ())
    cfg = lora.LoRAConfig(rank=4, alpha=16, target_modules=targets, use_rslora=rslora)
    model = qwen3.from_pretrained(tiny_checkpoint_untied, dtype=jnp.float32)
    lora.apply_lora(model, cfg, rngs=nnx.Rngs(7))
    _randomize_b(model, jax.random.key(3), scale=0.1)
    ours = np.asarray(model(IDS, attention_mask=MASK))
    with lora.adapters_disabled(model):
        ours_base = np.asarray(model(IDS, attention_mask=MASK))
    lora.save_adapter(model, tmp_path / "adapter", cfg)

    hf = transformers.Qwen3ForCausalLM.from_pretrained(tiny_checkpoint_untied, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(
            input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)
        ).logits.numpy()
    real = MASK.astype(bool)
    # The adapter moves the logits far more than the tolerance, so the comparison can fail.
    assert np.abs(ours - ours_base)[real].max() > 50 * 1e-4
    np.testing.assert_allclose(ours[real], theirs[real], rtol=0, atol=1e-4)


# ------------------------------------------------------------------ adapters trained with PEFT
def _peft_adapter(checkpoint, out_dir, **lora_kwargs):
    """A PEFT LoRA adapter (non-zero A and B) saved to ``out_dir`` and PEFT's logits on
    ``IDS`` / ``MASK``."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model = peft.get_peft_model(hf, peft.LoraConfig(**lora_kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits
    model.save_pretrained(out_dir)
    return logits.numpy()


def _assert_same_real_logits(ours, theirs):
    real = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_peft_adapter_naming_modules_by_full_name_or_suffix_loads(
    tiny_checkpoint_untied, tmp_path, scan_layers
):
    """PEFT's target_modules list matches a module by its full name or a dotted suffix; PEFT
    itself saves "all-linear" on a model with fewer than 20 projections as full names."""
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj")]
    theirs = _peft_adapter(tiny_checkpoint_untied, tmp_path / "a", r=4, lora_alpha=8,
                           target_modules=[*names, "mlp.up_proj"])  # fmt: skip
    model = qwen3.from_pretrained(tiny_checkpoint_untied, dtype=jnp.float32,
                                  scan_layers=scan_layers)  # fmt: skip
    lora.load_adapter(model, tmp_path / "a")
    assert len(list(lora._per_layer(model))) == 3 * model.config.num_layers
    _assert_same_real_logits(model(IDS, attention_mask=MASK), theirs)


def test_adapter_on_some_layers_saves_targets_that_select_just_those(tiny_checkpoint_untied,
                                                                     tmp_path):  # fmt: skip
    """An adapter on layer 1 only: its adapter_config.json must not name every layer's
    projection (PEFT would add adapters elsewhere, and load_adapter found no weights for them)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

    cfg = lora.LoRAConfig(rank=2, alpha=4, target_modules=r"model\.layers\.1\.mlp\.(up|down)_proj")
    model = qwen3.from_pretrained(tiny_checkpoint_untied, dtype=jnp.float32)
    lora.apply_lora(model, cfg, rngs=nnx.Rngs(1))
    _randomize_b(model, jax.random.key(4), scale=0.1)
    lora.save_adapter(model, tmp_path / "a", cfg)

    other = qwen3.from_pretrained(tiny_checkpoint_untied, dtype=jnp.float32)
    lora.load_adapter(other, tmp_path / "a")
    assert [n for n, _ in lora.lora_modules(other)] == [n for n, _ in lora.lora_modules(model)]
    np.testing.assert_array_equal(np.asarray(other(IDS, attention_mask=MASK)),
                                  np.asarray(model(IDS, attention_mask=MASK)))  # fmt: skip
    hf = transformers.Qwen3ForCausalLM.from_pretrained(tiny_checkpoint_untied)
    wrapped = peft.PeftModel.from_pretrained(hf, tmp_path / "a")
    assert sorted(n.removeprefix("base_model.model.") for n, m in wrapped.named_modules()
                  if hasattr(m, "lora_A")) == sorted(n for n, _ in lora.lora_modules(model))  # fmt: skip


def _break_adapter(adapter_dir, how):
    """Damage a saved adapter one way; returns the error message a load must raise (regex)."""
    from safetensors.numpy import load_file, save_file

    weights, config = adapter_dir / lora.ADAPTER_WEIGHTS, adapter_dir / lora.ADAPTER_CONFIG
    if how == "no_weights":
        weights.unlink()
        return r"adapter_model\.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        return r"adapter_model\.safetensors: truncated"
    if how == "bad_json":
        config.write_text('{"r": 2,')
        return r"adapter_config\.json"
    if how == "no_rank":
        cfg = json.loads(config.read_text())
        del cfg["r"]
        config.write_text(json.dumps(cfg))
        return r"adapter_config\.json.*'r'"
    assert how == "late_shape"  # the last module's B is mis-shaped; earlier ones are fine
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(weights))
    return r"model\.layers\.1\.self_attn\.v_proj: adapter shapes"


@pytest.mark.parametrize("how", ["no_weights", "truncated", "bad_json", "no_rank", "late_shape"])
def test_failed_adapter_load_names_the_problem_and_leaves_the_model_as_it_was(
    tiny_checkpoint, base, tmp_path, how
):
    cfg = lora.LoRAConfig(rank=2, alpha=4, target_modules=("q_proj", "v_proj"))
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    lora.apply_lora(model, cfg, rngs=nnx.Rngs(2))
    _randomize_b(model, jax.random.key(5))
    lora.save_adapter(model, tmp_path / "a", cfg)
    message = _break_adapter(tmp_path / "a", how)

    fresh = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        lora.load_adapter(fresh, tmp_path / "a")
    assert not list(lora.lora_modules(fresh))  # no adapters with random A left behind
    np.testing.assert_array_equal(np.asarray(fresh(IDS, attention_mask=MASK)),
                                  np.asarray(base(IDS, attention_mask=MASK)))  # fmt: skip

    other = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    lora.apply_lora(other, cfg, rngs=nnx.Rngs(3))
    before = [np.asarray(x) for x in jax.tree.leaves(lora.lora_state(other))]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        lora.load_adapter(other, tmp_path / "a")
    after = [np.asarray(x) for x in jax.tree.leaves(lora.lora_state(other))]
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)  # no layer overwritten before the error


@pytest.mark.parametrize("scan_layers", [False, True])
def test_peft_adapter_on_lm_head_loads_with_its_base_layer_copy(tiny_checkpoint_untied, tmp_path,
                                                                 scan_layers):  # fmt: skip
    """With lm_head targeted PEFT also saves its base weight (``lm_head.base_layer.weight``) and
    loads it over the base model's; sfjax does the same."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file, save_file

    _peft_adapter(tiny_checkpoint_untied, tmp_path / "a", r=2, lora_alpha=4,
                  target_modules=["q_proj", "lm_head"])  # fmt: skip
    file = str(tmp_path / "a" / lora.ADAPTER_WEIGHTS)
    tensors = load_file(file)
    key = "base_model.model.lm_head.base_layer.weight"
    tensors[key] = 1.5 * tensors[key]  # a resized / retrained head: PEFT uses the saved one
    save_file(tensors, file, metadata={"format": "pt"})
    hf = transformers.Qwen3ForCausalLM.from_pretrained(tiny_checkpoint_untied, dtype=torch.float32)
    wrapped = peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval()
    with torch.no_grad():
        theirs = wrapped(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits
    model = qwen3.from_pretrained(tiny_checkpoint_untied, dtype=jnp.float32,
                                  scan_layers=scan_layers)  # fmt: skip
    lora.load_adapter(model, tmp_path / "a")
    _assert_same_real_logits(model(IDS, attention_mask=MASK), theirs.numpy())


@pytest.mark.parametrize(
    "field, value",
    [
        ("alora_invocation_tokens", [111, 333]),  # adapter on tokens after these only
        ("exclude_modules", ["model.layers.0.self_attn.q_proj"]),
        ("lora_bias", True),
        ("use_qalora", True),
        ("trainable_token_indices", [5, 7]),
    ],
)
def test_unsupported_peft_features_are_named(tiny_checkpoint, tmp_path, field, value):
    """PEFT LoRA features sfjax does not compute are refused by name, not loaded as plain LoRA
    (an aLoRA adapter loaded silently gave other logits than PEFT's)."""
    cfg = lora.LoRAConfig(rank=2, alpha=4, target_modules=("q_proj",))
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    lora.apply_lora(model, cfg, rngs=nnx.Rngs(2))
    lora.save_adapter(model, tmp_path / "a", cfg)
    config_file = tmp_path / "a" / lora.ADAPTER_CONFIG
    written = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**written, field: value}))
    fresh = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    with pytest.raises(ValueError, match=f"not supported by sfjax: \\['{field}'\\]"):
        lora.load_adapter(fresh, tmp_path / "a")
    assert not list(lora.lora_modules(fresh))
