"""How much experience Algorithm 1 (paper IV-B) gathers: :class:`LoopConfig`.

Its own module so that the experiments' CLI and the config checks import it without the loop
(:mod:`sfjax.agents.loop`, which re-exports it) and its orbax / model imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sfjax.configcheck import Bad, at_least, seeds


@dataclass(frozen=True)
class LoopConfig:
    """Algorithm 1: how many SF iterations, how much experience per iteration."""

    sf_iterations: int = 3
    """Self-finetuning iterations I (collect -> reflect -> RfR/KTO); plus a final collect. A
    rerun in the same run dir with a larger I extends the run there from its checkpoints."""
    num_envs: int = 1
    """Parallel environments (trajectories) collected per iteration."""
    trajectory_steps: int = 300
    """R-MDP steps per trajectory (paper: 300 decisions of 100 ms)."""
    env_seed: int = 0
    """Seed of the environments' keys."""
    same_env_seeds: bool = True
    """Collect every iteration on the same env seeds (iterations differ only by the Actor)."""
    seed: int = 0
    """Seed of the Actor's sampling, rollouts and KTO (root key)."""
    keep_checkpoints: int = 3
    """How many of the latest phase checkpoints to keep (>= 2: the previous one is the fallback
    when the newest is damaged); every collect phase's is kept besides (one per SF iteration:
    the Actor of each iterate)."""
    final_actor: Literal["last", "best"] = "last"
    """The Actor the run ends with, whose held-out "after" is measured and whose LoRA is saved
    as adapter/: ``last``, the Actor after the last SF iteration (Algorithm 1); or ``best``, of
    the iterates 0..I (0 = the Actor before any fine-tuning) the one whose collected
    trajectories had the highest mean eq. 15 utility (ties: the earlier), a guard against SF
    iterations that oscillate. Those trajectories are on the env seeds the Reflector labels,
    so the kept iterate's in-sample numbers are optimistic; judge it on held-out seeds. It
    chooses, it never trains: the iterates are the same either way, and a finished run may
    be rerun with the other value."""

    def env_key(self, iteration: int):
        """The key of SF iteration ``iteration``'s collect (:func:`sfjax.agents.collect.collect`
        splits it into the reset and per-step keys): every iteration's is iteration 0's under
        ``same_env_seeds``."""
        import jax

        return jax.random.fold_in(
            jax.random.key(self.env_seed), 0 if self.same_env_seeds else iteration
        )

    def invalid(self) -> list[Bad]:
        bad = at_least(self, 1, "sf_iterations", "num_envs", "trajectory_steps")
        bad += seeds(self, "env_seed", "seed")
        bad += at_least(self, 2, "keep_checkpoints")
        if self.final_actor not in ("last", "best"):
            bad.append(Bad("final_actor", "'last' or 'best'"))
        return bad
