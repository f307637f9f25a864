"""Timing helper shared by the CPU benchmarks (run them as scripts: ``python benchmarks/x.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def interleaved_medians(
    fns: Sequence[Callable[[], object]], repeats: int
) -> list[tuple[float, float]]:
    """Median (wall, process CPU) seconds of each function, runs interleaved so that load drifts
    hit every function alike. Process CPU time counts every thread of this process and is what
    other jobs on a shared machine distort least."""
    times: list[list[tuple[float, float]]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            ts.append((time.perf_counter() - w0, time.process_time() - c0))
    return [
        (statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts)) for ts in times
    ]
