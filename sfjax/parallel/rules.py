"""Logical sharding rules: which mesh axes every parameter, LoRA parameter, KV-cache field and
activation is split over, with fall-back to replication where an axis does not divide a dim."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sfjax.parallel.mesh import BATCH_AXES

log = logging.getLogger(__name__)
_REPORTED: set[tuple] = set()  # divisibility fall-backs already logged

Rules = Mapping[str, tuple[str, ...]]

DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "vocab": ("tp",),
    "embed": ("fsdp",),
    "heads": ("tp",),
    "mlp": ("tp",),
    "kv_heads": ("tp",),
}
"""Logical axis -> mesh axes. Logical axes not listed (``layers``, ``cache_seq``, ``head_dim``,
``lora_rank``, ``norm``, ``seq``) are replicated."""

PARAM_AXES: dict[tuple[str, str], tuple[str | None, ...]] = {
    # D not over fsdp: a gather from a D-sharded table cannot hand a batch-sharded result to
    # the residual stream without replicating it (XLA SPMD "involuntary rematerialization").
    ("embed_tokens", "embedding"): ("vocab", None),
    ("q_proj", "kernel"): ("embed", "heads"),
    ("k_proj", "kernel"): ("embed", "heads"),
    ("v_proj", "kernel"): ("embed", "heads"),
    ("o_proj", "kernel"): ("heads", "embed"),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
}
"""(module attribute, variable) -> logical axes, for every parameter of
:class:`sfjax.models.qwen3.Qwen3` with more than one dimension."""

KV_CACHE_AXES: dict[str, tuple[str | None, ...]] = {
    "k": ("batch", "kv_heads", "cache_seq", "head_dim"),  # each layer's (a stack: "layers" first)
    "v": ("batch", "kv_heads", "cache_seq", "head_dim"),
    "slot_mask": ("batch", "cache_seq"),
    "positions": ("batch",),
    "index": (),
}
"""Logical axes of each field of :class:`sfjax.models.qwen3.KVCache`."""

_LORA_VARS = {"lora_a": 0, "lora_b": 1}  # which axis of the base kernel the adapter keeps
_WRAPPER_NAMES = {"base"}  # LoRALinear keeps the wrapped Linear as `.base`


# ---------------------------------------------------------------------------------- rules
def logical_to_spec(
    logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules | None = None
) -> PartitionSpec:
    """The ``PartitionSpec`` of a tensor of ``shape`` with ``logical`` axis names on ``mesh``.

    Each logical axis maps to mesh axes through ``rules``; a mesh axis is used only if the mesh
    has it, no earlier dimension uses it, and its size (times the axes already chosen for this
    dimension) divides the dimension -- otherwise that dimension falls back to fewer axes, down
    to replication. The spec has one entry per dimension (``None`` = replicated).
    """
    rules = DEFAULT_RULES if rules is None else rules
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    sizes = dict(mesh.shape)
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for name, n in zip(logical, shape):
        chosen: list[str] = []
        ways = 1
        for axis in rules.get(name, ()) if name is not None else ():
            if axis not in sizes or axis in used:
                continue
            s = sizes[axis]
            if n % (ways * s):
                if (name, n, axis, s) not in _REPORTED:  # once per case, not per call
                    _REPORTED.add((name, n, axis, s))
                    log.info("dim %s=%d not divisible by mesh axis %s=%d: not split over it",
                             name, n, axis, s)  # fmt: skip
                continue
            chosen.append(axis)
            ways *= s
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*out)


def param_logical_axes(path: Sequence[str | int], shape: Sequence[int]) -> tuple[str | None, ...]:
    """Logical axes of one model variable from its state path (see :data:`PARAM_AXES`).

    ``path`` is an ``nnx`` state path such as ``("layers", 0, "self_attn", "q_proj", "kernel")``
    or, under LoRA, ``(..., "q_proj", "base", "kernel")`` / ``(..., "q_proj", "lora_a")``. A
    stacked layer's variable (``("layers", "self_attn", ...)``, ``scan_layers``) gets a leading
    ``layers`` axis (replicated by :data:`DEFAULT_RULES`; pipeline stages could split it).
    Scalars and vectors (norm weights, RNG keys and counters) are replicated. An unknown
    multi-dimensional parameter raises: add it to :data:`PARAM_AXES`.
    """
    j = _stacked_at(path)
    if j is not None:  # scan_layers: a leading layers axis, then the layer's own axes
        return ("layers", *param_logical_axes((*path[: j + 1], 0, *path[j + 1 :]), shape[1:]))
    names = [p for p in path if isinstance(p, str)]
    var = names[-1] if names else ""
    modules = [n for n in names[:-1] if n not in _WRAPPER_NAMES]
    module = modules[-1] if modules else ""
    if len(shape) <= 1:
        return (None,) * len(shape)
    if var in _LORA_VARS:
        base = PARAM_AXES.get((module, "kernel"))
        if base is None:
            raise ValueError(f"LoRA adapter on unknown module {module!r} at {tuple(path)}")
        keep = base[_LORA_VARS[var]]
        return (keep, "lora_rank") if var == "lora_a" else ("lora_rank", keep)
    axes = PARAM_AXES.get((module, var))
    if axes is None or len(axes) != len(shape):
        raise ValueError(
            f"no sharding rule for parameter {'.'.join(map(str, path))} of shape {tuple(shape)}; "
            "add its (module, variable) logical axes to sfjax.parallel.PARAM_AXES"
        )
    return axes


def _stacked_at(path: Sequence[str | int]) -> int | None:
    """Where ``"layers"`` sits in ``path`` if it names a stacked decoder-layer variable
    (``Qwen3Config.scan_layers``: ``("layers", "self_attn", ...)`` rather than
    ``("layers", 3, "self_attn", ...)``); optimizer moments prefix the parameter path."""
    for i, p in enumerate(path[:-1]):
        if p == "layers":
            return None if isinstance(path[i + 1], int) else i
    return None


def param_spec(path, shape, mesh: Mesh, rules: Rules | None = None) -> PartitionSpec:
    """``PartitionSpec`` of one parameter (logical axes of :func:`param_logical_axes`)."""
    return logical_to_spec(param_logical_axes(path, shape), shape, mesh, rules)


def param_sharding(path, shape, mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
    """``NamedSharding`` of one parameter; the rule ``from_pretrained(..., mesh=)`` places with."""
    return NamedSharding(mesh, param_spec(path, shape, mesh, rules))


def _path_names(key_path) -> tuple[str | int, ...]:
    """A ``tree_util`` key path -> plain tuple (``nnx`` Variables add a trailing ``.value``)."""
    out: list[str | int] = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name not in ("value", "raw_value"):
                out.append(k.name)
        else:
            out.append(str(k))
    return tuple(out)


def state_shardings(state, mesh: Mesh, rules: Rules | None = None):
    """A pytree like ``state`` (an ``nnx.State``, or any pytree of model variables) holding
    the ``NamedSharding`` of every leaf; usable as ``in_shardings`` / ``out_shardings``.

    Works on optimizer states too: optax moments mirror the parameter paths (the parameter path
    is a suffix of the moment's path), and scalars such as step counts are replicated.
    """

    def one(key_path, leaf):
        shape = np.shape(leaf)
        return param_sharding(_path_names(key_path), shape, mesh, rules)

    return jax.tree_util.tree_map_with_path(one, state)


def cache_shardings(cache, mesh: Mesh, rules: Rules | None = None):
    """A :class:`~sfjax.models.qwen3.KVCache` whose fields are their ``NamedSharding`` (``k`` /
    ``v``: one per layer, or one for a stacked ``[L, ...]`` cache, its layers axis unsharded)."""

    def field(name, axes):
        def one(leaf):
            shape = np.shape(leaf)
            logical = ("layers",) * (len(shape) - len(axes)) + axes  # a stacked cache's L
            return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules))

        return jax.tree.map(one, getattr(cache, name))

    return cache.replace(**{name: field(name, axes) for name, axes in KV_CACHE_AXES.items()})


def batch_sharding(mesh: Mesh, shape: Sequence[int], batch_dim: int = 0,
                   rules: Rules | None = None) -> NamedSharding:  # fmt: skip
    """Sharding of an activation / input array: dimension ``batch_dim`` over ``(data, fsdp)``."""
    logical = [None] * len(shape)
    logical[batch_dim] = "batch"
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated placement on ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def constrain(x, mesh: Mesh, logical: Sequence[str | None], rules: Rules | None = None):
    """``with_sharding_constraint`` of an activation by its logical axes (inside ``jit``)."""
    spec = logical_to_spec(logical, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def constrain_batch(tree, mesh: Mesh, batch_dim: int = 0, rules: Rules | None = None):
    """Constrain every array of ``tree`` to be split over the batch axes along ``batch_dim``."""

    def one(x):
        if np.ndim(x) <= batch_dim:
            return x
        return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.shape, batch_dim, rules))

    return jax.tree.map(one, tree)
