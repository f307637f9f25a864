"""The Actor's prompt (paper IV-A/IV-B, R-MDP) and a robust parser for its output.

The Actor sees, in words, the task and its three objectives (the controlled slice's spectral
efficiency, packet QoS violations, reconfigurations), generated from the same scoring objective
the env and Table III use (``PromptConfig.objective``, :mod:`sfjax.agents.objective_text`) —
never a scalar reward — followed by the current state of eq. 14,

    s_t = (a_{t-1}, SE_t, arrival throughput_t, queue increment_t, dropped bytes_t),

with slice 1's arrivals, queue change and drops appended when the state carries them (the env
runners do by default: under cell-wide violations the agent must see both slices),

and a window of the last ``k`` R-MDP steps (state, reflection, action, analysis, feedback). It
answers with three fields: a reflection ``rho_t`` on the previous step, ``Action: <int>`` and a
short analysis ``eta_t``. Two field orders are supported: ``reflection_first`` (the paper's
order: rho, a, eta) and ``action_first`` (a, rho, eta — the action is decided after a few
tokens, which cuts decision latency; the reflection then explains it).

The parser never guesses: it finds exactly one ``Action`` field holding an integer in range, or
it reports why not (the Actor then keeps the previous allocation and counts the failure).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from sfjax.agents.objective_text import objective_compact, objective_lines
from sfjax.envs.objective import Objective

FieldOrder = Literal["reflection_first", "action_first"]

ACTION_FIELD = "Action:"
"""The literal that opens the action line; the sampler's action constraint keys on it."""

# Keys of the eq. 14 state and of the feedback vector, as the env's ``info`` dict names them.
STATE_KEYS = ("prev_action", "se", "arrival_rate_bps", "queue_delta_bytes", "dropped_bytes")
OTHER_STATE_KEYS = ("other_arrival_rate_bps", "other_queue_delta_bytes", "other_dropped_bytes")
"""The other slice's demand (eq. 14 of slice 1); shown whenever the state carries it, which the
env runners do by default: with cell-wide violations the agent must see both slices."""
FEEDBACK_KEYS = (
    "se",
    "violation",
    "reconfiguration",
    "arrival_rate_bps",
    "queue_delta_bytes",
    "dropped_bytes",
    "slice_violation",
    "other_violation",
)


@dataclass(frozen=True)
class PromptConfig:
    """How the Actor's prompt is written and its output read."""

    action_lo: int = 1
    """Smallest allowed action (resource units for the controlled slice). The experiment
    scripts take the range from the env (``prompt_config_for_env``) and refuse another given
    value; the defaults are the default env's range (25 PRBs: 13 RBGs, one kept for slice 1)."""
    action_hi: int = 12
    """Largest allowed action."""
    action_unit: str = "RBG"
    """Name of the action's unit, as shown to the model."""
    prbs_per_unit: int = 2
    """PRBs per action unit (shown to the model so it can reason in PRBs too)."""
    history_window: int = 5
    """k: how many past steps the prompt shows (the Actor's short-term memory, paper IV-B3)."""
    field_order: FieldOrder = "reflection_first"
    """``reflection_first`` (paper: rho, a, eta) or ``action_first`` (a, rho, eta; lower latency)."""
    max_field_chars: int = 240
    """Reflections/analyses from history are cut to this many characters in the prompt (0 leaves
    them out: shown as "-")."""
    slice_description: str = (
        "Slice 0 serves 20 GBR users (0.5 Mb/s each while active, 10 ms delay budget); "
        "slice 1 serves 4 non-GBR users (2 Mb/s each while active, 50 ms delay budget). "
        "Users switch on and off at random (mean 15 s on, 15 s off)."
    )
    """Words describing the slices and their traffic."""
    enable_thinking: bool = False
    """Passed to the Qwen3 chat template; thinking off keeps decisions short."""
    style: Literal["full", "compact"] = "full"
    """``full``: the task in detail; ``compact``: the same objectives in a few lines, for
    small-context models and fast CPU runs."""
    objective: Objective = Objective()
    """The scoring objective the prompt states in words (set from the env by
    ``prompt_config_for_env``; Table III scores the same one)."""
    trade_off: bool = True
    """Also state how the objectives weigh against each other (eq. 15's weights as ratios) to
    the Actor, the Reflector and Reflexion. False: the objectives in words only (an ablation:
    the paper's agents get no handcrafted reward, and eq. 15 is given for the RL baselines)."""

    def __post_init__(self):
        if not 0 <= self.action_lo <= self.action_hi:
            raise ValueError(
                f"PromptConfig: need 0 <= action_lo <= action_hi, got "
                f"[{self.action_lo}, {self.action_hi}]"
            )
        if self.history_window < 0:
            raise ValueError("PromptConfig.history_window must be >= 0")
        if self.max_field_chars < 0:
            raise ValueError(
                f"PromptConfig.max_field_chars must be >= 0, got {self.max_field_chars}"
            )
        if self.style not in ("full", "compact"):
            raise ValueError(f"PromptConfig.style must be 'full' or 'compact', got {self.style!r}")
        if self.field_order not in ("reflection_first", "action_first"):
            raise ValueError(
                f"PromptConfig.field_order must be 'reflection_first' or 'action_first', "
                f"got {self.field_order!r}"
            )


