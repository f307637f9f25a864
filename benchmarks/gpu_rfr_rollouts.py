"""Refine-from-Reflection rollout throughput of Qwen3-4B (random bf16 weights): K = 8 samples
per prompt for 64 SF prompts (paper Algorithm 2, lines 8-20).

Prompts are the Actor's real ones (:mod:`sfjax.agents.prompts`, 10-step window, one per
distinct step of a synthetic trajectory), sampled with the Actor's rollout settings
(temperature 1, no top-k/top-p, 128 new tokens, action constraint on) through exactly the SF
loop's path: :func:`sfjax.agents.rfr.sample_in_calls` over ``Actor.sample`` (the sampler with
``n = K``: each prompt prefilled once, its KV cache copied K times).

All 64 × 8 rows in one call would need ≈ 190 GB of KV cache at Qwen3-4B (2,560-slot prompt
bucket + 128 new, 144 KiB per token), so RfR splits the prompts into memory-bounded calls
(``RfRConfig.max_cache_gib_per_call``, 32 GiB by default = 8 prompts × 8 per call here;
``--cache-gib`` changes it) or into ``--prompts-per-call`` prompts per call when that is given.
The plan is recorded with the results; if a call runs out of memory the run is repeated with
half as many prompts per call (each attempt recorded).

Reported: wall time of all rollouts, rollouts/s, generated tokens/s, the floor (per call:
prefill FLOPs / measured matmul rate + Σ decode steps max(bytes / bandwidth, FLOPs / matmul
rate)), and PyTorch ``generate(num_return_sequences=K, do_sample=True)`` of the same prompts
with the same number of new tokens, when torch sees a GPU.

Usage::

    python benchmarks/gpu_rfr_rollouts.py --out results/gpu_rfr_rollouts.json
    python benchmarks/gpu_rfr_rollouts.py --prompts-per-call 16    # or --cache-gib 48
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
    p.add_argument("--prompts-per-call", type=int, default=None,
                   help="prompts per sampler call (default: RfR's byte-bounded plan)")
    p.add_argument("--cache-gib", type=float, default=32.0,
                   help="RfRConfig.max_cache_gib_per_call (when no --prompts-per-call)")
    p.add_argument("--new-tokens", type=int, default=None, help="max new tokens (128)")
    p.add_argument("--history-window", type=int, default=None, help="(10; --tiny: 1)")
    p.add_argument("--style", default=None, choices=("full", "compact"))
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: local test one)")
    a = p.parse_args(argv)
    a.prompts = a.prompts or (4 if a.tiny else 64)
    a.k = a.k or (2 if a.tiny else 8)
    if a.tiny and a.prompts_per_call is None:
        a.prompts_per_call = 2
    a.new_tokens = a.new_tokens or (16 if a.tiny else 128)
    a.history_window = a.history_window if a.history_window is not None else (
        1 if a.tiny else 10)
    a.style = a.style or ("compact" if a.tiny else "full")
    a.iters = a.iters or 1
    return a


def actor_config(args):
    from sfjax.agents.actor import ActorConfig
    from sfjax.agents.prompts import PromptConfig

    return ActorConfig(prompt=PromptConfig(history_window=args.history_window, style=args.style),
                       max_new_tokens=args.new_tokens)


def rfr_config(args, prompts_per_call: int | None):
    """RfR's rollout-call limits: ``prompts_per_call`` prompts, else the byte budget."""
    from sfjax.agents.rfr import RfRConfig

    if prompts_per_call:
        return RfRConfig(num_rollouts=args.k, max_rows_per_call=prompts_per_call * args.k,
                         max_cache_gib_per_call=0)
    return RfRConfig(num_rollouts=args.k, max_cache_gib_per_call=args.cache_gib)


def rollout_setup(tok, args):
    return step_prompts(tok, actor_config(args).prompt, args.prompts, args.history_window,
                        args.seed)


def chunks_of(xs, plan):
    return [xs[a:b] for a, b in plan]


