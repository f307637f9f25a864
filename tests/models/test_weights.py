"""HF checkpoint loading/saving: sharded files, bf16, round trips through transformers, errors."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

from sfjax import testing
from sfjax.models import qwen3
from sfjax.models.weights import (
    CheckpointError,
    hf_param_table,
    param_sharding,
    read_safetensors_header,
    read_tensor,
)


def params(model):
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=str(k))


def hf_logits(path, ids, dtype=torch.float32):
    hf = transformers.Qwen3ForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation="eager"
    )
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids)).logits.float().numpy()


IDS = np.arange(2 * 9).reshape(2, 9) * 37 % 900


@nnx.jit
def forward(model, ids_BT):
    return model(ids_BT)


def test_param_table_matches_transformers_names(tiny_checkpoint_untied):
    cfg = qwen3.Qwen3Config.from_hf(tiny_checkpoint_untied)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg.to_hf("float32")))
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    table = hf_param_table(cfg)
    assert {s.hf_name: s.hf_shape for s in table} == hf_shapes


def test_sharded_checkpoint_equals_single_file(tiny_checkpoint, tmp_path):
    sharded = testing.write_tiny_checkpoint(tmp_path / "sharded", seed=0, max_shard_bytes=60_000)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 3
    assert_same_params(
        qwen3.from_pretrained(sharded, dtype=jnp.float32),
        qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32),
    )


def test_bfloat16_checkpoint_loads_exactly(tmp_path):
    path = testing.write_tiny_checkpoint(tmp_path / "bf16", seed=2, dtype="bfloat16")
    ref = load_file(
        str(testing.write_tiny_checkpoint(tmp_path / "f32", seed=2) / "model.safetensors")
    )
    model = qwen3.from_pretrained(path, dtype=jnp.bfloat16)
    got = np.asarray(model.layers[1].mlp.down_proj.kernel[...])
    want = ref["model.layers.1.mlp.down_proj.weight"].astype(ml_dtypes.bfloat16).T
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got, want)
    # bf16 storage upcast to a float32 model is exact too.
    m32 = qwen3.from_pretrained(path, dtype=jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(m32.layers[1].mlp.down_proj.kernel[...]), want.astype(np.float32)
    )


def test_save_then_transformers_load_gives_same_logits(tiny_checkpoint_untied, tmp_path):
    model = qwen3.from_pretrained(tiny_checkpoint_untied, dtype=jnp.float32)
    out = qwen3.save_pretrained(model, tmp_path / "saved", max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").is_file()
    mask = os.umask(0)
    os.umask(mask)  # every shard readable as config.json is (safetensors >= 0.8 writes 0o600)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~mask}
    ours = np.asarray(forward(model, IDS))
    theirs = hf_logits(out, IDS)
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-4
    # The saved tensors are the original ones, bit for bit.
    orig = load_file(str(tiny_checkpoint_untied / "model.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(orig)
    name = "model.layers.1.self_attn.o_proj.weight"
    np.testing.assert_array_equal(load_file(str(out / index[name]))[name], orig[name])


def _save_base_model(causal_ckpt, out, **kwargs):
    """``Qwen3Model.save_pretrained`` of a causal checkpoint's base model: tensor names without
    the ``model.`` prefix, no ``lm_head.weight``, ``architectures: ["Qwen3Model"]``."""
    hf = transformers.Qwen3ForCausalLM.from_pretrained(str(causal_ckpt), dtype=torch.float32)
    hf.model.save_pretrained(str(out), **kwargs)
    names = set()
    for f in out.glob("*.safetensors"):
        names |= set(read_safetensors_header(f))
    assert "embed_tokens.weight" in names and "layers.0.self_attn.q_proj.weight" in names
    assert not any(n.startswith("model.") or n.startswith("lm_head") for n in names)
    return out


@pytest.mark.parametrize("shard", [None, "100KB"], ids=["single-file", "sharded"])
def test_base_model_checkpoint_with_tied_head_loads_like_transformers(
    tiny_checkpoint, tmp_path, shard
):
    """transformers 5.25 adds the ``model.`` prefix (``base_model_prefix``) and ties lm_head to
    the embedding: every tensor is loaded, none is missing."""
    base = _save_base_model(
        tiny_checkpoint, tmp_path / "base", **({"max_shard_size": shard} if shard else {})
    )
    assert (base / "model.safetensors.index.json").is_file() == bool(shard)
    _, info = transformers.Qwen3ForCausalLM.from_pretrained(str(base), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model = qwen3.from_pretrained(base, dtype=jnp.float32)
    assert_same_params(model, qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32))
    theirs = hf_logits(base, IDS)
    ours = np.asarray(forward(model, IDS))
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-4


def test_base_model_checkpoint_with_untied_head_is_refused(tiny_checkpoint_untied, tmp_path):
    """Untied: transformers loads the body and initialises lm_head randomly (a warning only);
    sfjax refuses, naming the file and the missing head."""
    base = _save_base_model(tiny_checkpoint_untied, tmp_path / "base")
    _, info = transformers.Qwen3ForCausalLM.from_pretrained(str(base), output_loading_info=True)
    assert set(info["missing_keys"]) == {"lm_head.weight"}
    with pytest.raises(CheckpointError) as e:
        qwen3.from_pretrained(base, dtype=jnp.float32)
    msg = str(e.value)
    assert str(base / "model.safetensors") in msg
    assert "Qwen3Model" in msg and "lm_head.weight" in msg and "tie_word_embeddings" in msg
    assert "random" in msg


def test_load_save_load_is_lossless(tiny_checkpoint, tmp_path):
    for dtype in (jnp.float32, jnp.bfloat16):
        a = qwen3.from_pretrained(tiny_checkpoint, dtype=dtype)
        out = qwen3.save_pretrained(a, tmp_path / jnp.dtype(dtype).name)
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == jnp.dtype(dtype).name
        assert read_safetensors_header(out / "model.safetensors")["model.norm.weight"].dtype == (
            "F32" if dtype == jnp.float32 else "BF16"
        )
        assert_same_params(a, qwen3.from_pretrained(out, dtype=dtype))


def test_bfloat16_save_loads_in_transformers(tiny_checkpoint, tmp_path):
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.bfloat16)
    out = qwen3.save_pretrained(model, tmp_path / "bf16")
    hf = transformers.Qwen3ForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    w = hf.model.layers[0].mlp.up_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(
        w, np.asarray(model.layers[0].mlp.up_proj.kernel[...], np.float32).T
    )


def test_tokenizer_saved_alongside(tiny_checkpoint, tmp_path):
    from sfjax.tokenizer import load_tokenizer

    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    out = qwen3.save_pretrained(model, tmp_path / "s", tokenizer=load_tokenizer(tiny_checkpoint))
    assert load_tokenizer(out).encode("Action: 12") == load_tokenizer(tiny_checkpoint).encode(
        "Action: 12"
    )


def test_mesh_places_params_by_rule(tiny_checkpoint):
    """Placement follows the default rule (sfjax.parallel's) on a 1-device mesh."""
    mesh = Mesh(np.array(jax.devices()[:1]), ("tp",))
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32, mesh=mesh)
    q = model.layers[0].self_attn.q_proj.kernel[...]
    o = model.layers[0].self_attn.o_proj.kernel[...]
    assert isinstance(q.sharding, NamedSharding)
    assert q.sharding.spec == PartitionSpec(None, "tp")
    assert o.sharding.spec == PartitionSpec("tp", None)
    assert model.norm.weight[...].sharding.spec == PartitionSpec(None)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        arr = var.get_value()
        assert arr.sharding == param_sharding(path, arr.shape, mesh), path
    assert np.isfinite(np.asarray(forward(model, IDS))).all()


