"""Hugging Face safetensors <-> Flax NNX Qwen3, one tensor at a time.

Loading (:func:`from_pretrained`) first reads every safetensors *header* (a few KB), checks the
checkpoint against the parameters the config implies through an explicit name table
(:func:`hf_param_table`), and only then reads, converts and places tensors one by one, so peak
host memory is about one tensor and every user error (missing/unexpected tensors, wrong shape or
dtype, truncated file) is raised before any compute. The model itself is built with
``nnx.eval_shape`` and filled in, so loading 4B never materialises a random 4B model.

Files are read and written with the ``safetensors`` package (numpy framework; bfloat16 through
``ml_dtypes``): headers through ``safe_open`` slices, tensors one at a time from its memory map.

With ``config.scan_layers`` the decoder layers' parameters are stacked ``[L, ...]``: each stack
is created on its devices and filled layer by layer (:func:`_stack_writer`), so loading still
holds one checkpoint tensor on the host at a time.

Shape legend: D hidden, F MLP width, N/K query/kv heads, H head dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfjax import atomic
from sfjax.models.config import CheckpointUnavailable

if TYPE_CHECKING:
    from sfjax.models.qwen3 import Qwen3, Qwen3Config

FLOAT_CODES = ("F64", "F32", "F16", "BF16")
"""safetensors dtype codes a checkpoint or adapter tensor may have."""
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # HF's "5GB"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model (missing/unexpected/mis-shaped tensors)."""


# ------------------------------------------------------------------------------ name table
@dataclass(frozen=True)
class ParamSpec:
    """Where one HF tensor lives in the NNX model."""

    hf_name: str
    """Tensor name in the safetensors files, e.g. ``model.layers.0.mlp.up_proj.weight``."""
    path: tuple[str | int, ...]
    """Path of the ``nnx.Param`` in the model state, e.g. ``("layers", 0, "mlp", "up_proj", "kernel")``."""
    shape: tuple[int, ...]
    """Shape of the Flax parameter (projections are ``[in, out]``)."""
    transpose: bool
    """Whether the HF tensor is the transpose (torch ``Linear`` stores ``[out, in]``)."""

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.transpose else self.shape


def hf_param_table(config: Qwen3Config) -> list[ParamSpec]:
    """The explicit HF-name -> NNX-path mapping for a Qwen3 config, in checkpoint order."""
    c = config
    d, f, h = c.hidden_size, c.intermediate_size, c.head_dim
    proj = {
        "self_attn.q_proj": (d, c.num_heads * h),
        "self_attn.k_proj": (d, c.num_kv_heads * h),
        "self_attn.v_proj": (d, c.num_kv_heads * h),
        "self_attn.o_proj": (c.num_heads * h, d),
        "mlp.gate_proj": (d, f),
        "mlp.up_proj": (d, f),
        "mlp.down_proj": (f, d),
    }
    norms = {
        "input_layernorm": d,
        "post_attention_layernorm": d,
        "self_attn.q_norm": h,
        "self_attn.k_norm": h,
    }
    table = [
        ParamSpec(
            "model.embed_tokens.weight", ("embed_tokens", "embedding"), (c.vocab_size, d), False
        )
    ]
    for i in range(c.num_layers):
        pre = f"model.layers.{i}."
        for name, shape in proj.items():
            path = ("layers", i, *name.split("."), "kernel")
            table.append(ParamSpec(f"{pre}{name}.weight", path, shape, True))
        for name, dim in norms.items():
            path = ("layers", i, *name.split("."), "weight")
            table.append(ParamSpec(f"{pre}{name}.weight", path, (dim,), False))
    table.append(ParamSpec("model.norm.weight", ("norm", "weight"), (d,), False))
    if not c.tie_word_embeddings:
        table.append(ParamSpec("lm_head.weight", ("lm_head", "kernel"), (d, c.vocab_size), True))
    return table


# ------------------------------------------------------------------------- safetensors I/O
@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry: file, name, dtype code and shape."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]


