"""LoRA adapters on Qwen3 projections: apply, switch off, merge, PEFT export / import.

The Actor is fine-tuned with KTO on LoRA weights only (paper §IV-C); the KTO reference policy
is the same base model with the adapters switched off, so no second copy of the base weights
exists. A wrapped projection computes (Hu et al. 2021, PEFT ``lora.Linear``)::

    y = x @ W + s · dropout(x) @ A @ B,   s = alpha / r   (alpha / sqrt(r) with rsLoRA)

with ``W`` the frozen base kernel ``[in, out]`` (:class:`sfjax.models.qwen3.Linear`),
``A`` ``[in, r]`` drawn like PEFT (``kaiming_uniform_(a=sqrt(5))``, i.e. U(±1/sqrt(in))) and
``B`` ``[r, out]`` zero, so a fresh adapter leaves the model unchanged. ``A`` and ``B`` are
:class:`flax.nnx.LoRAParam` variables: ``nnx.state(model, nnx.LoRAParam)`` is exactly the
trainable set.

PEFT layout: ``adapter_model.safetensors`` holds, per wrapped module,
``base_model.model.<hf module name>.lora_A.weight`` ``[r, in]`` (= ``A.T``) and
``...lora_B.weight`` ``[out, r]`` (= ``B.T``), one pair per layer also when the model stacks
its layers (``scan_layers``: ``A`` ``[L, in, r]``, ``B`` ``[L, r, out]``, exported and imported
slice by slice under the per-layer names); ``adapter_config.json`` holds ``r``,
``lora_alpha``, ``target_modules`` etc. ``peft.PeftModel.from_pretrained`` loads it on top of
``transformers.Qwen3ForCausalLM``.

Shape legend: ``I`` input features, ``O`` output features, ``R`` LoRA rank, ``N`` rows (the
leading batch / time axes flattened).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfjax import atomic
from sfjax.models.matmul import low_rank_product
from sfjax.models.qwen3 import Linear
from sfjax.models.weights import FLOAT_CODES, TensorInfo, read_safetensors_header

DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)  # fmt: skip
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_UNSUPPORTED: tuple[str, ...] = (
    "exclude_modules", "lora_bias", "layer_replication", "trainable_token_indices",
    "target_parameters", "use_qalora", "alora_invocation_tokens", "use_bdlora", "arrow_config",
    "kasa_config", "velora_config", "monteclora_config",
)  # fmt: skip
"""``adapter_config.json`` fields (PEFT 0.21) that :func:`read_adapter_config` refuses when set:
sfjax computes plain LoRA on whole modules, and e.g. an aLoRA adapter
(``alora_invocation_tokens``) read as plain LoRA would give other outputs than PEFT's."""


PARAM_DTYPES = ("float32", "bfloat16", "float16")
"""The dtypes :attr:`LoRAConfig.param_dtype` takes."""


