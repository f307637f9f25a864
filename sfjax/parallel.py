"""Device meshes, logical sharding rules and multi-host start-up (TPU VMs, multi-GPU boxes).

Everything here is JAX's own SPMD runtime: a :class:`jax.sharding.Mesh` with three named axes,
:class:`~jax.sharding.NamedSharding` / :class:`~jax.sharding.PartitionSpec` placements computed
from a small table of *logical* axis names, ``jax.jit`` with explicit ``in_shardings`` /
``out_shardings`` at the edges (the sampler's decode program, the KTO train step), and
``jax.distributed.initialize`` for several processes. There is no communication code of our own:
XLA's GSPMD partitioner inserts the collectives.

Mesh axes (:class:`MeshConfig`):

* ``data`` -- pure data parallelism: the batch (prompts, rollouts, KTO micro-batch rows,
  parallel environments) is split over it; parameters are replicated along it.
* ``fsdp`` -- fully-sharded data parallelism: the batch is split over it *and* each weight's
  hidden (``embed``) dimension is sharded over it (gathered just in time by XLA).
* ``tp`` -- tensor (model) parallelism: attention heads, MLP width and vocabulary are split.

Logical axes of every tensor (:data:`PARAM_AXES`, :data:`DEFAULT_RULES`):

==========================  ========================  ===========================
tensor                      logical axes              mesh axes (default rules)
==========================  ========================  ===========================
embed_tokens.embedding VD   (vocab, -)                (tp, -)
q/k/v_proj.kernel [in,out]  (embed, heads)            (fsdp, tp)
gate/up_proj.kernel         (embed, mlp)              (fsdp, tp)
o_proj.kernel               (heads, embed)            (tp, fsdp)
down_proj.kernel            (mlp, embed)              (tp, fsdp)
lm_head.kernel DV           (embed, vocab)            (fsdp, tp)
norm weights, RNG state     replicated                replicated
LoRA A [in, r] / B [r, out] (base in, -) / (-, base out)  follow the base kernel
KV cache k/v LBSKH          (-, batch, -, kv_heads, -)    (-, (data, fsdp), -, tp, -)
cache slot_mask BS / pos B  (batch, -) / (batch,)     ((data, fsdp), -)
activations / token ids BT  (batch, ...)              ((data, fsdp), ...)
==========================  ========================  ===========================

A dimension that a mesh axis does not divide is not split over that axis (for a multi-axis
entry such as ``batch`` each axis is tried in turn), so any shape runs on any mesh: e.g. a
batch of 2 on ``data=2, fsdp=2`` is split over ``data`` only, and Qwen3's 8 KV heads on
``tp=16`` are replicated in the cache. Such fall-backs are logged at INFO level.

Multi-host: every process runs the same program (SPMD). :func:`initialize_distributed` starts
``jax.distributed`` when :class:`DistributedConfig` says so (auto-detecting TPU pods, SLURM and
Open MPI when no coordinator is given); :func:`put` places host data that every process holds
identically, :func:`host_local_to_global` assembles a global batch from per-process slices
(host-local data loading), :func:`to_host` fetches a possibly non-addressable array, and
:func:`is_main_process` / :func:`main_process_only` keep logs and file writes on process 0
(orbax coordinates multi-host checkpoint saves by itself).

Shape legend: L layers, B batch, S cache slots, K kv heads, H head dim, V vocab, D hidden,
T tokens.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

AXES: tuple[str, str, str] = ("data", "fsdp", "tp")
"""Mesh axis names, outermost first (``data`` spans hosts, ``tp`` stays inside one)."""
BATCH_AXES: tuple[str, str] = ("data", "fsdp")
"""Mesh axes the batch dimension is split over."""

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
    "k": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    "slot_mask": ("batch", "cache_seq"),
    "positions": ("batch",),
    "index": (),
}
"""Logical axes of each field of :class:`sfjax.models.qwen3.KVCache`."""

_LORA_VARS = {"lora_a": 0, "lora_b": 1}  # which axis of the base kernel the adapter keeps
_WRAPPER_NAMES = {"base"}  # LoRALinear keeps the wrapped Linear as `.base`


# --------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class MeshConfig:
    """Shape of the ``(data, fsdp, tp)`` device mesh."""

    data: int = -1
    """Data-parallel ways; -1 = every device not used by ``fsdp`` and ``tp``."""
    fsdp: int = 1
    """Fully-sharded data-parallel ways (batch split + weights' hidden dim sharded)."""
    tp: int = 1
    """Tensor-parallel ways (heads, MLP width, vocab); keep it within one host."""

    def __post_init__(self):
        for name in AXES:
            v = getattr(self, name)
            if v == 0 or v < -1:
                raise ValueError(f"MeshConfig.{name}={v}: use a positive size, or -1 for 'the rest'")
        if [self.data, self.fsdp, self.tp].count(-1) > 1:
            raise ValueError("MeshConfig: at most one of data/fsdp/tp may be -1 ('the rest')")

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Concrete ``(data, fsdp, tp)`` sizes for ``num_devices`` devices (product must match)."""
        sizes = [self.data, self.fsdp, self.tp]
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"mesh {self.data}x{self.fsdp}x{self.tp} (data x fsdp x tp): {num_devices} "
                    f"devices are not a multiple of {known}; choose sizes that divide the device "
                    "count"
                )
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            raise ValueError(
                f"mesh {sizes[0]}x{sizes[1]}x{sizes[2]} (data x fsdp x tp) needs "
                f"{int(np.prod(sizes))} devices but {num_devices} are available; set one size "
                "to -1 to use the rest"
            )
        return sizes[0], sizes[1], sizes[2]


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process start-up through ``jax.distributed.initialize``."""

    enabled: bool = False
    """Call ``jax.distributed.initialize`` (one process per host, or per GPU)."""
    coordinator_address: str | None = None
    """``host:port`` of process 0; None = auto-detect (TPU VM pod slice, SLURM, Open MPI)."""
    num_processes: int | None = None
    """Total processes; None = auto-detect."""
    process_id: int | None = None
    """This process's rank in ``[0, num_processes)``; None = auto-detect."""
    local_device_ids: tuple[int, ...] | None = None
    """Local accelerators this process drives (e.g. one GPU per process); None = all."""
    initialization_timeout: int = 300
    """Seconds to wait for all processes to join."""


@dataclass(frozen=True)
class ParallelConfig:
    """Everything about where a run executes: mesh shape and multi-host start-up."""

    mesh: MeshConfig = field(default_factory=MeshConfig)
    """Device mesh shape."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Multi-process start-up."""


# ---------------------------------------------------------------------------- start-up / mesh
def initialize_distributed(config: DistributedConfig) -> bool:
    """Start ``jax.distributed`` if ``config.enabled`` (call before any other JAX call).

    Returns whether this process is part of a multi-process run. Idempotent: a second call, or
    a call after another component initialised the runtime, does nothing.
    """
    if not config.enabled:
        return False
    if jax.distributed.is_initialized():
        return True
    given = [config.coordinator_address, config.num_processes, config.process_id]
    if any(v is not None for v in given) and any(v is None for v in given):
        raise ValueError(
            "DistributedConfig: set coordinator_address, num_processes and process_id together "
            "(or none of them, to auto-detect on TPU pods / SLURM / Open MPI)"
        )
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
        local_device_ids=list(config.local_device_ids) if config.local_device_ids else None,
        initialization_timeout=config.initialization_timeout,
    )
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )  # fmt: skip
    return True


