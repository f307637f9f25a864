"""Refine-from-Reflection rollout throughput of Qwen3-4B (random bf16 weights): K = 8 samples
per prompt for 64 SF prompts (paper Algorithm 2, lines 8-20).

Prompts are the Actor's real ones (:mod:`sfjax.agents.prompts`, 10-step window, one per
distinct step of a synthetic trajectory), sampled with the Actor's rollout settings
(temperature 1, no top-k/top-p, 128 new tokens, action constraint on) by the project's
sampler, ``n = K`` per prompt so each prompt is prefilled once and its KV cache copied K times.

``Actor.sample`` puts every prompt in one sampler call. At Qwen3-4B scale that does not fit one
GPU: 64 × 8 rows × (prompt bucket + 128) slots × 144 KiB of KV cache is ≈ 87 GB for a
1024-token bucket and ≈ 320 GB for a 4096-token one, plus the prefill's attention scores.
So the prompts go in chunks of ``--prompts-per-call`` (default 8 → 64 rows per call); the
chunk size is recorded with the results.

Reported: wall time of all rollouts, rollouts/s, generated tokens/s, the floor (per call:
prefill FLOPs / measured matmul rate + Σ decode steps max(bytes / bandwidth, FLOPs / matmul
rate)), and PyTorch ``generate(num_return_sequences=K, do_sample=True)`` of the same prompts
with the same number of new tokens, when torch sees a GPU.

Usage::

    python benchmarks/gpu_rfr_rollouts.py --out results/gpu_rfr_rollouts.json
    python benchmarks/gpu_rfr_rollouts.py --prompts-per-call 16
    python benchmarks/gpu_rfr_rollouts.py --tiny --no-torch        # CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gpu_common as gc  # noqa: E402
from gpu_decision_latency import step_prompts  # noqa: E402


def parse_args(argv=None):
    p = gc.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--prompts", type=int, default=None, help="distinct prompts (64)")
    p.add_argument("--k", type=int, default=None, help="samples per prompt (8)")
    p.add_argument("--prompts-per-call", type=int, default=None, help="prompts per call (8)")
    p.add_argument("--new-tokens", type=int, default=None, help="max new tokens (128)")
    p.add_argument("--history-window", type=int, default=None, help="(10; --tiny: 1)")
    p.add_argument("--style", default=None, choices=("full", "compact"))
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: local test one)")
    a = p.parse_args(argv)
    a.prompts = a.prompts or (4 if a.tiny else 64)
    a.k = a.k or (2 if a.tiny else 8)
    a.prompts_per_call = a.prompts_per_call or (2 if a.tiny else 8)
    a.new_tokens = a.new_tokens or (16 if a.tiny else 128)
    a.history_window = a.history_window if a.history_window is not None else (
        1 if a.tiny else 10)
    a.style = a.style or ("compact" if a.tiny else "full")
    a.iters = a.iters or 1
    return a


def rollout_setup(tok, args):
    from sfjax.agents.actor import ActorConfig
    from sfjax.agents.prompts import ACTION_FIELD, PromptConfig
    from sfjax.sampling import ActionConstraint, SamplingParams

    acfg = ActorConfig(prompt=PromptConfig(history_window=args.history_window,
                                           style=args.style), max_new_tokens=args.new_tokens)
    p = acfg.prompt
    constraint = ActionConstraint(lo=p.action_lo, hi=p.action_hi, field=ACTION_FIELD,
                                  action_first=p.field_order == "action_first",
                                  free_budget=acfg.free_budget)
    params = SamplingParams(temperature=acfg.rollout_temperature, top_p=acfg.rollout_top_p,
                            top_k=acfg.rollout_top_k, max_new_tokens=acfg.max_new_tokens)
    prompts = step_prompts(tok, p, args.prompts, args.history_window, args.seed)
    return prompts, params, constraint


def chunks(xs, n):
    return [xs[i:i + n] for i in range(0, len(xs), n)]


def run_sfjax(model, tok, prompts, params, constraint, args) -> dict:
    import jax

    from sfjax.sampling import Sampler

    sampler = Sampler(model, tok)
    key = jax.random.key(args.seed)
    sampler.generate(prompts[: args.prompts_per_call], params, key, n=args.k,
                     action_constraint=constraint)  # compile
    best = None
    for it in range(args.iters):
        t0 = time.perf_counter()
        outs = [sampler.generate(c, params, jax.random.fold_in(key, 1000 * it + i), n=args.k,
                                 action_constraint=constraint)
                for i, c in enumerate(chunks(prompts, args.prompts_per_call))]
        wall = time.perf_counter() - t0
        best = wall if best is None else min(best, wall)
    lengths = [len(t) for o in outs for t in o.tokens]
    parsed = sum(a is not None for o in outs for a in o.actions)
    max_new = [max(len(t) for t in o.tokens) for o in outs]
    sampler.release_cache()
    return {"wall_s": best, "rollouts": len(lengths), "rollouts_per_s": len(lengths) / best,
            "generated_tokens": sum(lengths), "tokens_per_s": sum(lengths) / best,
            "actions_parsed": parsed, "calls": len(outs), "max_new_per_call": max_new,
            "traces": sampler.num_traces}


def floor_s(config, tok, prompts, max_new_per_call, args, roof) -> float:
    total = 0.0
    for c, new in zip(chunks(prompts, args.prompts_per_call), max_new_per_call):
        L = max(len(tok(s, add_special_tokens=False)["input_ids"]) for s in c)
        B, N = len(c), len(c) * args.k
        pf = gc.forward_flops(config, B * L, gc.prefill_attended_keys(B, L), B)
        total += max(pf / roof.matmul_flops_per_s,
                     gc.decode_step_bytes(config, 0, 0) / roof.hbm_bytes_per_s)
        total += sum(gc.decode_floor_s(config, N, L + i, roof) for i in range(new))
    return total


def run_torch(tmodel, tok, prompts, args, device) -> dict:
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def call(c):
        ids = [tok(s, add_special_tokens=False)["input_ids"] for s in c]
        T = max(map(len, ids))
        x = torch.full((len(c), T), pad, dtype=torch.long)
        m = torch.zeros((len(c), T), dtype=torch.long)
        for i, row in enumerate(ids):  # left padding, as the sfjax sampler
            x[i, T - len(row):] = torch.tensor(row)
            m[i, T - len(row):] = 1
        with torch.inference_mode():
            return tmodel.generate(input_ids=x.to(device), attention_mask=m.to(device),
                                   num_return_sequences=args.k, do_sample=True,
                                   temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad,
                                   max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    call(prompts[: args.prompts_per_call])
    gc.torch_sync()
    t0 = time.perf_counter()
    for c in chunks(prompts, args.prompts_per_call):
        call(c)
    gc.torch_sync()
    wall = time.perf_counter() - t0
    n = len(prompts) * args.k
    return {"wall_s": wall, "rollouts_per_s": n / wall,
            "tokens_per_s": n * args.new_tokens / wall}


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if gc.maybe_device_check(args):
        return None
    config = gc.model_config(args.tiny)
    roof = gc.measure_roofline(args.tiny)
    tok = gc.load_bench_tokenizer(args.tokenizer)
    prompts, params, constraint = rollout_setup(tok, args)
    res = {"prompts": args.prompts, "k": args.k, "prompts_per_call": args.prompts_per_call,
           "max_new_tokens": args.new_tokens, "history_window": args.history_window,
           "style": args.style, "roofline": gc.roofline_record(roof),
           "prompt_tokens_max": max(len(tok(s, add_special_tokens=False)["input_ids"])
                                    for s in prompts)}
    device = gc.torch_device(args)
    res["torch_device"] = device
    if device:  # first, then freed: JAX's allocator keeps what it takes
        tmodel = gc.torch_model(config, device, args.seed)
        res["torch"] = gc.reference(args, run_torch, tmodel, tok, prompts, args, device)
        del tmodel
        gc.free_torch()
    model = gc.random_model(config, seed=args.seed)
    res["sfjax"] = run_sfjax(model, tok, prompts, params, constraint, args)
    mx = res["sfjax"]["max_new_per_call"]
    res["floor_measured_s"] = floor_s(config, tok, prompts, mx, args, roof)
    res["floor_spec_h200_s"] = floor_s(config, tok, prompts, mx, args, gc.SPEC_H200)
    res["fraction_of_floor"] = gc.ratio(res["floor_measured_s"], res["sfjax"]["wall_s"])
    if device and "error" not in res["torch"]:
        res["sfjax_over_torch_tokens_per_s"] = gc.ratio(res["sfjax"]["tokens_per_s"],
                                                        res["torch"]["tokens_per_s"])
    print(f"rollouts: {res['sfjax']['rollouts_per_s']:.1f}/s, "
          f"{res['sfjax']['tokens_per_s']:.0f} tok/s, "
          f"{100 * res['fraction_of_floor']:.0f} % of floor", file=sys.stderr)
    return gc.emit(args, "gpu_rfr_rollouts", res)


if __name__ == "__main__":
    main()
