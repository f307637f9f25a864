"""R-MDP trajectories (paper IV-A) and the Reflector's per-step labels, with JSON persistence.

A trajectory ``H = [(s_t, x_t, y_t, rho_t, a_t, eta_t, f_t)]_{t=0..T-1}`` holds, per step, the
eq. 14 state, the exact prompt string the Actor saw, its raw output, the parsed fields, the
action actually applied (the previous allocation when the output was unusable) and the
feedback vector the environment returned. Trajectories are written to disk before they are
reflected on, so a crash never loses collected experience.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from sfjax import atomic
from sfjax.metrics import UtilityWeights

Label = Literal["effective", "suboptimal"]
LABELS: tuple[str, ...] = ("effective", "suboptimal")


@dataclass
class Step:
    """One R-MDP step of one environment."""

    t: int
    state: dict[str, float]
    prompt: str
    output: str
    reflection: str
    action: int
    analysis: str
    parsed_ok: bool
    feedback: dict[str, float]
    parse_error: str | None = None


@dataclass
class Trajectory:
    """The steps of one environment's episode, plus where it came from."""

    env_index: int
    seed: int
    steps: list[Step] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Trajectory metrics (paper Table III columns) from the feedback vectors."""
        return trajectory_metrics(self)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> Trajectory:
        return Trajectory(d["env_index"], d["seed"], [Step(**s) for s in d["steps"]])


@dataclass(frozen=True)
class StepLabel:
    """The Reflector's verdict on one step: label, improved action a*_t and a short reason."""

    step: int
    label: str
    improved_action: int
    reason: str


@dataclass
class Reflection:
    """All step labels of one trajectory, the trajectory summary and the backend that made them."""

    env_index: int
    labels: list[StepLabel]
    summary: str
    backend: str

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> Reflection:
        return Reflection(
            d["env_index"], [StepLabel(**x) for x in d["labels"]], d["summary"], d["backend"]
        )


def trajectory_metrics(traj: Trajectory, weights: UtilityWeights | None = None) -> dict:
    """Avg. SE, reconfigurations, PQoS violations, eq. 15 utility and parse failures, from the
    feedback vectors (``se`` and ``violation`` as the env scored them; reporting only)."""
    weights = weights or UtilityWeights()
    n = len(traj.steps)
    if n == 0:
        raise ValueError("trajectory has no steps")
    se = [float(s.feedback["se"]) for s in traj.steps]
    rec = [float(s.feedback["reconfiguration"]) for s in traj.steps]
    vio = [float(s.feedback["violation"]) for s in traj.steps]
    utility = (
        weights.se_weight * sum(x + weights.se_offset for x in se)
        - weights.reconfig_penalty * sum(rec)
        - weights.violation_penalty * sum(vio)
    )
    return {
        "avg_se": sum(se) / n,
        "reconfigurations": sum(rec),
        "violations": sum(vio),
        "utility": utility,
        "parse_failures": sum(0 if s.parsed_ok else 1 for s in traj.steps),
        "steps": n,
    }


def save_json(path: str | os.PathLike, obj) -> str:
    """Write JSON atomically (temp file + rename), so a kill never leaves half a file; returns
    the SHA-256 of the bytes written."""
    return atomic.write_json(path, obj)


def load_json(path: str | os.PathLike):
    """Read JSON; a damaged file raises :class:`sfjax.atomic.DamagedFile` naming it."""
    return atomic.read_json(path)


def save_trajectories(path: str | os.PathLike, trajs: Sequence[Trajectory]) -> None:
    save_json(path, [t.to_json() for t in trajs])


def iteration_files(run_dir: str | os.PathLike, sub: str) -> list[tuple[int, Path]]:
    """``(i, path)`` of every ``RUN_DIR/<sub>/iter_<i>.json`` of a self-finetuning run dir
    (``trajectories``, ``reflections``), in iteration order."""
    found = []
    for path in (Path(run_dir) / sub).glob("iter_*.json"):
        m = re.fullmatch(r"iter_(\d+)\.json", path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def load_trajectories(path: str | os.PathLike) -> list[Trajectory]:
    return [Trajectory.from_json(d) for d in load_json(path)]


def load_reflections(path: str | os.PathLike) -> list[Reflection]:
    return [Reflection.from_json(d) for d in load_json(path)]
