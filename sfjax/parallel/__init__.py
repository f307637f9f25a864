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
KV cache k/v BKSH per layer (batch, kv_heads, -, -)   ((data, fsdp), tp, -, -)
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
:func:`is_main_process` / :func:`main_process_only` keep logs and file writes on process 0,
:func:`on_main_process` runs a host-side call (an API request) once and gives every process its
result, and :func:`check_shared_directory` fails early when a run directory is not shared by all
hosts (orbax writes every host's checkpoint shards into it).

Shape legend: L layers, B batch, S cache slots, K kv heads, H head dim, V vocab, D hidden,
T tokens.
"""

from __future__ import annotations

from sfjax.parallel.launch import main
from sfjax.parallel.mesh import (
    AXES,
    BATCH_AXES,
    DistributedConfig,
    MeshConfig,
    ParallelConfig,
    default_mesh,
    describe,
    initialize_distributed,
    make_mesh,
    mesh_from_config,
    resolve_mesh,
    set_default_mesh,
)
from sfjax.parallel.multihost import (
    MainProcessError,
    all_processes_agree,
    broadcast_object,
    check_shared_directory,
    is_main_process,
    main_process_only,
    on_main_process,
    summary_writer,
    sync,
)
from sfjax.parallel.placement import (
    PARAMS,
    REPLICATED,
    Placement,
    activation_sharding,
    batch_split,
    host_local_to_global,
    jit_sharded,
    like,
    put,
    shard_activation,
    shard_model,
    to_host,
)
from sfjax.parallel.rules import (
    DEFAULT_RULES,
    KV_CACHE_AXES,
    PARAM_AXES,
    batch_sharding,
    cache_shardings,
    constrain,
    constrain_batch,
    logical_to_spec,
    param_logical_axes,
    param_sharding,
    param_spec,
    replicated,
    state_shardings,
)

__all__ = [
    "AXES",
    "BATCH_AXES",
    "PARAMS",
    "REPLICATED",
    "DEFAULT_RULES",
    "KV_CACHE_AXES",
    "PARAM_AXES",
    "DistributedConfig",
    "MainProcessError",
    "MeshConfig",
    "ParallelConfig",
    "Placement",
    "activation_sharding",
    "all_processes_agree",
    "batch_sharding",
    "batch_split",
    "broadcast_object",
    "cache_shardings",
    "check_shared_directory",
    "constrain",
    "constrain_batch",
    "default_mesh",
    "describe",
    "host_local_to_global",
    "initialize_distributed",
    "is_main_process",
    "jit_sharded",
    "like",
    "main",
    "logical_to_spec",
    "main_process_only",
    "make_mesh",
    "mesh_from_config",
    "on_main_process",
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
