"""Shared pieces of the ``benchmarks/gpu_*.py`` scripts: random Qwen3-4B on device, rooflines,
timing and JSON output.

Every GPU script compares a measured figure with its floor: the bytes it must move divided by
the *measured* HBM bandwidth (a large on-device elementwise pass: read + write), or the FLOPs it
must do divided by the *measured* dense bf16 matmul rate — and, where torch + CUDA are present,
with PyTorch ``transformers`` on the same GPU in the same process. Speed does not depend on the
weight values, so the model is Qwen3-4B-shaped with random bf16 weights built directly on the
device (``nnx.eval_shape`` for the structure, one jitted random init; nothing is downloaded).

Spec-sheet rooflines, printed next to the measured ones: the datasheet of the card the run is on,
looked up from JAX's ``device_kind`` (:data:`SPECS`: H100 SXM / PCIe / NVL, H200 SXM / NVL,
A100, TPU v4 / v5e / v5p / v6e; dense BF16 tensor-core rates, not the 2:4-sparsity figures);
``None`` on anything else (CPU). ``--tiny`` runs every script on any backend (CPU included)
with the tiny test architecture, a few steps, so the scripts are exercised by the test suite.

Cost model of a Qwen3 forward (dense decoder, GQA, tied or untied LM head), in
:func:`forward_flops` / :func:`decode_step_bytes`:
  matmul FLOPs = 2 · (per-token matmul params) · tokens + 2 · D · V · (tokens whose logits are
  computed) + 4 · L · N · H · (attended keys summed over queries) (QKᵀ and PV);
  decode-step bytes = every weight once (embedding rows gathered only, the LM head / tied
  embedding read whole) + the KV cache read (2 · L · K · H · bytes per token of context per row)
  + the new token's KV written.

Shape legend: L layers, D hidden, F MLP width, N query heads, K kv heads, H head dim, V vocab.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

# JAX must not grab 75 % of the GPU up front: the PyTorch reference shares the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# ``python3 benchmarks/gpu_x.py`` from a plain checkout (sfjax not pip-installed, as on a bare
# GPU machine): the repository root must be importable.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(1, _ROOT)

from sfjax.device_memory import is_out_of_memory  # noqa: E402 -- after the path above


# ---------------------------------------------------------------------------------- CLI
def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags every GPU script takes."""
    parser.add_argument("--tiny", action="store_true",
                        help="tiny config, 2-3 steps: a smoke run on any backend (CPU tests)")
    parser.add_argument("--device-check", action="store_true",
                        help="print jax.devices() (and torch's CUDA device) and exit")
    parser.add_argument("--out", default=None, help="write the JSON record here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torch", action="store_true",
                        help="skip the PyTorch transformers reference")
    parser.add_argument("--iters", type=int, default=None, help="timed repetitions")
    parser.add_argument("--attention", default="auto",
                        choices=("plain", "xla", "cudnn", "auto"),
                        help="attention kernel (sfjax.models.attention): auto = cuDNN on GPU "
                             "where shapes allow, else plain f32 scores")
    parser.add_argument("--unrolled", action="store_true",
                        help="unrolled layers (default: Qwen3Config.scan_layers, one compiled "
                             "layer for prefill and training; decode unrolled unless --scan-decode)")
    parser.add_argument("--scan-decode", action="store_true",
                        help="Qwen3Config.scan_decode: decode steps scanned too, over a stacked "
                             "KV cache (smallest programs; step time on GPU to be measured)")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not use XLA's persistent compilation cache ($SFJAX_JAX_CACHE)")
    return parser


