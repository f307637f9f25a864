"""``python -m sfjax.parallel [options] -- SCRIPT [ARGS]``: run a script on a mesh (see :func:`main`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sfjax.parallel import failfast
from sfjax.parallel.mesh import (
    DistributedConfig,
    MeshConfig,
    ParallelConfig,
    describe,
    mesh_from_config,
    set_default_mesh,
)
from sfjax.parallel.multihost import is_main_process

log = logging.getLogger("sfjax.parallel")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m sfjax.parallel [mesh / distributed options] -- SCRIPT [ARGS...]``.

    Starts ``jax.distributed`` if asked, builds the mesh, makes it the default mesh (so
    ``from_pretrained``, ``Sampler`` and ``KTOTrainer`` in SCRIPT shard by the rules without
    code changes), then runs SCRIPT as ``__main__`` with ARGS. With several processes, one that
    fails (an exception or a non-zero exit) stops all of them within seconds, each naming it
    (:mod:`sfjax.parallel.failfast`), instead of leaving them in a collective.
    """
    import argparse
    import os
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
    if not os.path.exists(rest[0]):
        parser.error(f"{rest[0]}: no such script")
    try:  # a bad size or a mesh the devices cannot fill: said before anything starts
        mesh = mesh_from_config(ParallelConfig(MeshConfig(args.data, args.fsdp, args.tp), dist))
    except ValueError as e:
        parser.error(str(e))
    set_default_mesh(mesh)
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING)
    log.warning("sfjax.parallel: %s", describe(mesh))
    sys.argv = list(rest)
    with failfast.together():  # several processes: one's failure stops them all
        runpy.run_path(rest[0], run_name="__main__")