def make_mesh(config: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp, tp)`` mesh over ``devices`` (default: all devices of all processes).

    Devices are laid out by ``mesh_utils.create_device_mesh`` (TPU-topology aware, process-major
    elsewhere), so ``tp`` groups neighbouring chips and ``data`` varies slowest, across hosts.
    Axes are ``AxisType.Auto``: GSPMD propagates shardings between the explicit ones.
    """
    from jax.experimental import mesh_utils

    config = config if config is not None else MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    shape = config.resolve(len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):  # exotic topologies
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def mesh_from_config(config: ParallelConfig) -> Mesh:
    """Initialise ``jax.distributed`` if asked, then build the mesh (the one-call start-up)."""
    initialize_distributed(config.distributed)
    return make_mesh(config.mesh)


_DEFAULT_MESH: Mesh | None = None


def set_default_mesh(mesh: Mesh | None) -> None:
    """Make ``mesh`` the one ``from_pretrained``, ``Sampler`` and ``KTOTrainer`` use when they
    are not given one (``None`` switches that off). Set by ``python -m sfjax.parallel``."""
    global _DEFAULT_MESH
    _DEFAULT_MESH = mesh


def default_mesh() -> Mesh | None:
    """The mesh set by :func:`set_default_mesh` (None: single-device behaviour)."""
    return _DEFAULT_MESH


def resolve_mesh(mesh: Mesh | None) -> Mesh | None:
    """``mesh`` if given, else :func:`default_mesh` -- what components call on their argument."""
    return mesh if mesh is not None else _DEFAULT_MESH


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
    or, under LoRA, ``(..., "q_proj", "base", "kernel")`` / ``(..., "q_proj", "lora_a")``.
    Scalars and vectors (norm weights, RNG keys and counters) are replicated. An unknown
    multi-dimensional parameter raises: add it to :data:`PARAM_AXES`.
    """
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
    """A :class:`~sfjax.models.qwen3.KVCache` whose fields are their ``NamedSharding``."""
    return cache.replace(**{
        name: NamedSharding(mesh, logical_to_spec(axes, np.shape(getattr(cache, name)), mesh, rules))
        for name, axes in KV_CACHE_AXES.items()
    })  # fmt: skip


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