@dataclass(frozen=True)
class HistoryEntry:
    """One past R-MDP step as the prompt shows it."""

    state: Mapping[str, float]
    reflection: str
    action: int
    analysis: str
    feedback: Mapping[str, float]


@dataclass(frozen=True)
class ParsedOutput:
    """The Actor's three fields; ``action`` is None when the output is unusable (see ``error``)."""

    reflection: str
    action: int | None
    analysis: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.action is not None


class _FMT:
    """Number formats used in the prompt (kept short: every character is a token)."""

    mbps = "{:.2f} Mb/s"
    kbytes = "{:.1f} kB"
    se = "{:.2f} bit/s/Hz"


def system_prompt(cfg: PromptConfig) -> str:
    """The task and objectives in words (no reward), and the output format."""
    lo, hi, unit = cfg.action_lo, cfg.action_hi, cfg.action_unit
    fields = _field_lines(cfg)
    if cfg.style == "compact":
        objectives = objective_compact(cfg.objective, trade_off=cfg.trade_off)
        return (
            f"You control a RAN slice: every 100 ms choose the {unit}s ({cfg.prbs_per_unit} PRBs "
            f"each) for slice 0; slice 1 gets the rest. {objectives}\n"
            f"Answer in three lines:\n{fields}\n"
            f"The action is an integer from {lo} to {hi}."
        )
    return (
        "You are a RAN slicing controller for one LTE base station. Every 100 ms you decide how "
        f"many resource block groups ({unit}s, {cfg.prbs_per_unit} PRBs each) the controlled "
        "slice (slice 0) gets; the remaining ones go to slice 1.\n"
        f"{cfg.slice_description}\n"
        "Your objectives, all at once:\n"
        + "\n".join(objective_lines(cfg.objective, trade_off=cfg.trade_off)) + "\n"
        "Learn from the recent steps shown to you.\n"
        f"Answer with exactly three lines, in this order:\n{fields}\n"
        f"The action is an integer from {lo} to {hi}."
    )


def _field_lines(cfg: PromptConfig) -> str:
    refl = "Reflection: <one sentence on how your previous decision worked out>"
    act = f"{ACTION_FIELD} <integer number of {cfg.action_unit}s for slice 0>"
    ana = "Analysis: <one sentence on why this action fits the current state>"
    order = (refl, act, ana) if cfg.field_order == "reflection_first" else (act, refl, ana)
    return "\n".join(order)


def format_state(state: Mapping[str, float], cfg: PromptConfig) -> str:
    """The eq. 14 state in words: previous allocation, SE, arrival rate, queue delta, drops."""
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise KeyError(f"state is missing {missing}; expected keys {STATE_KEYS}")
    text = (
        f"allocation {int(state['prev_action'])} {cfg.action_unit}s, "
        f"SE {_FMT.se.format(float(state['se']))}, "
        f"arrivals {_FMT.mbps.format(float(state['arrival_rate_bps']) / 1e6)}, "
        f"queue change {_FMT.kbytes.format(float(state['queue_delta_bytes']) / 1e3)}, "
        f"dropped {_FMT.kbytes.format(float(state['dropped_bytes']) / 1e3)}"
    )
    if all(k in state for k in OTHER_STATE_KEYS):
        text += (
            f"; slice 1: arrivals "
            f"{_FMT.mbps.format(float(state['other_arrival_rate_bps']) / 1e6)}, queue change "
            f"{_FMT.kbytes.format(float(state['other_queue_delta_bytes']) / 1e3)}, dropped "
            f"{_FMT.kbytes.format(float(state['other_dropped_bytes']) / 1e3)}"
        )
    return text


