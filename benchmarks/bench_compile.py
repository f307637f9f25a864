"""Ahead-of-time compile time and memory of every program the ``paper`` preset runs, unrolled vs
``scan_layers``, at Qwen3-4B shapes (abstract: nothing is allocated).

Each program is jitted exactly as sfjax runs it and compiled with ``jit(...).lower(abstract
args).compile()`` on ``jax.ShapeDtypeStruct`` inputs (the model from ``nnx.eval_shape``):

* ``prefill``    — the Actor's prompt through the cached forward: 1 row × 2,560 tokens (the SF
  prompt's bucket) into a cache of 2,560 + 256 slots;
* ``decode``     — the sampler's whole program (prefill + ``lax.while_loop`` decode) for one
  Actor decision: 1 prompt, bucket 2,560, 192 new tokens (bucket 256), top-k 20 / top-p 0.8,
  the constrained action field;
* ``rfr``        — the same program for RfR rollouts: K = 8 samples of one prompt;
* ``ref_logps``  — the KTO reference log-probs (adapters off) of one micro-batch of 8 rows ×
  (768 prompt + 256 completion) tokens, matched + KL rows, shared prompt;
* ``kto_step``   — the KTO train step (reference + policy + KL, gradient, AdamW) at 8 × 1,024.

Modes: ``unrolled`` (today's layout), ``scanned`` (``scan_layers``: prefill, training and
reference passes scan one layer; decode steps run unrolled over parameter slices, the faster
per step on CPU) and ``scan_decode`` (decode steps scanned too, over a stacked ``[L, ...]`` KV
cache that the scan only reads: the smallest programs).

LoRA r = 16 on the 7 projections throughout (the Actor is the adapted model). Each record has
the lowering and compile seconds and ``compiled.memory_analysis()`` (argument, output, temp,
alias and generated-code bytes; ``peak`` = argument + output + temp − alias). ``--fsdp N``
also compiles the KTO step sharded over N fake host devices (``fsdp`` axis) and reports the
per-device peak next to a 16 GB TPU chip; the single-device peak is compared with an 80 GB
GPU and the 141 GB H200. XLA:CPU's buffer assignment is a proxy for XLA:GPU / TPU's.

``--decode-step`` measures instead the run time of a decode step (16 greedy steps inside one
jit, per-step time) on a mid-size model for the unrolled model, the scanned model decoding
over parameter slices (the default) and the scanned model decoding as a scan
(``scan_decode``): the choice recorded in :attr:`sfjax.models.qwen3.Qwen3Config.scan_decode`.

Usage::

    python benchmarks/bench_compile.py --out benchmarks/compile.json        # all, both modes
    python benchmarks/bench_compile.py --programs kto_step --modes scanned --fsdp 8
    python benchmarks/bench_compile.py --programs decode,rfr --modes scan_decode
    python benchmarks/bench_compile.py --decode-step
    python benchmarks/bench_compile.py --tiny                               # seconds (tests)

Shape legend: B rows, P prompt, C completion, T tokens, S cache slots, L layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(1, _ROOT)

PROGRAMS = ("prefill", "decode", "rfr", "ref_logps", "kto_step")
MODES = ("unrolled", "scanned")
GPU_80GB = 80e9
H200_BYTES = 141e9
TPU_CHIP_BYTES = 16e9


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The paper preset's program shapes (tiny: the test architecture, small sizes)."""

    prompt_bucket: int = 2560
    """Actor prompt bucket (SF prompt, no prefix cache)."""
    new_tokens: int = 192
    """Actor ``max_new_tokens`` (bucket 256)."""
    rollouts: int = 8
    """RfR samples per prompt (K)."""
    micro_batch: int = 8
    """KTO micro-batch rows."""
    kto_prompt: int = 768
    """KTO prompt bucket (``--kto-prompt``: the paper preset's SF prompts, ~2.2k tokens, are
    cut to its ``max_prompt_length`` 2,048)."""
    kto_completion: int = 256
    """KTO completion bucket."""
    lora_rank: int = 16
    """LoRA rank on all 7 projections."""
    remat: bool = False
    """KTO step with rematerialised layers (``KTOConfig.remat``; default off, as the preset)."""

    @classmethod
    def tiny(cls) -> Shapes:
        return cls(prompt_bucket=32, new_tokens=8, rollouts=2, micro_batch=2, kto_prompt=16,
                   kto_completion=8, lora_rank=2)  # fmt: skip


def model_config(tiny: bool, mode: str):
    """The architecture in layout ``mode``: ``unrolled``, ``scanned`` (``scan_layers``; decode
    over parameter slices) or ``scan_decode`` (``scan_layers`` and decode as a scan too)."""
    from sfjax.models.qwen3 import Qwen3Config

    if mode not in (*MODES, "scan_decode"):
        raise ValueError(f"unknown mode {mode!r}: unrolled, scanned or scan_decode")
    c = Qwen3Config.tiny() if tiny else Qwen3Config.qwen3_4b()
    return dataclasses.replace(c, scan_layers=mode != "unrolled", scan_decode=mode == "scan_decode")


