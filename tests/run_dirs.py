"""A self-finetuning run dir read back for comparing two runs: ``json_artefacts(run_dir)``."""

from __future__ import annotations

from pathlib import Path

ARTEFACT_DIRS = ("trajectories", "reflections", "datasets")
"""Where the loop's phases write their JSON artefacts (collected trajectories, the Reflector's
labels, the KTO datasets)."""


def json_artefacts(run_dir) -> dict[str, bytes]:
    """Every JSON artefact of the run in ``run_dir``, by run-dir relative path, as bytes."""
    run_dir = Path(run_dir)
    return {f"{sub}/{p.name}": p.read_bytes()
            for sub in ARTEFACT_DIRS
            for p in sorted((run_dir / sub).glob("*.json"))}  # fmt: skip