def _open(file: Path):
    """``safetensors.safe_open`` (numpy framework: bfloat16 comes back as ``ml_dtypes``) with
    its errors turned into a :class:`CheckpointError` naming the file and what to do."""
    from safetensors import SafetensorError, safe_open

    hint = "the file is corrupt or truncated (re-download or re-save the checkpoint)"
    size = file.stat().st_size
    if size < 8:
        raise CheckpointError(f"{file}: only {size} bytes, no safetensors header; {hint}")
    try:
        return safe_open(str(file), framework="numpy")
    except SafetensorError as e:
        if "not fully covered" in str(e) or "incomplete" in str(e):
            raise CheckpointError(f"{file}: truncated ({e}); {hint}") from None
        raise CheckpointError(f"{file}: unreadable safetensors header ({e}); {hint}") from None


def read_safetensors_header(file: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor's dtype code and shape in one ``.safetensors`` file (header only); raises
    :class:`CheckpointError` naming the file if it is corrupt or truncated."""
    file = Path(file)
    out = {}
    with _open(file) as f:
        for name in f.keys():
            sl = f.get_slice(name)
            out[name] = TensorInfo(file, name, sl.get_dtype(), tuple(sl.get_shape()))
    return out


def read_tensor(info: TensorInfo) -> np.ndarray:
    """One tensor as a numpy array (bfloat16 via ``ml_dtypes``), copied out of the memory map:
    host memory holds this tensor only."""
    with _open(info.file) as f:
        return f.get_tensor(info.name)


def write_safetensors(file: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:  # fmt: skip
    """``safetensors.numpy.save_file`` with HF's ``{"format": "pt"}`` metadata: the arrays of
    one file are in host memory while it is written (:func:`save_pretrained` passes one shard,
    at most ``max_shard_bytes``)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(file),
              metadata=metadata or {"format": "pt"})  # fmt: skip
    atomic.umask_mode(file)  # safetensors >= 0.8 writes 0o600


# ------------------------------------------------------------------------------- sharding
def param_sharding(name_path: tuple[str | int, ...], shape: tuple[int, ...], mesh):
    """Default placement of one parameter on ``mesh``: the logical rules of
    :mod:`sfjax.parallel` (q/k/v/gate/up kernels ``[in, out]`` as (fsdp, tp), o/down as
    (tp, fsdp), embedding (tp, fsdp), LM head (fsdp, tp), norms replicated; a dimension a mesh
    axis does not divide is not split over it).
    """
    from sfjax import parallel

    return parallel.param_sharding(name_path, shape, mesh)


# --------------------------------------------------------------------------------- loading
HUB_WEIGHT_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")
HUB_TOKENIZER_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja")


def resolve_checkpoint_dir(
    path_or_hub_id: str | os.PathLike, patterns: tuple[str, ...] = HUB_WEIGHT_PATTERNS
) -> Path:
    """A local directory for a path or a hub id (downloading only ``patterns`` when online)."""
    path = Path(os.path.expanduser(os.fspath(path_or_hub_id)))
    if path.exists():
        if not path.is_dir():
            raise CheckpointUnavailable(
                f"{path} is a file; pass the checkpoint directory holding config.json"
            )
        return path
    repo_id = os.fspath(path_or_hub_id)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise CheckpointUnavailable(
            f"checkpoint directory {repo_id!r} does not exist (and it is not a Hugging Face hub id "
            "like 'Qwen/Qwen3-4B')"
        )
    download_hint = (
        f"download it where there is internet (`huggingface-cli download {repo_id} --local-dir "
        f"/path/to/{repo_id.split('/')[-1]}`) and pass the local directory instead "
        f"(--model.checkpoint /path/to/{repo_id.split('/')[-1]} in the experiments, "
        f"qwen3.from_pretrained('/path/to/{repo_id.split('/')[-1]}') in Python)"
    )
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id,
            allow_patterns=list(patterns),
            local_files_only=offline,
        )
    except Exception as e:  # noqa: BLE001 - hub errors are many; all mean "not available here"
        why = (
            "the Hugging Face Hub is offline (HF_HUB_OFFLINE=1)"
            if offline
            else f"{type(e).__name__}: {e}"
        )
        raise CheckpointUnavailable(
            f"could not get {repo_id!r} from the Hugging Face Hub: {why}, and it is not in the "
            f"local cache. {download_hint}"
        ) from e
    return Path(local)


