"""KTO train-step time: sfjax ``KTOTrainer`` (jitted, LoRA) vs TRL ``KTOTrainer`` + PEFT LoRA.

Both train LoRA r=16 (alpha 32, q/k/v/o/gate/up/down, no dropout) on the same random
Qwen3-architecture checkpoint (written by :func:`sfjax.testing.write_tiny_checkpoint`) in the
same precision (``--precision``, below), on the same CPU in one process, with the same data:
``--batch`` examples per step (KL pairs rolled within the batch, loss "kto", reference =
adapters off), every sequence exactly ``--prompt-len`` prompt tokens + ``--completion-len``
completion tokens (digits, one token each, plus EOS), so neither side pays for padding the
other does not. Per optimizer step both run
the same work: policy forward+backward on the batch, policy forward on the KL rows, reference
forward on both, AdamW.

Precision (``--precision``): ``bf16`` (default) = base weights in bf16 on both sides, TRL with
its default ``bf16=True`` (matmuls under ``torch.autocast``), LoRA A/B in float32 on both (PEFT's
``autocast_adapter_dtype``; sfjax ``LoRAConfig.param_dtype``) — how Qwen3 is trained; ``fp32`` =
everything float32 (TRL ``bf16=False``). Note: TRL's ``KTOConfig.bf16`` defaults to True, so a
"float32" TRL run must turn it off — before ``--precision`` existed this benchmark compared
sfjax in float32 with TRL under bf16 autocast.

Two settings, each a row: the default (reference forward in every step) and
``precompute_ref_log_probs=True`` on both sides (reference log-probs computed once per dataset,
before the timed steps, on both sides; each side's one-off precompute is not in the step time).

Timing: rounds alternate sfjax and TRL so load drift hits both alike. sfjax: wall time of a
``train()`` call over ``--steps`` steps divided by the steps (includes host batching and
dispatch; the step is already compiled — compile time is measured separately on the first
call). TRL: per-step time from ``on_step_begin`` to ``on_step_end`` (the forward/backward and
optimizer step only), first step of each call dropped. Both also as process CPU time (robust
on a shared, loaded machine when both run single-threaded). Reported: medians and the ratios.

Usage::

    .venv/bin/python benchmarks/bench_kto.py                       # small config
    .venv/bin/python benchmarks/bench_kto.py --rounds 3 --steps 8
    .venv/bin/python benchmarks/bench_kto.py --threads 1        # both single-threaded
    .venv/bin/python benchmarks/bench_kto.py --threads 1 --flops  # + FLOPs per step, each side
    .venv/bin/python benchmarks/bench_kto.py --threads 1 --precision fp32  # all float32
    .venv/bin/python benchmarks/bench_kto.py --threads 1 --config mid --rounds 2 --steps 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--threads" in sys.argv:  # must precede the jax import: XLA reads its flags once
    _n = int(sys.argv[sys.argv.index("--threads") + 1])
    if _n == 1:
        # XLA:CPU runs independent ops concurrently even without Eigen threads (measured: 1.8
        # cores busy), so the whole process is pinned to one core: both libraries get one.
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_cpu_multi_thread_eigen=false"
        )
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sfjax.testing import BENCHMARK_CONFIGS  # noqa: E402

CONFIGS = {name: BENCHMARK_CONFIGS[name] for name in ("small", "mid")}

# --precision: (base-weight dtype on both sides, TRL ``bf16`` autocast). LoRA A/B stay float32
# on both sides in both settings (sfjax LoRAConfig.param_dtype; PEFT's
# autocast_adapter_dtype=True, which TRL keeps outside DeepSpeed ZeRO-3).
PRECISIONS = {
    # TRL's defaults (KTOConfig.bf16 defaults to True: matmuls in bf16 under torch.autocast) on
    # a bf16 checkpoint, as Qwen3 ships; sfjax with bf16 base weights.
    "bf16": ("bfloat16", True),
    # Both entirely in float32 (TRL with bf16=False: no autocast).
    "fp32": ("float32", False),
}


def make_examples(n: int, prompt_len: int, completion_len: int, seed: int = 0):
    """Digit strings: the tiny tokenizer splits every digit into its own token."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = "".join(map(str, rng.integers(0, 10, prompt_len)))
        completion = "".join(map(str, rng.integers(0, 10, completion_len - 1)))  # + EOS
        out.append((prompt, completion, bool(i % 3)))
    return out