@dataclass(frozen=True)
class LoRAConfig:
    """Which projections get adapters and how they are shaped."""

    rank: int = 16
    """LoRA rank r."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with ``use_rslora``)."""
    dropout: float = 0.0
    """Dropout on the adapter input during training (PEFT ``lora_dropout``)."""
    target_modules: tuple[str, ...] | str = DEFAULT_TARGETS
    """Projections to wrap, matched as PEFT does against HF module names: names or dotted
    suffixes (any of q/k/v/o_proj, gate/up/down_proj, lm_head; ``self_attn.q_proj``;
    ``model.layers.0.mlp.up_proj``), or one regex the whole name must match."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (PEFT ``use_rslora``)."""
    param_dtype: str = "float32"
    """dtype of A and B (PEFT keeps adapters in float32 over a bf16 base)."""

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.alpha < float("inf"):
            raise ValueError(f"LoRA alpha must be a finite value > 0 (0 scales the update to 0), "
                             f"got {self.alpha}")  # fmt: skip
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(
                f"LoRA param_dtype must be one of {PARAM_DTYPES}, got {self.param_dtype!r}"
            )
        if not self.target_modules:
            raise ValueError("LoRAConfig.target_modules is empty: name at least one projection")
        if not isinstance(self.target_modules, str):  # a str is a regex over module names
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            known = DEFAULT_TARGETS + ("lm_head",)
            unknown = [t for t in self.target_modules if t.rsplit(".", 1)[-1] not in known]
            if unknown:
                raise ValueError(
                    f"LoRA target_modules {unknown}: a name or dotted suffix must end in one of "
                    f"{known} (or pass one regex string)"
                )

    @property
    def scaling(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoRALinear(nnx.Module):
    """A :class:`Linear` plus a low-rank update; ``enabled=False`` gives exactly the base output."""

    def __init__(self, base: Linear, config: LoRAConfig, *, rngs: nnx.Rngs):
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = config.rank
        self.scaling = config.scaling
        self.enabled = True
        dtype = jnp.dtype(config.param_dtype)
        # A stacked base (Qwen3Config.scan_layers, kernel [L, in, out]) gets stacked adapters.
        lead = tuple(base.kernel[...].shape[:-2])
        self.num_layers = lead[0] if lead else None
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
        a_IR = jax.random.uniform(rngs.params(), (*lead, self.in_features, config.rank), dtype,
                                  -bound, bound)  # fmt: skip
        self.lora_a = nnx.LoRAParam(a_IR)
        self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, config.rank, self.out_features), dtype))
        # Off unless the module is in train mode (``model.train()``; the KTO step does that).
        self.dropout = (
            nnx.Dropout(config.dropout, deterministic=True, rngs=rngs.fork())
            if config.dropout > 0
            else None
        )

    def delta(self, x_I):
        """The adapter's contribution ``s · dropout(x) @ A @ B`` in the adapter dtype."""
        a_IR, b_RO = self.lora_a[...], self.lora_b[...]
        # Flatten leading axes: the weight gradients are then plain 2-D matmuls (a dot_general
        # contracting over several batch axes is far slower on XLA:CPU).
        h_NI = x_I.reshape(-1, x_I.shape[-1]).astype(a_IR.dtype)
        if self.dropout is not None:
            h_NI = self.dropout(h_NI)
        out_NO = low_rank_product(h_NI, a_IR, b_RO) * self.scaling
        return out_NO.reshape(*x_I.shape[:-1], b_RO.shape[-1])

    def __call__(self, x_I):
        y_O = self.base(x_I)
        if not self.enabled:
            return y_O
        return y_O + self.delta(x_I).astype(y_O.dtype)


# ------------------------------------------------------------------------------ naming
def _hf_module_name(path: tuple) -> str:
    """sfjax module path (``('layers', 0, 'self_attn', 'q_proj')``) -> HF dotted module name."""
    name = ".".join(str(p) for p in path)
    return name if name == "lm_head" else "model." + name


def lora_modules(model: nnx.Module) -> Iterator[tuple[str, LoRALinear]]:
    """``(hf_module_name, LoRALinear)`` for every adapter in ``model``, in graph order (a stacked
    adapter, ``scan_layers``, once, named ``model.layers.<rest>``)."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, LoRALinear):
            yield _hf_module_name(path), module


def _per_layer(model: nnx.Module) -> Iterator[tuple[str, LoRALinear, int | None]]:
    """``(hf_module_name, module, layer)`` per PEFT tensor pair: a stacked adapter once per
    layer with its HF name ``model.layers.<i>.<rest>`` (``layer`` indexes the stack), a plain
    one with ``layer=None``."""
    for name, module in lora_modules(model):
        if module.num_layers is None:
            yield name, module, None
        else:
            rest = name.removeprefix("model.layers.")
            for i in range(module.num_layers):
                yield f"model.layers.{i}.{rest}", module, i


def _peft_match(targets, name: str) -> bool:
    """PEFT's rule (``check_target_module_exists``): a str is a regex the whole HF module name
    must match; a list names modules exactly or by a dotted suffix (``q_proj``,
    ``self_attn.q_proj``, ``model.layers.0.self_attn.q_proj``)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _targets(model: nnx.Module, targets) -> list[tuple[nnx.Module, str, tuple]]:
    """(parent, attribute, path) for each plain :class:`Linear` that ``targets`` selects
    (:func:`_peft_match` on its HF module name)."""

    def wanted(path, attr):
        name = _hf_module_name(path + (attr,))
        if not name.startswith("model.layers.") or name.split(".")[2].isdigit():
            return _peft_match(targets, name)
        # stacked layers (scan_layers): one adapter serves every layer, so all or none
        rest = name.removeprefix("model.layers.")
        hits = {_peft_match(targets, f"model.layers.{i}.{rest}")
                for i in range(getattr(model.config, "num_layers", 1))}  # fmt: skip
        if len(hits) > 1:
            raise ValueError(f"target_modules {targets!r} selects some layers' {rest} only; "
                             "per-layer targets need a model with scan_layers=False")
        return hits.pop()

    found = []
    for path, module in list(nnx.iter_modules(model)):
        if isinstance(module, LoRALinear):
            continue
        for attr, child in list(vars(module).items()):
            if isinstance(child, Linear) and wanted(tuple(path), attr):
                found.append((module, attr, tuple(path) + (attr,)))
    return found


