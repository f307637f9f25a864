"""One Reflector reply for every process of a multi-host run (paper IV-B2 under SPMD).

In a ``jax.distributed`` run every process executes Algorithm 1 and must build the same KTO
dataset, or the hosts' sharded KTO steps and RfR rollouts would get different arguments and
diverge (or hang). A Reflector reply is host-side and need not be reproducible -- an API model
samples, a request may time out on one host only -- so it is produced once and broadcast:

* a *host-side* backend (``api``, ``rule``, any object without ``collective = True``) runs on
  process 0 only: an API is queried once per reflect phase, not once per host, and its on-disk
  reply cache is written by one process;
* a *collective* backend (``collective = True``: ``local``, whose Reflector model may be sharded
  over all processes, so every process has to make the same sampler calls) runs on every
  process, and process 0's result is still what every process keeps.

A failure on process 0 (e.g. :class:`~sfjax.agents.reflectors.base.ReflectorError` after all
retries) is raised on every process, so none is left waiting in a collective.

:func:`build_on_process_0` goes one step further for host-side backends: only process 0
constructs the real Reflector (so only it needs the API key), the others hold a
:class:`ProcessZeroReflector` stand-in with the same name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax

from sfjax.agents.reflectors.base import Reflector, ReflectorError
from sfjax.agents.trajectory import Reflection, Trajectory
from sfjax.parallel import MainProcessError, broadcast_object, is_main_process, on_main_process


def is_collective(reflector: Reflector) -> bool:
    """Whether every process must call ``reflector.reflect`` (it runs sharded programs)."""
    return bool(getattr(reflector, "collective", False))


def reflect_on_all_processes(
    reflector: Reflector, trajectories: Sequence[Trajectory], key: jax.Array | None = None
) -> list[Reflection]:
    """``reflector.reflect(trajectories, key)``, identical on every process (module docstring).

    With one process this is the plain call. Raises :class:`ReflectorError` on every process
    when the reflector failed on process 0.
    """
    if jax.process_count() == 1:
        return list(reflector.reflect(trajectories, key))
    if is_collective(reflector):
        mine = [r.to_json() for r in reflector.reflect(trajectories, key)]
        payload = broadcast_object(mine if is_main_process() else None)
    else:
        try:
            payload = on_main_process(
                lambda: [r.to_json() for r in reflector.reflect(trajectories, key)]
            )
        except MainProcessError as e:
            raise ReflectorError(f"the Reflector failed {e}") from None
    return [Reflection.from_json(d) for d in payload]


class ProcessZeroReflector:
    """Stand-in, on processes other than 0, for a host-side Reflector that only process 0 holds
    (see :func:`build_on_process_0`); :func:`reflect_on_all_processes` never calls it."""

    collective = False

    def __init__(self, name: str):
        self.name = name

    def reflect(self, trajectories, key=None):
        raise ReflectorError(
            f"{self.name} runs on process 0 only; call it through reflect_on_all_processes"
        )


def build_on_process_0(factory: Callable[[], Reflector]) -> Reflector:
    """``factory()`` on process 0 and a :class:`ProcessZeroReflector` of the same name on the
    others (identity with one process); for host-side backends, e.g. the api one, whose key
    then need only be set on process 0's host. A failure of ``factory`` (missing key) is
    raised on every process."""
    if jax.process_count() == 1:
        return factory()
    built: list[Reflector] = []

    def build() -> str:
        built.append(factory())
        if is_collective(built[0]):
            raise ValueError("build_on_process_0 is for host-side Reflectors, not collective ones")
        return built[0].name

    try:
        name = on_main_process(build)
    except MainProcessError as e:
        raise ReflectorError(f"building the Reflector failed {e}") from None
    return built[0] if built else ProcessZeroReflector(name)
