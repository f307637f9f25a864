"""Out of device memory: recognise the error, name where it happened, say which options help.

On a GPU or TPU an allocation that does not fit raises XLA's ``RESOURCE_EXHAUSTED`` (a
``jax.errors.JaxRuntimeError``; PyTorch's reference runs in ``benchmarks/`` raise "CUDA out of
memory"). The SF loop and the experiments run their phases inside :func:`during`, which turns
that error into :class:`OutOfDeviceMemory` naming the phase; the experiment CLIs then print one
error with the options that lower memory (:class:`MemoryOption`, :func:`advice`) instead of a
traceback. A CPU has no such error: the operating system ends the process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

_OOM_WORDS = ("Out of memory", "out of memory", "OutOfMemory")
"""Text that says out of memory whatever the status (XLA's, PyTorch's)."""

MARKERS = ("RESOURCE_EXHAUSTED", *_OOM_WORDS)
"""Text that XLA's (and PyTorch's) out-of-memory errors hold."""

_MEMORY_WORDS = ("memory", "allocat", "hbm")
"""What a ``RESOURCE_EXHAUSTED`` status about memory says besides (TPU: "Error allocating device
buffer"); the same status code also reports e.g. a gRPC message over its size limit."""


def text_is_out_of_memory(text: str) -> bool:
    """``text`` (an error message, a log's tail) reports an out-of-memory error."""
    if any(s in text for s in _OOM_WORDS):
        return True
    return "RESOURCE_EXHAUSTED" in text and any(w in text.lower() for w in _MEMORY_WORDS)


def is_out_of_memory(e: BaseException) -> bool:
    """``e`` is an out-of-memory error of XLA or PyTorch."""
    return isinstance(e, OutOfDeviceMemory) or text_is_out_of_memory(f"{type(e).__name__}: {e}")


def detail(e: BaseException, limit: int = 300) -> str:
    """The line of ``e``'s message that says what did not fit (XLA appends pages of buffer
    listings), at most ``limit`` characters."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    line = next((ln for ln in lines if any(s in ln for s in MARKERS)), lines[0] if lines else "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


class OutOfDeviceMemory(RuntimeError):
    """A phase ran out of accelerator memory; ``where`` names it, ``detail`` what did not fit."""

    def __init__(self, where: str, error: BaseException):
        self.where, self.detail = where, detail(error)
        super().__init__(f"out of device memory in {where}: {self.detail}")


@contextlib.contextmanager
def during(where: str) -> Iterator[None]:
    """An out-of-memory error raised inside leaves as :class:`OutOfDeviceMemory` naming
    ``where`` (the innermost ``during`` names it); any other error passes unchanged."""
    try:
        yield
    except OutOfDeviceMemory:
        raise
    except Exception as e:
        if is_out_of_memory(e):
            raise OutOfDeviceMemory(where, e) from e
        raise


@dataclass(frozen=True)
class MemoryOption:
    """One way to lower an experiment's device memory, as the user types it."""

    flag: str
    """The option(s) as typed, e.g. ``--kto.remat``."""
    effect: str
    """What it changes, in a few words."""
    same_results: bool
    """True: the results stay the same (up to float rounding, as the tests check), so the option
    may be added when continuing a run; False: another run (a new ``--run-dir``)."""
    applies_to: str = ""
    """Text of the :func:`during` names of the places it helps (e.g. ``kto``: the KTO phases);
    empty: everywhere."""


POOL = MemoryOption(
    "XLA_PYTHON_CLIENT_MEM_FRACTION=.95",
    "before the command, on a GPU: more of its memory for JAX's pool (75 % by default; newer "
    "JAX reads XLA_CLIENT_MEM_FRACTION; docs.jax.dev, \"GPU memory allocation\")",
    same_results=True,
)
"""What every CLI suggests: JAX preallocates a share of a GPU's memory for its buffers."""


def advice(options: Sequence[MemoryOption], where: str | None = None, width: int = 34) -> str:
    """The lines the CLIs print after an out-of-memory error in ``where`` (None: unknown, every
    option): the options that help there and keep the run's results (the same command
    continues the run with them), then the ones that need a new run dir. A flag longer than
    ``width`` has its effect on the next line."""
    options = [o for o in options if where is None or o.applies_to in where]
    out = []
    for same, head in ((True, "run the same command with (the run's results stay the same up "
                              "to float rounding):"),
                       (False, "start a new --run-dir with (these change results):")):  # fmt: skip
        group = [o for o in options if o.same_results is same]
        if not group:
            continue
        out.append(("Or " if out else "To lower memory, ") + head)
        col = min(width, max(len(o.flag) for o in group))
        for o in group:
            if len(o.flag) > col:
                out += [f"  {o.flag}", f"  {' ' * col}  {o.effect}"]
            else:
                out.append(f"  {o.flag.ljust(col)}  {o.effect}")
    return "\n".join(out)
