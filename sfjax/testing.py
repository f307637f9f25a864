"""Tiny Qwen3-architecture checkpoints built locally, for tests, benchmarks and the smoke demo.

Nothing here touches the network or torch. :func:`write_tiny_checkpoint` writes a directory in
Hugging Face layout that ``transformers.Qwen3ForCausalLM.from_pretrained`` and
``transformers.AutoTokenizer.from_pretrained`` load:

* ``config.json`` (``model_type: qwen3``) and ``generation_config.json``;
* ``model.safetensors`` (or sharded files plus ``model.safetensors.index.json``) holding seeded
  random weights under Hugging Face's tensor names;
* ``tokenizer.json`` / ``tokenizer_config.json``: a byte-level BPE trained with the ``tokenizers``
  library on a fixed in-memory corpus, with Qwen3's pre-tokenizer regex (so every digit is its
  own token, as in Qwen3), Qwen3's special tokens and a Qwen3-style chat template with the
  ``enable_thinking`` switch.

The weights are random, so the model's text is gibberish; what matters is that shapes, names,
special tokens and the chat template behave like the real Qwen3-4B checkpoint.

:class:`LocalJSONServer` is the plumbing of the local fakes of remote JSON APIs
(``tests/fake_openai.FakeOpenAI``, ``benchmarks/fake_r1.FakeR1``): an HTTP server on
127.0.0.1 in a daemon thread that hands each POST's parsed body to its subclass.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

# Qwen2/Qwen3 pre-tokenizer split: letters grouped, every numeric character alone.
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's special tokens in Qwen3's order; ``<think>``/``</think>`` are plain added tokens there.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")

# A Qwen3-style chat template: ChatML turns, reasoning stripped from earlier assistant turns,
# and an empty think block after the generation prompt when ``enable_thinking`` is false.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' and '</think>' in content and not loop.last %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Default tiny architecture: GQA ratio 2, head_dim decoupled from hidden/heads as in Qwen3.
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1024,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": True,
}

# The model sizes the CPU benchmarks compare against transformers (issues: sampler, KTO, prefill).
BENCHMARK_CONFIGS: dict[str, dict[str, Any]] = {
    "small": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=32, intermediate_size=768, vocab_size=8192,
    ),
    "mid": dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
        head_dim=64, intermediate_size=1536, vocab_size=32000,
    ),
}  # fmt: skip

_BPE_VOCAB_SIZE = 900  # byte alphabet + merges; specials are appended after this.

_CORPUS_WORDS = """
the a an of to and in on for with by is are was be as at from that this it its or not no
you your we our they their which when what how why than then there these those each every
slice slices network radio access base station cell user users equipment UE UEs GBR non
PRB PRBs RBG RBGs resource block blocks allocation allocate allocated reallocate keep
increase decrease raise lower more fewer same previous current next step steps time
spectral efficiency SE throughput arrival rate queue buffer bytes packets dropped drop
delay budget violation violations QoS quality service reconfiguration reconfigurations
action Action reflection Reflection analysis Analysis state State feedback Feedback
effective suboptimal label improved reason summary trajectory window history objective
maximise maximize avoid minimise minimize control controller decision decisions agent
Mb s ms bit Hz kHz MHz dBm dB traffic load high low stable bursty on off idle active
because so therefore however while since should would could must will can may might
assistant system user thinking answer output format integer value between range
""".split()


def _tokenizer_corpus() -> list[str]:
    """A fixed, deterministic training corpus: domain words in sentence-like lines."""
    rng = np.random.default_rng(1234)
    lines = []
    for _ in range(400):
        n = int(rng.integers(6, 16))
        words = [_CORPUS_WORDS[int(i)] for i in rng.integers(0, len(_CORPUS_WORDS), size=n)]
        number = int(rng.integers(0, 100000))
        lines.append(" ".join(words) + f": {number}.\n")
    lines.append("Action: 12\nReflection: the previous step was effective.\nAnalysis: ok.\n")
    return lines


def build_tokenizer():
    """Train the tiny byte-level BPE tokenizer (a ``tokenizers.Tokenizer``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.add_tokens(list(THINK_TOKENS))
    return tok


def _tokenizer_files(out: Path) -> dict[str, int]:
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + THINK_TOKENS}
    added = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t in SPECIAL_TOKENS + THINK_TOKENS
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
            },
            indent=2,
        )
    )
    return ids


