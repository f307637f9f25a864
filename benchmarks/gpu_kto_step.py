"""KTO LoRA train-step time and MFU of Qwen3-4B (random bf16 weights) with the project's
``KTOTrainer`` (:mod:`sfjax.train.kto`), at batch 8 × 1024 tokens (issue target: MFU >= 35 %).

Data: ``--batch`` × ``--steps`` token-id examples, each exactly ``--prompt-len`` (768) prompt +
``--completion-len`` (256) completion tokens, so no bucket pads; loss "kto" (KL rows rolled
within the batch), LoRA r = 16, alpha 32 on q/k/v/o/gate/up/down, AdamW. One optimizer step
runs (see the trainer's docstring): the reference forward (adapters off) on the matched + KL
rows (2B), the policy forward on the KL rows (B), the policy forward + backward on the matched
rows (B); the LM head only on completion positions.

Step time = (wall of ``train()`` over ``steps`` steps − wall over 1 step) / (steps − 1): the
compiled step with the trainer's host side (batch collation, one-step-late metric fetch),
without compile time (reported apart).

Model FLOPs per step (the MFU numerator; remat recomputation is not counted):
  F(rows) = forward matmul FLOPs of ``rows`` sequences (:func:`gpu_common.forward_flops`:
  layers on all T tokens, causal attention, LM head on the C completion tokens);
  step = F(2B) + F(B) + F(B) + [F_dense(B) + 2·F_attn(B)]  (backward: activation gradients
  through the frozen weights = 1× the dense forward, attention backward = 2× its forward;
  the rank-16 LoRA matmuls are < 1 % and ignored).
MFU = step FLOPs / step time / peak, against the datasheet dense BF16 peak of the card it runs on
(989 TFLOP/s on an H100 or H200 SXM; :func:`gpu_common.spec_roofline`) and against the matmul
rate measured in this run.

PyTorch reference (when torch sees a GPU): ``Qwen3ForCausalLM`` (sdpa) + PEFT LoRA with the
same adapters, the same work per step written out by hand (reference and KL forwards under
``no_grad`` with the adapter disabled, policy forward + backward, the KTO loss, AdamW), logits
only on the completion positions (``logits_to_keep``).

Out of memory without ``--remat``: the sfjax run is repeated with ``--remat`` (recorded as
``remat_after_oom``); any other failure with a fused attention kernel is repeated on the plain
path (``plain_after_error``, the first error kept); a failing PyTorch reference is recorded,
not fatal. ``--attention`` picks the attention kernel (default ``auto``: cuDNN on GPU, forward
and backward).

Usage::

    python benchmarks/gpu_kto_step.py --out results/gpu_kto_step.json
    python benchmarks/gpu_kto_step.py --remat          # if activations do not fit
    python benchmarks/gpu_kto_step.py --prompt-len 2048 --remat --no-torch --steps 2
                                     # the paper preset's own 8 x (2,048 + 256) rows (gpu_all's
                                     # kto_preset job): step time and the device's peak memory
    python benchmarks/gpu_kto_step.py --tiny --no-torch
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


def parse_args(argv=None):
    p = gc.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--batch", type=int, default=None, help="examples per step (8)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (768)")
    p.add_argument("--completion-len", type=int, default=None, help="completion tokens (256)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (5)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--remat", action="store_true", help="recompute layer activations")
    a = p.parse_args(argv)
    a.batch = a.batch or (4 if a.tiny else 8)
    a.prompt_len = a.prompt_len or (24 if a.tiny else 768)
    a.completion_len = a.completion_len or (8 if a.tiny else 256)
    a.steps = max(a.steps or (3 if a.tiny else 5), 2)
    return a


def make_examples(n: int, P: int, C: int, seed: int, vocab: int):
    import numpy as np

    from sfjax.train import KTOExample

    rng = np.random.default_rng(seed)
    high = min(vocab, 100_000)
    return [KTOExample(list(map(int, rng.integers(1, high, P))),
                       list(map(int, rng.integers(1, high, C))), bool(i % 3))
            for i in range(n)]


def step_flops(config, B: int, P: int, C: int) -> dict:
    T = P + C
    keys = gc.prefill_attended_keys(1, T)

    def fwd(rows, attn_factor=1.0, dense_factor=1.0):
        dense = gc.forward_flops(config, rows * T, 0, rows * C)
        attn = gc.forward_flops(config, 0, rows * keys, 0)
        return dense_factor * dense + attn_factor * attn

    total = fwd(2 * B) + fwd(B) + fwd(B) + fwd(B, attn_factor=2.0)
    return {"step_flops": total, "forward_flops_batch": fwd(B)}


def run_sfjax(config, examples, args, remat: bool | None = None) -> dict:
    import jax

    from sfjax.models import lora
    from sfjax.train import KTOConfig, KTOTrainer

    model = gc.random_model(config, seed=args.seed)
    model.remat = bool(args.remat if remat is None else remat)
    cfg = KTOConfig(
        micro_batch_size=args.batch, learning_rate=1e-5, warmup_ratio=0.0,
        max_prompt_length=args.prompt_len, max_completion_length=args.completion_len,
        buckets=(args.prompt_len,), completion_buckets=(args.completion_len,),
        shuffle=False, progress=False, desirable_weight=1.0, undesirable_weight=1.0,
        remat=model.remat,
    )  # fmt: skip
    trainer = KTOTrainer(model, None, cfg, lora_config=lora.LoRAConfig(rank=args.rank,
                                                                       alpha=2 * args.rank))

    def run(n_steps):
        t0 = time.perf_counter()
        hist = trainer.train(examples[: args.batch * n_steps], jax.random.key(args.seed))
        jax.block_until_ready(jax.tree.leaves(lora.lora_state(model)))
        return time.perf_counter() - t0, hist

    gc.progress(f"sfjax KTO: compiling + 1 step (remat={model.remat})")
    first, _ = run(1)  # compile + one step
    with gc.CompileCounter() as timed:  # the step's program is compiled once, by ``first``
        one, _ = run(1)
        many, hist = run(args.steps)
    step = (many - one) / (args.steps - 1)
    if step <= 0:  # only under heavy timing noise (shared CPU): fall back to the plain mean
        step = many / args.steps
    return {"first_call_s": first, "compile_s_approx": first - one, "step_s": step,
            "loss_last": hist[-1]["loss"] if hist else None,
            "skipped_steps": trainer.skipped_steps, "traces": trainer.trace_count,
            "compiles_while_timed": timed.count,
            # the process's peak so far: the weights, the step's buffers, what ran before
            "device_memory": gc.device_memory_record()}


def run_torch(config, examples, args, device) -> dict:
    import peft
    import torch
    import torch.nn.functional as F

    tmodel = gc.torch_model(config, device, args.seed)
    if args.remat:
        tmodel.gradient_checkpointing_enable()
    tmodel = peft.get_peft_model(tmodel, peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in tmodel.parameters() if p.requires_grad], lr=1e-5)
    B, C, beta = args.batch, args.completion_len, 0.1

    def logps(ids, comp):
        logits = tmodel(input_ids=ids, logits_to_keep=C + 1).logits[:, :-1].float()
        return torch.gather(F.log_softmax(logits, -1), 2, comp[..., None])[..., 0].sum(-1)

    def step(batch):
        prompt = torch.tensor([e.prompt for e in batch], device=device)
        comp = torch.tensor([e.completion for e in batch], device=device)
        kl_comp = torch.roll(comp, 1, 0)
        matched, mismatched = torch.cat([prompt, comp], 1), torch.cat([prompt, kl_comp], 1)
        desirable = torch.tensor([e.desirable for e in batch], device=device)
        with torch.no_grad():
            with tmodel.disable_adapter():
                ref, ref_kl = logps(torch.cat([matched, mismatched]),
                                    torch.cat([comp, kl_comp])).split(B)
            z = (logps(mismatched, kl_comp) - ref_kl).mean().clamp(min=0)
        r = logps(matched, comp) - ref
        loss = torch.where(desirable, 1 - torch.sigmoid(beta * (r - z)),
                           1 - torch.sigmoid(beta * (z - r))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in tmodel.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    batches = [examples[i * B:(i + 1) * B] for i in range(args.steps)]
    tmodel.train()
    step(batches[0])  # warm-up (allocator, kernels)
    gc.torch_sync()
    t0 = time.perf_counter()
    for b in batches:
        loss = step(b)
    gc.torch_sync()
    return {"step_s": (time.perf_counter() - t0) / len(batches), "loss_last": float(loss.detach())}


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    started = gc.start(args)
    if started is None:
        return None
    config, roof = started
    spec = gc.spec_roofline()
    examples = make_examples(args.batch * args.steps, args.prompt_len, args.completion_len,
                             args.seed, config.vocab_size)
    res = {"batch": args.batch, "prompt_len": args.prompt_len,
           "completion_len": args.completion_len, "lora_rank": args.rank, "remat": args.remat,
           "roofline": gc.roofline_record(roof),
           **step_flops(config, args.batch, args.prompt_len, args.completion_len)}
    device = gc.torch_device(args)
    res["torch_device"] = device
    if device:  # first, then freed: JAX's allocator keeps what it takes
        gc.progress("torch + PEFT reference")
        res["torch"] = gc.reference(args, run_torch, config, examples, args, device)
        gc.free_torch()
        if "error" not in res["torch"] and spec:
            res["torch"]["mfu_spec"] = res["step_flops"] / res["torch"]["step_s"] / (
                spec.matmul_flops_per_s)
        gc.emit_partial(args, "gpu_kto_step", res)
    res["sfjax"] = gc.guarded(args, "sfjax KTO step", run_sfjax, config, examples, args)
    if res["sfjax"].get("oom") and not args.remat:
        first_error = res["sfjax"]
        res["sfjax"] = gc.guarded(args, "sfjax KTO step (remat)", run_sfjax, config, examples,
                                  args, remat=True)
        res["sfjax"].update(remat_after_oom=True, error_without_remat=first_error["error"])
    if "error" in res["sfjax"] and not res["sfjax"].get("oom") and args.attention != "plain":
        # a kernel the fused path picked may still fail to compile (cuDNN's shape rules are
        # checked only partly while tracing): the figure on the plain path, recorded as such
        from sfjax.models import attention

        first_error = res["sfjax"]
        with attention.implementation("plain"):
            res["sfjax"] = gc.guarded(args, "sfjax KTO step (plain attention)", run_sfjax,
                                      config, examples, args,
                                      remat=True if first_error.get("remat_after_oom") else None)
        res["sfjax"].update(plain_after_error=True, error_with_attention=first_error["error"])
    if "error" in res["sfjax"]:
        return gc.emit(args, "gpu_kto_step", res)
    s = res["sfjax"]["step_s"]
    res["mfu_spec"] = res["step_flops"] / s / spec.matmul_flops_per_s if spec else None
    res["mfu_measured_matmul"] = res["step_flops"] / s / roof.matmul_flops_per_s
    res["floor_step_s"] = res["step_flops"] / roof.matmul_flops_per_s
    if device and "error" not in res["torch"]:
        res["sfjax_over_torch_speedup"] = gc.ratio(res["torch"]["step_s"], s)
    of_spec = (f" ({100 * res['mfu_spec']:.1f} % of the {spec.source.removeprefix('spec: ')})"
               if spec else "")
    gc.progress(f"KTO step {1e3 * s:.1f} ms, MFU {100 * res['mfu_measured_matmul']:.1f} % of the "
                f"measured matmul rate{of_spec}")
    return gc.emit(args, "gpu_kto_step", res)


if __name__ == "__main__":
    main()