def abstract_model(config, rank: int, dtype=None):
    """A LoRA-adapted Qwen3 of ``ShapeDtypeStruct`` leaves (no memory)."""
    import jax.numpy as jnp
    from flax import nnx

    from sfjax.models import lora, qwen3

    dtype = dtype or jnp.bfloat16

    def make():
        m = qwen3.Qwen3(config, dtype=dtype, rngs=nnx.Rngs(0))
        return lora.apply_lora(m, lora.LoRAConfig(rank=rank), rngs=nnx.Rngs(1))

    return nnx.eval_shape(make)


def memory(compiled) -> dict:
    """``memory_analysis()`` in bytes, with ``peak`` = argument + output + temp − alias."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in
           ("argument", "output", "temp", "alias", "generated_code")}  # fmt: skip
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def compile_timed(jitted, *args, **kwargs) -> dict:
    t0 = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return {"lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
            "total_s": round(t2 - t0, 2), "memory": memory(compiled)}  # fmt: skip


# ---------------------------------------------------------------------------- the programs
def prefill_program(model, shapes: Shapes):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sfjax.models.kv_cache import init_cache

    graphdef, state = nnx.split(model)
    B, T = 1, shapes.prompt_bucket
    S = T + _new_bucket(shapes.new_tokens)
    cache = jax.eval_shape(lambda: init_cache(model.config, B, S, jnp.bfloat16))

    def prefill(state, cache, ids_BT, mask_BT):
        m = nnx.merge(graphdef, state)
        logits_BTV, cache = m(ids_BT, attention_mask=mask_BT, cache=cache)
        return logits_BTV[:, -1], cache

    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    mask = jax.ShapeDtypeStruct((B, T), jnp.bool_)
    return jax.jit(prefill, donate_argnums=1), (state, cache, ids, mask)


def _new_bucket(n: int) -> int:
    from sfjax.sampling import sampler

    return sampler._bucket(n, sampler._MIN_NEW_BUCKET)


class _Captured(Exception):
    pass


def sampler_program(model, shapes: Shapes, tokenizer, *, n: int):
    """The sampler's decode program and its arguments for one prompt of ``prompt_bucket`` tokens
    and ``n`` samples, as ``Sampler.generate`` builds them (its call is intercepted before
    anything runs; the KV cache is abstract)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sfjax.agents.prompts import ACTION_FIELD
    from sfjax.sampling import ActionConstraint, Sampler, SamplingParams
    from sfjax.sampling import sampler as sampler_mod
    from sfjax.sampling.loop import decode_program

    sampler = Sampler(model, tokenizer)
    captured = {}

    def intercept(graphdef, n, *args):
        captured["args"] = (graphdef, n, *args)
        raise _Captured

    sampler._program = intercept
    real_init = sampler_mod.init_cache
    sampler_mod.init_cache = lambda *a, **k: jax.eval_shape(lambda: real_init(*a, **k))
    acting = n == 1
    params = SamplingParams(temperature=0.7 if acting else 1.0, top_p=0.8 if acting else 1.0,
                            top_k=20 if acting else 0, max_new_tokens=shapes.new_tokens)  # fmt: skip
    constraint = ActionConstraint(lo=0, hi=25, field=ACTION_FIELD, action_first=True,
                                  free_budget=min(96, shapes.new_tokens // 2))  # fmt: skip
    prompt = [int(x) for x in np.arange(shapes.prompt_bucket - 8) % 200 + 10]
    try:
        sampler.generate([prompt], params, jax.random.key(0), n=n, action_constraint=constraint)
    except _Captured:
        pass
    finally:
        sampler_mod.init_cache = real_init
    graphdef, n_, state, cache, *rest = captured["args"]
    rest = [jax.tree.map(jnp.asarray, x) if x is not None else None for x in rest]
    jitted = jax.jit(decode_program([0]), static_argnums=(0, 1), donate_argnums=(3,))
    return jitted, (graphdef, n_, state, cache, *rest)


def kto_batch(shapes: Shapes, accum: int | None):
    """Abstract micro-batch arrays (``[B, ...]``, or ``[A, B, ...]`` with ``accum``)."""
    import jax
    import jax.numpy as jnp

    lead = (shapes.micro_batch,) if accum is None else (accum, shapes.micro_batch)
    P, C = shapes.kto_prompt, shapes.kto_completion
    s = lambda *shape, dt=jnp.int32: jax.ShapeDtypeStruct((*lead, *shape), dt)  # noqa: E731
    return {
        "prompt_ids_ABP": s(P), "prompt_mask_ABP": s(P, dt=jnp.bool_),
        "completion_ids_ABC": s(C), "completion_mask_ABC": s(C, dt=jnp.bool_),
        "kl_completion_ids_ABC": s(C), "kl_completion_mask_ABC": s(C, dt=jnp.bool_),
        "desirable_AB": s(dt=jnp.bool_), "valid_AB": s(dt=jnp.bool_),
    }  # fmt: skip


def kto_config(shapes: Shapes):
    from sfjax.train.kto import KTOConfig

    return KTOConfig(micro_batch_size=shapes.micro_batch, max_prompt_length=2048,
                     max_completion_length=256, progress=False, remat=shapes.remat)  # fmt: skip


def ref_logps_program(model, shapes: Shapes):
    import jax
    from flax import nnx

    from sfjax.train.step import _step_spec, reference_logps

    graphdef, state = nnx.split(model)
    spec = _step_spec(kto_config(shapes))

    def fn(state, mb):
        return reference_logps(nnx.merge(graphdef, state), mb, spec)

    return jax.jit(fn), (state, kto_batch(shapes, None))


def kto_step_program(model, shapes: Shapes, mesh=None):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sfjax.train.step import _step_spec, make_optimizer, make_train_step

    graphdef, lora, rng_state, frozen = nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)
    config = kto_config(shapes)
    opt_state = jax.eval_shape(make_optimizer(config).init, lora)
    step = make_train_step(graphdef, _step_spec(config), mesh)
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    args = (lora, opt_state, frozen, rng_state, kto_batch(shapes, 1),
            jax.eval_shape(lambda: jax.random.key(0)), jax.ShapeDtypeStruct((2,), jnp.float32),
            f32)  # fmt: skip
    return step, args


def build(program: str, model, shapes: Shapes, tokenizer):
    if program == "prefill":
        return prefill_program(model, shapes)
    if program == "decode":
        return sampler_program(model, shapes, tokenizer, n=1)
    if program == "rfr":
        return sampler_program(model, shapes, tokenizer, n=shapes.rollouts)
    if program == "ref_logps":
        return ref_logps_program(model, shapes)
    if program == "kto_step":
        return kto_step_program(model, shapes)
    raise ValueError(f"unknown program {program!r}; choose from {PROGRAMS}")


def shapes_for(tiny: bool, remat: bool = False, kto_prompt: int | None = None) -> Shapes:
    """The shapes measured: the tiny or full set, with remat and another KTO prompt bucket."""
    shapes = dataclasses.replace(Shapes.tiny() if tiny else Shapes(), remat=remat)
    return shapes if kto_prompt is None else dataclasses.replace(shapes, kto_prompt=kto_prompt)


def measure(programs, modes, tiny: bool, progress=print, remat: bool = False,
            kto_prompt: int | None = None) -> dict:  # fmt: skip
    """``{program: {mode: record}}`` (compile seconds and memory per program and mode)."""
    import jax

    from benchmarks.gpu_common import load_bench_tokenizer

    shapes = shapes_for(tiny, remat, kto_prompt)
    tok = load_bench_tokenizer(None)
    out: dict = {}
    for mode in modes:
        model = abstract_model(model_config(tiny, mode), shapes.lora_rank)
        for program in programs:
            jax.clear_caches()  # no reuse across programs / modes: each compile from scratch
            jitted, args = build(program, model, shapes, tok)
            rec = compile_timed(jitted, *args)
            out.setdefault(program, {})[mode] = rec
            progress(f"{program:10s} {mode:9s} lower {rec['lower_s']:7.2f} s  compile "
                     f"{rec['compile_s']:7.2f} s  peak {rec['memory'].get('peak', 0) / 1e9:7.2f} GB")
    return out


def sharded_kto_step(fsdp: int, tiny: bool, remat: bool = False,
                     kto_prompt: int | None = None) -> dict:  # fmt: skip
    """The scanned KTO step compiled over ``fsdp`` fake host devices: per-device memory."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    if jax.device_count() < fsdp:
        raise SystemExit(f"--fsdp {fsdp} needs XLA_FLAGS=--xla_force_host_platform_device_count"
                         f"={fsdp} before jax starts (this script sets it when given --fsdp)")
    shapes = shapes_for(tiny, remat, kto_prompt)
    model = abstract_model(model_config(tiny, "scanned"), shapes.lora_rank)
    mesh = Mesh(np.array(jax.devices()[:fsdp]).reshape(1, fsdp, 1), ("data", "fsdp", "tp"))
    step, args = kto_step_program(model, shapes, mesh)
    rec = compile_timed(step, *args)  # the step's own lower(): shardings from the rules
    rec["devices"] = fsdp
    return rec


# ------------------------------------------------------------------------- decode step time
def decode_step_times(batch_sizes=(1, 8), steps: int = 16, slots: int = 1024) -> list[dict]:
    """Per-step decode time of a mid-size model (8 layers, hidden 1024, bf16) unrolled, scanned
    over parameter slices, and scanned as a scan over a stacked cache (``scan_decode``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sfjax.models import qwen3
    from sfjax.models.kv_cache import init_cache

    base = qwen3.Qwen3Config(vocab_size=8192, hidden_size=1024, intermediate_size=3072,
                             num_layers=8, num_heads=16, num_kv_heads=8, head_dim=128)  # fmt: skip
    variants = {"unrolled": {}, "scanned (slices)": dict(scan_layers=True),
                "scanned (scan_decode)": dict(scan_layers=True, scan_decode=True)}  # fmt: skip
    out = []
    for B in batch_sizes:
        for name, kw in variants.items():
            config = dataclasses.replace(base, **kw)
            model = qwen3.Qwen3(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
            graphdef, state = nnx.split(model)
            run = jax.jit(_decode_steps(graphdef, steps))
            cache = init_cache(config, B, slots, jnp.bfloat16)
            ids = jnp.ones((B, 1), jnp.int32)
            t0 = time.perf_counter()
            compiled = run.lower(state, cache, ids).compile()
            compile_s = time.perf_counter() - t0
            jax.block_until_ready(compiled(state, cache, ids))
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(state, cache, ids))
                times.append(time.perf_counter() - t0)
            rec = {"batch": B, "variant": name, "compile_s": round(compile_s, 2),
                   "step_ms": round(min(times) / steps * 1e3, 2)}  # fmt: skip
            print(json.dumps(rec), flush=True)
            out.append(rec)
    return out


def _decode_steps(graphdef, steps: int):
    """``steps`` greedy decode steps of the model ``graphdef`` (one program)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def run(state, cache, ids_B1):
        m = nnx.merge(graphdef, state)

        def body(_, carry):
            cache, ids_B1 = carry
            logits, cache = m(ids_B1, attention_mask=jnp.ones_like(ids_B1, bool), cache=cache)
            return cache, jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, steps, body, (cache, ids_B1))

    return run


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--programs", default=",".join(PROGRAMS), help=f"comma list of {PROGRAMS}")
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma list of unrolled, scanned, scan_decode")
    p.add_argument("--fsdp", type=int, default=0, help="also compile the KTO step over N devices")
    p.add_argument("--decode-step", action="store_true", help="decode step run time instead")
    p.add_argument("--remat", action="store_true", help="KTO step with KTOConfig.remat=True")
    p.add_argument("--kto-prompt", type=int, default=None, metavar="P",
                   help="KTO prompt bucket of ref_logps / kto_step (default 768; the paper "
                        "preset's prompts fill its max_prompt_length, 2048)")
    p.add_argument("--tiny", action="store_true", help="tiny architecture (tests)")
    p.add_argument("--out", default=None, help="write the JSON record here")
    args = p.parse_args(argv)
    if args.fsdp:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.fsdp}")
    import jax

    shapes = shapes_for(args.tiny, args.remat, args.kto_prompt)
    record: dict = {"jax": jax.__version__, "backend": jax.default_backend(), "tiny": args.tiny,
                    "remat": args.remat, "kto_tokens": [shapes.micro_batch, shapes.kto_prompt,
                                                        shapes.kto_completion],
                    "load_average": os.getloadavg()[0]}  # fmt: skip
    if args.decode_step:
        record["decode_step"] = decode_step_times()
    else:
        programs = [x for x in args.programs.split(",") if x]
        modes = [x for x in args.modes.split(",") if x]
        record["programs"] = measure(programs, modes, args.tiny, remat=args.remat,
                                     kto_prompt=args.kto_prompt,
                                     progress=lambda m: print(m, file=sys.stderr, flush=True))
        for _program, recs in record["programs"].items():
            if "unrolled" in recs and "scanned" in recs:
                recs["speedup"] = round(recs["unrolled"]["total_s"] / recs["scanned"]["total_s"], 2)
        kto = record["programs"].get("kto_step", {})
        for _mode, rec in kto.items():
            if isinstance(rec, dict) and rec.get("memory"):
                peak = rec["memory"]["peak"]
                rec["fits"] = {"80GB": peak < GPU_80GB, "H200_141GB": peak < H200_BYTES}
        if args.fsdp:
            rec = sharded_kto_step(args.fsdp, args.tiny, args.remat, args.kto_prompt)
            rec["fits_16GB_chip"] = rec["memory"].get("peak", 0) < TPU_CHIP_BYTES
            record["kto_step_fsdp"] = rec
            print(f"kto_step fsdp={args.fsdp}: per-device peak "
                  f"{rec['memory'].get('peak', 0) / 1e9:.2f} GB", file=sys.stderr)
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return record


if __name__ == "__main__":
    main()
