"""Decode throughput: sfjax's jitted KV-cache sampler vs transformers' ``generate``, same weights.

Both run the same random Qwen3-architecture checkpoint (``sfjax.testing.write_tiny_checkpoint``
with the issue's sizes, float32) on the same CPU in one process, one after the other:
``--batch`` prompts of ``--prompt-len`` random tokens, exactly ``--new-tokens`` new tokens
each (EOS ignored on both sides), greedy by default (``--mode sample``: temperature 1,
top-p 0.9). Greedy outputs are checked to be token-identical before timing.

Reported: generated tokens/s (batch x new tokens / wall time of one whole ``generate`` call,
prefill included), median of ``--repeats`` interleaved runs, the ratio sfjax / torch, and the
same ratio in process CPU time (robust to other jobs on a shared CPU). Next to them, the
weight-read bound: every decode step reads all weights once, so batch x (measured read
bandwidth over a buffer of the weights' size, the better of one XLA pass and torch's sum on all
cores) / (weight bytes) bounds decode tokens/s for any implementation; a "5x transformers /
bound" above 1 means the 5x target is beyond it.
sfjax's compile time is excluded from its figure (one warm-up call first) and listed
separately; transformers needs no compilation.

Usage::

    .venv/bin/python benchmarks/bench_sampler.py                       # small & mid, batch 1 & 8
    .venv/bin/python benchmarks/bench_sampler.py --configs small --batches 1 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from timing import interleaved_medians  # noqa: E402  (benchmarks/timing.py)

from sfjax.testing import BENCHMARK_CONFIGS as CONFIGS  # noqa: E402


def weight_stream_gbps(n_bytes: int, repeats: int = 20) -> tuple[float, float]:
    """Measured read bandwidth (GB/s) over ``n_bytes`` of float32: ``(XLA, torch)`` — one jitted
    XLA reduction (XLA:CPU runs it, like a decode-size matvec, on one core) and torch's sum with
    all of its threads (both cores). The larger is the rate at which any implementation can at
    best stream the model's weights on this machine."""
    import jax
    import jax.numpy as jnp
    import torch

    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    t = torch.ones(n_bytes // 4, dtype=torch.float32)
    fns = [lambda: f(x).block_until_ready(), lambda: t.sum()]
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        for fn in fns:  # compile / warm up
            fn()
        (xla_s, _), (torch_s, _) = interleaved_medians(fns, repeats)
    finally:
        torch.set_num_threads(threads)
    return n_bytes / xla_s / 1e9, n_bytes / torch_s / 1e9


def bench(name, checkpoint, batch, prompt_len, new_tokens, mode, repeats) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from sfjax.models import qwen3
    from sfjax.sampling import Sampler, SamplingParams
    from sfjax.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    model = qwen3.from_pretrained(checkpoint, dtype=jnp.float32)
    hf = transformers.Qwen3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # exactly new_tokens tokens, like ignore_eos
    hf.generation_config.pad_token_id = tok.pad_token_id

    ids = np.random.default_rng(0).integers(0, 800, (batch, prompt_len)).tolist()
    sample = mode == "sample"
    params = SamplingParams(
        temperature=1.0 if sample else 0.0, top_p=0.9 if sample else 1.0,
        max_new_tokens=new_tokens, ignore_eos=True,
    )  # fmt: skip
    sampler = Sampler(model, tok)
    keys = iter(jax.random.split(jax.random.key(0), 1000))
    ids_t = torch.tensor(ids)
    mask_t = torch.ones_like(ids_t)
    hf_kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=sample)
    if sample:
        hf_kwargs.update(temperature=1.0, top_p=0.9, top_k=0)

    def run_jax():
        return sampler.generate(ids, params, next(keys))

    def run_torch():
        with torch.no_grad():
            return hf.generate(input_ids=ids_t, attention_mask=mask_t, **hf_kwargs)

    # torch's OpenMP pool collapses on an oversubscribed CPU; give transformers its best
    # thread count (1 or all), chosen on a short warm-up generate.
    default_threads = torch.get_num_threads()
    trial = {}
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(input_ids=ids_t, attention_mask=mask_t, **dict(hf_kwargs, max_new_tokens=8,
                                                                      min_new_tokens=8))
        trial[threads] = time.perf_counter() - t0
    torch.set_num_threads(min(trial, key=trial.get))

    t0 = time.perf_counter()
    ours = run_jax()
    compile_s = time.perf_counter() - t0
    assert all(len(t) == new_tokens for t in ours.tokens)
    ref = run_torch()[:, prompt_len:].tolist()
    assert all(len(t) == new_tokens for t in ref)
    if not sample:
        same = sum(a == b for x, y in zip(ours.tokens, ref) for a, b in zip(x, y))
        if same != batch * new_tokens:
            raise AssertionError(f"{name}: greedy tokens differ ({same}/{batch * new_tokens} equal)")

    (jax_s, jax_cpu), (torch_s, torch_cpu) = interleaved_medians([run_jax, run_torch], repeats)
    tokens = batch * new_tokens
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    xla_gbps, torch_gbps = weight_stream_gbps(weight_bytes)
    gbps = max(xla_gbps, torch_gbps)
    # Every decode step reads every weight once: batch x bandwidth / bytes is an upper bound
    # on decode tokens/s for any implementation (prefill and the KV cache only add to it).
    floor_tok_s = batch * gbps * 1e9 / weight_bytes
    threads = torch.get_num_threads()
    torch.set_num_threads(default_threads)
    return {
        "config": name,
        "batch": batch,
        "params_M": sum(p.numel() for p in hf.parameters()) / 1e6,
        "sfjax_tok_s": tokens / jax_s,
        "torch_tok_s": tokens / torch_s,
        "ratio": torch_s / jax_s,
        "cpu_ratio": torch_cpu / jax_cpu,
        "compile_s": compile_s - jax_s,
        "torch_threads": threads,
        "stream_gbps": gbps,
        "xla_gbps": xla_gbps,
        "torch_gbps": torch_gbps,
        "floor_tok_s": floor_tok_s,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["small", "mid"], choices=sorted(CONFIGS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--mode", choices=["greedy", "sample"], default="greedy")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from sfjax.testing import write_tiny_checkpoint

    print(
        f"decode: {args.prompt_len}-token prompts, {args.new_tokens} new tokens, {args.mode}, "
        f"float32, median of {args.repeats}"
    )
    print(
        "| config | batch | params (M) | sfjax tok/s | transformers tok/s | ratio | "
        "sfjax compile s | torch threads | CPU-time ratio | weight-read bound tok/s "
        "(GB/s) | read GB/s XLA / torch | sfjax / bound | 5x transformers / bound |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        with tempfile.TemporaryDirectory() as d:
            overrides = dict(CONFIGS[name], max_position_embeddings=4096)
            write_tiny_checkpoint(d, overrides, seed=0)
            for batch in args.batches:
                r = bench(name, d, batch, args.prompt_len, args.new_tokens, args.mode,
                          args.repeats)
                print(
                    f"| {r['config']} | {r['batch']} | {r['params_M']:.1f} | "
                    f"{r['sfjax_tok_s']:.0f} | {r['torch_tok_s']:.0f} | {r['ratio']:.2f} | "
                    f"{r['compile_s']:.1f} | {r['torch_threads']} | {r['cpu_ratio']:.2f} | "
                    f"{r['floor_tok_s']:.0f} ({r['stream_gbps']:.0f}) | "
                    f"{r['xla_gbps']:.0f} / {r['torch_gbps']:.0f} | "
                    f"{r['sfjax_tok_s'] / r['floor_tok_s']:.2f} | "
                    f"{5 * r['torch_tok_s'] / r['floor_tok_s']:.2f} |",
                    flush=True,
                )
    print(f"(cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
