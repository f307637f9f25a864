"""Decode and prefill tokens/s of Qwen3-4B (random bf16 weights) with the sfjax ``Sampler``,
next to the HBM roofline and to PyTorch ``transformers`` ``generate`` on the same GPU.

For each batch size (default 1, 8, 64, 256): ``--prompt-len`` (128) random-token prompts,
``--new-tokens`` (256) greedy tokens with EOS ignored, so every row runs the full length.

* sfjax sampler: wall time of ``Sampler.generate`` (one jitted prefill + ``while_loop``
  decode + host post-processing) for ``new`` tokens and for ``h = new // 2 + 1`` tokens — the
  same compiled program (one new-token bucket), so each batch size compiles once. Decode
  tokens/s = ``B · (new − h) / (t_new − t_h)``; prefill tokens/s = ``B · prompt / t_0`` with
  ``t_0 = t_new − (new − 1) · step`` (the call without its decode steps: prefill + host side).
* sfjax model only: one jitted decode step (``model(tok, cache=cache)``, cache donated) at
  context ``prompt + new/2``, and one jitted prefill of the prompts (cache allocation
  included) — the ceiling the sampler loop can reach.
* ``--attention`` picks the attention kernel (default ``auto``: cuDNN on GPU); the record says
  which kernel each traced call used. A batch size that fails (out of memory) is recorded with
  its error and the next one runs; the JSON is rewritten after every batch size.
* floor: Σ over the ``new`` steps of max(bytes / bandwidth, FLOPs / matmul rate)
  (:func:`gpu_common.decode_floor_s`), with the bandwidth / matmul rate measured in this run,
  and with the datasheet figures of the card it runs on (:func:`gpu_common.spec_roofline`).
  Reported: tokens/s at the floor and the fraction reached (issue target at batch 1: >= 80 %
  of the HBM roofline).
* PyTorch: ``Qwen3ForCausalLM.generate`` (sdpa attention, dynamic cache, greedy,
  ``min_new_tokens = max_new_tokens``), same formulas, when torch sees a GPU.

Usage::

    python benchmarks/gpu_decode.py --device-check
    python benchmarks/gpu_decode.py --out results/gpu_decode.json
    python benchmarks/gpu_decode.py --tiny --no-torch          # CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gpu_common as gc  # noqa: E402


def parse_args(argv=None):
    p = gc.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (1,8,64,256)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (128)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens (256)")
    p.add_argument("--torch-batches", default=None,
                   help="batch sizes that also run torch generate (default: all)")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in (args.batches or ("2" if args.tiny else "1,8,64,256"))
                    .split(",")]
    args.torch_batches = (args.batches if args.torch_batches is None
                          else [int(b) for b in args.torch_batches.split(",") if b])
    args.prompt_len = args.prompt_len or (16 if args.tiny else 128)
    args.new_tokens = args.new_tokens or (6 if args.tiny else 256)
    args.iters = args.iters or (1 if args.tiny else 3)
    return args


def random_prompts(batch: int, length: int, seed: int, high: int = 800) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(1, high, length))) for _ in range(batch)]


def sfjax_sampler(model, tok, prompts, args) -> dict:
    import jax

    from sfjax.sampling import Sampler, SamplingParams

    sampler = Sampler(model, tok)
    B, new = len(prompts), args.new_tokens

    def gen(n_new):
        params = SamplingParams(temperature=0.0, max_new_tokens=n_new, ignore_eos=True)
        return lambda: sampler.generate(prompts, params, jax.random.key(0))

    half = new // 2 + 1
    out = gen(new)()
    assert all(len(t) == new for t in out.tokens), [len(t) for t in out.tokens]
    r_new = gc.time_call(gen(new), iters=args.iters, warmup=0, sync=lambda x: x,
                         label=f"sampler batch {B}")
    r_half = gc.time_call(gen(half), iters=args.iters, warmup=0, sync=lambda x: x,
                          label=f"sampler batch {B}, {half} new tokens")
    t_new, t_half = r_new["median_s"], r_half["median_s"]
    if t_new > t_half:
        step_s = (t_new - t_half) / (new - half)
    else:  # timing noise (shared CPU): the plain mean over the whole call
        step_s = t_new / new
    t_zero = t_new - (new - 1) * step_s
    if t_zero <= 0:  # noise again: bound prefill by the whole call
        t_zero = t_new
    traces = sampler.num_traces
    sampler.release_cache()
    return {
        "generate_s": t_new,
        "generate_half_s": t_half,
        "half_new_tokens": half,
        "decode_tokens_per_s": B / step_s,
        "prefill_tokens_per_s": B * args.prompt_len / t_zero,
        "ms_per_decode_step": 1e3 * step_s,
        "traces": traces,
        "compiles_while_timed": r_new["compiles"] + r_half["compiles"],
    }


def sfjax_model_only(model, config, prompts, args) -> dict:
    """Jitted prefill and one jitted decode step (cache donated), no sampling logic."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sfjax.models.qwen3 import init_cache

    B, P, new = len(prompts), args.prompt_len, args.new_tokens
    graphdef, state = nnx.split(model)
    ids_BP = jnp.asarray(prompts, jnp.int32)
    mask_BP = jnp.ones_like(ids_BP, bool)

    @jax.jit
    def prefill(state, ids, mask):
        cache = init_cache(config, B, P + new, model.dtype)
        return gc.prefill_last_logits(nnx.merge(graphdef, state), ids, mask, cache)

    def step(state, tok_B1, cache):
        logits, cache = nnx.merge(graphdef, state)(tok_B1, cache=cache)
        return jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32), cache

    step = jax.jit(step, donate_argnums=(2,))
    t_prefill = gc.time_call(lambda: prefill(state, ids_BP, mask_BP), iters=args.iters,
                             label=f"prefill batch {B}")
    _, cache = prefill(state, ids_BP, mask_BP)
    tok = jnp.zeros((B, 1), jnp.int32)
    half = max(new // 2 - 1, 0)
    for _ in range(half):  # advance to the middle of the generation
        tok, cache = step(state, tok, cache)
    box = {"tok": tok, "cache": cache}
    n_timed = max(min(args.iters * 4, new - half - 1), 1)

    def one():
        box["tok"], box["cache"] = step(state, box["tok"], box["cache"])
        return box["tok"]

    t_step = gc.time_call(one, iters=n_timed, warmup=0, label=f"decode step batch {B}")
    return {
        "compiles_while_timed": t_prefill["compiles"] + t_step["compiles"],
        "prefill_s": t_prefill["median_s"],
        "prefill_tokens_per_s": B * P / t_prefill["median_s"],
        "decode_step_s": t_step["median_s"],
        "decode_tokens_per_s": B / t_step["median_s"],
        "decode_context": P + half,
    }


def floors(config, B, args, roof) -> dict:
    P, new = args.prompt_len, args.new_tokens
    t = sum(gc.decode_floor_s(config, B, P + i, roof) for i in range(new))
    prefill_flops = gc.forward_flops(config, B * P, gc.prefill_attended_keys(B, P), B)
    weights = gc.decode_step_bytes(config, 0, 0)
    prefill_t = max(prefill_flops / roof.matmul_flops_per_s, weights / roof.hbm_bytes_per_s)
    return {
        "decode_tokens_per_s": B * new / t,
        "ms_per_decode_step": 1e3 * t / new,
        "prefill_tokens_per_s": B * P / prefill_t,
        "decode_bytes_per_step_mid": gc.decode_step_bytes(config, B, P + new // 2),
        "prefill_flops": prefill_flops,
    }


def torch_generate(tmodel, prompts, args, device) -> dict:
    import torch

    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    B, new = len(prompts), args.new_tokens

    def gen(n):
        def run():
            with torch.inference_mode():
                return tmodel.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=0, eos_token_id=None,
                )
        return run

    out = gen(new)()
    assert out.shape == (B, args.prompt_len + new), out.shape
    t_new = gc.time_call(gen(new), iters=args.iters, warmup=0, sync=gc.torch_sync)["median_s"]
    t_one = gc.time_call(gen(1), iters=args.iters, warmup=1, sync=gc.torch_sync)["median_s"]
    decode_s = t_new - t_one if t_new > t_one else t_new  # else: timing noise (shared CPU)
    return {
        "generate_s": t_new,
        "generate_1_token_s": t_one,
        "decode_tokens_per_s": B * (new - 1) / decode_s,
        "prefill_tokens_per_s": B * args.prompt_len / t_one,
        "ms_per_decode_step": 1e3 * decode_s / (new - 1),
    }


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    started = gc.start(args)
    if started is None:
        return None
    config, roof = started
    model = gc.random_model(config, seed=args.seed)
    tok = gc.load_bench_tokenizer(None)
    device = gc.torch_device(args)
    tmodel = gc.torch_model(config, device, args.seed) if device else None
    costs = gc.qwen3_costs(config)
    rows = []

    def record():
        return {
            "config": {"params": costs.total_params,
                       "kv_bytes_per_token": costs.kv_bytes_per_token},
            "roofline": gc.roofline_record(roof),
            "torch_device": device,
            "rows": rows,
        }

    for B in args.batches:
        prompts = random_prompts(B, args.prompt_len, args.seed + B)
        row = {"batch": B, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
        gc.progress(f"B={B}: sfjax sampler")
        row["sfjax_sampler"] = gc.guarded(args, f"B={B} sampler", sfjax_sampler, model, tok,
                                          prompts, args)
        gc.progress(f"B={B}: sfjax model only")
        row["sfjax_model_only"] = gc.guarded(args, f"B={B} model only", sfjax_model_only, model,
                                             config, prompts, args)
        row["floor_measured"] = floors(config, B, args, roof)
        row["floor_spec"] = gc.spec_floor(floors, config, B, args)
        got = row["sfjax_sampler"].get("decode_tokens_per_s", float("nan"))
        row["sampler_fraction_of_floor"] = gc.ratio(got, row["floor_measured"]["decode_tokens_per_s"])
        gc.progress(f"B={B}: sampler {got:.1f} tok/s, floor "
                    f"{row['floor_measured']['decode_tokens_per_s']:.1f} tok/s "
                    f"({100 * row['sampler_fraction_of_floor']:.0f} %)")
        gc.emit_partial(args, "gpu_decode", record() | {"rows": rows + [row]})
        if tmodel is not None and B in args.torch_batches:
            gc.progress(f"B={B}: torch generate")
            row["torch"] = gc.reference(args, torch_generate, tmodel, prompts, args, device)
            if "error" not in row["torch"] and "error" not in row["sfjax_sampler"]:
                row["sfjax_over_torch_decode"] = gc.ratio(
                    got, row["torch"]["decode_tokens_per_s"])
                row["sfjax_over_torch_prefill"] = gc.ratio(
                    row["sfjax_sampler"]["prefill_tokens_per_s"],
                    row["torch"]["prefill_tokens_per_s"])
            if "sfjax_over_torch_decode" in row:
                gc.progress(f"B={B}: torch {row['torch']['decode_tokens_per_s']:.1f} tok/s; "
                            f"sfjax / torch {row['sfjax_over_torch_decode']:.2f}x")
        rows.append(row)
        gc.emit_partial(args, "gpu_decode", record())
    return gc.emit(args, "gpu_decode", record())


if __name__ == "__main__":
    main()
