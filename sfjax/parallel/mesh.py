"""Mesh shape and multi-process start-up: :class:`MeshConfig`, :class:`DistributedConfig`,
:func:`initialize_distributed`, :func:`make_mesh` and the default mesh the launcher sets."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

log = logging.getLogger(__name__)

AXES: tuple[str, str, str] = ("data", "fsdp", "tp")
"""Mesh axis names, outermost first (``data`` spans hosts, ``tp`` stays inside one)."""
BATCH_AXES: tuple[str, str] = ("data", "fsdp")
"""Mesh axes the batch dimension is split over."""


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
                raise ValueError(
                    f"MeshConfig.{name}={v}: use a positive size, or -1 for 'the rest'"
                )
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


def describe(mesh: Mesh) -> str:
    """One line for logs: mesh shape, device kind and process count."""
    shape = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
    kind = mesh.devices.flat[0].device_kind
    return f"mesh {shape} over {mesh.size} {kind} device(s), {jax.process_count()} process(es)"
