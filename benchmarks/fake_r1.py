"""A fake DeepSeek-R1 behind an OpenAI-compatible endpoint on 127.0.0.1, for
benchmarks/paper_rehearsal.py: it answers a reflection request as R1 does -- reasoning,
``</think>``, then the JSON list of labels, sometimes in a code fence or with prose after it,
or with the reasoning in ``reasoning_content`` as DeepSeek's own API sends it (:data:`SHAPES`,
in turn) -- and its labels are meaningful: the project's offline rule labeller
(:mod:`sfjax.agents.reflectors.rule`) applied to the steps it reads back from the request's
text (:func:`rule_labels`). It checks the key (:data:`DUMMY_KEY` in :data:`KEY_ENV`, the paper
preset's variable) and records what it served. Faults are tests/fake_openai.py's business.
"""

from __future__ import annotations

import json
import re
import time

from sfjax.testing import LocalJSONServer, send_json

KEY_ENV = "DEEPSEEK_API_KEY"
"""The paper preset's key variable (``ApiReflectorConfig.api_key_env``); a dummy value here."""
DUMMY_KEY = "sk-rehearsal-dummy-key-0000"

_STEP_RE = re.compile(r"^step (\d+): state: (.*?) \| action (\d+)(.*)$", re.M)
_RANGE_RE = re.compile(r"\d+ PRBs each, from (\d+) to (\d+)\)")
_NUM = r"([-+]?\d+(?:\.\d+)?)"

SHAPES = ("r1_content", "fenced", "prose_after", "reasoning_content")
"""How the fake's replies come, in turn: R1 served without a reasoning parser (reasoning,
``</think>`` with no opening tag, the list), a code fence around the list after ``<think>...
</think>``, prose with brackets after the list, and DeepSeek's API (reasoning in
``reasoning_content``, the list alone in ``content``)."""


def _number(pattern: str, text: str, default: float = 0.0) -> float:
    m = re.search(pattern.replace("#", _NUM), text)
    return float(m.group(1)) if m else default


def steps_from_request(user: str):
    """The steps of a reflection request, read back from its text as
    :func:`sfjax.agents.reflectors.base.reflection_user_prompt` writes them (state, action,
    feedback; the Actor's own words between them are skipped)."""
    from sfjax.agents.trajectory import Step

    steps = []
    for m in _STEP_RE.finditer(user):
        t, state, action, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        feedback = rest.rpartition(" | feedback: ")[2]
        where = re.search(r"QoS violation \(([^)]*)\)", feedback)
        violation = "QoS violation" in feedback and "no QoS violation" not in feedback
        arrival = _number(r"arrivals # Mb/s", state) * 1e6
        fb = {
            "se": _number(r"SE # bit/s/Hz", feedback),
            "violation": float(violation),
            "reconfiguration": float("not reconfigured" not in feedback),
            "arrival_rate_bps": arrival,
            "queue_delta_bytes": 0.0,
            "dropped_bytes": _number(r"dropped # kB", feedback) * 1e3,
        }
        if where is not None:
            fb["slice_violation"] = float("slice 0" in where.group(1))
            fb["other_violation"] = float("slice 1" in where.group(1))
        prev = int(_number(r"allocation # ", state))
        state_d = {"prev_action": prev, "se": 0.0, "arrival_rate_bps": arrival,
                   "queue_delta_bytes": 0.0, "dropped_bytes": 0.0}  # fmt: skip
        steps.append(Step(t, state_d, "", "", "", action, "", True, fb))
    return steps


def rule_labels(system: str, user: str) -> list[dict]:
    """The fake Reflector's verdicts: the offline rule labeller on the request's steps."""
    from sfjax.agents.prompts import PromptConfig
    from sfjax.agents.reflectors.rule import RuleReflector, RuleReflectorConfig
    from sfjax.agents.trajectory import Trajectory

    m = _RANGE_RE.search(system)
    lo, hi = (int(m.group(1)), int(m.group(2))) if m else (1, 12)
    steps = steps_from_request(user)
    labels = RuleReflector(RuleReflectorConfig(), PromptConfig(action_lo=lo, action_hi=hi)).label(
        Trajectory(0, 0, steps)
    )
    return [
        {"step": x.step, "label": x.label, "improved_action": x.improved_action,
         "reason": x.reason.removeprefix("[rule-based hindsight labeller] ")}
        for x in labels
    ]  # fmt: skip


def r1_reply(labels: list[dict], shape: str) -> tuple[str, str | None]:
    """(content, reasoning_content) of a reply in the given :data:`SHAPES` entry."""
    answer = json.dumps(labels, indent=1)
    n_sub = sum(x["label"] == "suboptimal" for x in labels)
    thinking = (
        f"Okay, let me go through the {len(labels)} steps [{labels[0]['step']}..."
        f"{labels[-1]['step']}] one by one. A step with a violation {{slice 0}} needs more; "
        f"a short dip that came back is [not worth] two reconfigurations. So {n_sub} are "
        "suboptimal. Let me write the list."
    )
    if shape == "r1_content":
        return f"{thinking}\n</think>\n\n{answer}", None
    if shape == "fenced":
        return f"<think>\n{thinking}\n</think>\n\n```json\n{answer}\n```", None
    if shape == "prose_after":
        return (f"{thinking}\n</think>\n\n{answer}\n\nNote: steps [{labels[0]['step']}] and "
                f"[{labels[-1]['step']}] were borderline {{see above}}."), None  # fmt: skip
    return answer, thinking


class FakeR1(LocalJSONServer):
    """``with FakeR1() as server: server.url``; ``server.requests`` lists what it served."""

    def __init__(self):
        self.requests: list[dict] = []
        self.errors: list[str] = []
        super().__init__(path="/v1")

    def handle_post(self, h, body: dict) -> None:
        try:
            code, reply = self.answer(h.path, h.headers, body)
        except Exception as e:  # a bug of the fake: a 500 the client retries, noted
            with self.lock:
                self.errors.append(f"{type(e).__name__}: {e}")
            code, reply = 500, {"error": {"message": f"fake R1 failed: {e}"}}
        send_json(h, code, reply)

    def answer(self, path: str, headers, body: dict) -> tuple[int, dict]:
        if path.rstrip("/") != "/v1/chat/completions":
            return 404, {"error": {"message": f"no route {path}"}}
        if headers.get("Authorization") != f"Bearer {DUMMY_KEY}":
            return 401, {"error": {"message": "Authentication Fails (wrong key)"}}
        messages = body["messages"]
        system, user = messages[0]["content"], messages[1]["content"]
        labels = rule_labels(system, user)
        with self.lock:
            n = len(self.requests)
            self.requests.append({
                "model": body.get("model"), "max_tokens": body.get("max_tokens"),
                "messages": len(messages), "chars": sum(len(m["content"]) for m in messages),
                "steps": [x["step"] for x in labels],
            })  # fmt: skip
        if not labels:  # a request without steps (Reflexion's self-reflection): a lesson
            content, reasoning = "Thinking.\n</think>\n\nLesson: react to violations.", None
        else:
            content, reasoning = r1_reply(labels, SHAPES[n % len(SHAPES)])
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        return 200, {
            "id": f"fake-r1-{n}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }  # fmt: skip
