"""sfjax.parallel: mesh config, logical sharding rules and their fall-backs, placement helpers.

Rules are checked on ``AbstractMesh`` (any mesh shape, no devices needed). The runs on 8 fake
devices (sharded forward / greedy sampler / KTO step equal the single-device ones) live in
``test_parallel_devices.py``, which :func:`test_eight_device_suite` runs in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (it must be set before JAX starts).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from sfjax import parallel
from sfjax.models import lora as lora_lib
from sfjax.models import qwen3

MESH_222 = AbstractMesh((2, 2, 2), parallel.AXES)


def spec(path, shape, mesh=MESH_222):
    return parallel.param_spec(path, shape, mesh)


# ------------------------------------------------------------------------------ mesh config
def test_mesh_config_resolves_sizes():
    assert parallel.MeshConfig().resolve(8) == (8, 1, 1)
    assert parallel.MeshConfig(fsdp=2, tp=2).resolve(8) == (2, 2, 2)
    assert parallel.MeshConfig(data=1, fsdp=-1, tp=2).resolve(8) == (1, 4, 2)
    assert parallel.MeshConfig(data=2, fsdp=2, tp=2).resolve(8) == (2, 2, 2)


@pytest.mark.parametrize(
    "kwargs, devices, match",
    [
        (dict(tp=4), 6, "not a multiple of 4"),
        (dict(data=2, fsdp=2, tp=1), 8, "needs 4 devices but 8"),
    ],
)
def test_mesh_config_rejects_impossible_shapes(kwargs, devices, match):
    with pytest.raises(ValueError, match=match):
        parallel.MeshConfig(**kwargs).resolve(devices)


def test_mesh_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="at most one"):
        parallel.MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="positive"):
        parallel.MeshConfig(tp=0)


def test_make_mesh_on_available_devices():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == parallel.AXES
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tp": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert "process" in parallel.describe(mesh)


# ------------------------------------------------------------------------------ param rules
def test_projection_embedding_and_norm_rules():
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert spec(("layers", 0, "self_attn", proj, "kernel"), (64, 32)) == P("fsdp", "tp")
    for proj in ("gate_proj", "up_proj"):
        assert spec(("layers", 3, "mlp", proj, "kernel"), (64, 128)) == P("fsdp", "tp")
    assert spec(("layers", 0, "self_attn", "o_proj", "kernel"), (64, 64)) == P("tp", "fsdp")
    assert spec(("layers", 0, "mlp", "down_proj", "kernel"), (128, 64)) == P("tp", "fsdp")
    assert spec(("embed_tokens", "embedding"), (1024, 64)) == P("tp", None)
    assert spec(("lm_head", "kernel"), (64, 1024)) == P("fsdp", "tp")
    assert spec(("layers", 1, "input_layernorm", "weight"), (64,)) == P(None)
    assert spec(("layers", 1, "self_attn", "k_norm", "weight"), (16,)) == P(None)
    assert spec(("norm", "weight"), (64,)) == P(None)


def test_lora_params_follow_their_base_kernel():
    q = ("layers", 0, "self_attn", "q_proj")
    o = ("layers", 0, "self_attn", "o_proj")
    assert spec((*q, "base", "kernel"), (64, 64)) == P("fsdp", "tp")
    assert spec((*q, "lora_a"), (64, 8)) == P("fsdp", None)
    assert spec((*q, "lora_b"), (8, 64)) == P(None, "tp")
    assert spec((*o, "lora_a"), (64, 8)) == P("tp", None)
    assert spec((*o, "lora_b"), (8, 64)) == P(None, "fsdp")
    assert spec(("lm_head", "lora_b"), (8, 1024)) == P(None, "tp")
    # dropout RNG state of an adapter: scalars, replicated
    assert spec((*q, "dropout", "rngs", "key"), ()) == P()


def test_non_divisible_dims_fall_back_to_replication():
    assert spec(("embed_tokens", "embedding"), (1023, 64)) == P(None, None)
    assert spec(("layers", 0, "self_attn", "k_proj", "kernel"), (63, 5)) == P(None, None)
    tp4 = AbstractMesh((1, 1, 4), parallel.AXES)
    assert spec(("layers", 0, "self_attn", "k_proj", "kernel"), (64, 6), tp4) == P("fsdp", None)
    # batch over (data, fsdp): each axis tried in turn
    m = AbstractMesh((2, 4, 1), parallel.AXES)
    assert parallel.logical_to_spec(("batch",), (8,), m) == P(("data", "fsdp"))
    assert parallel.logical_to_spec(("batch",), (6,), m) == P("data")
    assert parallel.logical_to_spec(("batch",), (4,), AbstractMesh((3, 4, 1), parallel.AXES)) == P(
        "fsdp"
    )
    assert parallel.logical_to_spec(("batch", None), (5, 3), m) == P(None, None)


def test_a_mesh_axis_is_used_once_per_tensor():
    rules = {"a": ("tp",), "b": ("tp", "fsdp")}
    assert parallel.logical_to_spec(("a", "b"), (4, 4), MESH_222, rules) == P("tp", "fsdp")


def test_unknown_parameter_raises_with_a_fix():
    with pytest.raises(ValueError, match="PARAM_AXES"):
        spec(("layers", 0, "mlp", "mystery_proj", "kernel"), (64, 64))
    with pytest.raises(ValueError, match="unknown module"):
        spec(("layers", 0, "mlp", "mystery_proj", "lora_a"), (64, 8))


def test_every_qwen3_and_lora_param_has_a_rule():
    cfg = qwen3.Qwen3Config.tiny(tie_word_embeddings=False)

    def build():
        model = qwen3.Qwen3(cfg)
        lora_lib.apply_lora(model, lora_lib.LoRAConfig(rank=4, dropout=0.1,
                            target_modules=lora_lib.DEFAULT_TARGETS + ("lm_head",)))  # fmt: skip
        return model

    model = nnx.eval_shape(build)
    shardings = parallel.state_shardings(nnx.state(model), MESH_222)
    flat = dict(nnx.to_flat_state(shardings))
    assert flat["layers", 1, "mlp", "up_proj", "base", "kernel"].get_value().spec == P("fsdp", "tp")
    assert flat["lm_head", "lora_a"].get_value().spec == P("fsdp", None)
    assert len(flat) == len(nnx.to_flat_state(nnx.state(model)))


def test_optimizer_state_is_sharded_like_its_params():
    model = nnx.eval_shape(lambda: lora_lib.apply_lora(qwen3.Qwen3(qwen3.Qwen3Config.tiny()),
                                                       lora_lib.LoRAConfig(rank=4)))  # fmt: skip
    lora = lora_lib.lora_state(model)
    opt = jax.eval_shape(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)).init, lora)
    sh = parallel.state_shardings(opt, MESH_222)
    adam = sh[1][0]
    mu = dict(nnx.to_flat_state(adam.mu))
    assert mu["layers", 0, "self_attn", "v_proj", "lora_b"].get_value().spec == P(None, "tp")
    assert mu["layers", 0, "mlp", "down_proj", "lora_a"].get_value().spec == P("tp", None)
    assert adam.count.spec == P()


def test_kv_cache_rules():
    cfg = qwen3.Qwen3Config.tiny()  # 2 kv heads
    cache = jax.eval_shape(lambda: qwen3.init_cache(cfg, 8, 32, jnp.bfloat16))
    sh = parallel.cache_shardings(cache, MESH_222)
    assert len(sh.k) == len(sh.v) == cfg.num_layers
    assert {x.spec for x in sh.k + sh.v} == {P(("data", "fsdp"), "tp", None, None)}
    assert sh.slot_mask.spec == P(("data", "fsdp"), None)
    assert sh.positions.spec == P(("data", "fsdp"))
    assert sh.index.spec == P()
    tp4 = AbstractMesh((2, 1, 4), parallel.AXES)  # 4 does not divide 2 kv heads
    assert parallel.cache_shardings(cache, tp4).k[0].spec == P(("data", "fsdp"), None, None, None)


# ---------------------------------------------------------------------- placement / jit
def test_jit_sharded_matches_jit_and_donates_state():
    mesh = parallel.make_mesh()

    def step(params, opt, batch_BT, key, scale):
        noise = jax.random.normal(key, params["w"].shape)
        loss = jnp.mean((batch_BT @ params["w"]) ** 2)
        new = {"w": params["w"] - scale * noise}
        return new, opt + 1, loss

    params = {"w": jnp.arange(12.0).reshape(3, 4)}
    batch = np.ones((2, 3), np.float32)
    key = jax.random.key(0)
    want = jax.jit(step)(params, jnp.int32(0), batch, key, 0.5)
    fn = parallel.jit_sharded(
        step, mesh,
        (parallel.PARAMS, parallel.REPLICATED, parallel.batch_split(), parallel.REPLICATED,
         parallel.REPLICATED),
        (parallel.like(0), parallel.REPLICATED, parallel.REPLICATED),
        donate_argnums=(0,),
        rules={**parallel.DEFAULT_RULES},
    )  # fmt: skip
    with pytest.raises(ValueError, match="no sharding rule"):
        fn(params, jnp.int32(0), batch, key, 0.5)  # "w" is not a Qwen3 parameter name
    parallel.PARAM_AXES["toy", "w"] = ("embed", "heads")
    try:
        toy = {"toy": {"w": jnp.arange(12.0).reshape(3, 4)}}

        def toy_step(p, opt, batch_BT, key, scale):
            new, opt, loss = step(p["toy"], opt, batch_BT, key, scale)
            return {"toy": new}, opt, loss

        fn = parallel.jit_sharded(
            toy_step, mesh,
            (parallel.PARAMS, parallel.REPLICATED, parallel.batch_split(), parallel.REPLICATED,
             parallel.REPLICATED),
            (parallel.like(0), parallel.REPLICATED, parallel.REPLICATED), donate_argnums=(0,),
        )  # fmt: skip
        got = fn(toy, jnp.int32(0), batch, key, 0.5)
        np.testing.assert_allclose(got[0]["toy"]["w"], want[0]["w"], rtol=1e-6)
        assert int(got[1]) == 1 and np.isclose(float(got[2]), float(want[2]))
        assert toy["toy"]["w"].is_deleted()  # donated
        fn(got[0], got[1], batch, key, 0.5)
        assert len(fn.programs) == 1  # same structure and shapes: one program
    finally:
        del parallel.PARAM_AXES["toy", "w"]


def test_batch_split_needs_a_common_batch_dim():
    fn = parallel.jit_sharded(lambda x: x, parallel.make_mesh(), (parallel.batch_split(1),),
                              parallel.REPLICATED)  # fmt: skip
    with pytest.raises(ValueError, match="common batch dim"):
        fn({"a": np.zeros((2, 3)), "b": np.zeros((2, 4))})


def test_put_accepts_prefix_shardings_and_keys():
    mesh = parallel.make_mesh()
    tree = {"a": np.ones((4, 2)), "b": {"c": np.zeros(3)}, "k": jax.random.key(1)}
    out = parallel.put(tree, {"a": parallel.batch_sharding(mesh, (4,)), "b": parallel.replicated(mesh),
                              "k": parallel.replicated(mesh)})  # fmt: skip
    assert out["a"].sharding.spec == P(("data", "fsdp"))
    assert out["b"]["c"].sharding.spec == P()
    assert jax.dtypes.issubdtype(out["k"].dtype, jax.dtypes.prng_key)
    host = parallel.to_host(out)
    np.testing.assert_array_equal(host["a"], tree["a"])


def test_host_local_to_global_single_process():
    mesh = parallel.make_mesh()
    out = parallel.host_local_to_global({"x": np.arange(6).reshape(2, 3)}, mesh)
    assert out["x"].shape == (2 * jax.process_count(), 3)
    np.testing.assert_array_equal(parallel.to_host(out["x"]), np.arange(6).reshape(2, 3))


# ------------------------------------------------------------------------------- processes
def test_distributed_config_disabled_and_validated():
    assert parallel.initialize_distributed(parallel.DistributedConfig()) is False
    with pytest.raises(ValueError, match="together"):
        parallel.initialize_distributed(
            parallel.DistributedConfig(enabled=True, coordinator_address="127.0.0.1:1234")
        )


def test_main_process_helpers(tmp_path):
    assert parallel.is_main_process()
    assert parallel.main_process_only(lambda x: x + 1)(1) == 2
    assert parallel.summary_writer(None) is None
    writer = parallel.summary_writer(tmp_path / "tb")
    writer.add_scalar("x", 1.0, 0)
    writer.close()
    assert list((tmp_path / "tb").iterdir())
    parallel.sync("noop")


def test_eight_device_suite():
    """Run test_parallel_devices.py with 8 fake CPU devices in a fresh interpreter."""
    if jax.device_count() >= 8:
        pytest.skip("this process already has 8 devices: test_parallel_devices.py runs in it")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(root / "tests" / "test_parallel_devices.py"),
         "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], report


def test_launcher_sets_default_mesh_for_an_unmodified_script(tiny_checkpoint, tmp_path):
    """`python -m sfjax.parallel --tp 2 -- script.py ARGS`: a plain from_pretrained shards."""
    script = tmp_path / "script.py"
    script.write_text(
        "import json, sys\n"
        "import jax.numpy as jnp\n"
        "from sfjax import parallel\n"
        "from sfjax.models import qwen3\n"
        "model = qwen3.from_pretrained(sys.argv[1], dtype=jnp.float32)\n"
        "q = model.layers[0].self_attn.q_proj.kernel[...]\n"
        "print(json.dumps({'argv': sys.argv[1:], 'mesh': dict(parallel.default_mesh().shape),\n"
        "                  'spec': [str(a) for a in q.sharding.spec],\n"
        "                  'local': list(q.addressable_shards[0].data.shape)}))\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "sfjax.parallel", "--tp", "2", "--", str(script),
         str(tiny_checkpoint), "--flag"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["argv"] == [str(tiny_checkpoint), "--flag"]
    assert out["mesh"] == {"data": 2, "fsdp": 1, "tp": 2}
    assert out["spec"] == ["fsdp", "tp"] and out["local"] == [64, 32]
    assert "mesh data=2 x fsdp=1 x tp=2" in proc.stderr


def test_launcher_needs_a_script():
    with pytest.raises(SystemExit):
        parallel.main(["--tp", "2", "--"])


@pytest.mark.parametrize("args, says", [
    (["--data", "0"], "MeshConfig.data=0: use a positive size"),
    (["--data", "1", "--tp", "64"], "needs 64 devices but"),
])  # fmt: skip
def test_launcher_refuses_a_bad_mesh_before_the_script_runs(tmp_path, capsys, args, says):
    """A bad size or a mesh the devices cannot fill used to end in a traceback: it is a usage
    error (exit 2) that names the problem, and the script never starts."""
    script = tmp_path / "script.py"
    script.write_text("raise SystemExit('the script ran')\n")
    with pytest.raises(SystemExit) as e:
        parallel.main([*args, "--", str(script)])
    assert e.value.code == 2 and says in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        parallel.main(["--", str(tmp_path / "missing.py")])
    assert e.value.code == 2 and "missing.py: no such script" in capsys.readouterr().err


def test_on_main_process_sends_errors_and_results_json_cannot_carry(monkeypatch):
    """As process 0 of 2: an error, or a result JSON cannot carry (a dataclass, a Path: how
    the SF CLI broke on several processes), is sent to the others with its type and raised
    here; the others raise MainProcessError with the type and the message apart."""
    import sfjax.parallel.multihost as mh

    sent = []
    monkeypatch.setattr(mh.jax, "process_count", lambda: 2)
    monkeypatch.setattr(mh, "is_main_process", lambda: True)
    monkeypatch.setattr(mh, "broadcast_object", lambda obj: sent.append(obj) or obj)
    assert parallel.on_main_process(lambda: [1, "a"]) == [1, "a"]
    with pytest.raises(TypeError, match="PosixPath is not JSON serializable"):
        parallel.on_main_process(lambda: Path("/x"))
    with pytest.raises(KeyError):
        parallel.on_main_process(lambda: {}["missing"])
    assert sent[1:] == [
        {"error": "Object of type PosixPath is not JSON serializable", "kind": "TypeError"},
        {"error": "'missing'", "kind": "KeyError"},
    ]
    # process 1 receives process 0's error
    monkeypatch.setattr(mh, "is_main_process", lambda: False)
    monkeypatch.setattr(mh, "broadcast_object", lambda obj: sent[1])
    with pytest.raises(parallel.MainProcessError) as e:
        parallel.on_main_process(lambda: 1)
    assert (e.value.kind, e.value.detail) == ("TypeError", sent[1]["error"])
    assert str(e.value) == f"on process 0: TypeError: {sent[1]['error']}"


def test_main_process_calls_and_shared_directory_single_process(tmp_path):
    assert parallel.on_main_process(lambda a, b=0: a + b, 1, b=2) == 3
    with pytest.raises(KeyError):  # the original error, with one process
        parallel.on_main_process(lambda: {}["missing"])
    assert parallel.all_processes_agree(True) and not parallel.all_processes_agree(False)
    parallel.check_shared_directory(tmp_path / "not-created")  # no-op with one process
    assert not (tmp_path / "not-created").exists()