# ------------------------------------------------------------------------------ activations
_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar(
    "sfjax_activation_mesh", default=None
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None):
    """While tracing inside this context, :func:`shard_activation` pins activations to ``mesh``.

    :func:`jit_sharded` and the sharded ``Sampler`` enter it around their calls, so the model's
    residual stream stays split over the batch axes: without the pin, GSPMD may prefer to gather
    the batch and keep ``fsdp``-sharded weights in place (a contraction over ``fsdp``), which
    is correct but is not FSDP and costs the full batch's activations on every device.
    """
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def shard_activation(x_BTD):
    """Constrain an activation's batch dimension 0 to ``(data, fsdp)`` and the rest to be
    replicated, when traced under :func:`activation_sharding`; identity otherwise."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return x_BTD
    return jax.lax.with_sharding_constraint(x_BTD, batch_sharding(mesh, x_BTD.shape))


# ------------------------------------------------------------------------------- sharded jit
@dataclass(frozen=True)
class Placement:
    """How one argument (or result) pytree of :func:`jit_sharded` is laid out on the mesh."""

    kind: str
    """``params`` (by rule), ``replicated``, ``batch`` (split along ``arg``), ``like``
    (the shardings of input ``arg``)."""
    arg: int = 0
    """The batch dimension (``batch``) or input position (``like``)."""


PARAMS = Placement("params")
"""A model-variable pytree (``nnx.State``, LoRA params, optimizer state), placed by rule."""
REPLICATED = Placement("replicated")
"""Small arrays every device needs whole (keys, scalars, lookup tables)."""


def batch_split(dim: int = 0) -> Placement:
    """Arrays whose dimension ``dim`` is the batch, split over ``(data, fsdp)``."""
    return Placement("batch", dim)


def like(argnum: int) -> Placement:
    """Output placement: the shardings of positional input ``argnum`` (updated, donated state)."""
    return Placement("like", argnum)


def _placement_shardings(placement: Placement, tree, mesh: Mesh, rules: Rules | None):
    if placement.kind == "params":
        return state_shardings(tree, mesh, rules)
    if placement.kind == "replicated":
        return replicated(mesh)
    if placement.kind != "batch":
        raise ValueError(f"unknown placement {placement!r}")
    dim = placement.arg
    shapes = {tuple(np.shape(x)[: dim + 1]) for x in jax.tree.leaves(tree)}
    if len(shapes) != 1 or len(next(iter(shapes))) != dim + 1:
        raise ValueError(f"batch_split({dim}): leaves need a common batch dim {dim}, got {shapes}")
    (shape,) = shapes
    return NamedSharding(mesh, logical_to_spec([None] * dim + ["batch"], shape, mesh, rules))


def jit_sharded(
    fn: Callable,
    mesh: Mesh,
    in_placements: Sequence[Placement],
    out_placements: Placement | Sequence[Placement],
    *,
    donate_argnums: Sequence[int] = (),
    rules: Rules | None = None,
) -> Callable:
    """``jax.jit(fn)`` with explicit ``in_shardings`` / ``out_shardings`` from placements.

    Each positional input gets a :class:`Placement` (:data:`PARAMS`, :data:`REPLICATED`,
    :func:`batch_split`); results get :data:`REPLICATED`, :func:`batch_split` or :func:`like`
    (an input's shardings, for state that is updated and donated). Shardings depend on the
    inputs' pytree structure and shapes (divisibility fall-backs), so one compiled program is
    kept per structure / shapes; arguments are placed with :func:`put` (multi-host safe).
    """
    programs: dict[Any, tuple[Callable, tuple]] = {}
    single_out = isinstance(out_placements, Placement)
    outs = [out_placements] if single_out else list(out_placements)

    def call(*args):
        if len(args) != len(in_placements):
            raise TypeError(f"expected {len(in_placements)} positional arguments, got {len(args)}")
        leaves, treedef = jax.tree.flatten(args)
        key = (treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))
        if key not in programs:
            in_sh = tuple(
                _placement_shardings(p, a, mesh, rules) for p, a in zip(in_placements, args)
            )
            results = None
            if any(p.kind == "batch" for p in outs):  # need the results' shapes
                results = jax.eval_shape(fn, *args)
                results = [results] if single_out else list(results)
            out_sh = tuple(
                in_sh[p.arg] if p.kind == "like"
                else _placement_shardings(p, results[i] if results else None, mesh, rules)
                for i, p in enumerate(outs)
            )  # fmt: skip
            program = jax.jit(
                fn, in_shardings=in_sh, out_shardings=out_sh[0] if single_out else out_sh,
                donate_argnums=tuple(donate_argnums),
            )  # fmt: skip
            programs[key] = (program, in_sh)
        program, in_sh = programs[key]
        with activation_sharding(mesh):
            return program(*put(args, in_sh))

    call.programs = programs
    return functools.wraps(fn)(call)


# ------------------------------------------------------------------------------ placement
def put(tree, shardings):
    """Place ``tree`` with ``shardings``: a matching pytree, a pytree *prefix* of ``tree``
    (one sharding for a whole sub-tree), or one sharding for every leaf.

    Multi-host safe: host values (numpy, or arrays fully present on this process) are placed
    with ``jax.make_array_from_callback``, so each process transfers only the shards its own
    devices hold; every process must pass the same global value. Arrays that already span
    other processes are resharded with ``jax.device_put``. Already placed arrays are kept.
    """
    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    if is_sharding(shardings):
        return jax.tree.map(lambda x: _put_leaf(x, shardings), tree)
    return jax.tree.map(lambda s, sub: put(sub, s), shardings, tree, is_leaf=is_sharding)


def _put_leaf(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _put_leaf(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_model(model, mesh: Mesh, rules: Rules | None = None):
    """Move every variable of an ``nnx`` model (LoRA adapters included) onto its shards, in
    place; returns ``model``. Use after ``apply_lora`` on a model loaded with ``mesh=``."""
    from flax import nnx

    state = nnx.state(model)
    nnx.update(model, put(state, state_shardings(state, mesh, rules)))
    return model


def host_local_to_global(local_batch, mesh: Mesh, batch_dim: int = 0,
                         rules: Rules | None = None):  # fmt: skip
    """Global batch arrays from each process's own slice (host-local data loading).

    Process ``p`` passes rows ``[p·b, (p+1)·b)`` of the global batch; the result's global
    batch dimension is ``process_count · b``. With one process this is :func:`put`.
    """

    def one(x):
        x = np.asarray(x)
        shape = list(x.shape)
        shape[batch_dim] *= jax.process_count()
        sharding = batch_sharding(mesh, shape, batch_dim, rules)
        return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

    return jax.tree.map(one, local_batch)


def to_host(tree):
    """Numpy copies of every array (gathering shards that live on other processes); typed PRNG
    keys become their ``key_data``."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


# ------------------------------------------------------------------------- process 0 only
def is_main_process() -> bool:
    """Whether this process writes logs, TensorBoard events and files (process 0)."""
    return jax.process_index() == 0


def main_process_only(fn: Callable) -> Callable:
    """Decorator: run ``fn`` on process 0 only (returns None elsewhere)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper


def summary_writer(logdir: str | os.PathLike | None):
    """A tensorboardX ``SummaryWriter`` on process 0, None on the others (or without logdir)."""
    if logdir is None or not is_main_process():
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(logdir))


def sync(name: str) -> None:
    """Barrier across processes (no-op with one process), e.g. before reading what process 0
    wrote."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_object(obj: Any) -> Any:
    """Process 0's JSON-serialisable ``obj`` on every process (identity with one process).

    For host-side results that may differ between processes (an API reply, a wall-clock
    timestamp): every process must make the same sharded calls, so such values are decided once
    on process 0 and broadcast.
    """
    if jax.process_count() == 1:
        return obj
    import json

    from jax.experimental import multihost_utils

    payload = np.frombuffer(json.dumps(obj).encode() if is_main_process() else b"", np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int64(payload.size)))
    buf = np.zeros((n,), np.uint8)
    buf[: payload.size] = payload[:n]
    data = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return json.loads(data.tobytes().decode())


