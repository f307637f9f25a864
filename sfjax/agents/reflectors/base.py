"""What every Reflector shares (paper IV-B2/IV-B3): the interface, the LLM reflection prompt,
windowing with a whole-trajectory summary, and strict validation of the reply.

A Reflector reads complete trajectories after they end and returns, for every step, a label in
{effective, suboptimal} and an improved action a*_t (eq. 7: a*_t = Reflector(H, s_t)); for an
effective step a*_t is the action taken. LLM backends see the whole trajectory in one request
when it fits the model's context (the api backend), else in windows that fit (the local backend:
``window_steps``); each window's request carries a short summary of the whole trajectory, so
local judgements keep the global view. A reply must be a JSON list of ``{"step", "label",
"improved_action", "reason"}`` covering exactly the window's steps; anything else raises
:class:`ReplyError`, whose message is sent back to the model on the
retry — a malformed reply is never accepted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Protocol

import jax

from sfjax.agents.objective_text import objective_lines
from sfjax.agents.prompts import PromptConfig, format_feedback, format_state
from sfjax.agents.trajectory import LABELS, Reflection, StepLabel, Trajectory


class ReplyError(ValueError):
    """A Reflector reply that does not satisfy the output contract (message says why)."""


class ReflectorError(RuntimeError):
    """A Reflector could not produce valid labels (after all retries)."""


class Reflector(Protocol):
    """Labels every step of finished trajectories."""

    name: str
    """Backend name, written into every Reflection it produces."""

    def reflect(
        self, trajectories: Sequence[Trajectory], key: jax.Array | None = None
    ) -> list[Reflection]:
        """One Reflection per trajectory, with a label for every step."""
        ...


def windows(n_steps: int, window_steps: int) -> list[range]:
    """Split ``range(n_steps)`` into consecutive windows of at most ``window_steps`` steps."""
    if window_steps < 1:
        raise ValueError("window_steps must be >= 1")
    return [range(s, min(s + window_steps, n_steps)) for s in range(0, n_steps, window_steps)]


def trajectory_summary(traj: Trajectory, segment: int = 25) -> str:
    """A short whole-trajectory summary: totals, then per-segment action/SE/violations."""
    m = traj.metrics()
    acts = [s.action for s in traj.steps]
    lines = [
        f"Whole trajectory: {m['steps']} steps; mean SE {m['avg_se']:.2f} bit/s/Hz; "
        f"{int(m['violations'])} steps with QoS violations; "
        f"{int(m['reconfigurations'])} reconfigurations; actions min {min(acts)}, "
        f"max {max(acts)}, mean {sum(acts) / len(acts):.1f}."
    ]
    for r in windows(len(traj.steps), segment):
        seg = [traj.steps[i] for i in r]
        vio = sum(1 for s in seg if s.feedback["violation"])
        se = sum(float(s.feedback["se"]) for s in seg) / len(seg)
        arr = sum(float(s.feedback["arrival_rate_bps"]) for s in seg) / len(seg) / 1e6
        lines.append(
            f"steps {r.start}-{r.stop - 1}: mean action "
            f"{sum(s.action for s in seg) / len(seg):.1f}, mean SE {se:.2f}, "
            f"mean arrivals {arr:.2f} Mb/s, {vio} violation steps"
        )
    return "\n".join(lines)


def reflection_system_prompt(cfg: PromptConfig) -> str:
    """Instructions for an LLM Reflector: objectives, labels, improved actions, JSON format."""
    return (
        "You are the Reflector of a RAN slicing agent. The agent decided every 100 ms how many "
        f"{cfg.action_unit}s ({cfg.prbs_per_unit} PRBs each, from {cfg.action_lo} to "
        f"{cfg.action_hi}) the controlled slice 0 gets; the rest went to slice 1.\n"
        f"{cfg.slice_description}\n"
        "Its objectives (exactly how the agent is judged):\n"
        + "\n".join(objective_lines(cfg.objective, trade_off=cfg.trade_off)) + "\n"
        "You see the whole trajectory in hindsight. For EVERY step shown, judge the action "
        "taken at that step by its consequences (the feedback of that step and of the steps "
        'after it): label it "effective" or "suboptimal", and give the action that would '
        "have been better (for an effective step, the action taken).\n"
        "Reply with ONLY a JSON list, one object per step shown, in step order: "
        '[{"step": <int>, "label": "effective" | "suboptimal", "improved_action": <int>, '
        '"reason": "<short reason>"}]'
    )


AGENT_TEXT_CHARS = 160
"""Default characters of the Actor's reflection and analysis an LLM Reflector reads per step
(``ReflectorConfig.agent_text_chars``)."""


def reflection_user_prompt(
    traj: Trajectory,
    window: range,
    summary: str,
    cfg: PromptConfig,
    agent_text_chars: int = AGENT_TEXT_CHARS,
) -> str:
    """One window of a trajectory, with the whole-trajectory summary first; each step's
    reflection and analysis cut to ``agent_text_chars`` characters (0: left out)."""
    lines = [summary, f"\nSteps {window.start} to {window.stop - 1} of {len(traj.steps)}:"]
    for i in window:
        s = traj.steps[i]
        text = (
            f"agent's reflection: {_short(s.reflection, agent_text_chars)} | agent's analysis: "
            f"{_short(s.analysis, agent_text_chars)} | "
            if agent_text_chars
            else ""
        )
        lines.append(
            f"step {s.t}: state: {format_state(s.state, cfg)} | action {s.action}"
            f"{'' if s.parsed_ok else ' (output unusable, allocation kept)'} | "
            f"{text}feedback: {format_feedback(s.feedback)}"
        )
    lines.append(
        f"\nReturn the JSON list for steps {window.start} to {window.stop - 1} "
        f"({len(window)} objects)."
    )
    return "\n".join(lines)


def _short(text: str, n: int) -> str:
    """``text`` with whitespace collapsed, cut to ``n`` characters ending in '...' (n >= 4)."""
    text = " ".join(text.split())
    if n < 4:
        return (text[:n]) or "-"
    return (text if len(text) <= n else text[: n - 3] + "...") or "-"


_THINK_END = "</think>"
_OPENER_RE = re.compile(r"\[\s*(?=[{\]])|\{\s*(?=\"(?:labels|steps)\")")


def reply_answer(text: str | None) -> str:
    """A reasoning model's reply without its reasoning: everything up to the last ``</think>``
    dropped (R1 served without a reasoning parser sends no opening tag), stripped."""
    return (text or "").rsplit(_THINK_END, 1)[-1].strip()


def _extract_json(text: str):
    """The reply's JSON list of label objects, from any of the shapes reasoning models produce.

    Everything up to the last ``</think>`` is reasoning (R1 served without a reasoning parser
    sends the reasoning and ``</think>`` with no opening tag), so it is dropped, brackets and
    all. In the rest, every ``[`` that opens a list of objects (or ``{`` that opens
    ``{"labels": ...}``) is decoded with :meth:`json.JSONDecoder.raw_decode`, which stops at the
    end of the value, so prose (with brackets) after the JSON or a code fence around it does not
    matter; the last value that is a list of objects wins (a draft in prose comes first).
    """
    body = reply_answer(text)
    if not body:
        raise ReplyError("the reply is empty; return only the JSON list")
    decoder = json.JSONDecoder()
    found, err, pos = None, None, 0
    while (m := _OPENER_RE.search(body, pos)) is not None:
        try:
            value, end = decoder.raw_decode(body, m.start())
        except (json.JSONDecodeError, RecursionError) as e:
            err, pos = e, m.start() + 1
            continue
        if isinstance(value, dict) or (value and all(isinstance(x, dict) for x in value)):
            found = value
        pos = end
    if found is None:
        try:
            return json.loads(body)  # a bare non-list value gets the shape error below
        except json.JSONDecodeError as e:
            err = err or e
        raise ReplyError(f"the reply is not valid JSON ({err}); return only the JSON list")
    return found


def _as_int(v, what: str) -> int:
    if isinstance(v, bool):
        raise ReplyError(f"{what} must be an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v):
        return int(v)
    raise ReplyError(f"{what} must be an integer, got {v!r}")


def validate_reply(
    text: str, steps: Sequence[int], actions: Sequence[int], cfg: PromptConfig
) -> list[StepLabel]:
    """Parse and check a Reflector reply for the window ``steps`` (taken ``actions``).

    Accepts a JSON list (or ``{"labels": [...]}``), possibly in a code fence or after a
    ``<think>`` block. Requires exactly one object per step, labels in {effective,
    suboptimal}, and for a suboptimal step an integer improved action in range that differs
    from the action taken. An effective step's improved action is the action taken (eq. 7),
    whatever the reply gives for it, null or nothing included (the paper asks for improved
    actions for suboptimal decisions only, section IV-B2). Raises :class:`ReplyError`
    otherwise.
    """
    data = _extract_json(text)
    if isinstance(data, dict):
        data = data.get("labels", data.get("steps"))
    if not isinstance(data, list):
        raise ReplyError("the reply must be a JSON list of objects, one per step")
    taken = dict(zip(steps, actions))
    out: dict[int, StepLabel] = {}
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ReplyError(f"item {i} is not an object: {str(item)[:60]!r}")
        missing = [k for k in ("step", "label") if k not in item]
        if missing:
            raise ReplyError(f"item {i} lacks the key(s) {missing}")
        step = _as_int(item["step"], f"item {i} 'step'")
        if step not in taken:
            raise ReplyError(f"item {i} has step {step}, which is not one of the steps shown")
        if step in out:
            raise ReplyError(f"step {step} appears more than once")
        label = str(item["label"]).strip().lower()
        if label not in LABELS:
            raise ReplyError(f"step {step}: label must be one of {LABELS}, got {item['label']!r}")
        # an effective step's a*_t is the action taken (eq. 7)
        a = taken[step] if label == "effective" else _improved(item, step, taken[step], cfg)
        out[step] = StepLabel(step, label, a, str(item.get("reason", ""))[:500])
    absent = [s for s in steps if s not in out]
    if absent:
        raise ReplyError(f"steps {absent} are missing; give one object for every step shown")
    return [out[s] for s in steps]


def _improved(item: dict, step: int, taken: int, cfg: PromptConfig) -> int:
    """A suboptimal step's improved action: an integer in range, other than the one taken."""
    if item.get("improved_action") is None:
        raise ReplyError(f"step {step} is labelled suboptimal but lacks its improved_action")
    a = _as_int(item["improved_action"], f"step {step} 'improved_action'")
    if not cfg.action_lo <= a <= cfg.action_hi:
        raise ReplyError(
            f"step {step}: improved_action {a} outside [{cfg.action_lo}, {cfg.action_hi}]"
        )
    if a == taken:
        raise ReplyError(
            f"step {step}: labelled suboptimal but improved_action {a} is the action taken; "
            "a suboptimal step needs a different, better action (or label it effective)"
        )
    return a


def merge_windows(traj: Trajectory, parts: Sequence[list[StepLabel]]) -> list[StepLabel]:
    """Concatenate window labels and check that every step is labelled exactly once."""
    labels = [x for p in parts for x in p]
    if [x.step for x in labels] != [s.t for s in traj.steps]:
        raise ReflectorError("window labels do not cover the trajectory's steps exactly once")
    return labels