def format_feedback(feedback: Mapping[str, float]) -> str:
    """The feedback vector f_t of one step, in words."""
    parts = [f"SE {_FMT.se.format(float(feedback.get('se', 0.0)))}"]
    if not feedback.get("violation", 0):
        parts.append("no QoS violation")
    elif "slice_violation" in feedback and "other_violation" in feedback:
        where = [name for key, name in (("slice_violation", "slice 0"),
                                        ("other_violation", "slice 1")) if feedback[key]]
        parts.append(f"QoS violation ({' and '.join(where) or 'cell'})")
    else:
        parts.append("QoS violation")
    parts.append("reconfigured" if feedback.get("reconfiguration", 0) else "not reconfigured")
    parts.append(f"dropped {_FMT.kbytes.format(float(feedback.get('dropped_bytes', 0.0)) / 1e3)}")
    return ", ".join(parts)


def _clip(text: str, n: int) -> str:
    if n <= 0:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= n else text[: max(n - 3, 0)] + "..."


def user_prompt(
    state: Mapping[str, float], history: Sequence[HistoryEntry], cfg: PromptConfig, *, step: int
) -> str:
    """The user turn: last-k window (oldest first) then the current state."""
    window = list(history)[-cfg.history_window :] if cfg.history_window else []
    lines = []
    if window:
        lines.append(f"Recent steps (oldest first, last {len(window)}):")
        first = step - len(window)
        for i, h in enumerate(window):
            if cfg.style == "compact":
                lines.append(
                    f"[t={first + i}] {format_state(h.state, cfg)} | reflection: "
                    f"{_clip(h.reflection, cfg.max_field_chars) or '-'} | action {int(h.action)}"
                    f" | analysis: {_clip(h.analysis, cfg.max_field_chars) or '-'} | "
                    f"feedback: {format_feedback(h.feedback)}"
                )
                continue
            lines.append(
                f"[t={first + i}] state: {format_state(h.state, cfg)}\n"
                f"  reflection: {_clip(h.reflection, cfg.max_field_chars) or '-'}\n"
                f"  action: {int(h.action)}\n"
                f"  analysis: {_clip(h.analysis, cfg.max_field_chars) or '-'}\n"
                f"  feedback: {format_feedback(h.feedback)}"
            )
    else:
        lines.append("No previous steps yet.")
    lines.append(f"Current state [t={step}]: {format_state(state, cfg)}")
    lines.append("Decide the allocation for the next 100 ms.")
    return "\n".join(lines)


def build_messages(
    state: Mapping[str, float], history: Sequence[HistoryEntry], cfg: PromptConfig, *, step: int
) -> list[dict[str, str]]:
    """Chat messages (system + user) for the Actor at step ``step``."""
    return [
        {"role": "system", "content": system_prompt(cfg)},
        {"role": "user", "content": user_prompt(state, history, cfg, step=step)},
    ]


def format_output(reflection: str, action: int, analysis: str, cfg: PromptConfig) -> str:
    """The canonical completion text for the three fields (inverse of :func:`parse_output`)."""
    refl = f"Reflection: {' '.join(reflection.split())}"
    act = f"{ACTION_FIELD} {int(action)}"
    ana = f"Analysis: {' '.join(analysis.split())}"
    order = (refl, act, ana) if cfg.field_order == "reflection_first" else (act, refl, ana)
    return "\n".join(order)


