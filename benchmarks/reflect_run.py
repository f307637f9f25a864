"""Label a finished run's trajectories with another Reflector, outside the loop.

    .venv/bin/python benchmarks/reflect_run.py RUN_DIR --iteration I --out F [--reflector.* ...]

SF iteration ``I``'s trajectories of an ``experiments/sf_ranslicing.py`` run
(``RUN_DIR/trajectories/iter_<I>.json``) are labelled by the Reflector the ``--reflector.*``
options configure, exactly as the loop's reflect phase would: the run's prompts (action range,
slices and objective from its env) and the reflect phase's key. The default is the offline
rule labeller with its defaults; ``--reflector.backend api --reflector.api.base-url URL
--reflector.api.model deepseek-reasoner`` asks DeepSeek-R1 or any OpenAI-compatible endpoint
(key in the variable ``--reflector.api.api-key-env`` names; never written anywhere),
``--reflector.backend local --reflector.local.checkpoint PATH`` a Flax checkpoint. The labels go
to ``F``, a JSON list of reflections as ``reflections/iter_<I>.json`` holds; an API's replies
are cached beside it (``<F's stem>_cache/``), so an interrupted call resumes. Nothing in
``RUN_DIR`` is changed. Then

    .venv/bin/python benchmarks/label_audit.py RUN_DIR --iteration I --reflections F

scores them with counterfactual replays (or ``--from`` a saved audit, in seconds), on the same
steps as the run's own Reflector: two Reflectors compared on identical trajectories.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sf_target_match as stm  # noqa: E402 -- benchmarks/ (puts experiments/ on sys.path)

from sfjax.agents.reflector import ReflectorConfig  # noqa: E402


@dataclass(frozen=True)
class ReflectRunConfig:
    """Which run's trajectories to label, with which Reflector, into which file."""

    run_dir: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """A run dir of experiments/sf_ranslicing.py (any preset)."""
    iteration: int
    """SF iteration whose trajectories (``trajectories/iter_<I>.json``) are labelled."""
    out: Path
    """Where the reflections go (JSON); its parent is created."""
    reflector: ReflectorConfig = field(default_factory=ReflectorConfig)
    """The Reflector (default: the offline rule labeller with its defaults)."""


def reflect_run(cfg: ReflectRunConfig) -> list:
    """Label the trajectories and write ``cfg.out``; returns the reflections."""
    import jax

    from sfjax import atomic
    from sfjax.agents.loop import phase_key, phase_plan
    from sfjax.agents.reflector import make_reflector
    from sfjax.config_rules import RULES
    from sfjax.configcheck import ConfigError, check_config

    check_config(cfg.reflector, "reflector.", RULES)
    if cfg.iteration < 0:
        raise ConfigError(f"--iteration {cfg.iteration}: must be >= 0")
    trajs_file = cfg.run_dir / f"trajectories/iter_{cfg.iteration}.json"
    for need in (cfg.run_dir / "config.json", trajs_file):
        if not need.is_file():
            raise ConfigError(f"{need} not found: SF iteration {cfg.iteration}'s trajectories of "
                              "a sf_ranslicing.py run dir are needed")  # fmt: skip
    run_cfg = stm.run_config(cfg.run_dir)
    trajs = stm.iteration_trajectories(cfg.run_dir, cfg.iteration)
    cache = cfg.out.parent / f"{cfg.out.stem}_cache" if cfg.reflector.backend == "api" else None
    reflector = make_reflector(cfg.reflector, stm.run_prompt_config(run_cfg), cache)
    # the reflect phase's key: what a sampling Reflector (local) used in the loop
    phases = phase_plan(max(run_cfg.loop.sf_iterations, cfg.iteration + 1),
                        run_cfg.rfr.kto_iterations)  # fmt: skip
    phase = next(p for p in phases if p.kind == "reflect" and p.iteration == cfg.iteration)
    key = phase_key(jax.random.key(run_cfg.loop.seed), phase)
    refls = reflector.reflect(trajs, key)
    stm.check_reflections(refls, trajs, reflector.name)  # as label_audit / kto_replay read them
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(cfg.out, [r.to_json() for r in refls])
    n_sub = sum(x.label == "suboptimal" for r in refls for x in r.labels)
    n = sum(len(r.labels) for r in refls)
    stats = getattr(reflector, "stats", None)
    print(f"{cfg.run_dir} SF iteration {cfg.iteration}: {n_sub} of {n} steps suboptimal "
          f"({reflector.name}){f'; calls: {dict(stats)}' if stats else ''}\nwrote {cfg.out}; "
          f"score it: .venv/bin/python benchmarks/label_audit.py {cfg.run_dir} --iteration "
          f"{cfg.iteration} --reflections {cfg.out}")  # fmt: skip
    return refls


def main(argv: list[str] | None = None) -> None:
    """Parse, validate, label; a bad value or missing input exits 2 with one ``error:`` line."""
    import cli_common

    cfg = tyro.cli(ReflectRunConfig, args=argv, description=__doc__.split("\n\n")[0])
    cli_common.run_cli(reflect_run, cfg)


if __name__ == "__main__":
    main()
