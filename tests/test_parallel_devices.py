"""Sharded runs on 8 fake CPU devices equal single-device runs (issue 10).

This module needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before JAX is
imported, so ``tests/test_parallel.py`` runs it in a subprocess; collected in an ordinary
(one-device) pytest process it skips itself.

Tolerances (float32 on CPU): sharding only reorders the partial sums of matmuls and
reductions, so logits agree to 2e-5 absolute (values are O(1)), greedy tokens agree exactly,
their log-probs to 1e-4, and one KTO step's updated LoRA weights to 1e-6 absolute (updates are
O(lr) = 1e-3) with losses / metrics to 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

if jax.device_count() < 8:
    pytest.skip(
        "needs 8 devices (run through tests/test_parallel.py, which sets XLA_FLAGS)",
        allow_module_level=True,
    )

from sfjax import parallel  # noqa: E402
from sfjax.models import lora as lora_lib  # noqa: E402
from sfjax.models import qwen3  # noqa: E402
from sfjax.tokenizer import load_tokenizer  # noqa: E402

MESHES = {"8x1x1": (8, 1, 1), "1x4x2": (1, 4, 2), "2x2x2": (2, 2, 2)}


def mesh_of(name: str):
    d, f, t = MESHES[name]
    return parallel.make_mesh(parallel.MeshConfig(data=d, fsdp=f, tp=t))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A one-layer tiny Qwen3 with an untied LM head (depth adds compile time, not coverage)."""
    from sfjax import testing

    return testing.write_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny_1layer"),
        {"tie_word_embeddings": False, "num_hidden_layers": 1}, seed=2,
    )  # fmt: skip


@pytest.fixture(scope="module")
def single(ckpt):
    return qwen3.from_pretrained(ckpt, dtype=jnp.float32)


def left_padded_batch(B=8, T=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 800, (B, T)).astype(np.int32)
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    mask = np.arange(T)[None, :] >= (T - lengths)[:, None]
    return np.where(mask, ids, 0), mask


# ---------------------------------------------------------------------------- rules in place
def test_from_pretrained_places_every_param_by_rule(ckpt):
    mesh = mesh_of("2x2x2")
    model = qwen3.from_pretrained(ckpt, dtype=jnp.float32, mesh=mesh)
    lora_lib.apply_lora(model, lora_lib.LoRAConfig(rank=4))
    parallel.shard_model(model, mesh)
    expected = {
        ("embed_tokens", "embedding"): P("tp", None),
        ("lm_head", "kernel"): P("fsdp", "tp"),
        ("norm", "weight"): P(None),
    }
    for proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        expected[proj, "base", "kernel"] = P("fsdp", "tp")
        expected[proj, "lora_a"] = P("fsdp", None)
        expected[proj, "lora_b"] = P(None, "tp")
    for proj in ("o_proj", "down_proj"):
        expected[proj, "base", "kernel"] = P("tp", "fsdp")
        expected[proj, "lora_a"] = P("tp", None)
        expected[proj, "lora_b"] = P(None, "fsdp")
    seen = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = tuple(p for p in path if isinstance(p, str) and p not in ("layers",))
        names = names[-3:] if names[-2] == "base" else names[-2:]
        arr = var.get_value()
        want = expected.get(names, P(None) if arr.ndim == 1 else None)
        assert want is not None, f"no expectation for {path}"
        assert arr.sharding.spec == want, (path, arr.sharding.spec, want)
        # The shards really are split: each device holds shape / (ways per dim).
        ways = [np.prod([mesh.shape[a] for a in ((e,) if isinstance(e, str) else e)])
                if e is not None else 1 for e in want]  # fmt: skip
        local = arr.addressable_shards[0].data.shape
        assert local == tuple(n // w for n, w in zip(arr.shape, ways)), path
        seen += 1
    layers = model.config.num_layers
    assert seen == 3 + layers * (7 * 3 + 4)  # embed, lm_head, norm; per layer 7 x (W, A, B) + 4 norms


def test_kv_cache_and_batch_fall_back_when_not_divisible():
    cfg = qwen3.Qwen3Config.tiny()  # 2 kv heads
    cache = jax.eval_shape(lambda: qwen3.init_cache(cfg, 4, 16, jnp.float32))
    sh = parallel.cache_shardings(cache, mesh_of("2x2x2"))
    assert {x.spec for x in sh.k} == {P(("data", "fsdp"), "tp", None, None)}
    assert sh.slot_mask.spec == P(("data", "fsdp"), None)
    assert sh.positions.spec == P(("data", "fsdp"))
    assert sh.index.spec == P()
    tp8 = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=1, tp=8))
    assert parallel.cache_shardings(cache, tp8).k[0].spec == P(("data", "fsdp"), None, None, None)
    # batch 4 on data=8: not divisible -> replicated; batch 2 on 2x2x2 -> data only
    assert parallel.batch_sharding(mesh_of("8x1x1"), (4, 7)).spec == P("fsdp", None)
    assert parallel.batch_sharding(mesh_of("2x2x2"), (2, 7)).spec == P("data", None)


