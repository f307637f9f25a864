"""What an Actor's allocations depend on, read off its collected trajectories.

    python -m sfjax.agents.policy_profile RUN_DIR            # one profile per SF iteration

The held-out table says whether a fine-tuned Actor scores better; this says *how* its policy
changed. Per collect (``RUN_DIR/trajectories/iter_<i>.json``: ``iter_0`` is the Actor before
any fine-tuning, ``iter_<i>`` the Actor after SF iteration ``i``) it gives the mean action
(RBGs of the controlled slice) by the slice's arrival rate in the state the Actor saw and by
the time in the episode, with the violations and reconfigurations of each part of the episode
and, where the Reflector's labels are there (``reflections/iter_<i>.json``), what it asked for
there: how many steps it labelled suboptimal with a larger or a smaller improved action.

Reading it. A fine-tuning that learnt a state-dependent correction changes the action
differently at different loads. One that moved the action marginal shifts every load bin by
about the same amount, and a collapsed policy gives the same action whatever the load: its
*load slope* (least-squares RBGs per Mb/s of arrivals) and correlation fall to about 0.

The profiles are computed from the same env seeds whenever the run collected every iteration
on the same seeds (``--loop.same-env-seeds``, the default), so the rows of two iterations
differ only by the Actor. They describe the in-sample trajectories, not held-out seeds.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sfjax.agents.trajectory import (
    Reflection,
    Trajectory,
    iteration_files,
    load_reflections,
    load_trajectories,
)

LOAD_KEY = "arrival_rate_bps"
"""The state field the load bins read (the controlled slice's arrival rate, eq. 14)."""


@dataclass(frozen=True)
class Bin:
    """Steps in one load bin or one part of the episode."""

    lo: float
    """Lower edge (Mb/s for a load bin, step index for a block); inclusive."""
    hi: float
    """Upper edge; exclusive (inf for the last load bin)."""
    steps: int
    """Steps that fell in it, over all trajectories."""
    mean_action: float
    """Their mean action (RBGs of the controlled slice); nan without steps."""
    violations: float = math.nan
    """QoS-violation steps per trajectory (blocks only)."""
    reconfigurations: float = math.nan
    """Reconfigurations per trajectory (blocks only)."""
    asked_more: int = -1
    """Steps the Reflector labelled suboptimal with a larger improved action (-1: no labels)."""
    asked_less: int = -1
    """Steps it labelled suboptimal with a smaller improved action (-1: no labels)."""
    asked_change: float = math.nan
    """Mean over the block's steps of (improved action - action taken), effective steps
    counting 0: the change the Reflector asked for, to set against the next collect's change
    of the mean action (nan: no labels)."""


@dataclass(frozen=True)
class PolicyProfile:
    """One collect's policy, summarised (module docstring)."""

    label: str
    trajectories: int
    steps: int
    mean_action: float
    load_slope: float
    """Least-squares slope of the action on the arrival rate, RBGs per Mb/s (nan: no spread)."""
    load_corr: float
    """Pearson correlation of the action and the arrival rate (nan: no spread in either)."""
    by_load: tuple[Bin, ...]
    by_block: tuple[Bin, ...]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def slope_and_corr(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of ``y`` on ``x`` and their Pearson correlation (nan where a
    variance is 0, e.g. a policy that always gives the same action has correlation nan and
    slope 0)."""
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length ({len(x)} vs {len(y)})")
    if len(x) < 2:
        return math.nan, math.nan
    mx, my = _mean(x), _mean(y)
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    slope = sxy / sxx if sxx > 0 else math.nan
    corr = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan
    return slope, corr


def requested_changes(
    trajs: Sequence[Trajectory], reflections: Sequence[Reflection]
) -> dict[tuple[int, int], int]:
    """{(env_index, step): improved action - action taken} for the steps the Reflector labelled
    suboptimal with another action (a suboptimal step whose improved action is the one taken
    asks for no change and is left out)."""
    actions = {(t.env_index, s.t): s.action for t in trajs for s in t.steps}
    out = {}
    for r in reflections:
        for lab in r.labels:
            taken = actions.get((r.env_index, lab.step))
            if lab.label != "suboptimal" or taken is None or lab.improved_action == taken:
                continue
            out[(r.env_index, lab.step)] = lab.improved_action - taken
    return out


def profile(
    trajs: Sequence[Trajectory],
    *,
    label: str = "",
    reflections: Sequence[Reflection] | None = None,
    load_bin_mbps: float = 1.5,
    num_load_bins: int = 5,
    block_steps: int = 50,
) -> PolicyProfile:
    """The :class:`PolicyProfile` of ``trajs``: load bins of ``load_bin_mbps`` Mb/s (the last
    one open-ended) and blocks of ``block_steps`` steps; ``reflections`` (the Reflector's
    labels of these trajectories) add what it asked for per block."""
    if load_bin_mbps <= 0 or num_load_bins < 1 or block_steps < 1:
        raise ValueError("load_bin_mbps must be > 0, num_load_bins and block_steps >= 1")
    steps = [(t.env_index, s) for t in trajs for s in t.steps]
    if not steps:
        raise ValueError(f"{label or 'trajectories'}: no steps to profile")
    loads = [float(s.state[LOAD_KEY]) / 1e6 for _, s in steps]
    actions = [float(s.action) for _, s in steps]
    slope, corr = slope_and_corr(loads, actions)
    asked = requested_changes(trajs, reflections) if reflections is not None else None

    by_load = []
    for i in range(num_load_bins):
        lo = i * load_bin_mbps
        hi = math.inf if i == num_load_bins - 1 else (i + 1) * load_bin_mbps
        sel = [a for x, a in zip(loads, actions) if lo <= x < hi]
        by_load.append(Bin(lo, hi, len(sel), _mean(sel)))

    n_traj = len(trajs)
    longest = max(s.t for _, s in steps) + 1
    by_block = []
    for lo in range(0, longest, block_steps):
        hi = lo + block_steps
        sel = [(e, s) for e, s in steps if lo <= s.t < hi]
        dirs = [asked.get((e, s.t), 0) for e, s in sel] if asked is not None else None
        more = sum(d > 0 for d in dirs) if dirs is not None else -1
        less = sum(d < 0 for d in dirs) if dirs is not None else -1
        by_block.append(Bin(
            lo, hi, len(sel), _mean([float(s.action) for _, s in sel]),
            violations=sum(float(s.feedback["violation"]) for _, s in sel) / n_traj,
            reconfigurations=sum(float(s.feedback["reconfiguration"]) for _, s in sel) / n_traj,
            asked_more=more, asked_less=less,
            asked_change=_mean(dirs) if dirs is not None else math.nan,
        ))  # fmt: skip
    return PolicyProfile(label, n_traj, len(steps), _mean(actions), slope, corr,
                         tuple(by_load), tuple(by_block))  # fmt: skip


def _f(x: float, digits: int = 2) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def format_profiles(profiles: Sequence[PolicyProfile]) -> str:
    """Side-by-side tables (one column per profile): mean action by load bin, then by block
    with violations, reconfigurations and the Reflector's requests."""
    if not profiles:
        return "(no trajectories)"
    rows: list[tuple[str, list[str]] | str] = [
        ("", [p.label for p in profiles]),
        ("steps (trajectories)", [f"{p.steps} ({p.trajectories})" for p in profiles]),
        ("mean action [RBG]", [_f(p.mean_action) for p in profiles]),
        ("load slope [RBG per Mb/s]", [_f(p.load_slope) for p in profiles]),
        ("load correlation", [_f(p.load_corr) for p in profiles]),
        "mean action by arrival rate [Mb/s] (steps):",
    ]
    for i, b in enumerate(profiles[0].by_load):
        name = f"  {b.lo:g}+" if math.isinf(b.hi) else f"  {b.lo:g}-{b.hi:g}"
        cells = []
        for p in profiles:
            c = p.by_load[i] if i < len(p.by_load) else None
            cells.append("-" if c is None or not c.steps else f"{_f(c.mean_action)} ({c.steps})")
        rows.append((name, cells))
    asks = any(b.asked_more >= 0 for p in profiles for b in p.by_block)
    rows.append("by steps: mean action / violations / reconfigurations per trajectory"
                + (" / Reflector asked more, less (mean change asked per step)" if asks else "")
                + ":")  # fmt: skip
    for i in range(max(len(p.by_block) for p in profiles)):
        ref = next(p.by_block[i] for p in profiles if i < len(p.by_block))
        cells = []
        for p in profiles:
            if i >= len(p.by_block):
                cells.append("-")
                continue
            b = p.by_block[i]
            cell = f"{_f(b.mean_action)} / {_f(b.violations, 1)} / {_f(b.reconfigurations, 1)}"
            if b.asked_more >= 0:
                cell += f" / {b.asked_more}, {b.asked_less} ({b.asked_change:+.2f})"
            cells.append(cell)
        rows.append((f"  {ref.lo:g}-{ref.hi - 1:g}", cells))
    table = [r for r in rows if not isinstance(r, str)]
    first = max(len(name) for name, _ in table) + 2
    width = max(len(c) for _, cells in table for c in cells) + 3
    return "\n".join(
        r if isinstance(r, str) else f"{r[0]:{first}}" + "".join(f"{c:>{width}}" for c in r[1])
        for r in rows
    )


def run_profiles(run_dir: str | Path, **kwargs) -> list[PolicyProfile]:
    """One profile per ``trajectories/iter_<i>.json`` of a self-finetuning run dir, in
    iteration order, each with that iteration's reflections when they exist."""
    run_dir = Path(run_dir)
    found = iteration_files(run_dir, "trajectories")
    if not found:
        raise FileNotFoundError(
            f"{run_dir}: no trajectories/iter_<i>.json (is it an sf_ranslicing run dir?)"
        )
    out = []
    for i, path in found:
        refl_path = run_dir / "reflections" / path.name
        refl = load_reflections(refl_path) if refl_path.exists() else None
        label = "before SF" if i == 0 else f"after SF {i}"
        out.append(profile(load_trajectories(path), label=label, reflections=refl, **kwargs))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m sfjax.agents.policy_profile",
        description="How a self-finetuning run's Actor acts, per SF iteration: mean action by "
                    "load and by time in the episode, violations, reconfigurations and what the "
                    "Reflector asked for (in-sample trajectories of RUN_DIR).")  # fmt: skip
    p.add_argument("run_dir", help="an experiments/sf_ranslicing.py run dir")
    p.add_argument("--load-bin-mbps", type=float, default=1.5, help="load bin width (Mb/s)")
    p.add_argument("--num-load-bins", type=int, default=5, help="load bins (the last open)")
    p.add_argument("--block-steps", type=int, default=50, help="steps per block of the episode")
    a = p.parse_args(argv)
    try:
        profiles = run_profiles(a.run_dir, load_bin_mbps=a.load_bin_mbps,
                                num_load_bins=a.num_load_bins, block_steps=a.block_steps)  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    print(format_profiles(profiles))


if __name__ == "__main__":
    main()
