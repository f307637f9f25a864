"""HTTP for the api Reflector: the openai client with a configurable backoff, and a transport
that gives every attempt a total deadline and turns a 200 that is not a chat completion into a
retryable error. Why each exists (what openai 3.60 cannot do) is in
:mod:`sfjax.agents.reflectors.api`'s docstring.
"""

from __future__ import annotations

import json
import math
import random
import threading

import httpx2
import openai


class RetryingClient(openai.OpenAI):
    """openai's client with a configurable backoff: openai fixes it at 0.5 s doubling to 8 s
    (module constants), so the one method that computes the delay is overridden; its retry loop,
    error classification and ``Retry-After`` parsing are openai's."""

    def __init__(self, *, backoff_base_s: float, backoff_max_s: float, **kw):
        super().__init__(**kw)
        self._backoff = (backoff_base_s, backoff_max_s)

    def _calculate_retry_timeout(self, remaining_retries, options, response_headers=None):
        base, cap = self._backoff
        retry_after = self._parse_retry_after_header(response_headers)
        max_retries = options.get_max_retries(self.max_retries)
        delay = random.uniform(0, min(cap, base * 2 ** min(max_retries - remaining_retries, 60)))
        if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
            # in full: an earlier retry is refused again; openai does not retry at all when the
            # server asks for more than 120 s, so the wait stays bounded
            delay = max(delay, retry_after)
        return delay


def _completion_problem(status: int, headers, body: bytes) -> str | None:
    """Why a 200 body is not a chat completion, or None when it is one."""
    decoded = httpx2.Response(status, headers=headers, content=body)
    try:
        data = json.loads(decoded.read())
    except (ValueError, UnicodeDecodeError):
        ctype = headers.get("content-type", "no content type")
        return f"a body that is not JSON ({ctype}, {len(body)} bytes)"
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        return "JSON without a 'choices' list"
    if not data["choices"]:
        return "an empty 'choices' list"
    return None


class AttemptTransport(httpx2.BaseTransport):
    """One HTTP attempt with a total deadline, classified and reported to ``on_attempt(kind,
    reason[, response])`` (the response of an HTTP error status).

    The attempt (connect, send, headers, body) runs on a helper thread; the caller waits at most
    ``deadline_s`` and then raises ``httpx2.ReadTimeout``, which openai retries. The helper stops
    at the next chunk of a trickling reply (or at the per-read timeout of a silent one).

    The attempt goes through an inner ``httpx2.Client``, which picks the proxy from
    ``HTTP(S)_PROXY`` / ``ALL_PROXY`` / ``NO_PROXY`` as openai's own client does: a client given
    a transport (this one) ignores the environment's proxies.
    """

    def __init__(self, deadline_s: float, on_attempt):
        self._inner = httpx2.Client(follow_redirects=False)  # openai's client follows them
        self.deadline_s = deadline_s
        self.on_attempt = on_attempt

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        box: dict = {}
        done, cancel = threading.Event(), threading.Event()

        def attempt():
            try:
                resp = self._inner.send(request, stream=True)
                chunks = []
                try:
                    for chunk in resp.stream:
                        if cancel.is_set():
                            return
                        chunks.append(chunk)
                finally:
                    resp.stream.close()
                box["reply"] = (resp.status_code, resp.headers, b"".join(chunks))
            except BaseException as e:  # handed to the caller's thread
                box["error"] = e
            finally:
                done.set()

        threading.Thread(target=attempt, daemon=True, name="reflector-http").start()
        if not done.wait(self.deadline_s):
            cancel.set()
            reason = f"no complete reply within the {self.deadline_s:g} s deadline"
            self.on_attempt("deadline", reason)
            raise httpx2.ReadTimeout(reason, request=request)
        if "error" in box:
            err = box["error"]
            kind = "timeout" if isinstance(err, httpx2.TimeoutException) else "connection"
            self.on_attempt(kind, f"{type(err).__name__}: {err}")
            raise err
        status, headers, body = box["reply"]
        if status == 200:
            problem = _completion_problem(status, headers, body)
            if problem is not None:
                self.on_attempt("non-completion 200", f"HTTP 200 with {problem}")
                msg = f"the endpoint answered HTTP 200 with {problem}"
                return httpx2.Response(
                    502,
                    headers={"x-should-retry": "true"},
                    json={"error": {"message": msg}},
                    request=request,
                )
            self.on_attempt(None, None)
        response = httpx2.Response(status, headers=headers, content=body, request=request)
        if status != 200:
            after = headers.get("retry-after")
            self.on_attempt(
                f"HTTP {status}",
                f"HTTP {status}" + (f" (Retry-After {after})" if after else ""),
                response,
            )
        return response

    def close(self) -> None:
        self._inner.close()
