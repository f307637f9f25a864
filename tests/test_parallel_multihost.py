"""Two ``jax.distributed`` processes on localhost (4 fake CPU devices each) run sharded steps.

The test starts this file twice through the launcher, ``python -m sfjax.parallel
--coordinator-address 127.0.0.1:<free port> --num-processes 2 --process-id {0,1} --data 2
--fsdp 2 --tp 2 -- <this file> ...``, which initialises ``jax.distributed`` and sets the global
``data=2 x fsdp=2 x tp=2`` default mesh (``data`` spans the two processes). Each worker then
loads the tiny checkpoint with a plain ``from_pretrained`` straight onto its shards,
assembles a global batch from host-local halves, and runs one sharded forward and one sharded
KTO train step; process 0 alone writes the results, which must equal a single-device run in the
pytest process (tolerances as in ``test_parallel_devices.py``). CPU collectives go through gloo.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from multihost_launch import launch_two  # tests/multihost_launch.py

B, T = 4, 12
KTO_LR = 1e-3


def batch_arrays():
    """The global batch: left-padded ids / mask, the same on every process."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 800, (B, T)).astype(np.int32)
    lengths = np.array([T, 5, 9, 1])
    mask = np.arange(T)[None, :] >= (T - lengths)[:, None]
    return np.where(mask, ids, 0), mask


def kto_examples():
    from sfjax.train.data import KTOExample

    return [
        KTOExample([5, 6, 7, 8], [9, 10, 11], True),
        KTOExample([12, 13], [14, 15, 16, 17], False),
        KTOExample([18, 19, 20], [21, 22], True),
        KTOExample([23, 24, 25, 26, 27], [28], False),
    ]


def kto_step(model, mesh):
    """One KTO optimizer step on LoRA; returns (updated lora as numpy dict, loss)."""
    import jax

    from sfjax.models import lora as lora_lib
    from sfjax.train.kto import KTOConfig, KTOTrainer

    lora_lib.apply_lora(model, lora_lib.LoRAConfig(rank=4), rngs=__import__("flax").nnx.Rngs(1))
    cfg = KTOConfig(micro_batch_size=4, learning_rate=KTO_LR, warmup_ratio=0.0, shuffle=False,
                    progress=False, max_prompt_length=16, max_completion_length=16)  # fmt: skip
    trainer = KTOTrainer(model, None, cfg)  # the default mesh, if any
    assert trainer.mesh is mesh
    history = trainer.train(kto_examples(), jax.random.key(0))
    from flax import nnx

    from sfjax import parallel

    flat = nnx.to_flat_state(lora_lib.lora_state(model))
    lora = {"/".join(map(str, p)): parallel.to_host(v.get_value()) for p, v in flat}
    return lora, history[-1]["loss"]


def worker(ckpt: str, out_dir: str) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import PartitionSpec

    from sfjax import parallel
    from sfjax.models import qwen3

    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    process_id = jax.process_index()
    mesh = parallel.default_mesh()  # set by the launcher
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tp": 2}
    # Values decided on process 0 only (e.g. an API reply) reach every process.
    assert parallel.broadcast_object({"from": process_id, "x": [1.5, "a"]}) == {
        "from": 0, "x": [1.5, "a"]
    }
    model = qwen3.from_pretrained(ckpt, dtype=jnp.float32)
    q = model.layers[0].self_attn.q_proj.kernel[...]
    assert not q.is_fully_addressable and q.sharding.spec == PartitionSpec("fsdp", "tp")

    # Host-local data loading: each process holds only its half of the batch.
    ids, mask = batch_arrays()
    half = slice(process_id * B // 2, (process_id + 1) * B // 2)
    g_ids, g_mask = parallel.host_local_to_global((ids[half], mask[half]), mesh)
    assert g_ids.shape == (B, T) and not g_ids.is_fully_addressable

    graphdef, state = nnx.split(model)
    forward = parallel.jit_sharded(
        lambda state, ids, mask: nnx.merge(graphdef, state)(ids, attention_mask=mask),
        mesh, (parallel.PARAMS, parallel.batch_split(), parallel.batch_split()),
        parallel.batch_split(),
    )  # fmt: skip
    logits = parallel.to_host(forward(state, g_ids, g_mask))
    lora, loss = kto_step(model, mesh)
    parallel.sync("results")
    if parallel.is_main_process():
        np.savez(Path(out_dir) / "results.npz", logits=logits, **lora)
        (Path(out_dir) / "meta.json").write_text(json.dumps({"loss": loss}))
    parallel.sync("written")
    jax.distributed.shutdown()


def test_two_process_run_matches_single_device(tmp_path):
    import jax.numpy as jnp

    from sfjax import testing
    from sfjax.models import qwen3

    # One layer: depth adds compile time (paid three times here), not sharding coverage.
    tiny_checkpoint = testing.write_tiny_checkpoint(
        tmp_path / "ckpt", {"num_hidden_layers": 1}, seed=0
    )

    mesh = ("--data", "2", "--fsdp", "2", "--tp", "2")
    launch_two(__file__, [str(tiny_checkpoint), str(tmp_path)], mesh, timeout_s=240)
    got = np.load(tmp_path / "results.npz")
    meta = json.loads((tmp_path / "meta.json").read_text())

    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    ids, mask = batch_arrays()
    want_logits = np.asarray(model(ids, attention_mask=mask))
    np.testing.assert_allclose(got["logits"], want_logits, atol=2e-5, rtol=1e-5)
    want_lora, want_loss = kto_step(model, None)
    assert set(want_lora) == set(got.files) - {"logits"}
    for name, value in want_lora.items():
        np.testing.assert_allclose(got[name], value, atol=1e-6, err_msg=name)
    assert abs(meta["loss"] - want_loss) < 1e-5
    moved = [n for n in want_lora if "lora_b" in n and np.abs(want_lora[n]).max() > 0]
    assert moved, "the KTO step must change the zero-initialised B matrices"


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