def checkpoint_index(ckpt_dir: Path) -> dict[str, TensorInfo]:
    """All tensors of a single-file or sharded checkpoint, by name (headers only)."""
    index_file = ckpt_dir / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_file}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    elif (ckpt_dir / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        found = sorted(p.name for p in ckpt_dir.glob("*.safetensors"))
        raise CheckpointUnavailable(
            f"{ckpt_dir}: no model.safetensors or model.safetensors.index.json"
            + (f" (found {found})" if found else "")
            + "; sfjax reads safetensors checkpoints only (convert .bin files with transformers)"
        )
    tensors: dict[str, TensorInfo] = {}
    for fname in files:
        file = ckpt_dir / fname
        if not file.is_file():
            raise CheckpointUnavailable(f"{file}: shard listed in the index is missing")
        for name, info in read_safetensors_header(file).items():
            if weight_map is not None and weight_map.get(name) != fname:
                continue
            tensors[name] = info
    if weight_map is not None:
        lost = sorted(set(weight_map) - set(tensors))
        if lost:
            raise CheckpointError(
                f"{index_file}: tensors listed but absent from their shard: {lost[:10]}"
            )
    return tensors


BASE_MODEL_PREFIX = "model."
"""Prefix of the decoder's tensors in a ``Qwen3ForCausalLM`` checkpoint (transformers'
``base_model_prefix``); a ``Qwen3Model`` checkpoint stores the same tensors without it."""


def add_base_model_prefix(
    tensors: dict[str, TensorInfo], table: list[ParamSpec], ckpt_dir: Path, tied: bool
) -> dict[str, TensorInfo]:
    """Read a base ``Qwen3Model`` checkpoint as transformers does: a tensor whose name lacks the
    ``model.`` prefix (``layers.0.self_attn.q_proj.weight``) is taken as the prefixed one when
    that is a model tensor (transformers 5.25 ``core_model_loading``, key by key).

    Such a checkpoint has no ``lm_head.weight``. With tied embeddings transformers ties the head
    to ``embed_tokens`` and so does sfjax; untied, transformers initialises the head randomly
    (a warning in its load report) and this raises :class:`CheckpointError` instead.
    """
    expected = {s.hf_name for s in table}
    out, renamed = {}, False
    for name, info in tensors.items():
        prefixed = BASE_MODEL_PREFIX + name
        if name not in expected and prefixed in expected and prefixed not in tensors:
            out[prefixed], renamed = info, True
        else:
            out[name] = info
    if renamed and not tied and "lm_head.weight" not in out:
        index = ckpt_dir / "model.safetensors.index.json"
        where = index if index.is_file() else ckpt_dir / "model.safetensors"
        raise CheckpointError(
            f"{where}: a base Qwen3Model checkpoint (tensor names without the 'model.' prefix) "
            "without lm_head.weight, while config.json has tie_word_embeddings=false: there is no "
            "language-model head to load (transformers' Qwen3ForCausalLM would initialise it with "
            "random weights). Pass the Qwen3ForCausalLM checkpoint that has lm_head.weight, or "
            "set tie_word_embeddings to true in config.json if the head is the embedding table"
        )
    return out


def validate_checkpoint(table: list[ParamSpec], tensors: dict[str, TensorInfo], tied: bool) -> None:
    """Raise :class:`CheckpointError` listing every mismatch between checkpoint and model."""
    expected = {s.hf_name for s in table}
    have = set(tensors)
    if tied:
        have.discard("lm_head.weight")  # some tied checkpoints store the copy; HF ignores it too
    missing, unexpected = sorted(expected - have), sorted(have - expected)
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected}")
    for spec in table:
        info = tensors.get(spec.hf_name)
        if info is None:
            continue
        if info.dtype not in FLOAT_CODES:
            problems.append(f"{spec.hf_name}: dtype {info.dtype}, expected a float dtype")
        if info.shape != spec.hf_shape:
            problems.append(
                f"{spec.hf_name}: shape {list(info.shape)} in {info.file.name}, expected "
                f"{list(spec.hf_shape)} from config.json"
            )
    if problems:
        raise CheckpointError(
            "checkpoint does not match its config.json:\n  " + "\n  ".join(problems)
        )


