"""Per-device memory of the sharding rules (sfjax.parallel), side by side with replication.

Two parts, one run:

1. Qwen3-4B (bf16 weights, LoRA r=16 on all projections with float32 AdamW moments, and a
   bf16 KV cache of ``--batch`` rows x ``--slots`` slots) on meshes of 8 devices: bytes each
   device holds under the rules, from the abstract shapes (nothing is allocated), and the ratio
   to full replication (what every device holds without a mesh).
2. A check that the arithmetic is what JAX really does: the tiny test model is loaded with
   ``from_pretrained(..., mesh=)`` on 8 fake CPU devices and the bytes resident on device 0 are
   counted from ``addressable_shards`` and compared with part 1's formula.
3. The self-finetuning loop's checkpoint of Qwen3-4B's LoRA + AdamW state (real float32
   arrays, sharded on a ``1 x 4 x 2`` mesh of the 8 fake devices), save + restore through
   ``LoopCheckpointer`` both ways: shard by shard (orbax gets the sharded ``jax.Array`` s and
   restores into the live shardings -- the only way for arrays that span processes, where
   ``np.asarray`` raises) and from a host copy (gather, save numpy, restore, place again --
   what one process does, and the loop's checkpoint before multi-host support). Reported: wall
   time, ratio, and the bytes one host holds gathered.

    .venv/bin/python benchmarks/bench_sharding.py            # markdown tables on stdout
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AbstractMesh  # noqa: E402

from sfjax import parallel  # noqa: E402
from sfjax.models import lora as lora_lib  # noqa: E402
from sfjax.models import qwen3  # noqa: E402

MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 4, 2), (2, 1, 4)]


def per_device_bytes(tree, shardings) -> tuple[int, int]:
    """(bytes on the busiest device, bytes of the whole tree) for abstract leaves."""
    total, worst = 0, 0
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(
            shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):  # fmt: skip
        nbytes = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        total += nbytes
        ways = 1
        for entry in sh.spec:
            for axis in (entry,) if isinstance(entry, str) else (entry or ()):
                ways *= sh.mesh.shape[axis]
        worst += nbytes // ways
    return worst, total


def abstract_state(config: qwen3.Qwen3Config, rank: int, batch: int, slots: int):
    def build():
        model = qwen3.Qwen3(config, dtype=jnp.bfloat16)
        lora_lib.apply_lora(model, lora_lib.LoRAConfig(rank=rank))
        return model

    model = nnx.eval_shape(build)
    base = nnx.state(model, nnx.Not(nnx.LoRAParam))
    adapters = lora_lib.lora_state(model)
    opt = jax.eval_shape(optax.adamw(1e-4).init, adapters)
    cache = jax.eval_shape(lambda: qwen3.init_cache(config, batch, slots, jnp.bfloat16))
    return {"weights": base, "lora+adam": (adapters, opt), "kv cache": cache}


def shardings_of(name, tree, mesh):
    if name == "kv cache":
        return parallel.cache_shardings(tree, mesh)
    return parallel.state_shardings(tree, mesh)


def analytic_table(batch: int, slots: int, rank: int) -> list[str]:
    parts = abstract_state(qwen3.Qwen3Config.qwen3_4b(), rank, batch, slots)
    rows = [
        "| mesh (data x fsdp x tp) | weights GiB/dev | LoRA+AdamW MiB/dev | KV cache GiB/dev "
        "| total GiB/dev | ratio to replicated |",
        "|---|---|---|---|---|---|",
    ]
    for shape in MESHES:
        mesh = AbstractMesh(shape, parallel.AXES)
        cells, dev_sum, full_sum = [], 0, 0
        for name, tree in parts.items():
            dev, full = per_device_bytes(tree, shardings_of(name, tree, mesh))
            dev_sum, full_sum = dev_sum + dev, full_sum + full
            cells.append(f"{dev / 2**20:.1f}" if name == "lora+adam" else f"{dev / 2**30:.2f}")
        rows.append(f"| {' x '.join(map(str, shape))} | " + " | ".join(cells)
                    + f" | {dev_sum / 2**30:.2f} | {dev_sum / full_sum:.3f} |")  # fmt: skip
    rows.append(f"| replicated (no mesh) | | | | {full_sum / 2**30:.2f} | 1.000 |")
    return rows


def measured_check() -> list[str]:
    from sfjax import testing

    rows = ["| mesh | predicted bytes on device 0 | measured bytes on device 0 | equal |",
            "|---|---|---|---|"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = testing.write_tiny_checkpoint(tmp, {"tie_word_embeddings": False}, seed=0)
        for shape in MESHES:
            mesh = parallel.make_mesh(parallel.MeshConfig(*shape))
            model = qwen3.from_pretrained(ckpt, dtype=jnp.float32, mesh=mesh)
            state = nnx.state(model)
            dev0 = mesh.devices.flat[0]
            measured = sum(
                s.data.nbytes for leaf in jax.tree.leaves(state)
                for s in leaf.addressable_shards if s.device == dev0
            )  # fmt: skip
            predicted, _ = per_device_bytes(state, parallel.state_shardings(state, mesh))
            rows.append(f"| {' x '.join(map(str, shape))} | {predicted} | {measured} | "
                        f"{'yes' if predicted == measured else 'NO'} |")  # fmt: skip
    return rows


def checkpoint_comparison(rank: int, repeats: int) -> list[str]:
    import time

    from sfjax.agents.checkpoint import LoopCheckpointer

    mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=4, tp=2))
    abstract = abstract_state(qwen3.Qwen3Config.qwen3_4b(), rank, 1, 1)["lora+adam"]
    shardings = parallel.state_shardings(abstract, mesh)
    rng = np.random.default_rng(0)

    def fill(leaf, sharding):  # random values (not zeros: no compressible shortcut)
        return parallel.put(rng.standard_normal(leaf.shape).astype(leaf.dtype), sharding)

    state = jax.tree.map(fill, abstract, shardings)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))

    def run(tmp, step, host_gather):
        ckpt = LoopCheckpointer(tmp, host_gather=host_gather)
        ckpt.save(step, state, {"phase": "x"})
        out, _ = ckpt.restore(step, state)
        jax.block_until_ready(out)
        ckpt.close()
        return out

    gathered = lambda tmp, step: run(tmp, step, True)  # noqa: E731
    sharded = lambda tmp, step: run(tmp, step, False)  # noqa: E731

    times = {"sharded": [], "gathered": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for name, fn in (("gathered", gathered), ("sharded", sharded)):
                t0 = time.perf_counter()
                out = fn(os.path.join(tmp, f"{name}_{r}"), r)
                times[name].append(time.perf_counter() - t0)
                for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(state)):
                    assert a.sharding == b.sharding and bool(jnp.array_equal(a, b)), name
                del out
    best = {k: min(v) for k, v in times.items()}
    return [
        f"LoRA r={rank} + AdamW moments of Qwen3-4B, float32, {nbytes / 2**20:.0f} MiB, mesh "
        f"1 x 4 x 2 on {jax.device_count()} fake CPU devices, best of {repeats}:\n",
        "| checkpoint path | save + restore s | ratio | bytes gathered on one host |",
        "|---|---|---|---|",
        f"| host copy (`host_gather=True`: one process, or arrays held whole) | "
        f"{best['gathered']:.2f} | 1.00 | {nbytes / 2**20:.0f} MiB |",
        f"| shard by shard (`host_gather=False`; always for arrays spanning processes) | "
        f"{best['sharded']:.2f} | {best['sharded'] / best['gathered']:.2f} | 0 |",
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="KV-cache rows (prompts x samples)")
    ap.add_argument("--slots", type=int, default=4096, help="KV-cache slots per row")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--repeats", type=int, default=3, help="checkpoint timing repeats")
    ap.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 3")
    args = ap.parse_args()
    parts = {int(x) for x in args.parts.split(",")}
    if 1 in parts:
        print(f"Qwen3-4B, LoRA r={args.rank}, KV cache {args.batch} x {args.slots} bf16, "
              "8 devices\n")  # fmt: skip
        print("\n".join(analytic_table(args.batch, args.slots, args.rank)))
    if 2 in parts:
        print(f"\nTiny model (untied) on {jax.device_count()} fake CPU devices, float32:\n")
        print("\n".join(measured_check()))
    if 3 in parts:
        print("\nSelf-finetuning loop checkpoint (part 3):\n")
        print("\n".join(checkpoint_comparison(args.rank, args.repeats)))


if __name__ == "__main__":
    main()