# ------------------------------------------------------------------------------ apply / switch
def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs | None = None):
    """Wrap the targeted projections of ``model`` in :class:`LoRALinear`, in place.

    Returns ``model`` (same object). Base kernels are shared, not copied. Raises if the model
    already has adapters, if no projection matches ``config.target_modules``, or if it names
    ``lm_head`` on a model whose head is the tied embedding (no such projection).
    """
    if any(True for _ in lora_modules(model)):
        raise ValueError("model already has LoRA adapters; merge_lora() or load into them instead")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    targets = config.target_modules
    if (not isinstance(targets, str) and "lm_head" in targets
            and getattr(model, "lm_head", False) is None):
        raise ValueError(
            "target_modules names lm_head, but this model ties its output head to the input "
            "embedding (tie_word_embeddings, e.g. Qwen3-4B) and has no lm_head projection to "
            "adapt; leave lm_head out of target_modules"
        )  # fmt: skip
    found = _targets(model, targets)
    if not found:
        raise ValueError(
            f"no Linear projection matches target_modules={config.target_modules}; "
            f"valid names are {DEFAULT_TARGETS + ('lm_head',)}"
        )
    for parent, attr, _ in found:
        setattr(parent, attr, LoRALinear(getattr(parent, attr), config, rngs=rngs))
    return model


def set_adapters_enabled(model: nnx.Module, enabled: bool) -> None:
    """Switch every adapter of ``model`` on or off (off = the base model, bit for bit)."""
    for _, module in lora_modules(model):
        module.enabled = bool(enabled)


@contextlib.contextmanager
def adapters_disabled(model: nnx.Module):
    """``with adapters_disabled(model): ref_logits = model(ids)`` -- the KTO reference policy.

    Works eagerly and while tracing (the switch is a static Python attribute, so a jitted
    function that uses it traces both branches).
    """
    previous = [(m, m.enabled) for _, m in lora_modules(model)]
    try:
        set_adapters_enabled(model, False)
        yield model
    finally:
        for module, enabled in previous:
            module.enabled = enabled


def lora_state(model: nnx.Module) -> nnx.State:
    """The trainable adapter parameters (``nnx.LoRAParam``) of ``model``."""
    return nnx.state(model, nnx.LoRAParam)


# ------------------------------------------------------------------------------ merge
def merge_lora(model: nnx.Module):
    """Fold every adapter into its base kernel (``W += s·A@B``) and unwrap it, in place.

    Returns ``model``, now a plain model whose forward equals the adapted forward (up to the
    rounding of the kernel dtype). Dropout is not part of the merged function (eval mode).
    """
    for _path, module in list(nnx.iter_modules(model)):
        for attr, child in list(vars(module).items()):
            if isinstance(child, LoRALinear):
                kernel = child.base.kernel[...]
                update_IO = (child.lora_a[...] @ child.lora_b[...]) * child.scaling
                merged = kernel.astype(jnp.float32) + update_IO.astype(jnp.float32)
                child.base.kernel[...] = merged.astype(kernel.dtype)
                setattr(module, attr, child.base)
    return model


