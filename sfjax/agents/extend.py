"""Extending a run with more SF iterations: Algorithm 1 (paper IV-B) with a larger I.

:func:`~sfjax.agents.loop.phase_plan` is prefix-stable: the phases of SF iterations 0..n-1
and iteration n's collect have the same kinds and indices for I = n and for every I > n. Every
phase's randomness is ``fold_in(root_key, phase.index)`` and its env keys depend on its
iteration only, so the checkpoints of a run of n iterations are the ones a run of m > n
iterations with the same configuration writes up to phase ``last_phase(n)``: the longer run
continues from them (``SelfFinetuningLoop.run(resume=True)`` with the longer plan), and what
it computes from there is what a fresh run of m iterations computes. Only what depends on the
final Actor is done again: its held-out "after" evaluation (cached per number of SF iterations,
:mod:`sfjax.baselines.heldout`), summary.json and the adapter.

A shorter run is no prefix of a longer one (its final collect and held-out "after" are of an
earlier Actor), so a run dir is never taken back to fewer SF iterations. A run whose phase
checkpoints are gone cannot be extended: starting over would overwrite its files.
"""

from __future__ import annotations

from pathlib import Path

from sfjax.agents.loop import phase_plan


def last_phase(sf_iterations: int, kto_iterations: int) -> int:
    """Index of a run's last phase (its final collect) = its last checkpoint's step."""
    return phase_plan(sf_iterations, kto_iterations)[-1].index


def phase_steps(checkpoints: Path) -> list[int]:
    """The phase checkpoints' steps in ``checkpoints`` (orbax's step directories), ascending."""
    if not checkpoints.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def fewer_refusal(run_dir: Path, ran: int, asked: int) -> str:
    """Why the run of ``ran`` SF iterations in ``run_dir`` is not taken to ``asked`` < ``ran``."""
    return (
        f"{run_dir} holds a run of {ran} SF iteration(s) and --loop.sf-iterations {asked} asks "
        f"for fewer ({ran} in the run, {asked} now): a run is only extended, since a shorter "
        "one's final collect and held-out evaluation are of an earlier Actor. Choose a new "
        f"--run-dir, or add --resume to continue the run with its {ran}"
    )


def results_without_checkpoints(run_dir: Path) -> str | None:
    """Why the run in ``run_dir`` is not run again: it has results (``summary.json``, written
    after every phase) but no phase checkpoint, and none was set aside as damaged (a run whose
    checkpoints were all damaged starts again, as
    :meth:`sfjax.agents.loop.SelfFinetuningLoop.restore` says), so they were removed by hand or
    never copied. Rerunning it would start from its first phase and overwrite its files, with
    whatever options are given now. None when that is not the case."""
    run_dir = Path(run_dir)
    checkpoints = run_dir / "checkpoints"
    if (not (run_dir / "summary.json").exists() or phase_steps(checkpoints)
            or (run_dir / f"{checkpoints.name}_damaged").is_dir()):  # fmt: skip
        return None
    return (
        f"{run_dir} holds a run with results (summary.json) but no phase checkpoint in "
        f"{checkpoints}: running it again would start over and overwrite its files. Its results "
        "stay readable (python -m sfjax.baselines.compare, the diagnostics); put its checkpoints "
        "back to continue it, or choose a new --run-dir"
    )


def extension_refusal(run_dir: Path, ran: int, kto_iterations: int) -> str | None:
    """Why the run of ``ran`` SF iterations (``kto_iterations`` each) in ``run_dir``, which has
    results, cannot be extended; None when it can.

    It can when it has a phase checkpoint and, once it has reached its final collect (its
    ``trajectories/iter_<ran>.json`` is written), the checkpoint of that last phase: the
    newest is never pruned (``LoopConfig.keep_checkpoints`` drops the oldest), so it is
    missing only when removed by hand or when a kill fell between the file and its
    checkpoint.
    """
    checkpoints = Path(run_dir) / "checkpoints"
    steps = phase_steps(checkpoints)
    if not steps:
        return (
            f"{run_dir} holds a run of {ran} SF iteration(s) with results but no phase "
            f"checkpoint in {checkpoints}: a run is extended from its checkpoints, and starting "
            "over would overwrite its files. Choose a new --run-dir"
        )
    last = last_phase(ran, kto_iterations)
    final = Path(run_dir) / "trajectories" / f"iter_{ran}.json"
    if final.exists() and steps[-1] < last:
        return (
            f"{run_dir} holds a run of {ran} SF iteration(s) that reached its final collect "
            f"({final.name}) but the checkpoint of that last phase (step {last}) is not in "
            f"{checkpoints} (newest: step {steps[-1]}). Run it once more with "
            f"--loop.sf-iterations {ran} to finish it from there, then extend it"
        )
    return None