def abstract_model(config: Qwen3Config, dtype=jnp.bfloat16, *, scan_layers: bool | None = None
                   ) -> Qwen3:  # fmt: skip
    """A Qwen3 whose params are ``ShapeDtypeStruct`` placeholders (no memory); ``scan_layers``
    (default: the config's) stacks the layers."""
    from sfjax.models.qwen3 import Qwen3

    if scan_layers is not None:
        config = dataclasses.replace(config, scan_layers=scan_layers)
    return nnx.eval_shape(lambda: Qwen3(config, dtype=dtype, rngs=nnx.Rngs(0)))


def from_pretrained(
    path_or_hub_id: str | os.PathLike,
    dtype=jnp.bfloat16,
    mesh=None,
    *,
    sharding_rule: Callable[..., Any] | None = None,
    scan_layers: bool = False,
) -> Qwen3:
    """Load an HF Qwen3 checkpoint (single-file or sharded safetensors) into a :class:`Qwen3`.

    A ``Qwen3ForCausalLM`` checkpoint, or a base ``Qwen3Model`` one (tensor names without the
    ``model.`` prefix) whose head is tied to the embedding, as transformers loads them
    (:func:`add_base_model_prefix`).

    Args:
      path_or_hub_id: checkpoint directory, or a hub id such as ``"Qwen/Qwen3-4B"`` (downloaded
        through ``huggingface_hub``; offline it must already be in the local cache).
      dtype: parameter / compute dtype (bf16 for real runs; norms, RoPE, softmax stay float32).
      mesh: optional ``jax.sharding.Mesh`` (default: ``sfjax.parallel``'s default mesh, if one
        was set); each tensor is placed with ``sharding_rule(path, shape, mesh)`` (default
        :func:`param_sharding`), straight from host memory to its shards.
      scan_layers: build the model with stacked layers (:attr:`Qwen3Config.scan_layers`); each
        checkpoint tensor is written into its layer's slice of the stack on the devices.

    Raises (before reading any tensor data): ``FileNotFoundError`` for a missing directory,
    config or shard, or a hub id that is unavailable offline; ``ValueError`` for an unsupported
    ``config.json``; :class:`CheckpointError` for missing / unexpected tensors (an untied base
    ``Qwen3Model`` checkpoint has no head), shape or dtype mismatches and corrupt or truncated
    files (each naming the tensor or file).
    """
    from sfjax.models.qwen3 import Qwen3Config

    ckpt_dir = resolve_checkpoint_dir(path_or_hub_id)
    config = Qwen3Config.from_hf(ckpt_dir)
    table = hf_param_table(config)
    tensors = checkpoint_index(ckpt_dir)
    tensors = add_base_model_prefix(tensors, table, ckpt_dir, config.tie_word_embeddings)
    validate_checkpoint(table, tensors, config.tie_word_embeddings)

    model = abstract_model(config, dtype, scan_layers=scan_layers)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    table_paths = {state_path(s.path, scan_layers)[0] for s in table}
    if set(flat) != table_paths:  # the table and the module must agree exactly
        raise AssertionError(f"name table out of sync with Qwen3: {set(flat) ^ table_paths}")
    from sfjax.parallel import resolve_mesh

    mesh = resolve_mesh(mesh)  # `python -m sfjax.parallel` sets a default mesh
    rule = sharding_rule or param_sharding
    target = np.dtype(jnp.dtype(dtype))
    stacks = {}  # stacked parameter path -> its [L, ...] array, filled layer by layer
    for spec in table:
        arr = read_tensor(tensors[spec.hf_name])
        arr = arr.T if spec.transpose else arr
        arr = np.ascontiguousarray(arr.astype(target, copy=False))
        place = (lambda a, sh: jax.device_put(a)) if mesh is None else _put
        path, layer = state_path(spec.path, scan_layers)
        if layer is None:
            flat[path].set_value(place(arr, rule(spec.path, spec.shape, mesh) if mesh else None))
        else:
            stack_shape = tuple(flat[path].get_value().shape)
            if path not in stacks:
                sharding = rule(path, stack_shape, mesh) if mesh is not None else None
                stacks[path] = _zeros(stack_shape, target, sharding)
            value = place(arr, rule(spec.path, spec.shape, mesh) if mesh else None)
            stacks[path] = _set_layer(stacks[path], value, np.int32(layer))
            if layer == config.num_layers - 1:
                flat[path].set_value(stacks.pop(path))
        del arr
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _put(arr, sharding):
    from sfjax.parallel import put  # each process transfers only its own shards (multi-host)

    return put(arr, sharding)