# ------------------------------------------------------------------------------ PEFT export
def save_adapter(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    config: LoRAConfig,
    *,
    base_model_name_or_path: str | os.PathLike | None = None,
) -> Path:
    """Write a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``peft.PeftModel.from_pretrained(transformers_model, out_dir)`` loads it. ``config`` must
    be the one the adapters were built with (its rank / scaling are checked against them).
    ``base_model_name_or_path`` (the base checkpoint's path or hub id) is what
    ``peft.AutoPeftModelForCausalLM.from_pretrained(out_dir)`` loads the base model from; with
    None it can only be loaded onto a base model given by hand.
    """
    from safetensors.numpy import save_file

    modules = list(_per_layer(model))
    if not modules:
        raise ValueError("model has no LoRA adapters to save; call apply_lora() first")
    tensors = {}
    for name, module, layer in modules:
        if module.rank != config.rank or not math.isclose(module.scaling, config.scaling):
            raise ValueError(
                f"{name}: adapter rank/scaling ({module.rank}, {module.scaling}) do not match "
                f"the LoRAConfig ({config.rank}, {config.scaling})"
            )
        for w in (module.lora_a[...], module.lora_b[...]):
            if isinstance(w, jax.Array) and not w.is_fully_addressable:
                raise ValueError(
                    f"{name}: this adapter is sharded over devices of other processes; gather "
                    "it first on every process (nnx.update(model, sfjax.parallel.to_host("
                    "lora_state(model)))), then save from one process"
                )
        a_IR = np.asarray(jax.device_get(module.lora_a[...] if layer is None else module.lora_a[layer]))
        b_RO = np.asarray(jax.device_get(module.lora_b[...] if layer is None else module.lora_b[layer]))
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a_IR.T)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b_RO.T)
    if any(t.dtype.name == "bfloat16" for t in tensors.values()):
        from safetensors.flax import save_file as save_jax  # numpy has no bf16 dtype name

        save = lambda t, p, metadata: save_jax({k: jnp.asarray(v) for k, v in t.items()}, p, metadata)  # noqa: E731
    else:
        save = save_file
    targets = _saved_targets(model, [name for name, _, _ in modules])
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": (
            None if base_model_name_or_path is None else os.fspath(base_model_name_or_path)
        ),
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "use_rslora": config.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
    save(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    atomic.umask_mode(out / ADAPTER_WEIGHTS)  # safetensors >= 0.8 writes 0o600
    return out


def _saved_targets(model: nnx.Module, names: list[str]) -> list[str]:
    """``target_modules`` for ``adapter_config.json``: the projection names (``q_proj``) when
    they select exactly the adapted modules ``names`` (per-layer HF names), else ``names``
    itself (an adapter on some layers only); PEFT and :func:`load_adapter` match either."""
    short = sorted({name.rsplit(".", 1)[-1] for name in names})
    return short if not _targets(model, short) else sorted(names)


def read_adapter_config(adapter_dir: str | os.PathLike) -> LoRAConfig:
    """A :class:`LoRAConfig` from a PEFT ``adapter_config.json``; unsupported features raise."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {adapter_dir} a PEFT LoRA adapter directory?")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(cfg, dict) or "r" not in cfg:
        raise ValueError(f"{path}: no LoRA rank 'r'; is this a PEFT LoRA adapter_config.json?")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    unsupported = {
        "use_dora": bool(cfg.get("use_dora")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "layers_to_transform": cfg.get("layers_to_transform") is not None,
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "bias": cfg.get("bias", "none") != "none",
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
        # PEFT >= 0.14 fields that change which modules / tokens get the update or its form
        **{k: bool(cfg.get(k)) for k in PEFT_UNSUPPORTED},
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{path}: LoRA features not supported by sfjax: {bad}")
    targets = cfg.get("target_modules") or DEFAULT_TARGETS
    return LoRAConfig(
        rank=int(cfg["r"]),
        alpha=float(cfg.get("lora_alpha", 8)),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        use_rslora=bool(cfg.get("use_rslora", False)),
    )


def _adapter_header(adapter_dir: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor's dtype and shape in ``adapter_model.safetensors`` (header only); a missing
    file raises ``FileNotFoundError``, a corrupt or truncated one :class:`CheckpointError`."""
    file = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not file.is_file():
        others = sorted(p.name for p in Path(adapter_dir).glob("adapter_model*"))
        raise FileNotFoundError(
            f"{file} not found"
            + (f" (found {others}: sfjax reads safetensors only; re-save the adapter with "
               "PEFT's save_pretrained(safe_serialization=True))" if others else "")
        )  # fmt: skip
    return read_safetensors_header(file)


def _load_plan(model: nnx.Module, header: dict[str, TensorInfo], config: LoRAConfig, adapter_dir
               ) -> list[tuple[LoRALinear, int | None, str, str, str | None]]:  # fmt: skip
    """``(module, layer, key_a, key_b, key_base)`` for every adapter of ``model``, after checking
    the file against them (every adapter has float weights of its shape, no weights for
    others). ``key_base`` names PEFT's copy of the module's base weight ``[out, in]`` when the
    file has one (PEFT saves it when lm_head is a target), else None."""
    plan, expected = [], set()
    for name, module, layer in _per_layer(model):
        key_a = f"{PEFT_PREFIX}{name}.lora_A.weight"
        key_b = f"{PEFT_PREFIX}{name}.lora_B.weight"
        key_base = f"{PEFT_PREFIX}{name}.base_layer.weight"
        key_base = key_base if key_base in header else None
        expected |= {key_a, key_b} | ({key_base} if key_base else set())
        if key_a not in header or key_b not in header:
            raise ValueError(f"adapter in {adapter_dir} has no weights for {name}")
        shapes = (header[key_a].shape, header[key_b].shape)
        want = ((module.rank, module.in_features), (module.out_features, module.rank))
        if shapes != want:
            raise ValueError(
                f"{name}: adapter shapes {shapes[0]}, {shapes[1]} do not fit the model "
                f"(expected {want[0]}, {want[1]})"
            )
        if key_base and header[key_base].shape != (module.out_features, module.in_features):
            raise ValueError(
                f"{key_base}: shape {header[key_base].shape} does not fit the model "
                f"(expected {(module.out_features, module.in_features)})"
            )
        for key in (key_a, key_b) + ((key_base,) if key_base else ()):
            if header[key].dtype not in FLOAT_CODES:
                raise ValueError(f"{key}: dtype {header[key].dtype}, expected a float dtype")
        if not math.isclose(module.scaling, config.scaling):
            raise ValueError(f"{name}: model adapter scaling {module.scaling} != {config.scaling}")
        plan.append((module, layer, key_a, key_b, key_base))
    extra = sorted(set(header) - expected)
    if extra:
        raise ValueError(f"adapter in {adapter_dir} has weights for modules the model lacks: {extra[:4]}")
    return plan


def _remove_adapters(model: nnx.Module) -> None:
    """Unwrap every :class:`LoRALinear` back to its base :class:`Linear` (adapters dropped)."""
    for _path, module in list(nnx.iter_modules(model)):
        for attr, child in list(vars(module).items()):
            if isinstance(child, LoRALinear):
                setattr(module, attr, child.base)


def _set(var: nnx.Variable, layer: int | None, value_IO: np.ndarray) -> None:
    """``var = value`` (``var[layer]`` of a stacked variable), in its dtype and placement."""
    old = var[...]
    new = jnp.asarray(value_IO, old.dtype)
    new = new if layer is None else old.at[layer].set(new)
    var[...] = jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else new


def load_adapter(model: nnx.Module, adapter_dir: str | os.PathLike) -> LoRAConfig:
    """Load a PEFT LoRA adapter into ``model`` (applying adapters first if it has none).

    Every adapter of the model must be present in the file and vice versa; shapes are checked.
    All checks run before any weight is written: on an error (missing / corrupt file, unsupported
    feature, missing or mis-shaped weights) the model is left as it was, without the adapters
    this call applied. A base weight PEFT saved with the adapter (``lm_head.base_layer.weight``,
    written when lm_head is a target) replaces the model's, as in PEFT. Returns the adapter's
    :class:`LoRAConfig`.
    """
    from safetensors.numpy import load_file

    config = read_adapter_config(adapter_dir)
    header = _adapter_header(adapter_dir)
    fresh = not any(True for _ in lora_modules(model))
    if fresh:
        apply_lora(model, config)
    try:
        plan = _load_plan(model, header, config, adapter_dir)
    except Exception:
        if fresh:
            _remove_adapters(model)
        raise
    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    for module, layer, key_a, key_b, key_base in plan:
        a_RI, b_OR = tensors[key_a], tensors[key_b]
        _set(module.lora_a, layer, a_RI.T)
        _set(module.lora_b, layer, b_OR.T)
        if key_base is not None:  # PEFT loads its copy of the base weight over the model's
            _set(module.base.kernel, layer, tensors[key_base].T)
    return config


__all__ = [
    "DEFAULT_TARGETS",
    "LoRAConfig",
    "LoRALinear",
    "adapters_disabled",
    "apply_lora",
    "load_adapter",
    "lora_modules",
    "lora_state",
    "merge_lora",
    "read_adapter_config",
    "save_adapter",
    "set_adapters_enabled",
]
