"""Attention kernels alone at Qwen3-4B shapes: plain (f32 scores) vs XLA vs cuDNN fused, one
layer's worth, against the HBM / matmul floor — and which shapes cuDNN accepts at all.

The first job of ``gpu_all.py``: in well under a minute it says whether cuDNN flash attention
takes each shape the project runs (the T = 1 decode step over a KV cache, the sampler's
odd-length ``T - 1`` prefill, the KTO step's forward + backward), so the longer jobs' ``auto``
results can be read, and how much each kernel costs where attention matters most.

Cases (Qwen3-4B: 32 query heads, 8 kv heads, head dim 128; bf16; left padding of a quarter of
the prompt in half the rows so the mask is not trivial):

* ``decode_b{1,64,256}``: one query per row over a cache of 2,688 slots (2,560 prompt bucket +
  128) with 2,300 filled;
* ``prefill_b1``: 2,559 queries (the sampler's prefill minus its last column) over 2,688 slots;
* ``train_b8``: causal 1,024 x 1,024, forward + backward (``jax.grad`` of a sum): the KTO
  step's prompt pass (768 of them since the shared prefix is padded to an even length);
* ``train_cont_b8``: 256 queries over 1,024 keys, forward + backward: the KTO step's
  completions continuing the shared prompt.

Per case and implementation: median time of the jitted call (or the error, e.g. cuDNN
refusing the shape), and the floor max(bytes / bandwidth, FLOPs / matmul rate) with bytes =
q + k + v + out (+ their gradients for training) and FLOPs = 4 · B · N · H · T · S (x 3 for
forward + backward), both rates measured in this run.

Usage::

    python benchmarks/gpu_attention.py --out results/gpu_attention.json
    python benchmarks/gpu_attention.py --tiny          # CPU smoke run (cuDNN cases error out)
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_common as gc  # noqa: E402

from sfjax.device_memory import is_out_of_memory  # noqa: E402 -- gpu_common puts it on the path

IMPLS = ("plain", "xla", "cudnn")


def parse_args(argv=None):
    p = gc.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    args = p.parse_args(argv)
    args.iters = args.iters or (2 if args.tiny else 10)
    return args


def cases(tiny: bool) -> list[dict]:
    if tiny:
        return [dict(name="decode_b2", B=2, T=1, S=48, filled=40, train=False),
                dict(name="prefill_b1", B=1, T=31, S=48, filled=32, train=False),
                dict(name="train_b2", B=2, T=32, S=32, filled=32, train=True),
                dict(name="train_cont_b2", B=2, T=8, S=32, filled=32, train=True)]
    out = [dict(name=f"decode_b{b}", B=b, T=1, S=2688, filled=2300, train=False)
           for b in (1, 64, 256)]
    out.append(dict(name="prefill_b1", B=1, T=2559, S=2688, filled=2560, train=False))
    out.append(dict(name="train_b8", B=8, T=1024, S=1024, filled=1024, train=True))
    out.append(dict(name="train_cont_b8", B=8, T=256, S=1024, filled=1024, train=True))
    return out


def make_inputs(case, N, K, H, dtype):
    """q, k, v and the visibility of a left-padded batch (decode/prefill: over a cache)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    B, T, S, filled = case["B"], case["T"], case["S"], case["filled"]
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, N, H), dtype)
    k = jax.random.normal(kk, (B, K, S, H), dtype)  # head-major, as the KV cache
    v = jax.random.normal(kv, (B, K, S, H), dtype)
    pads = np.where(np.arange(B) % 2 == 1, filled // 4, 0)
    slot = np.arange(S)[None, :]
    real_BS = (slot >= pads[:, None]) & (slot < filled)
    query_slot_T = (filled - T + np.arange(T)) if T < S else np.arange(T)
    causal_TS = slot <= query_slot_T[:, None]
    visible = jnp.asarray(causal_TS[None] & real_BS[:, None, :])
    return q, k, v, visible


def floor_s(case, N, K, H, roof, nbytes: int = 2) -> float:
    B, T, S = case["B"], case["T"], case["S"]
    io = (2 * B * T * N * H + 2 * B * S * K * H) * nbytes
    flops = 4.0 * B * N * H * T * S
    if case["train"]:
        io, flops = 2 * io, 3 * flops
    return max(io / roof.hbm_bytes_per_s, flops / roof.matmul_flops_per_s)


def time_case(case, impl, args, N, K, H, dtype) -> dict:
    import jax
    import jax.numpy as jnp

    from sfjax.models import attention

    q, k, v, visible = make_inputs(case, N, K, H, dtype)

    def fwd(q, k, v):
        return attention.attention(q, k, v, visible, implementation=impl)

    if case["train"]:
        fn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32)),
                              argnums=(0, 1, 2)))
    else:
        fn = jax.jit(fwd)
    out = fn(q, k, v)
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
    t = gc.time_call(lambda: fn(q, k, v), iters=args.iters, warmup=1)
    return {"median_s": t["median_s"], "min_s": t["min_s"], "finite": finite}


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    started = gc.start(args)
    if started is None:
        return None
    config, roof = started
    import jax.numpy as jnp

    N, K, H = config.num_heads, config.num_kv_heads, config.head_dim
    dtype = jnp.bfloat16
    rows = []
    for case in cases(args.tiny):
        row = {**case, "floor_measured_s": floor_s(case, N, K, H, roof),
               "floor_spec_s": gc.spec_floor(floor_s, case, N, K, H)}
        for impl in IMPLS:
            try:
                row[impl] = time_case(case, impl, args, N, K, H, dtype)
                row[impl]["fraction_of_floor"] = gc.ratio(row["floor_measured_s"],
                                                          row[impl]["median_s"])
            except Exception as e:  # noqa: BLE001 - a refused shape is a result here
                row[impl] = {"error": f"{type(e).__name__}: {str(e)[:400]}",
                             "oom": is_out_of_memory(e)}
                gc.free_device_memory()
            got = row[impl]
            gc.progress(f"{case['name']} {impl}: " + (
                f"{1e3 * got['median_s']:.3f} ms ({100 * got['fraction_of_floor']:.0f} % of "
                f"floor)" if "median_s" in got else f"error {got['error'][:120]}"))
        rows.append(row)
        gc.emit_partial(args, "gpu_attention", {"roofline": gc.roofline_record(roof),
                                                "heads": [N, K, H], "rows": rows})
    return gc.emit(args, "gpu_attention", {"roofline": gc.roofline_record(roof),
                                           "heads": [N, K, H], "rows": rows})


if __name__ == "__main__":
    main()
