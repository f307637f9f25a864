"""Prefill forward throughput: sfjax Qwen3 (jitted, float32) vs transformers' torch Qwen3.

Both run the same random Qwen3-architecture weights (built by transformers, saved, loaded by
``sfjax.models.qwen3.from_pretrained``) on the same CPU in one process, one after the other.
The logits are checked to agree before timing. Reported: tokens/s of a full forward over a
``batch x seq`` prompt (logits for every position), median of ``--repeats`` interleaved runs
after warm-up, and the ratio sfjax / torch; also tokens per CPU-second of the process (all its
threads), which is steadier than wall time on a CPU shared with other jobs.

Usage::

    .venv/bin/python benchmarks/bench_prefill.py                 # configs small and mid
    .venv/bin/python benchmarks/bench_prefill.py --configs small --repeats 5
    .venv/bin/python benchmarks/bench_prefill.py --single-thread   # 1 thread each
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from timing import interleaved_medians  # noqa: E402  (benchmarks/timing.py)

from sfjax.testing import BENCHMARK_CONFIGS as CONFIGS  # noqa: E402


def bench(name: str, batch: int, seq: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from sfjax.models import qwen3

    hf_cfg = transformers.Qwen3Config(
        **CONFIGS[name], rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
        max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = qwen3.from_pretrained(d, dtype=jnp.float32)

    ids = np.random.default_rng(0).integers(0, hf_cfg.vocab_size, (batch, seq))
    mask = np.ones((batch, seq), bool)
    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask.astype(np.int64))

    @nnx.jit
    def forward(model, ids_BT, mask_BT):
        return model(ids_BT, attention_mask=mask_BT)

    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)

    def run_jax():
        return forward(model, ids_j, mask_j).block_until_ready()

    def run_torch():
        with torch.no_grad():
            return hf(input_ids=ids_t, attention_mask=mask_t).logits

    t0 = time.perf_counter()
    ours = np.asarray(run_jax())
    compile_s = time.perf_counter() - t0
    ref = run_torch().numpy()
    err = float(np.abs(ours - ref).max() / np.abs(ref).max())
    if err > 1e-4:
        raise AssertionError(f"{name}: sfjax and transformers disagree (rel err {err:.2e})")

    (jax_s, jax_cpu), (torch_s, torch_cpu) = interleaved_medians([run_jax, run_torch], repeats)
    tokens = batch * seq
    return {
        "config": name,
        "params_M": sum(p.numel() for p in hf.parameters()) / 1e6,
        "sfjax_tok_s": tokens / jax_s,
        "torch_tok_s": tokens / torch_s,
        "ratio": torch_s / jax_s,
        "sfjax_tok_cpu_s": tokens / jax_cpu,
        "torch_tok_cpu_s": tokens / torch_cpu,
        "cpu_ratio": torch_cpu / jax_cpu,
        "compile_s": compile_s,
        "rel_err": err,
        "backend": jax.default_backend(),
        "torch_threads": torch.get_num_threads(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["small", "mid"], choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--single-thread",
        action="store_true",
        help="one core for both frameworks (process pinned to one CPU; fairer on a shared CPU)",
    )
    args = ap.parse_args()
    if args.single_thread:  # must happen before jax / torch start their thread pools
        # XLA:CPU runs independent ops concurrently even with Eigen off: pin to one core.
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
        )
        import torch

        torch.set_num_threads(1)
    print(
        f"prefill forward, batch {args.batch} x {args.seq} tokens, float32, median of {args.repeats}"
    )
    print(
        "| config | params (M) | sfjax tok/s | transformers tok/s | ratio sfjax/torch "
        "| sfjax tok/CPU-s | transformers tok/CPU-s | CPU ratio | jit compile s | rel err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        r = bench(name, args.batch, args.seq, args.repeats)
        print(
            f"| {r['config']} | {r['params_M']:.1f} | {r['sfjax_tok_s']:.0f} | {r['torch_tok_s']:.0f} "
            f"| {r['ratio']:.2f} | {r['sfjax_tok_cpu_s']:.0f} | {r['torch_tok_cpu_s']:.0f} "
            f"| {r['cpu_ratio']:.2f} | {r['compile_s']:.1f} | {r['rel_err']:.1e} |"
        )
    print(
        f"(jax backend {r['backend']}, torch threads {r['torch_threads']}, "
        f"cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
