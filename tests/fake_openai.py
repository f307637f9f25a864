"""A fake OpenAI-compatible chat-completions server on 127.0.0.1 that injects faults.

The fake Reflector's verdict on a step is :func:`truth`; replies are built from the steps it
finds in the request, so a reply is right exactly when the client sent the right steps. Faults
(transport errors, non-JSON 200 bodies, trickled replies, malformed / truncated / partial
replies) are drawn per request with probability ``fault_rate`` from ``faults`` (a kind listed
k times is drawn k times as often; by default :data:`RANDOM_FAULTS`), or scripted per request
with ``script`` (a list consumed in order). Good replies come in the shapes DeepSeek-R1 produces (see :data:`GOOD_SHAPES`). Counts
of what was served are in ``counts``, the request bodies in ``bodies`` (their arrival times in
``arrivals``, their request targets in ``paths``) and the ``Authorization`` headers seen in
``auth``; ``refuse_all = True`` answers 500 to everything. A 429 carries ``Retry-After:
retry_after``. Like vLLM and Ollama it serves under ``/v1`` only (404 elsewhere); the scripted
kind ``context_400`` is vLLM's refusal of a request longer than the model's context. A request without reflection steps (Reflexion's self-reflection) is answered
with :data:`LESSON` in the same shapes.
"""

from __future__ import annotations

import json
import random
import re
import time
from http.server import BaseHTTPRequestHandler

from sfjax.testing import LocalJSONServer, send_json, send_raw

TRANSPORT_FAULTS = ("429", "500", "503", "hang", "reset", "trickle")
NON_COMPLETION_200 = ("html", "truncated_body", "empty_choices", "json_string")
REPLY_FAULTS = ("malformed", "missing_steps", "length")
ALL_FAULTS = TRANSPORT_FAULTS + NON_COMPLETION_200 + REPLY_FAULTS
RANDOM_FAULTS = tuple(k for k in ALL_FAULTS if k != "length")
"""The faults drawn at random by default: all but a reply cut off at max_tokens ("length"),
which the api Reflector asks once more with a larger budget and fails on the second time (a
budget too small, not a transient fault to retry through), so tests script it."""
GOOD_SHAPES = ("plain", "think", "r1_no_open_tag", "fenced", "prose_after", "reasoning_content")
LESSON = "Lesson: give slice 0 more RBGs before its queue grows."
THINKING = "Let me weigh every step again. " * 200
"""The reasoning of a ``think_malformed`` reply (in its content, as vLLM without a parser)."""
"""The fake's free-text reply to a request that shows no steps (a self-reflection)."""


def truth(step: int, action: int, lo: int = 1, hi: int = 12) -> tuple[str, int]:
    """The fake Reflector's deterministic verdict: (label, improved action)."""
    if action % 3 == 0:
        return "suboptimal", action + 1 if action < hi else action - 1
    return "effective", action


def steps_in(user: str) -> list[tuple[int, int]]:
    """(step, action) pairs of a reflection request's user message."""
    return [(int(s), int(a)) for s, a in re.findall(r"^step (\d+): .*?\| action (\d+)", user, re.M)]