def bench_sfjax(ckpt, data, args, precompute=False):
    import jax

    from sfjax.models import lora, qwen3
    from sfjax.tokenizer import load_tokenizer
    from sfjax.train import KTOConfig, KTOExample, KTOTrainer

    model = qwen3.from_pretrained(ckpt, dtype=PRECISIONS[args.precision][0])
    tok = load_tokenizer(ckpt)
    cfg = KTOConfig(
        beta=0.1, micro_batch_size=args.batch, learning_rate=1e-4, warmup_ratio=0.0,
        max_prompt_length=args.prompt_len, max_completion_length=args.completion_len,
        buckets=(args.prompt_len,), completion_buckets=(args.completion_len,),
        shuffle=False, progress=False, precompute_ref_log_probs=precompute,
        desirable_weight=1.0, undesirable_weight=1.0,
    )  # fmt: skip
    trainer = KTOTrainer(model, tok, cfg, lora_config=lora.LoRAConfig(rank=16, alpha=32))
    examples = [KTOExample(p, c, d) for p, c, d in data[: args.batch * args.steps]]
    lengths = {len(e.prompt_ids) + len(e.completion_ids) for e in trainer.tokenize(examples)}
    assert lengths == {args.prompt_len + args.completion_len}, lengths

    def run(n_steps):
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train(examples[: args.batch * n_steps], jax.random.key(0))
        jax.block_until_ready(jax.tree.leaves(lora.lora_state(model)))
        return time.perf_counter() - t0, time.process_time() - c0

    first = run(1)[0]  # compile + one step
    if precompute:  # the one-off reference table of the timed example set, as TRL's
        t0 = time.perf_counter()
        trainer.reference_logps(trainer.tokenize(examples), _partners(trainer, examples))  # fmt: skip
        print(f"sfjax precompute_ref_log_probs table: {time.perf_counter() - t0:.2f} s")
    return trainer, run, first