def setup(args) -> None:
    """Apply the common flags: the attention kernel and (at full size) XLA's persistent
    compilation cache, shared by every script and rerun on the machine (compiling a 36-layer
    program costs tens of seconds of device time)."""
    import jax

    from sfjax.models import attention

    attention.set_implementation(args.attention)
    attention.reset_choices()
    if not args.tiny and not args.no_compile_cache:
        path = os.environ.get("SFJAX_JAX_CACHE", os.path.join(tempfile.gettempdir(),
                                                               "sfjax_jax_cache"))
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def progress(msg: str) -> None:
    """A timestamped progress line on stderr (flushed: the device tool returns the tail)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def guarded(args, label: str, fn, *a, **kw) -> dict:
    """Run one measurement; at full size a failure (out of memory above all) is recorded as
    ``{"error": ..., "oom": bool}`` and the script goes on with the next one, after freeing
    what JAX and torch cached. ``--tiny`` re-raises (the tests must see bugs)."""
    try:
        return fn(*a, **kw)
    except Exception as e:  # noqa: BLE001
        if args.tiny:
            raise
        oom = is_out_of_memory(e)
        progress(f"{label} FAILED ({'out of memory' if oom else type(e).__name__}): "
                 f"{str(e)[:300]}")
        free_device_memory()
        return {"error": repr(e)[:800], "oom": oom}


def free_device_memory() -> None:
    """Drop JAX's compiled programs / live buffers held by caches, and torch's cached blocks."""
    import jax

    jax.clear_caches()
    free_torch()


def device_info() -> dict:
    """What this process runs on (JAX devices, backend, torch CUDA device if any)."""
    import jax

    info = {
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
    }
    try:
        import torch

        info["torch_version"] = torch.__version__
        info["torch_cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch_version"] = None
    return info


def maybe_device_check(args) -> bool:
    """``--device-check``: print the devices; returns True when the script should exit."""
    if not args.device_check:
        return False
    import jax

    print("jax.devices():", jax.devices())
    print(json.dumps(device_info(), indent=2))
    return True


def start(args):
    """The common start of every script's ``main``: ``--device-check`` (returns None: exit
    now), the common flags (:func:`setup`), then the model config and the measured roofline,
    returned as ``(config, roof)``."""
    if maybe_device_check(args):
        return None
    setup(args)
    config = model_config(args.tiny, scan_layers=not getattr(args, "unrolled", False),
                          scan_decode=getattr(args, "scan_decode", False))  # fmt: skip
    progress("measuring the roofline")
    return config, measure_roofline(args.tiny)


def _full_record(args, name: str, record: dict, complete: bool) -> dict:
    from sfjax.models import attention

    return {"benchmark": name, "tiny": bool(args.tiny), "complete": complete,
            "device": device_info(),
            "attention": {"requested": getattr(args, "attention", None),
                          "traced_calls": attention.choices()},
            "layers": layer_mode(getattr(args, "unrolled", False),
                                 getattr(args, "scan_decode", False)),
            **record}


def layer_mode(unrolled: bool, scan_decode: bool) -> str:
    """The layer mode of ``--unrolled`` / ``--scan-decode`` (bench_compile's mode names):
    ``unrolled``, ``scanned`` (prefill and training scanned, decode unrolled: the default) or
    ``scan_decode`` (decode steps scanned too)."""
    if unrolled:
        return "unrolled"
    return "scan_decode" if scan_decode else "scanned"


def emit(args, name: str, record: dict) -> dict:
    """Print the record as JSON and write it to ``--out`` (if given)."""
    record = _full_record(args, name, record, complete=True)
    text = json.dumps(record, indent=2, default=_jsonable)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return record


def emit_partial(args, name: str, record: dict) -> None:
    """Write what is measured so far to ``--out`` (``"complete": false``), so a run stopped by
    a time limit still leaves its finished parts."""
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(_full_record(args, name, record, complete=False), f, indent=2,
                      default=_jsonable)


def _jsonable(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


# ---------------------------------------------------------------------------------- model
def model_config(tiny: bool, scan_layers: bool = False, scan_decode: bool = False):
    """Qwen3-4B, or the tiny test architecture for ``--tiny``; ``scan_layers`` stacks the
    layers (one compiled layer: :attr:`sfjax.models.qwen3.Qwen3Config.scan_layers`),
    ``scan_decode`` scans decode steps too (:attr:`~sfjax.models.qwen3.Qwen3Config.scan_decode`)."""
    import dataclasses

    from sfjax.models.qwen3 import Qwen3Config

    c = Qwen3Config.tiny() if tiny else Qwen3Config.qwen3_4b()
    return dataclasses.replace(c, scan_layers=scan_layers, scan_decode=scan_layers and scan_decode)


def random_model(config, dtype=None, seed: int = 0):
    """A Qwen3 with random weights created on the default device, never on the host.

    ``nnx.eval_shape`` gives the structure without allocating; each weight is then drawn on
    device (normal, std 0.02; RMSNorm weights = 1) by one small jitted draw per distinct
    (shape, dtype, kind): Qwen3-4B has ~10 distinct shapes among its 398 leaves (a handful
    with ``config.scan_layers``), so this compiles in seconds where one jit over every leaf
    compiled for 146 s on an H200 (issue 18).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sfjax.models.qwen3 import Qwen3

    dtype = jnp.bfloat16 if dtype is None else dtype
    abstract = nnx.eval_shape(lambda: Qwen3(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    keys = jax.random.split(jax.random.key(seed), len(paths_leaves))
    leaves = []
    for k, (path, leaf) in zip(keys, paths_leaves):
        ones = "norm" in jax.tree_util.keystr(path)
        leaves.append(_draw(tuple(leaf.shape), jnp.dtype(leaf.dtype).name, ones)(k))
    state = jax.tree.unflatten(treedef, leaves)
    jax.block_until_ready(state)
    return nnx.merge(graphdef, state)


@functools.cache
def _draw(shape: tuple, dtype: str, ones: bool):
    """One jitted draw per distinct (shape, dtype, kind)."""
    import jax
    import jax.numpy as jnp

    if ones:
        return jax.jit(lambda key: jnp.ones(shape, dtype))
    return jax.jit(lambda key: (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype))


def draw_compiles() -> int:
    """How many draw programs :func:`random_model` compiled in this process."""
    return _draw.cache_info().currsize


def prefill_last_logits(model, ids_BT, mask_BT, cache):
    """Prefill as the sampler does: all columns but the last (no LM head), then the last
    column alone; returns its logits ``[B, V]`` and the cache."""
    if ids_BT.shape[1] > 1:
        _, cache = model(ids_BT[:, :-1], attention_mask=mask_BT[:, :-1], cache=cache)
    logits_B1V, cache = model(ids_BT[:, -1:], attention_mask=mask_BT[:, -1:], cache=cache)
    return logits_B1V[:, -1], cache


def device_memory_record() -> dict | None:
    """JAX's allocator statistics of the first device (``peak_bytes_in_use`` since the process
    started, ``bytes_limit`` of its pool), or None where the backend keeps none (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
            if k in stats}  # fmt: skip


def free_torch() -> None:
    """Return the GPU memory of deleted torch objects (call after ``del``, before JAX runs)."""
    import gc as pygc

    pygc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_dir() -> str:
    """A directory holding the project's local byte-level BPE test tokenizer (Qwen3 chat
    template and special tokens; no download). Its ids are < 1024, inside any Qwen3 vocabulary;
    it splits text into more tokens than Qwen's 151k BPE, so prompt token counts are reported."""
    from sfjax.testing import write_tiny_checkpoint

    out = tempfile.mkdtemp(prefix="sfjax_gpu_tok_")
    write_tiny_checkpoint(out)
    return out


def load_bench_tokenizer(path: str | None):
    """``--tokenizer PATH`` (e.g. a local Qwen3 tokenizer) or the tiny test tokenizer."""
    from sfjax.tokenizer import load_tokenizer

    return load_tokenizer(path or tiny_tokenizer_dir())


# ---------------------------------------------------------------------------------- cost model
@dataclass(frozen=True)
class Qwen3Costs:
    """Parameter counts of a Qwen3 config that the cost model needs."""

    layer_matmul_params: int
    """Matmul weights of all layers (q/k/v/o + gate/up/down)."""
    norm_params: int
    """RMSNorm weights (all of them)."""
    embed_params: int
    """Embedding table V · D."""
    lm_head_params: int
    """Untied LM head V · D (0 when tied)."""
    kv_bytes_per_token: int
    """K + V bytes of one token over all layers, at the cache dtype."""

    @property
    def total_params(self) -> int:
        return self.layer_matmul_params + self.norm_params + self.embed_params + self.lm_head_params


def qwen3_costs(config, cache_bytes: int = 2) -> Qwen3Costs:
    c = config
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    norms = c.num_layers * (2 * c.hidden_size + 2 * c.head_dim) + c.hidden_size
    vd = c.vocab_size * c.hidden_size
    return Qwen3Costs(
        layer_matmul_params=c.num_layers * (attn + mlp),
        norm_params=norms,
        embed_params=vd,
        lm_head_params=0 if c.tie_word_embeddings else vd,
        kv_bytes_per_token=2 * c.num_layers * c.num_kv_heads * c.head_dim * cache_bytes,
    )


def forward_flops(config, tokens: int, attended_keys: int, logit_tokens: int) -> float:
    """Matmul FLOPs of a forward: ``tokens`` through the layers, ``attended_keys`` (sum over
    queries of the keys each attends to), LM head on ``logit_tokens``."""
    c = config
    costs = qwen3_costs(c)
    return (
        2.0 * costs.layer_matmul_params * tokens
        + 2.0 * c.hidden_size * c.vocab_size * logit_tokens
        + 4.0 * c.num_layers * c.num_heads * c.head_dim * attended_keys
    )


def prefill_attended_keys(batch: int, prompt_len: int) -> int:
    """Causal prefill: query t sees t + 1 keys."""
    return batch * prompt_len * (prompt_len + 1) // 2


def decode_step_bytes(config, batch: int, context: int, weight_bytes: int = 2,
                      cache_bytes: int = 2) -> float:
    """Least HBM traffic of one decode step of ``batch`` rows with ``context`` cached tokens."""
    costs = qwen3_costs(config, cache_bytes)
    weights = (costs.layer_matmul_params + costs.norm_params + costs.lm_head_params) * weight_bytes
    lm = costs.embed_params * weight_bytes if config.tie_word_embeddings else 0
    gather = batch * config.hidden_size * weight_bytes
    kv = batch * (context + 1) * costs.kv_bytes_per_token  # read context, write one
    return float(weights + lm + gather + kv)


def decode_floor_s(config, batch: int, context: int, roof: Roofline) -> float:
    """Least time of one decode step: max(bytes / bandwidth, FLOPs / matmul rate)."""
    flops = forward_flops(config, batch, batch * (context + 1), batch)
    return max(decode_step_bytes(config, batch, context) / roof.hbm_bytes_per_s,
               flops / roof.matmul_flops_per_s)


# ---------------------------------------------------------------------------------- rooflines
@dataclass(frozen=True)
class Roofline:
    """Bandwidth and matmul rate the floors are computed from."""

    hbm_bytes_per_s: float
    matmul_flops_per_s: float
    source: str
    """"measured" (on this device, this run) or "spec: <card> datasheet"."""


def _spec(card: str, tb_per_s: float, dense_bf16_tflops: float) -> Roofline:
    return Roofline(tb_per_s * 1e12, dense_bf16_tflops * 1e12, f"spec: {card} datasheet")


SPEC_H200 = _spec("NVIDIA H200 SXM", 4.8, 989)
SPEC_H100 = _spec("NVIDIA H100 SXM", 3.35, 989)
SPECS: tuple[tuple[tuple[str, ...], Roofline], ...] = (
    # (every word that must appear in jax's device_kind, lower case; first match wins)
    (("h200", "nvl"), _spec("NVIDIA H200 NVL", 4.8, 835)),
    (("h200",), SPEC_H200),
    (("h100", "pcie"), _spec("NVIDIA H100 PCIe", 2.0, 756)),
    (("h100", "nvl"), _spec("NVIDIA H100 NVL", 3.9, 835)),
    (("h100",), SPEC_H100),  # "NVIDIA H100 80GB HBM3": the SXM part
    (("a100", "80gb", "pcie"), _spec("NVIDIA A100 80GB PCIe", 1.935, 312)),
    (("a100", "80gb"), _spec("NVIDIA A100 80GB SXM", 2.039, 312)),
    (("a100",), _spec("NVIDIA A100 40GB", 1.555, 312)),
    (("tpu v6 lite",), _spec("TPU v6e", 1.64, 918)),
    (("tpu v5 lite",), _spec("TPU v5e", 0.819, 197)),
    (("tpu v5",), _spec("TPU v5p", 2.765, 459)),
    (("tpu v4",), _spec("TPU v4", 1.2, 275)),
)
"""Datasheet HBM bandwidth and dense BF16 peak per accelerator, matched on ``device_kind``."""


def spec_roofline(device_kind: str | None = None) -> Roofline | None:
    """The datasheet roofline of ``device_kind`` (default: JAX's first device), or None for a
    device not in :data:`SPECS` (CPU, an unknown card: only measured floors are reported)."""
    if device_kind is None:
        import jax

        device_kind = jax.devices()[0].device_kind
    kind = device_kind.lower()
    for words, roof in SPECS:
        if all(w in kind for w in words):
            return roof
    return None


def measure_hbm_bandwidth(nbytes: int, iters: int = 10) -> float:
    """Bytes/s of a jitted elementwise pass over a ``nbytes`` bf16 array (reads + writes)."""
    import jax
    import jax.numpy as jnp

    n = max(nbytes // 2, 1024)
    x = jnp.ones((n,), jnp.bfloat16)
    f = jax.jit(lambda a: a * jnp.bfloat16(1.0001))
    t = time_call(lambda: f(x), iters=iters, warmup=2)
    return 2 * 2 * n / t["median_s"]


def measure_matmul_flops(dim: int, iters: int = 10) -> float:
    """FLOP/s of a jitted ``[dim, dim] @ [dim, dim]`` bf16 matmul (f32 accumulation)."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (dim, dim), jnp.bfloat16)
    b = jax.random.normal(kb, (dim, dim), jnp.bfloat16)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32)
                .astype(jnp.bfloat16))
    t = time_call(lambda: f(a, b), iters=iters, warmup=2)
    return 2.0 * dim**3 / t["median_s"]


def measure_roofline(tiny: bool) -> Roofline:
    """Measured bandwidth (2 GiB array; 8 MiB with ``--tiny``) and matmul rate (8192²; 256²)."""
    bw = measure_hbm_bandwidth(8 << 20 if tiny else 2 << 30, iters=3 if tiny else 20)
    fl = measure_matmul_flops(256 if tiny else 8192, iters=3 if tiny else 20)
    return Roofline(bw, fl, "measured")


def roofline_record(roof: Roofline) -> dict:
    spec = spec_roofline()
    return {"measured": asdict(roof), "spec": asdict(spec) if spec else None}


def spec_floor(floor_fn, *args):
    """``floor_fn(*args, spec)`` at this device's datasheet roofline, None when it has none."""
    spec = spec_roofline()
    return None if spec is None else floor_fn(*args, spec)


# ---------------------------------------------------------------------------------- timing
def block(x):
    """Wait for every array in ``x`` (JAX pytrees; torch CUDA work via synchronize)."""
    import jax

    jax.block_until_ready(x)
    return x


# JAX records this event around every XLA compile it asks for: a compile, or a load from the
# persistent compilation cache (both mean the call did not run an already loaded program).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts the XLA programs JAX compiles (or loads from the persistent cache) while open::

        with CompileCounter() as compiles:
            ...
        compiles.count, compiles.seconds
    """

    def __init__(self):
        self.count, self.seconds = 0, 0.0

    def _listen(self, event: str, duration_secs: float, **_) -> None:
        if event == COMPILE_EVENT:
            self.count += 1
            self.seconds += duration_secs

    def __enter__(self) -> CompileCounter:
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        import jax.monitoring

        jax.monitoring.unregister_event_duration_listener(self._listen)


def warm_until_compiled(fn, passes: int = 3) -> None:
    """``fn()`` untimed, at least twice and until a call compiles nothing (at most ``passes``
    calls). A first pass can change what the next one runs (a prefix cache that moves its
    prefix, prompts in other buckets), so one quiet pass after it is the steady state."""
    for i in range(passes):
        with CompileCounter() as warm:
            fn()
        if i and not warm.count:
            return


def time_call(fn, iters: int = 5, warmup: int = 1, sync=block, label: str | None = None) -> dict:
    """Wall time of ``sync(fn())``: median / min / all, after ``warmup`` untimed calls.

    ``compiles`` counts the XLA compiles inside the timed calls (a new shape or bucket): a
    time that includes one measures the compiler, not the program, so a nonzero count is also
    printed as a warning (naming ``label``)."""
    for _ in range(warmup):
        sync(fn())
    times = []
    with CompileCounter() as compiles:
        for _ in range(max(iters, 1)):
            t0 = time.perf_counter()
            sync(fn())
            times.append(time.perf_counter() - t0)
    if compiles.count:
        progress(f"warning: {label or 'a timed call'}: {compiles.count} XLA compile(s) "
                 f"({compiles.seconds:.1f} s) inside the timed calls; their times include them")
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "compiles": compiles.count}


def ratio(a: float, b: float) -> float:
    return float(a / b) if b else math.nan


# ---------------------------------------------------------------------------------- torch
def torch_device(args) -> str | None:
    """"cuda" when torch sees a GPU; "cpu" only for ``--tiny`` (so tests exercise the path);
    None when the reference is skipped (``--no-torch``, no torch, or no GPU at full size)."""
    if args.no_torch:
        return None
    try:
        import torch
    except ImportError:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if args.tiny else None


def torch_model(config, device: str, seed: int = 0, attn: str = "sdpa"):
    """``transformers.Qwen3ForCausalLM`` with random weights built on ``device`` (bf16 on
    CUDA, float32 on CPU), eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf = transformers.Qwen3Config(**config.to_hf())
    hf._attn_implementation = attn
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = transformers.Qwen3ForCausalLM(hf)
        finally:
            torch.set_default_dtype(old)
    return model.eval()


def reference(args, fn, *a, **kw) -> dict:
    """Run a PyTorch reference; at full size a failure (e.g. out of memory) is recorded as
    ``{"error": ...}`` so the sfjax figures still come out. ``--tiny`` re-raises (tests)."""
    try:
        return fn(*a, **kw)
    except Exception as e:  # noqa: BLE001
        if args.tiny:
            raise
        print(f"PyTorch reference failed: {e!r}", file=sys.stderr)
        free_torch()
        return {"error": repr(e)[:500]}


def torch_sync(x=None):
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return x