class RecordingSampler:
    """A :class:`sfjax.sampling.Sampler` that keeps its outputs (token counts for tokens/s)."""

    def __init__(self, sampler):
        self.inner, self.outputs = sampler, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, *a, **kw):
        out = self.inner.generate(*a, **kw)
        self.outputs.append(out)
        return out


def rollout_cost(config, tok, args):
    """RfR's cost model of a rollout call for this model (bf16 KV cache) and tokenizer."""
    from sfjax.agents import rfr

    extra = rfr.PREFIX_CACHE_EXTRA_SLOTS if getattr(actor_config(args), "prefix_cache",
                                                    False) else 0
    return rfr.RolloutCost(gc.qwen3_costs(config).kv_bytes_per_token, args.new_tokens,
                           lambda p: len(tok(p, add_special_tokens=False)["input_ids"]), extra)


def run_sfjax(model, tok, prompts, args, prompts_per_call) -> dict:
    """Rollouts through ``rfr.sample_in_calls(Actor.sample, ...)``, as the SF loop runs them."""
    import jax

    from sfjax.agents import rfr
    from sfjax.agents.actor import Actor
    from sfjax.sampling import Sampler

    acfg = actor_config(args)
    sampler = RecordingSampler(Sampler(model, tok))
    actor = Actor(sampler, tok, acfg)
    cfg = rfr_config(args, prompts_per_call)
    cost = rfr.rollout_cost_of(actor.sample)  # what build_dataset reads off the Actor
    plan = rfr.plan_rollout_calls(prompts, cfg, cost)
    key = jax.random.key(args.seed)
    gc.progress(f"rfr: {len(plan)} call(s) of {[b - a for a, b in plan]} prompts; compiling")
    # the calls may differ in prompt bucket, and the first pass re-buckets the prefix cache's
    # prefix to what the calls share: the second runs other programs
    gc.warm_until_compiled(lambda: rfr.sample_in_calls(actor.sample, prompts, cfg, key, cost))
    best, compiles = None, 0
    for it in range(args.iters):
        sampler.outputs.clear()
        it_key = jax.block_until_ready(jax.random.fold_in(key, it + 1))  # not timed
        with gc.CompileCounter() as timed:
            t0 = time.perf_counter()
            _, calls = rfr.sample_in_calls(actor.sample, prompts, cfg, it_key, cost)
            wall = time.perf_counter() - t0
        compiles += timed.count
        best = wall if best is None else min(best, wall)
    if compiles:
        gc.progress(f"warning: rfr: {compiles} XLA compile(s) inside the timed passes")
    outs = sampler.outputs
    lengths = [len(t) for o in outs for t in o.tokens]
    parsed = sum(a is not None for o in outs for a in o.actions)
    max_new = [max(len(t) for t in o.tokens) for o in outs]
    traces = sampler.num_traces
    sampler.release_cache()
    return {"wall_s": best, "rollouts": len(lengths), "rollouts_per_s": len(lengths) / best,
            "generated_tokens": sum(lengths), "tokens_per_s": sum(lengths) / best,
            "actions_parsed": parsed, "calls": calls, "plan": plan,
            "prompts_per_call": [b - a for a, b in plan],
            "cache_gib_per_call": [cost.call_bytes(b - a, args.k, max(
                cost.count_tokens(p) for p in prompts[a:b])) / 2**30 for a, b in plan],
            "max_new_per_call": max_new, "traces": traces, "compiles": compiles}


def run_sfjax_adaptive(model, tok, prompts, args) -> dict:
    """``run_sfjax``; after an out-of-memory error, again with half the prompts per call."""
    attempts, per_call = [], args.prompts_per_call
    while True:
        res = gc.guarded(args, f"rfr ({per_call or 'byte plan'} prompts/call)", run_sfjax, model,
                         tok, prompts, args, per_call)
        if "error" not in res or not res.get("oom"):
            return {**res, "failed_attempts": attempts}
        attempts.append({"prompts_per_call": per_call, **res})
        if per_call is None:
            from sfjax.agents import rfr

            cost = rollout_cost(model.config, tok, args)
            plan = rfr.plan_rollout_calls(prompts, rfr_config(args, None), cost)
            per_call = max(b - a for a, b in plan)
        if per_call <= 1:
            return {**res, "failed_attempts": attempts}
        per_call //= 2