def sfjax_step_flops(run) -> float:
    """FLOPs of sfjax's compiled train step, by XLA's own cost analysis: the step built by the
    next ``train()`` call has its arguments captured (as abstract shapes) and is lowered with
    them."""
    import jax

    from sfjax.train import kto

    make, steps, shapes = kto.make_train_step, [], []

    def make_spy(*a, **k):
        fn = make(*a, **k)
        steps.append(fn)

        def spy(*args):
            if not shapes:
                abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x  # noqa: E731
                shapes.append(jax.tree.map(abstract, args))
            return fn(*args)

        spy.trace_count = fn.trace_count
        return spy

    kto.make_train_step = make_spy
    try:
        run(1)
    finally:
        kto.make_train_step = make
    cost = steps[0].lower(*shapes[0]).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def trl_step_flops(run, steps: int) -> float:
    """FLOPs per TRL step: torch's ``FlopCounterMode`` over one ``train()`` call / its steps."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops() / steps


def _partners(trainer, examples):
    from sfjax.train.data import fixed_kl_partners

    return fixed_kl_partners(trainer.tokenize(examples), trainer.config.micro_batch_size)


def bench_trl(ckpt, data, args, precompute=False):
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import KTOConfig, KTOTrainer

    torch.manual_seed(0)
    dtype, autocast = PRECISIONS[args.precision]
    model = transformers.Qwen3ForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype))
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    n = args.batch * args.steps
    ds = Dataset.from_dict(
        {
            "prompt": [p for p, _, _ in data[:n]],
            "completion": [c for _, c, _ in data[:n]],
            "label": [d for _, _, d in data[:n]],
        }
    )
    step_times: list[tuple[float, float]] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            step_times.append((time.perf_counter() - self.t0, time.process_time() - self.c0))

    out = tempfile.mkdtemp(prefix="trl_kto_")
    targs = KTOConfig(
        output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=1e-4, beta=0.1, report_to="none", save_strategy="no", logging_steps=10**6,
        use_cpu=True, max_length=None, dataloader_drop_last=True, disable_tqdm=True,
        warmup_steps=0, gradient_checkpointing=False, dataset_num_proc=None,
        precompute_ref_log_probs=precompute, bf16=autocast,
    )  # fmt: skip
    peft_cfg = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    trainer = KTOTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok,
                         peft_config=peft_cfg, callbacks=[Timer()])  # fmt: skip
    lengths = {len(p) + len(c) for p, c in zip(trainer.train_dataset["prompt_ids"],
                                              trainer.train_dataset["completion_ids"])}  # fmt: skip
    assert lengths == {args.prompt_len + args.completion_len}, lengths

    def run():
        step_times.clear()
        trainer.train()
        return tuple(statistics.median(x) for x in zip(*step_times[1:]))

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=96)
    parser.add_argument("--completion-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--precision", default="bf16", choices=sorted(PRECISIONS),
        help="bf16: bf16 base weights on both sides, TRL's default bf16 autocast, float32 "
        "LoRA; fp32: everything float32 (TRL bf16=False)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=0,
        help="1: both libraries on one core (process pinned to one CPU, XLA eigen off, "
        "torch.set_num_threads(1)); "
        "0: each library's default thread pool",
    )  # fmt: skip
    parser.add_argument(
        "--modes", default="default,precompute",
        help="comma-separated rows: default (reference forward every step), precompute "
        "(precompute_ref_log_probs=True on both sides)",
    )  # fmt: skip
    parser.add_argument(
        "--flops", action="store_true",
        help="also count each side's FLOPs per step (XLA cost analysis / torch FlopCounterMode)",
    )  # fmt: skip
    args = parser.parse_args()

    import torch

    if args.threads == 1:
        torch.set_num_threads(1)

    from sfjax.testing import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tempfile.mkdtemp(prefix="kto_bench_"), CONFIGS[args.config])
    data = make_examples(args.batch * args.steps, args.prompt_len, args.completion_len)

    print(
        f"config={args.config} batch={args.batch} seq={args.prompt_len}+{args.completion_len} "
        f"lora_r=16 precision={args.precision} steps={args.steps} rounds={args.rounds} "
        f"torch_threads={torch.get_num_threads()} "
        f"xla_single_thread={args.threads == 1} load_average={os.getloadavg()}"
    )
    for mode in args.modes.split(","):
        precompute = {"default": False, "precompute": True}[mode]
        t0 = time.perf_counter()
        _, sf_run, sf_first = bench_sfjax(ckpt, data, args, precompute)
        sf_setup = time.perf_counter() - t0
        trl_run = bench_trl(ckpt, data, args, precompute)
        trl_run()  # TRL's one-off precompute (and warm-up) outside the timed rounds
        sf_steps, trl_steps = [], []
        for _ in range(args.rounds):
            wall, cpu = sf_run(args.steps)
            sf_steps.append((wall / args.steps, cpu / args.steps))
            trl_steps.append(trl_run())
        sf = [statistics.median(x) for x in zip(*sf_steps)]
        trl = [statistics.median(x) for x in zip(*trl_steps)]
        print(f"[{mode}] load_average={os.getloadavg()}")
        print(f"[{mode}] sfjax step (median): wall {sf[0] * 1e3:7.1f} ms  cpu {sf[1] * 1e3:7.1f} ms"
              f"   wall runs: {[round(x[0] * 1e3, 1) for x in sf_steps]}")
        print(f"[{mode}] TRL   step (median): wall {trl[0] * 1e3:7.1f} ms  cpu {trl[1] * 1e3:7.1f} ms"
              f"   wall runs: {[round(x[0] * 1e3, 1) for x in trl_steps]}")
        print(f"[{mode}] speed-up sfjax / TRL: wall {trl[0] / sf[0]:.2f}x  cpu {trl[1] / sf[1]:.2f}x")
        print(f"[{mode}] sfjax first train() call (compile + 1 step): {sf_first:.2f} s "
              f"(setup total {sf_setup:.2f} s)", flush=True)
        if args.flops:
            sf_flops = sfjax_step_flops(sf_run)
            trl_flops = trl_step_flops(trl_run, args.steps)
            print(f"[{mode}] GFLOP per step: sfjax {sf_flops / 1e9:.2f} (XLA cost analysis), "
                  f"TRL {trl_flops / 1e9:.2f} (torch FlopCounterMode over a train() call / steps); "
                  f"effective GFLOP/s: "
                  f"sfjax {sf_flops / sf[0] / 1e9:.0f}, TRL {trl_flops / trl[0] / 1e9:.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