class FakeOpenAI(LocalJSONServer):
    """``with FakeOpenAI(...) as server: server.url``; see the module docstring."""

    def __init__(
        self,
        fault_rate: float = 0.0,
        faults: tuple[str, ...] = RANDOM_FAULTS,
        seed: int = 0,
        hang_s: float = 1.0,
        script: list[str] | None = None,
        echo_key_401: bool = False,
        retry_after: str = "0",
    ):
        self.rng = random.Random(seed)
        self.fault_rate, self.faults, self.hang_s = fault_rate, faults, hang_s
        self.script = list(script or [])
        self.echo_key_401 = echo_key_401
        self.retry_after = retry_after
        self.counts: dict[str, int] = {}
        self.bodies: list[dict] = []
        self.arrivals: list[float] = []
        self.paths: list[str] = []
        self.auth: set[str | None] = set()
        self.refuse_all = False
        super().__init__(path="/v1")

    def handle_post(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        with self.lock:
            self.bodies.append(body)
            self.arrivals.append(time.monotonic())
            self.paths.append(h.path)
            self.auth.add(h.headers.get("Authorization"))
            kind = self._draw()
        if "/v1/" not in h.path:  # served under /v1 only, as vLLM / Ollama
            kind = "404"
        self._count(kind)
        self._serve(h, kind, body)

    # -- what to serve ---------------------------------------------------------------------

    def _draw(self) -> str:
        if self.refuse_all:
            return "500"
        if self.echo_key_401:
            return "401"
        if self.script:
            return self.script.pop(0)
        if self.rng.random() < self.fault_rate:
            return self.rng.choice(self.faults)
        return "ok:" + self.rng.choice(GOOD_SHAPES)

    def _count(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1

    @property
    def faults_injected(self) -> int:
        return sum(v for k, v in self.counts.items() if not k.startswith("ok:"))

    def _serve(self, h: BaseHTTPRequestHandler, kind: str, body: dict) -> None:
        items = [
            {"step": s, "label": truth(s, a)[0], "improved_action": truth(s, a)[1], "reason": "f"}
            for s, a in steps_in(body["messages"][1]["content"])
        ]
        good = json.dumps(items) if items else LESSON
        if kind == "429":
            headers = {"Retry-After": self.retry_after}
            return send_json(h, 429, {"error": {"message": "slow down"}}, headers)
        if kind == "404":
            return send_json(h, 404, {"detail": "Not Found"})
        if kind == "context_400":
            msg = ("This model's maximum context length is 32768 tokens. However, you requested "
                   "40000 tokens. Please reduce the length of the messages or completion.")
            return send_json(h, 400, {"error": {"message": msg, "type": "BadRequestError"}})
        if kind in ("500", "503"):
            return send_json(h, int(kind), {"error": {"message": "busy"}})
        if kind == "401":
            auth = h.headers.get("Authorization", "")
            msg = f"Incorrect API key provided: {auth.removeprefix('Bearer ')}"
            return send_json(h, 401, {"error": {"message": msg}})
        if kind == "hang":
            time.sleep(self.hang_s)
            return send_json(h, 200, _completion(good))
        if kind == "reset":
            h.close_connection = True
            h.connection.shutdown(2)
            return None
        if kind == "trickle":  # headers, then a keep-alive byte now and then, never the end
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", "100000")
            h.end_headers()
            for _ in range(int(self.hang_s * 20) + 40):
                h.wfile.write(b"\n")
                h.wfile.flush()
                time.sleep(0.05)
            h.close_connection = True
            return None
        if kind == "html":
            page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            return send_raw(h, 200, page, "text/html")
        if kind == "truncated_body":
            data = json.dumps(_completion(good)).encode()
            return send_raw(h, 200, data[: len(data) // 2], "application/json")
        if kind == "empty_choices":
            return send_json(h, 200, {**_completion(""), "choices": []})
        if kind == "json_string":
            return send_json(h, 200, "upstream timed out")
        if kind == "malformed":
            return send_json(h, 200, _completion(good[:-7]))
        if kind == "think_malformed":  # vLLM without a reasoning parser: thinking in content
            return send_json(h, 200, _completion(f"<think>{THINKING}</think>\n{good[:-7]}"))
        if kind == "missing_steps":
            return send_json(h, 200, _completion(json.dumps(items[1:])))
        if kind == "length":
            return send_json(h, 200, _completion("I need to check each step [" + good[:20], "length"))
        shape = kind.removeprefix("ok:")
        text = {
            "plain": good,
            "think": f"<think>step [0] looks [fine]</think>\n{good}",
            "r1_no_open_tag": f"Okay, steps [0, 1] {{hmm}} look [ok]\n</think>\n\n{good}",
            "fenced": f"```json\n{good}\n```",
            "prose_after": f"{good}\n\nNote: steps [1] and [2] were borderline {{see above}}.",
            "reasoning_content": good,
        }[shape]
        completion = _completion(text)
        if shape == "reasoning_content":
            completion["choices"][0]["message"]["reasoning_content"] = "thinking [a] {b}"
        return send_json(h, 200, completion)


def _completion(content: str, finish_reason: str = "stop") -> dict:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "fake-r1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
            }
        ],
    }
