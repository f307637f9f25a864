"""The ``local`` Reflector: a Flax Qwen3 checkpoint run by the project's own sampler.

Same prompts, windows, summary and validation as the ``api`` backend; all windows of all
trajectories go to the sampler as one batch per attempt. Windows whose reply fails validation
are re-asked (the validation error appended to their conversation) up to
``max_format_retries`` times; a window that never validates raises — nothing malformed is
accepted. Sampling is seeded by the key the loop passes, so a resumed run reproduces it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax

from sfjax.agents.prompts import PromptConfig
from sfjax.agents.reflectors.base import (
    AGENT_TEXT_CHARS,
    ReflectorError,
    ReplyError,
    merge_windows,
    reflection_system_prompt,
    reflection_user_prompt,
    trajectory_summary,
    validate_reply,
    windows,
)
from sfjax.agents.trajectory import Reflection, Trajectory


@dataclass(frozen=True)
class LocalReflectorConfig:
    """A local Flax checkpoint as the Reflector."""

    checkpoint: str = ""
    """HF-layout checkpoint directory (or hub id) of the Reflector model."""
    dtype: str = "bfloat16"
    """Parameter dtype: bfloat16 or float32."""
    window_steps: int = 25
    """Steps per prompt (keep prompt + reply within the model's context)."""
    max_new_tokens: int = 4096
    """Reply budget per window (thinking models need more)."""
    temperature: float = 0.6
    """Sampling temperature (Qwen3's recommendation for thinking mode)."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    enable_thinking: bool = True
    """Let a Qwen3 Reflector think before answering (its <think> block is stripped)."""
    max_format_retries: int = 3
    """Re-asks after a reply that fails validation."""


GenerateFn = Callable[[list[list[dict]], jax.Array], list[str]]
"""(conversations, key) -> one reply text per conversation."""


class LocalReflector:
    """Reflector on a local model; ``generate`` turns chat conversations into replies."""

    collective = True
    """Every process of a multi-host run calls :meth:`reflect`: its model may be sharded over
    all of them (see :mod:`sfjax.agents.reflectors.broadcast`)."""

    def __init__(
        self,
        cfg: LocalReflectorConfig,
        prompt_cfg: PromptConfig,
        generate: GenerateFn,
        name: str,
        *,
        agent_text_chars: int = AGENT_TEXT_CHARS,
    ):
        self.cfg = cfg
        self.prompt_cfg = prompt_cfg
        self.agent_text_chars = agent_text_chars
        self.generate = generate
        self.name = f"local ({name})"
        self.stats = {"requests": 0, "format_retries": 0}

    def reflect(self, trajectories: Sequence[Trajectory], key: jax.Array) -> list[Reflection]:
        summaries = [trajectory_summary(t) for t in trajectories]
        jobs = []  # (trajectory index, window, conversation)
        system = reflection_system_prompt(self.prompt_cfg)
        for ti, traj in enumerate(trajectories):
            for w in windows(len(traj.steps), self.cfg.window_steps):
                user = reflection_user_prompt(
                    traj, w, summaries[ti], self.prompt_cfg, self.agent_text_chars
                )
                jobs.append(
                    [
                        ti,
                        w,
                        [{"role": "system", "content": system}, {"role": "user", "content": user}],
                    ]
                )
        results: dict[int, list] = {}
        pending = list(range(len(jobs)))
        for attempt in range(self.cfg.max_format_retries + 1):
            key, sub = jax.random.split(key)
            replies = self.generate([jobs[j][2] for j in pending], sub)
            self.stats["requests"] += len(pending)
            still = []
            for j, text in zip(pending, replies):
                ti, w, convo = jobs[j]
                traj = trajectories[ti]
                try:
                    results[j] = validate_reply(
                        text,
                        [traj.steps[i].t for i in w],
                        [traj.steps[i].action for i in w],
                        self.prompt_cfg,
                    )
                except ReplyError as e:
                    jobs[j][2] = convo + [
                        {"role": "assistant", "content": text},
                        {
                            "role": "user",
                            "content": f"Your reply was invalid: {e}. Reply again with ONLY the "
                            f"corrected JSON list for steps {w.start} to {w.stop - 1}.",
                        },
                    ]
                    still.append((j, str(e)))
            if not still:
                break
            if attempt == self.cfg.max_format_retries:
                j, err = still[0]
                raise ReflectorError(
                    f"local Reflector: {len(still)} window(s) still invalid after "
                    f"{attempt + 1} attempts (e.g. steps {jobs[j][1].start}-"
                    f"{jobs[j][1].stop - 1}: {err}); use a stronger Reflector model"
                )
            self.stats["format_retries"] += len(still)
            pending = [j for j, _ in still]
        out = []
        for ti, traj in enumerate(trajectories):
            parts = [results[j] for j in range(len(jobs)) if jobs[j][0] == ti]
            out.append(
                Reflection(traj.env_index, merge_windows(traj, parts), summaries[ti], self.name)
            )
        return out