def describe(mesh: Mesh) -> str:
    """One line for logs: mesh shape, device kind and process count."""
    shape = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
    kind = mesh.devices.flat[0].device_kind
    return f"mesh {shape} over {mesh.size} {kind} device(s), {jax.process_count()} process(es)"


__all__ = [
    "AXES",
    "BATCH_AXES",
    "PARAMS",
    "REPLICATED",
    "DEFAULT_RULES",
    "KV_CACHE_AXES",
    "PARAM_AXES",
    "DistributedConfig",
    "MeshConfig",
    "ParallelConfig",
    "Placement",
    "activation_sharding",
    "batch_sharding",
    "batch_split",
    "broadcast_object",
    "cache_shardings",
    "constrain",
    "constrain_batch",
    "default_mesh",
    "describe",
    "host_local_to_global",
    "initialize_distributed",
    "is_main_process",
    "jit_sharded",
    "like",
    "logical_to_spec",
    "main_process_only",
    "make_mesh",
    "mesh_from_config",
    "param_logical_axes",
    "param_sharding",
    "param_spec",
    "put",
    "replicated",
    "resolve_mesh",
    "set_default_mesh",
    "shard_activation",
    "shard_model",
    "state_shardings",
    "summary_writer",
    "sync",
    "to_host",
]