# -------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_forward_matches_single_device(single, ckpt, mesh_name):
    mesh = mesh_of(mesh_name)
    model = qwen3.from_pretrained(ckpt, dtype=jnp.float32, mesh=mesh)
    ids, mask = left_padded_batch()
    graphdef, state = nnx.split(model)
    data_sh = parallel.batch_sharding(mesh, ids.shape)
    out_sh = parallel.batch_sharding(mesh, (*ids.shape, model.config.vocab_size))

    @jax.jit
    def reference(ids, mask):
        return single(ids, attention_mask=mask)

    forward = jax.jit(
        lambda state, ids, mask: nnx.merge(graphdef, state)(ids, attention_mask=mask),
        in_shardings=(parallel.state_shardings(state, mesh), data_sh, data_sh),
        out_shardings=out_sh,
    )
    got = forward(state, *parallel.put((ids, mask), data_sh))
    assert got.sharding.spec == out_sh.spec
    want = reference(ids, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


# -------------------------------------------------------------------------------- sampler
PROMPTS = ["Action: 12 and", "the slice", "PRB 7", "queue grows by 3 packets"]


def greedy_params():
    from sfjax.sampling import SamplingParams

    return SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def greedy_reference(single, ckpt):
    from sfjax.sampling import Sampler

    tok = load_tokenizer(ckpt)
    return Sampler(single, tok).generate(PROMPTS, greedy_params(), n=2)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_greedy_sampler_matches_single_device(greedy_reference, ckpt, mesh_name):
    from sfjax.sampling import Sampler

    tok = load_tokenizer(ckpt)
    mesh = mesh_of(mesh_name)
    sharded = qwen3.from_pretrained(ckpt, dtype=jnp.float32)
    sampler = Sampler(sharded, tok, mesh=mesh)  # places the model by the rules
    embed = sharded.embed_tokens.embedding[...]
    assert embed.sharding == parallel.param_sharding(("embed_tokens", "embedding"), embed.shape, mesh)
    got = sampler.generate(PROMPTS, greedy_params(), n=2)
    want = greedy_reference
    assert got.tokens == want.tokens
    np.testing.assert_allclose(
        np.concatenate(got.logprobs), np.concatenate(want.logprobs), atol=1e-4
    )
    cache = next(iter(sampler._caches.values()))  # the donated cache stays on its shards
    assert tuple(x.sharding for x in cache.k) == parallel.cache_shardings(cache, mesh).k
    assert cache.k[0].sharding.spec[0] is not None  # rows (B·n = 8) are split over the batch axes
    got2 = sampler.generate(PROMPTS, greedy_params(), n=2)
    assert got2.tokens == want.tokens and sampler.num_traces == 1


SHARED = np.random.default_rng(11).integers(1, 800, 40).tolist()  # a "system prompt"
PREFIXED = [SHARED + [5 + i] * (1 + 3 * i) for i in range(4)]


@pytest.fixture(scope="module")
def prefixed_reference(single, ckpt):
    from sfjax.sampling import Sampler

    return Sampler(single, load_tokenizer(ckpt)).generate(PREFIXED, greedy_params())


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_prefix_cache_under_a_mesh_matches_single_device(prefixed_reference, ckpt, mesh_name):
    """The cached prompt prefix (one row, kept on its shards) gives the single-device tokens."""
    from sfjax.sampling import Sampler

    mesh = mesh_of(mesh_name)
    sharded = qwen3.from_pretrained(ckpt, dtype=jnp.float32)
    sampler = Sampler(sharded, load_tokenizer(ckpt), mesh=mesh, prefix_cache=True,
                      prefix_min_tokens=32)  # fmt: skip
    for _ in range(2):  # built, then reused
        got = sampler.generate(PREFIXED, greedy_params())
        assert got.tokens == prefixed_reference.tokens
    entry = sampler.prefix_cache.entry
    assert entry.tokens == tuple(SHARED) and sampler.prefix_cache.num_builds == 1
    assert tuple(x.sharding for x in entry.k_LyP) == sampler.prefix_cache.kv_sharding(entry.slots)
    np.testing.assert_allclose(
        np.concatenate(got.logprobs), np.concatenate(prefixed_reference.logprobs), atol=1e-4
    )


# ------------------------------------------------------------------------------- KTO step
def kto_examples():
    from sfjax.train.data import KTOExample

    rng = np.random.default_rng(3)
    return [
        KTOExample(rng.integers(1, 800, 3 + i).tolist(), rng.integers(1, 800, 2 + i % 3).tolist(),
                   bool(i % 2))  # fmt: skip
        for i in range(8)
    ]


def kto_step(model, mesh):
    """One KTO optimizer step (8 rows = one micro-batch); returns (LoRA params, metrics)."""
    from sfjax.train.kto import KTOConfig, KTOTrainer

    lora_lib.apply_lora(model, lora_lib.LoRAConfig(rank=4), rngs=nnx.Rngs(7))
    cfg = KTOConfig(micro_batch_size=8, learning_rate=1e-3, warmup_ratio=0.0, shuffle=False,
                    progress=False, max_prompt_length=16, max_completion_length=16)  # fmt: skip
    trainer = KTOTrainer(model, None, cfg, mesh=mesh)
    (metrics,) = trainer.train(kto_examples(), jax.random.key(0))
    flat = nnx.to_flat_state(lora_lib.lora_state(model))
    return {p: np.asarray(v.get_value()) for p, v in flat}, metrics, trainer


@pytest.fixture(scope="module")
def kto_reference(ckpt):
    model = qwen3.from_pretrained(ckpt, dtype=jnp.float32)
    lora, metrics, _ = kto_step(model, None)
    return lora, metrics


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_kto_step_matches_single_device(kto_reference, ckpt, mesh_name):
    mesh = mesh_of(mesh_name)
    model = qwen3.from_pretrained(ckpt, dtype=jnp.float32)
    lora, metrics, trainer = kto_step(model, mesh)
    want_lora, want_metrics = kto_reference
    assert lora.keys() == want_lora.keys()
    for path, value in lora.items():
        np.testing.assert_allclose(value, want_lora[path], atol=1e-6, err_msg=str(path))
    for name in ("loss", "kl", "rewards/chosen", "rewards/rejected", "grad_norm"):
        assert abs(metrics[name] - want_metrics[name]) <= 1e-5 * max(1, abs(want_metrics[name]))
    assert any(np.abs(v).max() > 0 for p, v in lora.items() if p[-1] == "lora_b")  # it trained
    # The adapters stay on their rule shardings after the donated, sharded step.
    b = model.layers[0].self_attn.q_proj.lora_b[...]
    assert b.sharding == parallel.param_sharding(("q_proj", "lora_b"), b.shape, mesh)
    (program, in_sh), = trainer._step_fn.programs.values()
    assert in_sh[4].spec == P(None, parallel.logical_to_spec(("batch",), (8,), mesh)[0])