def hf_config(overrides: Mapping[str, Any] | None = None, **special_ids: int) -> dict[str, Any]:
    """A Qwen3 ``config.json`` dict: :data:`TINY_CONFIG` updated with ``overrides``."""
    cfg = dict(TINY_CONFIG)
    cfg.update(overrides or {})
    num_layers = cfg["num_hidden_layers"]
    from sfjax.models.config import HF_FIXED_FIELDS

    return {
        **HF_FIXED_FIELDS,
        "max_window_layers": num_layers,
        "torch_dtype": "float32",
        "bos_token_id": special_ids.get("bos_token_id", 0),
        "eos_token_id": special_ids.get("eos_token_id", 0),
        "pad_token_id": special_ids.get("pad_token_id", 0),
        **cfg,
    }


def hf_weight_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hugging Face's Qwen3 tensor names and shapes for ``config`` (a ``config.json`` dict), in
    checkpoint order; projections are ``[out, in]`` like ``torch.nn.Linear``."""
    d, f = config["hidden_size"], config["intermediate_size"]
    h, nq, nkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    v = config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (nq * h, d),
            p + "self_attn.k_proj.weight": (nkv * h, d),
            p + "self_attn.v_proj.weight": (nkv * h, d),
            p + "self_attn.o_proj.weight": (d, nq * h),
            p + "self_attn.q_norm.weight": (h,),
            p + "self_attn.k_norm.weight": (h,),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        }
    shapes["model.norm.weight"] = (d,)
    if not config.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def random_hf_weights(config: Mapping[str, Any], seed: int = 0, randomize_norms: bool = True):
    """Seeded random weights under Hugging Face's Qwen3 tensor names (:func:`hf_weight_shapes`),
    as float32 numpy arrays, each drawn on its own: normal with std ``initializer_range``
    (0.02). Norm weights are drawn around 1 when ``randomize_norms`` so that parity tests
    exercise them."""
    rng = np.random.default_rng(seed)
    std = config.get("initializer_range", 0.02)
    w = {}
    for name, shape in hf_weight_shapes(config).items():
        if not _is_norm(name):
            w[name] = (rng.standard_normal(shape) * std).astype(np.float32)
        elif randomize_norms:
            w[name] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:
            w[name] = np.ones(shape, np.float32)
    return w


PER_SHAPE_SHIFT = 1009
"""Elements between the starts of two tensors of one shape in :func:`per_shape_hf_weights`."""


def per_shape_hf_weights(config: Mapping[str, Any], seed: int = 0, dtype: str = "bfloat16"):
    """Random weights as :func:`random_hf_weights` (same names, shapes and scales, norms around
    1) for checkpoints too big to draw tensor by tensor (Qwen3-4B: 398 tensors, 4.0 B values):
    one random block per distinct shape and kind, converted to ``dtype`` once; the ``i``-th
    tensor of that shape is the view of the block starting :data:`PER_SHAPE_SHIFT` x ``i``
    elements in, so layers differ (shifted) without further draws or copies. Qwen3-4B draws 0.46
    B values (1 GB in bf16 is all the arrays hold), the embedding table most of them."""
    rng = np.random.default_rng(seed)
    std = config.get("initializer_range", 0.02)
    shapes = hf_weight_shapes(config)
    groups: dict[tuple[tuple[int, ...], bool], list[str]] = {}
    for name, shape in shapes.items():
        groups.setdefault((shape, _is_norm(name)), []).append(name)
    w = {}
    for (shape, norm), names in groups.items():
        size = int(np.prod(shape))
        block = rng.standard_normal(size + PER_SHAPE_SHIFT * (len(names) - 1), dtype=np.float32)
        block *= 0.2 if norm else std
        if norm:
            block += 1.0
        block = block.astype(_np_dtype(dtype))
        for i, name in enumerate(names):
            w[name] = block[i * PER_SHAPE_SHIFT : i * PER_SHAPE_SHIFT + size].reshape(shape)
    return {name: w[name] for name in shapes}  # checkpoint order


def _np_dtype(dtype: str) -> np.dtype:
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _save_weights(out: Path, weights: dict[str, np.ndarray], dtype: str, max_shard_bytes: int | None):
    from sfjax.models.weights import write_safetensors  # the file mode open() gives

    # no copy of what has the dtype already (safetensors writes from the arrays' memory)
    weights = {k: a.astype(_np_dtype(dtype), copy=False) for k, a in weights.items()}
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        write_safetensors(out / "model.safetensors", weights, meta)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in weights.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        write_safetensors(out / fname, shard, meta)
        weight_map.update({name: fname for name in shard})
    total = sum(a.nbytes for a in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tiny_checkpoint(
    path: str | os.PathLike,
    config: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    dtype: str = "float32",
    randomize_norms: bool = True,
    max_shard_bytes: int | None = None,
    per_shape: bool = False,
) -> Path:
    """Write a tiny random Qwen3 checkpoint plus tokenizer to ``path`` and return it.

    Args:
      path: output directory (created if missing).
      config: overrides of :data:`TINY_CONFIG` (any Qwen3 ``config.json`` field). ``vocab_size``
        must cover the tokenizer (about 905 ids); larger values add unused rows as in Qwen3.
      seed: seed of the random weights.
      dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` storage dtype.
      randomize_norms: draw RMSNorm weights around 1 instead of exactly 1.
      max_shard_bytes: if given, split weights into ``model-0000k-of-0000n.safetensors`` files
        of at most this many bytes each plus ``model.safetensors.index.json``.
      per_shape: draw one block per distinct shape (:func:`per_shape_hf_weights`; norms
        randomized) instead of every tensor on its own: for Qwen3-4B-sized checkpoints.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    ids = _tokenizer_files(out)
    cfg = hf_config(
        config,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    cfg["torch_dtype"] = dtype
    if cfg["vocab_size"] <= max(ids.values()):
        raise ValueError(
            f"vocab_size={cfg['vocab_size']} is smaller than the tokenizer "
            f"({max(ids.values()) + 1} ids); use vocab_size >= {max(ids.values()) + 1}"
        )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    generation = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if per_shape:
        weights = per_shape_hf_weights(cfg, seed=seed, dtype=dtype)
    else:
        weights = random_hf_weights(cfg, seed=seed, randomize_norms=randomize_norms)
    _save_weights(out, weights, dtype, max_shard_bytes)
    return out


# -- local fakes of remote JSON APIs ---------------------------------------------------------


class LocalJSONServer:
    """An HTTP/1.1 server on 127.0.0.1 (a free port) in a daemon thread, for fakes of remote JSON
    APIs: ``with Fake() as server: server.url``. A subclass answers each POST in
    :meth:`handle_post`, given the request handler (path, headers, connection) and the parsed
    JSON body, and writes its reply with :func:`send_json` / :func:`send_raw`. ``lock`` guards
    what the subclass records: requests arrive on the server's threads. A client that hangs up
    before the reply is written is not an error of the server."""

    def __init__(self, path: str = ""):
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the API servers it stands in for

            def log_message(self, *a):  # no access log on stderr
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                try:
                    server.handle_post(self, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port: int = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}{path}"
        """The server's address plus ``path`` (e.g. ``/v1``, an OpenAI client's base URL)."""
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def handle_post(self, handler: BaseHTTPRequestHandler, body: Any) -> None:
        raise NotImplementedError

    def start(self):
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def send_json(handler: BaseHTTPRequestHandler, code: int, obj: Any,
              headers: Mapping[str, str] | None = None) -> None:
    """Reply ``code`` with ``obj`` as a JSON body (``Content-Length`` set, connection kept)."""
    send_raw(handler, code, json.dumps(obj).encode(), "application/json", headers)


def send_raw(handler: BaseHTTPRequestHandler, code: int, data: bytes, content_type: str,
             headers: Mapping[str, str] | None = None) -> None:
    """Reply ``code`` with ``data`` as the body, of ``content_type``, plus ``headers``."""
    handler.send_response(code)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(data)