def test_param_sharding_rules():
    mesh = AbstractMesh((4,), ("tp",))
    spec = lambda path, shape: param_sharding(path, shape, mesh).spec  # noqa: E731
    assert spec(("layers", 0, "mlp", "up_proj", "kernel"), (64, 128)) == PartitionSpec(None, "tp")
    assert spec(("layers", 0, "mlp", "down_proj", "kernel"), (128, 64)) == PartitionSpec("tp", None)
    assert spec(("embed_tokens", "embedding"), (1024, 64)) == PartitionSpec("tp", None)
    assert spec(("lm_head", "kernel"), (64, 1024)) == PartitionSpec(None, "tp")
    assert spec(("layers", 0, "self_attn", "q_norm", "weight"), (16,)) == PartitionSpec(None)
    assert spec(("layers", 0, "self_attn", "k_proj", "kernel"), (64, 6)) == PartitionSpec(
        None, None
    )
    other = AbstractMesh((2,), ("data",))
    assert param_sharding(("lm_head", "kernel"), (64, 1024), other).spec == PartitionSpec(
        None, None
    )


# ------------------------------------------------------------------------------ error cases
@pytest.fixture
def ckpt_copy(tiny_checkpoint, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def _rewrite(ckpt, edit):
    tensors = load_file(str(ckpt / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensors_are_listed(ckpt_copy):
    _rewrite(
        ckpt_copy,
        lambda t: [t.pop("model.layers.1.mlp.up_proj.weight"), t.pop("model.norm.weight")],
    )
    with pytest.raises(
        CheckpointError, match=r"missing tensors \(2\).*model\.layers\.1\.mlp\.up_proj"
    ):
        qwen3.from_pretrained(ckpt_copy)


def test_unexpected_tensors_are_listed(ckpt_copy):
    def add(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)

    _rewrite(ckpt_copy, add)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\).*q_proj\.bias"):
        qwen3.from_pretrained(ckpt_copy)


def test_untied_config_without_lm_head_is_missing(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): \['lm_head.weight'\]"):
        qwen3.from_pretrained(ckpt_copy)


def test_shape_mismatch_names_tensor(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight: shape \[128, 64\]"
    ):
        qwen3.from_pretrained(ckpt_copy)


def test_dtype_mismatch_names_tensor(ckpt_copy):
    def to_int(t):
        t["model.layers.0.input_layernorm.weight"] = t[
            "model.layers.0.input_layernorm.weight"
        ].astype(np.int32)

    _rewrite(ckpt_copy, to_int)
    with pytest.raises(CheckpointError, match=r"input_layernorm\.weight: dtype I32"):
        qwen3.from_pretrained(ckpt_copy)


def test_truncated_file_is_named(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        qwen3.from_pretrained(ckpt_copy)
    f.write_bytes(b"\x07" * 6)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: only 6 bytes"):
        qwen3.from_pretrained(ckpt_copy)


def test_corrupt_header_is_named(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors header"):
        qwen3.from_pretrained(ckpt_copy)


def test_missing_shard_is_named(tmp_path):
    ckpt = testing.write_tiny_checkpoint(tmp_path / "sh", seed=0, max_shard_bytes=200_000)
    victim = sorted(ckpt.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        qwen3.from_pretrained(ckpt)


def test_unsupported_model_type(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["model_type"] = "qwen3_moe"
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'qwen3_moe'"):
        qwen3.from_pretrained(ckpt_copy)


def test_no_weights_and_bad_paths(ckpt_copy, tmp_path):
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        qwen3.from_pretrained(ckpt_copy)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qwen3.from_pretrained(tmp_path / "nowhere" / "deeper" / "x")


def test_offline_hub_id_names_local_path_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as e:
        qwen3.from_pretrained("Qwen/Qwen3-4B")
    msg = str(e.value)
    assert "offline" in msg and "local directory" in msg and "huggingface-cli download" in msg


def test_read_tensor_round_trip(tmp_path):
    arr = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4).astype(ml_dtypes.bfloat16)
    save_file({"x": arr, "y": np.arange(5, dtype=np.int64)}, str(tmp_path / "t.safetensors"))
    header = read_safetensors_header(tmp_path / "t.safetensors")
    assert header["x"].dtype == "BF16" and header["x"].shape == (2, 3, 4)
    np.testing.assert_array_equal(read_tensor(header["x"]), arr)
    np.testing.assert_array_equal(read_tensor(header["y"]), np.arange(5))


def test_loading_holds_about_one_tensor_in_host_memory(tmp_path):
    """Transient numpy allocations (tracemalloc sees them) stay near one tensor, not the model."""
    import tracemalloc

    ckpt = testing.write_tiny_checkpoint(tmp_path / "deep", {"num_hidden_layers": 12}, seed=5)
    total = (ckpt / "model.safetensors").stat().st_size
    largest = 1024 * 64 * 4  # the embedding table, float32
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        model = qwen3.from_pretrained(ckpt, dtype=jnp.float32)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # On CPU the loaded arrays may alias host buffers (they are the "device" memory and stay in
    # ``current``); what loading needs on top of the result is the transient ``peak - current``.
    assert total > 7 * largest
    assert peak - current < 3 * largest, (peak, current, largest, total)
    assert len(model.layers) == 12


def test_save_refuses_unmerged_lora(tiny_checkpoint, tmp_path):
    lora = pytest.importorskip("sfjax.models.lora")
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    lora.apply_lora(model, lora.LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="merge_lora"):
        qwen3.save_pretrained(model, tmp_path / "lora")
    out = qwen3.save_pretrained(lora.merge_lora(model), tmp_path / "merged")
    assert_same_params(model, qwen3.from_pretrained(out, dtype=jnp.float32))


_TP_SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec
from sfjax.models import qwen3
assert jax.device_count() == 2
mesh = Mesh(np.array(jax.devices()).reshape(1, 2), ("data", "tp"))
sharded = qwen3.from_pretrained(sys.argv[1], dtype=jnp.float32, mesh=mesh)
plain = qwen3.from_pretrained(sys.argv[1], dtype=jnp.float32)
q = sharded.layers[0].self_attn.q_proj.kernel[...]
assert q.sharding.spec == PartitionSpec(None, "tp"), q.sharding
assert {s.data.shape for s in q.addressable_shards} == {(64, 32)}
emb = sharded.embed_tokens.embedding[...]
assert {s.data.shape for s in emb.addressable_shards} == {(512, 64)}
fwd = nnx.jit(lambda m, ids: m(ids))
ids = np.arange(14).reshape(2, 7) * 31 % 900
np.testing.assert_allclose(fwd(sharded, ids), fwd(plain, ids), rtol=1e-5, atol=1e-5)
out = qwen3.save_pretrained(sharded, sys.argv[2])  # gathers the shards
again = qwen3.from_pretrained(out, dtype=jnp.float32)
for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(again)), nnx.to_flat_state(nnx.state(plain))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), str(p))
print("OK")
"""


def test_tensor_parallel_placement_on_two_host_devices(tiny_checkpoint, tmp_path):
    """Params split over a 2-device "tp" axis; the sharded forward equals the plain one, and
    saving the sharded model round-trips."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _TP_SCRIPT, str(tiny_checkpoint), str(tmp_path / "saved")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_tied_checkpoint_with_stored_lm_head_loads(ckpt_copy):
    def add(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()

    _rewrite(ckpt_copy, add)
    model = qwen3.from_pretrained(ckpt_copy, dtype=jnp.float32)
    assert model.lm_head is None


def test_corrupt_config_json_is_named(ckpt_copy):
    (ckpt_copy / "config.json").write_text('{"model_type": "qwen3",')
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        qwen3.from_pretrained(ckpt_copy)
