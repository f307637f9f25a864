"""The ``api`` Reflector: any OpenAI-compatible chat-completions endpoint (DeepSeek-R1 default).

**Whole trajectory per request.** A trajectory goes to the model in one request when the
request (estimated at :data:`CHARS_PER_TOKEN` characters per token) plus ``max_tokens`` fits
``context_tokens`` -- the paper's trajectory-level view. Only a longer one is cut into the
fewest equal windows that fit, each with the whole-trajectory summary; that is logged.

**Retries are the openai client's** (HTTP 408/409/429/5xx, timeouts, connection errors, up to
``max_retries``; ``Retry-After`` honoured), with three additions it cannot make itself (openai
3.60, measured):

* its backoff is fixed by module constants (0.5 s doubling to 8 s): eight retries span at most
  ~40 s, shorter than a DeepSeek "server busy" spell, and a fault-injection test with hundreds
  of retries would sleep for minutes. :class:`~sfjax.agents.reflectors.transport.RetryingClient` overrides the one method that computes
  the delay: ``backoff_base_s`` doubling to ``backoff_max_s`` with full jitter, ``Retry-After``
  still honoured in full (openai retries only when it asks for at most 120 s);
* its timeout is httpx's per-read timeout: a server that trickles keep-alive bytes (DeepSeek
  sends blank lines while R1 thinks) held a request with ``timeout_s=2`` for 30 s and could hold
  it forever. :class:`~sfjax.agents.reflectors.transport.AttemptTransport` makes ``timeout_s`` a total deadline per attempt
  (connect, send, headers and body); a trickle cannot extend it;
* a 200 whose body is not chat-completion JSON (a gateway's HTML page, a truncated body,
  ``choices`` empty or missing) came back from openai as a ``str`` or a ``JSONDecodeError``,
  outside its retry path, and ended the run. The transport hands openai a retryable 502
  (``x-should-retry: true``) naming the problem instead.

Every failed attempt is logged when it happens, with its reason, and counted in ``stats``
(``retry_reasons``), which the loop writes into ``summary.json``.

**Replies.** A reply that fails validation (:func:`~sfjax.agents.reflectors.base.validate_reply`,
which handles R1's shapes) is re-asked up to ``max_format_retries`` times with the error
appended. A reply cut off at ``max_tokens`` (``finish_reason == "length"``) is asked once more
with the budget doubled (capped by the context; logged), and a second cut-off fails the phase
naming ``--reflector.api.max-tokens`` (see :attr:`ApiReflectorConfig.max_tokens`). Nothing
malformed or cut off is accepted. Validated replies are cached on disk under the SHA-256 of
the request (endpoint, model, messages, sampling settings -- never the key), so a resumed or
repeated run replays them without network traffic.

**The key** is read from the environment variable *named* by ``api_key_env`` (a value that looks
like a key is refused without being shown) and handed only to the client; it is never logged,
returned, cached or checkpointed, and an error body that echoes it is redacted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import openai

from sfjax import atomic
from sfjax.agents.prompts import PromptConfig
from sfjax.agents.reflectors.base import (
    AGENT_TEXT_CHARS,
    ReflectorError,
    ReplyError,
    merge_windows,
    reflection_system_prompt,
    reflection_user_prompt,
    reply_answer,
    trajectory_summary,
    validate_reply,
    windows,
)
from sfjax.agents.reflectors.transport import AttemptTransport, RetryingClient
from sfjax.agents.trajectory import Reflection, StepLabel, Trajectory
from sfjax.configcheck import Bad, at_least, check_config
from sfjax.console import progress_bar

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0
"""Seconds between progress lines of a reflect phase while no request is answered."""

CHARS_PER_TOKEN = 3.0
"""Conservative characters per token of the reflection prompt (numbers and units tokenise
densely; DeepSeek's tokenizer averages ~3.5 on these prompts), used to decide what fits."""


def looks_like_key(name: str) -> bool:
    """Whether ``name`` (meant to name an environment variable) looks like an API key itself."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        return True
    low = name.lower()
    mixed = any(c.islower() for c in name) and any(c.isdigit() for c in name)
    return low.startswith(("sk_", "sk-", "key_")) or (len(name) >= 24 and mixed)


@dataclass(frozen=True)
class ApiReflectorConfig:
    """An OpenAI-compatible chat-completions endpoint used as the Reflector."""

    base_url: str = "https://api.deepseek.com"
    """Endpoint base URL (OpenAI-compatible, e.g. https://api.deepseek.com or a vLLM server)."""
    model: str = "deepseek-reasoner"
    """Model name at that endpoint (deepseek-reasoner = DeepSeek-R1)."""
    api_key_env: str = "DEEPSEEK_API_KEY"
    """NAME of the environment variable that holds the API key (the key itself is never stored;
    a key typed here is refused)."""
    max_concurrency: int = 4
    """Requests in flight at once."""
    timeout_s: float = 600.0
    """Total seconds one attempt of a request may take, reply included (R1 replies to a whole
    trajectory can take minutes); a server trickling bytes cannot extend it."""
    max_retries: int = 8
    """Retries of one request after a 429, 5xx, timeout, connection error or non-JSON reply."""
    backoff_base_s: float = 2.0
    """First backoff delay; doubles each retry, with full jitter (Retry-After is honoured)."""
    backoff_max_s: float = 60.0
    """Cap on one backoff delay (a server's Retry-After, at most 120 s, is waited in full)."""
    max_format_retries: int = 3
    """Re-asks after a reply that fails validation (the error is sent back to the model)."""
    context_tokens: int = 65536
    """The model's context window in tokens. A trajectory whose request plus MAX_TOKENS fits
    is reflected in one request; a longer one in the fewest windows that fit."""
    max_tokens: int = 16384
    """Completion token budget per request (reasoning models spend most of it thinking).

    A reply cut off at it (``finish_reason`` "length") is asked once more with the budget
    doubled, capped by CONTEXT_TOKENS minus the request's estimated size (logged); cut off
    again, the reflect phase fails naming this option. Re-asking with the same budget, as
    before, mostly paid for another cut-off reply: a model that reasoned past the budget once
    does so again. The larger cap costs only the tokens the model then generates."""
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    """The request field MAX_TOKENS goes in: ``max_tokens`` (DeepSeek, vLLM, Ollama) or
    ``max_completion_tokens`` (OpenAI's reasoning models refuse ``max_tokens``)."""
    temperature: float | None = None
    """Sampling temperature, or None for the endpoint's default (R1 ignores it)."""

    def invalid(self) -> list[Bad]:
        bad = at_least(self, 1, "max_concurrency", "max_tokens")
        bad += at_least(self, 0, "max_retries", "max_format_retries", "backoff_base_s")
        if looks_like_key(self.api_key_env):
            bad.append(
                Bad(
                    "api_key_env",
                    "the NAME of an environment variable such as DEEPSEEK_API_KEY, not the key "
                    "itself (export the key in that variable)",
                    secret=True,
                )
            )
        if not self.base_url.startswith(("http://", "https://")):
            bad.append(Bad("base_url", "an http:// or https:// URL"))
        if not self.model:
            bad.append(Bad("model", "a model name"))
        if not self.timeout_s > 0:
            bad.append(Bad("timeout_s", "> 0 seconds"))
        if not self.backoff_max_s >= self.backoff_base_s:
            bad.append(Bad("backoff_max_s", f">= --backoff-base-s ({self.backoff_base_s:g})"))
        if not self.context_tokens > self.max_tokens:
            bad.append(Bad("context_tokens", f"> --max-tokens ({self.max_tokens})"))
        if self.max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            bad.append(Bad("max_tokens_field", "max_tokens or max_completion_tokens"))
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            bad.append(Bad("temperature", "None or in [0, 2]"))
        return bad


def _status_hint(status: int, message: str, cfg: ApiReflectorConfig) -> str:
    """What to check for a refused request (HTTP 4xx other than 408 / 409 / 429)."""
    if status in (401, 403):
        return f" (check the key in ${cfg.api_key_env})"
    if status == 404:
        return (f" (is {cfg.base_url!r} the API root? OpenAI-compatible servers such as vLLM "
                "and Ollama serve it under /v1, e.g. http://localhost:8000/v1; and is "
                f"{cfg.model!r} a model the server has? --reflector.api.base-url / .model)")
    if status == 400 and re.search(r"context|maximum|too long|token", message, re.I):
        return (f" (a request longer than the model's context? --reflector.api.context-tokens "
                f"{cfg.context_tokens} must not exceed the server's context length)")
    return ""


class ApiReflector:
    """Reflector backed by an OpenAI-compatible API; see the module docstring."""

    def __init__(
        self,
        cfg: ApiReflectorConfig,
        prompt_cfg: PromptConfig,
        cache_dir: str | os.PathLike | None,
        *,
        progress: bool = True,
        agent_text_chars: int = AGENT_TEXT_CHARS,
    ):
        check_config(cfg, "reflector.api.")  # before the key's variable name is ever printed
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise ReflectorError(
                f"the api Reflector needs an API key in the environment variable "
                f"{cfg.api_key_env!r} (set it, or choose another variable with "
                f"--reflector.api.api-key-env, or use the offline 'rule' reflector; a local "
                f"server that checks no key, such as vLLM or Ollama, takes any value, e.g. "
                f"{cfg.api_key_env}=EMPTY)"
            )
        self.cfg = cfg
        self.prompt_cfg = prompt_cfg
        self.agent_text_chars = agent_text_chars
        """Characters of the Actor's reflection and analysis shown per step."""
        self.progress = progress
        """Show a progress bar of the requests (on a terminal); the log lines come regardless."""
        self.name = f"api ({cfg.model} at {cfg.base_url})"
        # a placeholder key for a local server ("EMPTY", "x") is no secret, and replacing it
        # everywhere would garble the messages
        self._redact = ((lambda text: str(text).replace(key, "[API key redacted]"))
                        if len(key) >= 8 else str)  # fmt: skip
        self._local = threading.local()
        self._client = RetryingClient(
            base_url=cfg.base_url,
            api_key=key,
            timeout=cfg.timeout_s,
            max_retries=cfg.max_retries,
            backoff_base_s=cfg.backoff_base_s,
            backoff_max_s=cfg.backoff_max_s,
            http_client=openai.DefaultHttpxClient(
                transport=AttemptTransport(cfg.timeout_s, self._on_attempt)
            ),
        )
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.stats: dict = {
            "requests": 0,
            "attempts": 0,
            "transport_retries": 0,
            "format_retries": 0,
            "truncated_replies": 0,
            "cache_hits": 0,
            "windowed_trajectories": 0,
            "retry_reasons": {},
        }

    def __repr__(self) -> str:  # never show the client (it holds the key)
        return f"ApiReflector(model={self.cfg.model!r}, base_url={self.cfg.base_url!r})"

    # -- one request -----------------------------------------------------------------------

    def _request_body(self, messages: list[dict], max_tokens: int | None = None) -> dict:
        body = {"model": self.cfg.model, "messages": messages,
                self.cfg.max_tokens_field: max_tokens or self.cfg.max_tokens}
        if self.cfg.temperature is not None:
            body["temperature"] = self.cfg.temperature
        return body

    def request_hash(self, messages: list[dict]) -> str:
        """SHA-256 of the request (endpoint + body); the key is not part of it."""
        blob = json.dumps(
            {"base_url": self.cfg.base_url.rstrip("/"), **self._request_body(messages)},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def _bump(self, name: str, kind: str | None = None) -> None:
        with self._lock:
            self.stats[name] += 1
            if kind is not None:
                reasons = self.stats["retry_reasons"]
                reasons[kind] = reasons.get(kind, 0) + 1

    def _on_attempt(self, kind: str | None, reason: str | None, response=None) -> None:
        """Called by the transport after every HTTP attempt, in the requesting thread."""
        self._local.attempts = n = getattr(self._local, "attempts", 0) + 1
        self._bump("attempts")
        if kind is not None:
            self._local.last = reason
            # what openai retries: timeouts, connection errors and the statuses its _should_retry
            # accepts (408, 409, 429, 5xx, unless Retry-After asks for more than 120 s)
            retried = response is None or self._client._should_retry(response)
            if retried and n <= self.cfg.max_retries:
                self._bump("transport_retries", kind)
                log.warning(
                    "reflector API attempt %d of %d failed: %s; retrying",
                    n, self.cfg.max_retries + 1, self._redact(reason),
                )  # fmt: skip

    def _complete(self, messages: list[dict], max_tokens: int) -> tuple[str, str | None]:
        """One chat completion (the openai client retries); returns (text, finish_reason)."""
        self._local.attempts, self._local.last = 0, None
        self._bump("requests")
        try:
            resp = self._client.chat.completions.create(**self._request_body(messages, max_tokens))
        except openai.APIStatusError as e:
            if e.status_code >= 500 or e.status_code in (408, 409, 429):
                if not self._client._should_retry(e.response):
                    raise ReflectorError(
                        f"Reflector API at {self.cfg.base_url} answered "
                        f"{self._redact(self._local.last)}, a wait longer than the client retries "
                        f"after: rerun later with --resume"
                    ) from None
                raise self._gave_up(f"HTTP {e.status_code}: {e.message}") from None
            hint = _status_hint(e.status_code, str(e.message), self.cfg)
            raise ReflectorError(
                f"Reflector API at {self.cfg.base_url} refused the request with HTTP "
                f"{e.status_code}{hint}: {self._redact(e.message)}"
            ) from None
        except (openai.APITimeoutError, openai.APIConnectionError) as e:
            raise self._gave_up(self._local.last or f"{type(e).__name__}: {e}") from None
        if not isinstance(resp, openai.types.chat.ChatCompletion) or not resp.choices:
            # the transport makes these retryable 502s; reaching here is a bug, not a reply
            raise ReflectorError(f"Reflector API returned {type(resp).__name__}, not a completion")
        choice = resp.choices[0]
        return choice.message.content or "", choice.finish_reason

    def _gave_up(self, last: str) -> ReflectorError:
        return ReflectorError(
            f"Reflector API at {self.cfg.base_url} failed {self._local.attempts} times; last "
            f"error: {self._redact(last)} (raise --reflector.api.max-retries or "
            f"--reflector.api.timeout-s and rerun with --resume)"
        )

    def _messages(self, traj: Trajectory, window: range, summary: str) -> list[dict]:
        return [
            {"role": "system", "content": reflection_system_prompt(self.prompt_cfg)},
            {
                "role": "user",
                "content": reflection_user_prompt(
                    traj, window, summary, self.prompt_cfg, self.agent_text_chars
                ),
            },
        ]

    @staticmethod
    def prompt_tokens(messages: list[dict]) -> int:
        """A request's estimated size in tokens (:data:`CHARS_PER_TOKEN`)."""
        return math.ceil(sum(len(m["content"]) for m in messages) / CHARS_PER_TOKEN)

    def plan_windows(self, traj: Trajectory, summary: str) -> list[range]:
        """The whole trajectory when its request fits the context, else the fewest equal
        windows that each fit (logged)."""
        n = len(traj.steps)
        budget = self.cfg.context_tokens - self.cfg.max_tokens

        def tokens(w: range) -> int:
            return self.prompt_tokens(self._messages(traj, w, summary))

        for k in range(1, n + 1):
            parts = windows(n, math.ceil(n / k))
            if all(tokens(w) <= budget for w in parts):
                if len(parts) > 1:
                    self._bump("windowed_trajectories")
                    log.info(
                        "trajectory of %d steps (~%d tokens) exceeds the reflector's context "
                        "(%d tokens - %d for the reply): reflected in %d windows of <= %d steps",
                        n, tokens(range(n)), self.cfg.context_tokens, self.cfg.max_tokens,
                        len(parts), len(parts[0]),
                    )  # fmt: skip
                return parts
        raise ReflectorError(
            f"one step's reflection request does not fit --reflector.api.context-tokens "
            f"{self.cfg.context_tokens} minus --reflector.api.max-tokens {self.cfg.max_tokens}"
        )

    def _raised_budget(self, messages: list[dict], budget: int, what: str) -> int:
        """The budget of the one re-ask after a reply to ``messages`` was cut off at ``budget``
        tokens: doubled, capped by the context left after the request (logged). Raises
        :class:`ReflectorError` when ``budget`` was already raised or there is no room."""
        cfg = self.cfg
        self._bump("truncated_replies")
        if budget > cfg.max_tokens:
            raise ReflectorError(
                f"Reflector reply for {what} was cut off again at {budget} tokens, after a first "
                f"cut-off at --reflector.api.max-tokens {cfg.max_tokens} (a reasoning model "
                f"spends most of its budget thinking): raise --reflector.api.max-tokens (and "
                f"--reflector.api.context-tokens {cfg.context_tokens}, up to the server's "
                f"context length) and rerun with --resume"
            )
        prompt = self.prompt_tokens(messages)
        raised = min(2 * budget, cfg.context_tokens - prompt)
        if raised <= budget:
            raise ReflectorError(
                f"Reflector reply for {what} was cut off at --reflector.api.max-tokens {budget}, "
                f"and --reflector.api.context-tokens {cfg.context_tokens} leaves no room for a "
                f"larger budget (the request is ~{prompt} tokens): raise "
                f"--reflector.api.context-tokens up to the server's context length, or "
                f"--reflector.api.max-tokens (longer trajectories are then reflected in more, "
                f"smaller windows), and rerun with --resume"
            )
        self._bump("format_retries", "truncated reply")
        log.warning(
            "reflector reply for %s cut off at max_tokens %d; asking once more with max_tokens "
            "%d (doubled, at most --reflector.api.context-tokens %d minus the ~%d-token request)",
            what, budget, raised, cfg.context_tokens, prompt,
        )  # fmt: skip
        return raised

    def _window_labels(self, traj: Trajectory, window: range, summary: str) -> list[StepLabel]:
        messages = self._messages(traj, window, summary)
        steps = [traj.steps[i].t for i in window]
        actions = [traj.steps[i].action for i in window]
        digest = self.request_hash(messages)
        cached = self._cache_get(digest)
        if cached is not None:
            try:
                labels = validate_reply(cached, steps, actions, self.prompt_cfg)
            except ReplyError as e:
                log.warning("ignoring an invalid cached reflector reply %s (%s)", digest[:12], e)
            else:
                self._bump("cache_hits")
                return labels
        convo = list(messages)
        budget, retries, attempts = self.cfg.max_tokens, 0, 0
        while True:
            text, finish = self._complete(convo, budget)
            attempts += 1
            try:
                labels = validate_reply(text, steps, actions, self.prompt_cfg)
            except ReplyError as e:
                if finish == "length":  # the same question once more, with more room
                    what = f"steps {window.start}-{window.stop - 1}"
                    budget = self._raised_budget(convo, budget, what)
                    continue
                reason = str(e)
                if retries == self.cfg.max_format_retries:
                    raise ReflectorError(
                        f"Reflector reply for steps {window.start}-{window.stop - 1} still "
                        f"invalid after {attempts} attempts: {reason}"
                    ) from None
                retries += 1
                self._bump("format_retries", "invalid reply")
                log.warning(
                    "reflector reply for steps %d-%d invalid (%s); asking again",
                    window.start, window.stop - 1, reason[:200],
                )  # fmt: skip
                convo = convo + [
                    # its answer without the reasoning (DeepSeek: never send reasoning back;
                    # a vLLM reply in content can be thousands of tokens of thinking, and the
                    # windows leave room for one reply, not for a conversation of them)
                    {"role": "assistant", "content": reply_answer(text)},
                    {
                        "role": "user",
                        "content": f"Your reply was invalid: {reason}. Reply again with ONLY the "
                        f"corrected JSON list for steps {window.start} to {window.stop - 1}.",
                    },
                ]
                continue
            self._cache_put(digest, text)
            return labels

    def complete(self, messages: list[dict]) -> str:
        """The text of one free-form reply to ``messages`` (Reflexion's self-reflection), with
        the transport retries and the on-disk cache of the labels. A reply cut off at
        ``max_tokens`` is asked once more with a larger budget, as a label request's; one
        empty after its reasoning is asked again (``max_format_retries``); neither is
        returned."""
        digest = self.request_hash(messages)
        cached = self._cache_get(digest)
        if cached is not None:
            self._bump("cache_hits")
            return cached
        budget, retries = self.cfg.max_tokens, 0
        while True:
            text, finish = self._complete(messages, budget)
            if finish == "length":
                budget = self._raised_budget(messages, budget, f"request {digest[:12]}")
                continue
            if reply_answer(text):
                self._cache_put(digest, text)
                return text
            if retries == self.cfg.max_format_retries:
                raise ReflectorError(
                    f"Reflector reply still empty after its reasoning after {retries + 1} "
                    f"attempts (raise --reflector.api.max-format-retries)"
                )
            retries += 1
            self._bump("format_retries", "invalid reply")
            log.warning("reflector reply empty after its reasoning (%s); asking again", digest[:12])

    # -- cache -----------------------------------------------------------------------------

    def _cache_get(self, digest: str) -> str | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{digest}.json"
        if not path.exists():
            return None
        try:
            with open(path) as f:
                return json.load(f)["content"]
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the damaged reflector cache file %s (%s)", path, e)
            return None

    def _cache_put(self, digest: str, content: str) -> None:
        if self.cache_dir is not None:
            atomic.write_json(
                self.cache_dir / f"{digest}.json", {"model": self.cfg.model, "content": content}
            )

    # -- public ----------------------------------------------------------------------------

    def reflect(self, trajectories: Sequence[Trajectory], key=None) -> list[Reflection]:
        """Label every step of every trajectory (requests run concurrently)."""
        del key  # the endpoint's sampling is not ours to seed; the cache makes reruns exact
        jobs = []
        summaries = [trajectory_summary(t) for t in trajectories]
        for ti, traj in enumerate(trajectories):
            for w in self.plan_windows(traj, summaries[ti]):
                jobs.append((ti, w))
        progress = progress_bar(len(jobs), "reflect (api)", enabled=self.progress)
        t0 = time.monotonic()
        # the first failure (or Ctrl-C) ends the phase: queued requests are not sent (each would
        # run through all its retries first); those in flight finish and are cached
        stop = threading.Event()

        def labels(ti: int, w: range) -> list[StepLabel] | None:
            if stop.is_set():
                return None  # not sent; the failure that set ``stop`` is what reflect raises
            try:
                return self._window_labels(trajectories[ti], w, summaries[ti])
            except BaseException:
                stop.set()
                raise

        with ThreadPoolExecutor(max_workers=self.cfg.max_concurrency) as pool:
            futures = [pool.submit(labels, ti, w) for ti, w in jobs]
            pending, answered = set(futures), 0
            try:
                while pending:
                    # a line per answer and a heartbeat while R1 thinks: without a terminal (no
                    # progress bar) a reflect phase of many minutes looked frozen
                    done, pending = wait(pending, timeout=HEARTBEAT_S, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()  # the first failure ends the phase
                    answered += len(done)
                    progress.update(len(done))
                    log.info(
                        "reflect (api): %d of %d requests answered after %.0f s (%d retries so "
                        "far)", answered, len(jobs), time.monotonic() - t0,
                        self.stats["transport_retries"] + self.stats["format_retries"],
                    )  # fmt: skip
            except BaseException:
                stop.set()
                raise
            results = [f.result() for f in futures]
        progress.close()
        out = []
        for ti, traj in enumerate(trajectories):
            parts = [r for (tj, _), r in zip(jobs, results) if tj == ti]
            out.append(
                Reflection(traj.env_index, merge_windows(traj, parts), summaries[ti], self.name)
            )
        return out
