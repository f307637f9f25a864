"""Placing data and running programs on a mesh: :func:`put` (multi-host safe), :func:`jit_sharded`
(explicit in/out shardings), activation pinning, :func:`shard_model`, host-local batches, :func:`to_host`."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from sfjax.parallel.rules import Rules, batch_sharding, logical_to_spec, replicated, state_shardings

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

    def program_for(args):
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
        return programs[key]

    def call(*args):
        program, in_sh = program_for(args)
        with activation_sharding(mesh):
            return program(*put(args, in_sh))

    def lower(*args):
        """``jax.jit(...).lower`` of the program for these arguments (abstract ones allowed:
        ahead-of-time compilation, benchmarks/bench_compile.py)."""
        program, _ = program_for(args)
        with activation_sharding(mesh):
            return program.lower(*args)

    call.programs = programs
    call.lower = lower
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
