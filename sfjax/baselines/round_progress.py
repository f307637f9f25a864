"""Progress lines from inside a jitted, seed-vmapped rejax training run.

A baseline's whole training (80 rounds at the paper's budget, several seeds vmapped) is one XLA
program, so without help it is silent for its whole run (minutes per algorithm on a CPU). Each
round ends in rejax's ``eval_callback``; :func:`with_progress` adds a ``jax.debug.callback``
there that hands the round's mean utility to a host-side :class:`RoundProgress`. Under ``vmap``
the callback runs once per seed, in no fixed order, and every seed finishes round r before any
starts round r + 1 (the seeds step in lock-step), so every ``n_seeds`` calls close one round.
The logged numbers are the same per-round means as the Fig. 2 curves; nothing extra is computed
on the device and results do not change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

log = logging.getLogger(__name__)


class RoundProgress:
    """Host-side collector: one log line per round once every seed reported it, at most one
    line per ``every_s`` seconds (the first and the last round always)."""

    def __init__(self, name: str, n_seeds: int, rounds: int, every_s: float = 30.0):
        if n_seeds < 1 or rounds < 1:
            raise ValueError(f"RoundProgress needs n_seeds, rounds >= 1, got {n_seeds}, {rounds}")
        self.name, self.n_seeds, self.rounds, self.every_s = name, n_seeds, rounds, every_s
        self._values: list[float] = []
        self._round = 0
        self._start = time.perf_counter()
        self._last_line = -float("inf")
        self._first_round_end: float | None = None
        self._lock = threading.Lock()
        self.lines = 0
        """Lines logged so far."""

    def __call__(self, utility) -> None:
        """One seed's mean utility over the trajectories that ended in its current round."""
        with self._lock:
            self._values.append(float(np.asarray(utility)))
            if len(self._values) < self.n_seeds:
                return
            values, self._values = self._values, []
            self._round += 1
            now = time.perf_counter()
            if self._round == 1:
                self._first_round_end = now
            due = self._round in (1, self.rounds) or now - self._last_line >= self.every_s
            if not due:
                return
            self._last_line = now
            self.lines += 1
            left = ""
            if 1 < self._round < self.rounds:  # round 1's time holds the compile
                per_round = (now - self._first_round_end) / (self._round - 1)
                left = f", ~{per_round * (self.rounds - self._round):.0f} s left"
            log.info(
                "%s: round %d/%d, utility of its trajectories %.0f (mean of %d seeds); "
                "%.0f s so far, compile included%s", self.name, self._round, self.rounds,
                np.mean(values), self.n_seeds, now - self._start, left,
            )  # fmt: skip


def with_progress(eval_callback: Callable, progress: RoundProgress) -> Callable:
    """``eval_callback`` that also reports each round's ``utility`` entry to ``progress``."""

    def callback(algo, ts, rng):
        out = eval_callback(algo, ts, rng)
        jax.debug.callback(progress, out["utility"])
        return out

    return callback