# ------------------------------------------------------------------------------- launcher
def main(argv: Sequence[str] | None = None) -> None:
    """``python -m sfjax.parallel [mesh / distributed options] -- SCRIPT [ARGS...]``.

    Starts ``jax.distributed`` if asked, builds the mesh, makes it the default mesh (so
    ``from_pretrained``, ``Sampler`` and ``KTOTrainer`` in SCRIPT shard by the rules without
    code changes), then runs SCRIPT as ``__main__`` with ARGS.
    """
    import argparse
    import runpy
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        argv.append("--help")
        rest: list[str] = []
    else:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m sfjax.parallel",
        description="Run an sfjax script on a (data, fsdp, tp) device mesh, optionally as one "
        "process of a jax.distributed job. Usage: python -m sfjax.parallel [options] -- "
        "SCRIPT.py [script args]",
    )
    parser.add_argument("--data", type=int, default=-1, help="data-parallel ways (-1: the rest)")
    parser.add_argument("--fsdp", type=int, default=1, help="fully-sharded data-parallel ways")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ways (within a host)")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize (auto-detects TPU pods / SLURM / "
                        "Open MPI unless the three options below are given)")  # fmt: skip
    parser.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    args = parser.parse_args(argv)
    if not rest:
        parser.error("name the script to run after '--'")
    dist = DistributedConfig(
        enabled=args.distributed or args.coordinator_address is not None,
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    mesh = mesh_from_config(ParallelConfig(MeshConfig(args.data, args.fsdp, args.tp), dist))
    set_default_mesh(mesh)
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING)
    log.warning("sfjax.parallel: %s", describe(mesh))
    sys.argv = list(rest)
    runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    # Run the launcher of the importable module, not of this `__main__` copy, so the default
    # mesh is set where `from sfjax import parallel` finds it.
    from sfjax import parallel as _parallel

    _parallel.main()

