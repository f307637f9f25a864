"""The ``api`` Reflector: any OpenAI-compatible chat-completions endpoint (DeepSeek-R1 default).

Each trajectory is cut into windows (``base.windows``); every window is one chat request with the
whole-trajectory summary. Requests run on a thread pool of ``max_concurrency`` workers through
one ``openai.OpenAI`` client whose own retries are off: this module retries transport failures
(HTTP 429, 5xx, timeouts, connection errors) with exponential backoff and jitter, honouring a
``Retry-After`` header, up to ``max_retries`` times; a reply that fails validation is retried up
to ``max_format_retries`` times with the validation error appended to the conversation, and is
never accepted. Validated replies are cached on disk under the SHA-256 of the request (endpoint,
model, messages, sampling settings — never the key), so a resumed or repeated run replays them
without network traffic.

The API key is read from the environment variable *named* in the config at construction time and
handed only to the client; it is never logged, returned, cached or checkpointed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai

from sfjax.agents.prompts import PromptConfig
from sfjax.agents.reflectors.base import (
    ReflectorError,
    ReplyError,
    merge_windows,
    reflection_system_prompt,
    reflection_user_prompt,
    trajectory_summary,
    validate_reply,
    windows,
)
from sfjax.agents.trajectory import Reflection, StepLabel, Trajectory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiReflectorConfig:
    """An OpenAI-compatible chat-completions endpoint used as the Reflector."""

    base_url: str = "https://api.deepseek.com"
    """Endpoint base URL (OpenAI-compatible, e.g. https://api.deepseek.com or a vLLM server)."""
    model: str = "deepseek-reasoner"
    """Model name at that endpoint (deepseek-reasoner = DeepSeek-R1)."""
    api_key_env: str = "DEEPSEEK_API_KEY"
    """NAME of the environment variable that holds the API key (the key itself is never stored)."""
    max_concurrency: int = 4
    """Requests in flight at once."""
    timeout_s: float = 600.0
    """Per-request timeout in seconds (R1 replies to long windows can take minutes)."""
    max_retries: int = 8
    """Retries of one request after a 429, 5xx, timeout or connection error."""
    backoff_base_s: float = 2.0
    """First backoff delay; doubles each retry, with full jitter."""
    backoff_max_s: float = 60.0
    """Cap on one backoff delay."""
    max_format_retries: int = 3
    """Re-asks after a reply that fails validation (the error is sent back to the model)."""
    window_steps: int = 50
    """Steps per request; a longer trajectory is reflected in windows plus a summary."""
    max_tokens: int = 16384
    """Completion token budget per request (reasoning models spend most of it thinking)."""
    temperature: float | None = None
    """Sampling temperature, or None for the endpoint's default (R1 ignores it)."""


class ApiReflector:
    """Reflector backed by an OpenAI-compatible API; see the module docstring."""

    def __init__(
        self, cfg: ApiReflectorConfig, prompt_cfg: PromptConfig, cache_dir: str | os.PathLike | None
    ):
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise ReflectorError(
                f"the api Reflector needs an API key in the environment variable "
                f"{cfg.api_key_env!r} (set it, or choose another variable with "
                f"--reflector.api.api-key-env, or use the offline 'rule' reflector)"
            )
        if cfg.max_concurrency < 1:
            raise ValueError("ApiReflectorConfig.max_concurrency must be >= 1")
        self.cfg = cfg
        self.prompt_cfg = prompt_cfg
        self.name = f"api ({cfg.model} at {cfg.base_url})"
        self._client = openai.OpenAI(
            base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=0
        )
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "transport_retries": 0, "format_retries": 0, "cache_hits": 0}

    def __repr__(self) -> str:  # never show the client (it holds the key)
        return f"ApiReflector(model={self.cfg.model!r}, base_url={self.cfg.base_url!r})"

    # -- one request -----------------------------------------------------------------------

    def _request_body(self, messages: list[dict]) -> dict:
        body = {"model": self.cfg.model, "messages": messages, "max_tokens": self.cfg.max_tokens}
        if self.cfg.temperature is not None:
            body["temperature"] = self.cfg.temperature
        return body

    def request_hash(self, messages: list[dict]) -> str:
        """SHA-256 of the request (endpoint + body); the key is not part of it."""
        blob = json.dumps(
            {"base_url": self.cfg.base_url, **self._request_body(messages)}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def _bump(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _backoff(self, attempt: int, err: Exception) -> float:
        delay = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2**attempt)
        delay = random.uniform(0, delay)
        response = getattr(err, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after is not None:
            try:
                delay = max(delay, min(float(retry_after), self.cfg.backoff_max_s))
            except ValueError:
                pass
        return delay

    def _complete(self, messages: list[dict]) -> str:
        """One chat completion with transport retries; returns the reply text."""
        for attempt in range(self.cfg.max_retries + 1):
            self._bump("requests")
            try:
                resp = self._client.chat.completions.create(**self._request_body(messages))
                if not resp.choices:
                    return ""
                return resp.choices[0].message.content or ""
            except (
                openai.RateLimitError,
                openai.InternalServerError,
                openai.APITimeoutError,
                openai.APIConnectionError,
            ) as e:
                err = e
            except openai.APIStatusError as e:
                if e.status_code >= 500:
                    err = e
                else:
                    hint = (
                        f" (check the key in ${self.cfg.api_key_env})"
                        if e.status_code in (401, 403)
                        else ""
                    )
                    raise ReflectorError(
                        f"Reflector API at {self.cfg.base_url} refused the request with HTTP "
                        f"{e.status_code}{hint}: {e.message}"
                    ) from None
            if attempt == self.cfg.max_retries:
                raise ReflectorError(
                    f"Reflector API at {self.cfg.base_url} failed {attempt + 1} times; last "
                    f"error: {type(err).__name__}: {err}"
                )
            self._bump("transport_retries")
            delay = self._backoff(attempt, err)
            log.info("reflector request failed (%s); retrying in %.2fs", type(err).__name__, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _window_labels(self, traj: Trajectory, window: range, summary: str) -> list[StepLabel]:
        messages = [
            {"role": "system", "content": reflection_system_prompt(self.prompt_cfg)},
            {
                "role": "user",
                "content": reflection_user_prompt(traj, window, summary, self.prompt_cfg),
            },
        ]
        steps = [traj.steps[i].t for i in window]
        actions = [traj.steps[i].action for i in window]
        digest = self.request_hash(messages)
        cached = self._cache_get(digest)
        if cached is not None:
            self._bump("cache_hits")
            return validate_reply(cached, steps, actions, self.prompt_cfg)
        convo = list(messages)
        for attempt in range(self.cfg.max_format_retries + 1):
            text = self._complete(convo)
            try:
                labels = validate_reply(text, steps, actions, self.prompt_cfg)
            except ReplyError as e:
                if attempt == self.cfg.max_format_retries:
                    raise ReflectorError(
                        f"Reflector reply for steps {window.start}-{window.stop - 1} still "
                        f"invalid after {attempt + 1} attempts: {e}"
                    ) from None
                self._bump("format_retries")
                convo = convo + [
                    {"role": "assistant", "content": text},
                    {
                        "role": "user",
                        "content": f"Your reply was invalid: {e}. Reply again with ONLY the "
                        f"corrected JSON list for steps {window.start} to {window.stop - 1}.",
                    },
                ]
                continue
            self._cache_put(digest, text)
            return labels
        raise AssertionError("unreachable")

    # -- cache -----------------------------------------------------------------------------

    def _cache_get(self, digest: str) -> str | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{digest}.json"
        if not path.exists():
            return None
        with open(path) as f:
            return json.load(f)["content"]

    def _cache_put(self, digest: str, content: str) -> None:
        if self.cache_dir is None:
            return
        path = self.cache_dir / f"{digest}.json"
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
        with open(tmp, "w") as f:
            json.dump({"model": self.cfg.model, "content": content}, f)
        os.replace(tmp, path)

    # -- public ----------------------------------------------------------------------------

    def reflect(self, trajectories: Sequence[Trajectory], key=None) -> list[Reflection]:
        """Label every step of every trajectory (windows run concurrently)."""
        del key  # the endpoint's sampling is not ours to seed; the cache makes reruns exact
        jobs = []
        summaries = [trajectory_summary(t) for t in trajectories]
        for ti, traj in enumerate(trajectories):
            for w in windows(len(traj.steps), self.cfg.window_steps):
                jobs.append((ti, w))
        progress = _progress(len(jobs), "reflect (api)")
        with ThreadPoolExecutor(max_workers=self.cfg.max_concurrency) as pool:
            futures = [
                pool.submit(self._window_labels, trajectories[ti], w, summaries[ti])
                for ti, w in jobs
            ]
            results = []
            for f in futures:
                results.append(f.result())
                progress.update(1)
        progress.close()
        out = []
        for ti, traj in enumerate(trajectories):
            parts = [r for (tj, _), r in zip(jobs, results) if tj == ti]
            out.append(
                Reflection(traj.env_index, merge_windows(traj, parts), summaries[ti], self.name)
            )
        return out


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=None)