def _zeros(shape, dtype, sharding):
    """A zero ``[L, ...]`` stack created directly on its devices (never whole on the host)."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack_L, value, layer):
    """``stack[layer] = value`` in place (the stack is donated); one compile per shape."""
    return jax.lax.dynamic_update_index_in_dim(stack_L, value.astype(stack_L.dtype), layer, 0)


@jax.jit
def _get_layer(stack_L, layer):
    return jax.lax.dynamic_index_in_dim(stack_L, layer, 0, keepdims=False)


def state_path(path: tuple, scan_layers: bool) -> tuple[tuple, int | None]:
    """A name-table path ``("layers", i, ...)`` -> ``(state path, layer)``: with stacked layers
    ``(("layers", ...), i)``, else ``(path, None)``."""
    if scan_layers and path[0] == "layers":
        return ("layers", *path[2:]), int(path[1])
    return tuple(path), None


# ---------------------------------------------------------------------------------- saving
def save_pretrained(
    model: Qwen3,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer=None,
) -> Path:
    """Write ``model`` in HF layout: ``config.json`` + safetensors (sharded above 5 GB).

    Tensors are fetched from device and converted one at a time; a file's tensors are held on
    the host while it is written (``max_shard_bytes``, the ``safetensors`` writer). ``dtype`` (``"bfloat16"``,
    ``"float32"``, ``"float16"``) defaults to the model's parameter dtype. A ``tokenizer`` (HF)
    is saved alongside when given. ``transformers.Qwen3ForCausalLM.from_pretrained`` loads it.
    Multi-host: every process must call it (shards living on other processes are gathered);
    only process 0 writes.
    """
    config = model.config
    out = Path(out_dir)
    writer = jax.process_index() == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or jnp.dtype(model.dtype).name
    np_dtype = np.dtype(jnp.dtype(dtype))
    if np_dtype.name not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"save dtype must be bfloat16, float32 or float16, got {dtype!r}")
    table = hf_param_table(config)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    stacked = config.scan_layers
    where = {spec.hf_name: state_path(spec.path, stacked) for spec in table}
    wrapped = sorted(
        spec.hf_name.removesuffix(".weight")
        for spec in table
        if where[spec.hf_name][0] not in flat
        and (*where[spec.hf_name][0][:-1], "base", spec.path[-1]) in flat
    )
    if wrapped:
        raise ValueError(
            f"the model has LoRA adapters on {len(wrapped)} projections (e.g. {wrapped[0]}); "
            "save_pretrained writes plain Qwen3 weights: merge them first with "
            "sfjax.models.lora.merge_lora(model), or save only the adapter with "
            "sfjax.models.lora.save_adapter"
        )
    for spec in table:
        if where[spec.hf_name][0] not in flat:
            raise CheckpointError(f"model has no parameter {spec.path} for {spec.hf_name}")

    def get(spec: ParamSpec) -> np.ndarray:
        path, layer = where[spec.hf_name]
        value = flat[path].get_value()
        if layer is not None:  # one layer of a stack: sliced on its devices
            value = _get_layer(value, np.int32(layer))
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            from jax.experimental import multihost_utils  # all processes take part

            value = multihost_utils.process_allgather(value, tiled=True)
        arr = np.asarray(jax.device_get(value)).astype(np_dtype)
        return arr.T if spec.transpose else arr

    shards: list[list[ParamSpec]] = [[]]
    size = 0
    for spec in table:
        nbytes = int(np.prod(spec.shape)) * np_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    if not writer:  # take part in the gathers, write nothing
        for spec in table:
            get(spec)
        return out
    for stale in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        write_safetensors(out / fname, {s.hf_name: get(s) for s in shard})
        weight_map.update({s.hf_name: fname for s in shard})
    if n > 1:
        total = sum(int(np.prod(s.shape)) * np_dtype.itemsize for s in table)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config.to_hf(np_dtype.name), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