def floor_s(config, tok, prompts, plan, max_new_per_call, args, roof) -> float:
    total = 0.0
    for c, new in zip(chunks_of(prompts, plan), max_new_per_call):
        L = max(len(tok(s, add_special_tokens=False)["input_ids"]) for s in c)
        B, N = len(c), len(c) * args.k
        pf = gc.forward_flops(config, B * L, gc.prefill_attended_keys(B, L), B)
        total += max(pf / roof.matmul_flops_per_s,
                     gc.decode_step_bytes(config, 0, 0) / roof.hbm_bytes_per_s)
        total += sum(gc.decode_floor_s(config, N, L + i, roof) for i in range(new))
    return total


def run_torch(tmodel, tok, prompts, plan, args, device) -> dict:
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

    call(prompts[plan[0][0]:plan[0][1]])
    gc.torch_sync()
    t0 = time.perf_counter()
    for c in chunks_of(prompts, plan):
        call(c)
    gc.torch_sync()
    wall = time.perf_counter() - t0
    n = len(prompts) * args.k
    return {"wall_s": wall, "rollouts_per_s": n / wall,
            "tokens_per_s": n * args.new_tokens / wall}


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    started = gc.start(args)
    if started is None:
        return None
    config, roof = started
    tok = gc.load_bench_tokenizer(args.tokenizer)
    prompts = rollout_setup(tok, args)
    res = {"prompts": args.prompts, "k": args.k, "prompts_per_call_arg": args.prompts_per_call,
           "cache_gib": args.cache_gib, "max_new_tokens": args.new_tokens,
           "history_window": args.history_window, "style": args.style,
           "roofline": gc.roofline_record(roof),
           "prompt_tokens_max": max(len(tok(s, add_special_tokens=False)["input_ids"])
                                    for s in prompts)}
    device = gc.torch_device(args)
    res["torch_device"] = device
    from sfjax.agents import rfr

    plan = rfr.plan_rollout_calls(prompts, rfr_config(args, args.prompts_per_call),
                                  rollout_cost(config, tok, args))
    if device:  # first, then freed: JAX's allocator keeps what it takes
        gc.progress(f"torch reference: {len(plan)} generate call(s)")
        tmodel = gc.torch_model(config, device, args.seed)
        res["torch"] = gc.reference(args, run_torch, tmodel, tok, prompts, plan, args, device)
        del tmodel
        gc.free_torch()
        gc.emit_partial(args, "gpu_rfr_rollouts", res)
    model = gc.random_model(config, seed=args.seed)
    res["sfjax"] = run_sfjax_adaptive(model, tok, prompts, args)
    if "error" not in res["sfjax"]:
        mx, used = res["sfjax"]["max_new_per_call"], res["sfjax"]["plan"]
        res["floor_measured_s"] = floor_s(config, tok, prompts, used, mx, args, roof)
        res["floor_spec_s"] = gc.spec_floor(floor_s, config, tok, prompts, used, mx, args)
        res["fraction_of_floor"] = gc.ratio(res["floor_measured_s"], res["sfjax"]["wall_s"])
        if device and "error" not in res["torch"]:
            res["sfjax_over_torch_tokens_per_s"] = gc.ratio(res["sfjax"]["tokens_per_s"],
                                                            res["torch"]["tokens_per_s"])
        gc.progress(f"rollouts: {res['sfjax']['rollouts_per_s']:.1f}/s, "
                    f"{res['sfjax']['tokens_per_s']:.0f} tok/s, "
                    f"{100 * res['fraction_of_floor']:.0f} % of floor")
    return gc.emit(args, "gpu_rfr_rollouts", res)


if __name__ == "__main__":
    main()