# A field header at the start of a line, tolerant of markdown decoration ("**Action**:", "- ").
# Every quantifier is possessive or separated from its neighbour by a disjoint class, so a
# hostile output (50k "*" characters) is matched in linear time, not quadratic.
_HEADER = (
    r"^[ \t>*_#\-]*+(?:\d++[.)][ \t]*+[*_]*+)?{name}[*_]*+[ \t]*+(?:[:：=]|\bis\b)[*_ \t]*+"
)
_FIELD_RE = {
    name: re.compile(_HEADER.format(name=name), re.IGNORECASE | re.MULTILINE)
    for name in ("reflection", "action", "analysis")
}
_THINK_RE = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL)
# The action field's value: one integer (optionally signed, optionally with a zero fraction)
# with markdown decoration around it. "7/2", "5e3", "0x5", "5-7", "1,5" fail at the character
# after the digits; an alternative or a digit group right after it ("5 or 6", "5 to 6",
# "5, 6", "1 000") is refused by _ALTERNATIVE_RE; later words with numbers ("7 RBGs (14 PRBs)")
# are prose.
_INT_RE = re.compile(
    r"[*_`\[\( \t]*+([+-]?\d{1,6}+)(?:\.0++)?(?=$|[\s*_`\])]|[.,;:!?](?!\d))(.*)", re.DOTALL
)
_ALTERNATIVE_RE = re.compile(
    r"[*_`\])]*+[ \t(\[]*+(?:(?:or|and|to|vs\.?|versus)\b|[-–—/|,;~]|\.\.)[ \t*_`(\[]*+[+-]?\d"
    r"|[ \t]\d{3}(?!\d)",
    re.IGNORECASE,
)


def parse_output(text: str, cfg: PromptConfig) -> ParsedOutput:
    """Extract (reflection, action, analysis) from an Actor output, in either field order.

    Rules: ``<think>`` blocks are ignored; field headers are case-insensitive and may carry
    markdown decoration; the action must be exactly one integer in ``[action_lo, action_hi]``
    right after its header (``Action: 7``, ``**Action:** 7 RBGs``); two different action values
    or a value that is not one plain integer (``7/2``, ``5e3``, ``0x5``, ``5 or 6``, ``5, 6``,
    ``1 000``) are errors, never guessed. Linear in the text. Missing reflection/analysis fields are
    tolerated (empty strings) — they carry no control decision.
    """
    body = _THINK_RE.sub("", text)
    spans = []
    for name, rx in _FIELD_RE.items():
        for m in rx.finditer(body):
            spans.append((m.start(), m.end(), name))
    spans.sort()
    values: dict[str, list[str]] = {"reflection": [], "action": [], "analysis": []}
    for i, (_, end, name) in enumerate(spans):
        stop = spans[i + 1][0] if i + 1 < len(spans) else len(body)
        values[name].append(body[end:stop].strip())
    reflection = " ".join(values["reflection"][:1]).strip()
    analysis = " ".join(values["analysis"][:1]).strip()
    if not values["action"]:
        return ParsedOutput(reflection, None, analysis, "no 'Action:' field")
    actions = []
    for raw in values["action"]:
        line = raw.split("\n", 1)[0]
        m = _INT_RE.match(line)
        if m is None or _ALTERNATIVE_RE.match(m.group(2)):
            return ParsedOutput(
                reflection, None, analysis, f"action value is not an integer: {line[:40]!r}"
            )
        actions.append(int(m.group(1)))
    if len(set(actions)) > 1:
        return ParsedOutput(reflection, None, analysis, f"conflicting actions {actions}")
    action = actions[0]
    if not cfg.action_lo <= action <= cfg.action_hi:
        return ParsedOutput(
            reflection,
            None,
            analysis,
            f"action {action} outside [{cfg.action_lo}, {cfg.action_hi}]",
        )
    return ParsedOutput(reflection, action, analysis, None)


def with_action(text: str, action: int, cfg: PromptConfig) -> str | None:
    """``text`` with the value of every ``Action:`` field (outside ``<think>`` blocks) set to
    ``action``, the rest of the text unchanged; ``None`` when no field's value is one integer or
    the result would not parse (:func:`parse_output`) to ``action``."""
    thinks = [m.span() for m in _THINK_RE.finditer(text)]
    pieces, last = [], 0
    for header in _FIELD_RE["action"].finditer(text):
        if any(a <= header.start() < b for a, b in thinks):
            continue
        start = header.end()
        while start < len(text) and text[start].isspace():
            start += 1  # parse_output strips the field before reading its first line
        value = _INT_RE.match(text, start)
        if value is None or value.start(1) < last:
            return None
        pieces += [text[last : value.start(1)], str(int(action))]
        last = value.end(1)
    if not pieces:
        return None
    new = "".join(pieces) + text[last:]
    parsed = parse_output(new, cfg)
    return new if parsed.ok and parsed.action == int(action) else None
