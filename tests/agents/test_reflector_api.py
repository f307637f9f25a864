"""The api Reflector against tests/fake_openai.py on 127.0.0.1: non-completion 200 bodies, a
trickling server against the deadline, DeepSeek-R1's reply shapes, cut-off replies, whole
trajectories in one request, retries logged and counted, and the key kept out of everything."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
import time
from types import SimpleNamespace

import pytest
from fake_openai import ALL_FAULTS, LESSON, NON_COMPLETION_200, THINKING, FakeOpenAI, truth
from reflector_inputs import KEY_ENV, SECRET, random_trajectory

from sfjax.agents.prompts import PromptConfig
from sfjax.agents.reflector import (
    ApiReflectorConfig,
    ReflectorConfig,
    ReflectorError,
    make_reflector,
    validate_reply,
)
from sfjax.agents.reflectors.api import looks_like_key
from sfjax.configcheck import ConfigError, check_config

PCFG = PromptConfig(action_lo=1, action_hi=12)


_traj = functools.partial(random_trajectory, action_hi=PCFG.action_hi, arrival=4e6)
"""Random trajectories in this file's action range at a constant 4 Mbit/s."""


def _reflector(url, tmp_path, progress=True, **kw):
    """An api Reflector on `url` with fast retries. timeout_s is generous (10 s) so that a loaded
    CI machine never turns a healthy reply into a 'deadline' retry; the tests about hangs and
    deadlines pass their own short timeout_s."""
    base = dict(
        base_url=url, model="fake-r1", api_key_env=KEY_ENV, max_concurrency=2, timeout_s=10,
        max_retries=30, backoff_base_s=0.001, backoff_max_s=0.01, max_format_retries=30,
    )  # fmt: skip
    base.update(kw)
    return make_reflector(ReflectorConfig(backend="api", api=ApiReflectorConfig(**base)), PCFG,
                          tmp_path / "cache", progress=progress)  # fmt: skip


def _assert_right(trajs, out):
    for traj, refl in zip(trajs, out):
        assert [(x.step, x.label, x.improved_action) for x in refl.labels] == [
            (s.t, *truth(s.t, s.action)) for s in traj.steps
        ]


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


@pytest.mark.parametrize("shape", NON_COMPLETION_200)
def test_non_completion_200_is_retried_not_fatal(tmp_path, caplog, shape):
    """Issue 21 item 1: an HTML page / truncated body / empty choices / a JSON string with
    HTTP 200 raised AttributeError or JSONDecodeError outside the retry path."""
    caplog.set_level(logging.WARNING)
    trajs = [_traj(6)]
    with FakeOpenAI(script=[shape, shape]) as server:
        r = _reflector(server.url, tmp_path)
        out = r.reflect(trajs)
    _assert_right(trajs, out)
    assert r.stats["transport_retries"] == 2
    assert r.stats["retry_reasons"] == {"non-completion 200": 2}
    assert "HTTP 200 with" in caplog.text and "retrying" in caplog.text  # logged as it happened


def test_fault_mix_at_30_percent_gives_the_fault_free_labels(tmp_path):
    trajs = [_traj(20, seed=s, env_index=s) for s in range(3)]
    with FakeOpenAI(fault_rate=0.3, seed=5, hang_s=0.6) as server:
        r = _reflector(server.url, tmp_path, timeout_s=0.4, context_tokens=2000, max_tokens=500)
        out = r.reflect(trajs)
    _assert_right(trajs, out)
    assert server.faults_injected > 0
    kinds = set(server.counts)
    assert any(k in kinds for k in NON_COMPLETION_200), server.counts
    assert r.stats["transport_retries"] + r.stats["format_retries"] >= server.faults_injected - 1


def test_deadline_is_total_against_a_trickling_server(tmp_path):
    """Issue 21 item 2: a server that trickles keep-alive bytes held a request far beyond
    timeout_s (30 s with 2 s, unbounded in principle)."""
    with FakeOpenAI(script=["trickle"] * 3, hang_s=10) as server:
        r = _reflector(server.url, tmp_path, timeout_s=0.5, max_retries=2)
        t0 = time.perf_counter()
        with pytest.raises(ReflectorError, match=r"failed 3 times; last error: .*deadline"):
            r.reflect([_traj(3)])
        elapsed = time.perf_counter() - t0
    assert elapsed < 3 * 0.5 + 1.0, elapsed  # three attempts of 0.5 s, plus tiny backoffs
    assert r.stats["retry_reasons"] == {"deadline": 2}


def test_whole_trajectory_in_one_request_when_it_fits(tmp_path, caplog):
    """Issue 19: a 300-step trajectory went out as six 50-step windows."""
    caplog.set_level(logging.INFO)
    trajs = [_traj(300)]
    with FakeOpenAI() as server:
        r = _reflector(server.url, tmp_path, timeout_s=30)  # default 64k context
        _assert_right(trajs, r.reflect(trajs))
        assert len(server.bodies) == 1, (server.counts, r.stats)
        assert "Steps 0 to 299 of 300" in server.bodies[0]["messages"][1]["content"]
        assert "windows" not in caplog.text
        small = _reflector(server.url, tmp_path / "s", timeout_s=30, context_tokens=9000,
                           max_tokens=1000)  # fmt: skip
        _assert_right(trajs, small.reflect(trajs))
    parts = small.plan_windows(trajs[0], "")
    assert len(parts) > 1 and len({len(p) for p in parts}) <= 2  # equal windows
    assert "exceeds the reflector's context" in caplog.text


def _prompt_tokens(body):
    """The request's size as the api Reflector estimates it (3 characters per token)."""
    return math.ceil(sum(len(m["content"]) for m in body["messages"]) / 3.0)


def test_cut_off_reply_is_re_asked_once_with_a_doubled_budget(tmp_path, caplog):
    """A reply cut off at max_tokens was re-asked with the same budget (up to
    max_format_retries times): a reasoning model that thinks past the budget is cut again, and
    each re-ask is a paid call of a whole budget. Now: the same request once more with the
    budget doubled (logged), and the reply cached under the original request."""
    caplog.set_level(logging.WARNING)
    trajs = [_traj(5)]
    with FakeOpenAI(script=["length"]) as server:
        r = _reflector(server.url, tmp_path)
        _assert_right(trajs, r.reflect(trajs))
        first, second = server.bodies
        assert (first["max_tokens"], second["max_tokens"]) == (16384, 32768)
        assert second["messages"] == first["messages"]  # the same question, more room
        assert r.stats["truncated_replies"] == 1
        assert r.stats["retry_reasons"] == {"truncated reply": 1}
        assert "cut off at max_tokens 16384; asking once more with max_tokens 32768" in caplog.text
        server.refuse_all = True  # a rerun is served from the cache
        again = _reflector(server.url, tmp_path, max_retries=0)
        _assert_right(trajs, again.reflect(trajs))
    assert len(server.bodies) == 2 and again.stats["cache_hits"] == 1


def test_cut_off_twice_fails_the_phase_naming_the_option(tmp_path):
    """Cut off at the raised budget too: fail with what to raise, not 30 more paid calls."""
    with FakeOpenAI(script=["length", "length"]) as server:
        r = _reflector(server.url, tmp_path, max_format_retries=30)
        with pytest.raises(
            ReflectorError,
            match=r"cut off again at 32768 tokens.*--reflector\.api\.max-tokens 16384",
        ) as e:
            r.reflect([_traj(3)])
    assert "--resume" in str(e.value) and SECRET not in str(e.value)
    assert len(server.bodies) == 2 and r.stats["truncated_replies"] == 2


def test_raised_budget_is_capped_by_the_context(tmp_path):
    """Doubling stops at --context-tokens minus the request's estimated size; with no room
    above the budget the phase fails at the first cut-off (no re-ask that cannot help)."""
    trajs = [_traj(4)]
    with FakeOpenAI(script=["length"]) as server:
        _assert_right(trajs, _reflector(server.url, tmp_path, context_tokens=9000,
                                        max_tokens=5000).reflect(trajs))  # fmt: skip
        first, second = server.bodies
    assert first["max_tokens"] == 5000 and second["max_tokens"] == 9000 - _prompt_tokens(first)
    tight = 5000 + _prompt_tokens(first)  # the request and max_tokens fill the context
    with FakeOpenAI(script=["length"]) as server:
        r = _reflector(server.url, tmp_path / "b", context_tokens=tight, max_tokens=5000)
        with pytest.raises(
            ReflectorError, match=r"no room for a larger budget.*--reflector\.api\.context-tokens"
        ):
            r.reflect(trajs)
    assert len(server.bodies) == 1


def test_self_reflection_cut_off_twice_fails_naming_the_option(tmp_path):
    """Reflexion's free-text self-reflection: one re-ask with the doubled budget, then fail."""
    import jax

    from sfjax.agents.reflexion import make_self_reflect

    ev = SimpleNamespace(summary="s", suboptimal=1, steps=2, wanted_more=1, wanted_less=0,
                         wanted_same_as_before=0, top_reasons=("late packets",))  # fmt: skip
    with FakeOpenAI(script=["length", "length"]) as server:
        reflect = make_self_reflect(_reflector(server.url, tmp_path), PCFG)
        with pytest.raises(ReflectorError, match=r"--reflector\.api\.max-tokens 16384"):
            reflect(ev, 1, jax.random.key(0))
    assert [b["max_tokens"] for b in server.bodies] == [16384, 32768]


R1_REPLIES = [
    # vLLM without a reasoning parser: reasoning, then </think>, no opening tag
    "Let me look at step [3] and [4]: {{ok}}. Maybe [{{]\n</think>\n\n{good}",
    # prose with brackets after the JSON
    "{good}\n\nNotes: step [3] was [borderline]; see {{details}}.",
    # a draft in prose before the final list
    'Draft: [{{"step": 3}}] -- no wait.\nFinal:\n{good}',
    "<think>[1, 2] {{x}}</think>```json\n{good}\n```\nDone [ok].",
]


@pytest.mark.parametrize("template", R1_REPLIES)
def test_validate_reply_reads_deepseek_r1_shapes(template):
    steps, acts = [3, 4], [5, 6]
    good = json.dumps(
        [{"step": s, "label": "effective", "improved_action": a} for s, a in zip(steps, acts)]
    )
    labels = validate_reply(template.format(good=good), steps, acts, PCFG)
    assert [(x.step, x.improved_action) for x in labels] == [(3, 5), (4, 6)]


def test_validate_reply_is_linear_on_bracket_floods():
    t0 = time.perf_counter()
    with pytest.raises(ValueError):
        validate_reply("[{" * 20_000, [0], [1], PCFG)
    assert time.perf_counter() - t0 < 2.0


def test_401_echoing_the_key_is_redacted(tmp_path, caplog):
    """Issue 21 item 8: a 401 body that echoes the key was copied into the error."""
    with FakeOpenAI(echo_key_401=True) as server:
        r = _reflector(server.url, tmp_path)
        with pytest.raises(ReflectorError, match="HTTP 401") as e:
            r.reflect([_traj(3)])
    assert SECRET not in str(e.value) and "redacted" in str(e.value)
    assert SECRET not in caplog.text


@pytest.mark.parametrize("typed", [SECRET, "sk_live_abcdef", "abcdefghij0123456789abcdef", "A-B"])
def test_key_typed_as_variable_name_is_refused_unshown(typed):
    """Issue 21 item 8: ``--reflector.api.api-key-env sk-...`` was written into config.json."""
    assert looks_like_key(typed)
    with pytest.raises(
        ConfigError, match=r"--reflector\.api\.api-key-env \(value not shown\)"
    ) as e:
        check_config(ReflectorConfig(api=ApiReflectorConfig(api_key_env=typed)), "reflector.")
    assert typed not in str(e.value)
    assert not looks_like_key("DEEPSEEK_API_KEY") and not looks_like_key("my_key_2")


def test_api_config_values_validated_with_option_names():
    bad = ApiReflectorConfig(timeout_s=0, max_retries=-1, context_tokens=100, max_tokens=200)
    with pytest.raises(ConfigError) as e:
        check_config(ReflectorConfig(api=bad), "reflector.")
    lines = str(e.value).splitlines()
    assert "--reflector.api.timeout-s 0: must be > 0 seconds" in lines
    assert "--reflector.api.max-retries -1: must be >= 0" in lines
    assert "--reflector.api.context-tokens 100: must be > --max-tokens (200)" in lines


def test_every_fault_kind_is_known():
    assert len(set(ALL_FAULTS)) == len(ALL_FAULTS)


def test_slow_reflect_phase_logs_a_heartbeat(tmp_path, caplog, monkeypatch):
    """Issue 21 item 7: with output not on a terminal a slow reflect phase looked frozen."""
    import sfjax.agents.reflectors.api as api_mod

    monkeypatch.setattr(api_mod, "HEARTBEAT_S", 0.1)
    caplog.set_level(logging.INFO)
    with FakeOpenAI(script=["hang"], hang_s=0.5) as server:
        r = _reflector(server.url, tmp_path, timeout_s=2)
        r.reflect([_traj(3)])
    lines = [m for m in caplog.messages if m.startswith("reflect (api):")]
    assert "0 of 1 requests answered" in lines[0] and "1 of 1" in lines[-1]


@pytest.mark.parametrize("progress", [True, False])
def test_progress_false_hides_the_bar(tmp_path, monkeypatch, progress):
    """make_reflector(progress=False) (table3 runs sf_ranslicing.run(progress=False)): the api
    backend's bar is off too; before, it showed on a terminal whatever the loop was told."""
    import sfjax.agents.reflectors.api as api

    shown = []
    real = api.progress_bar
    monkeypatch.setattr(api, "progress_bar", lambda *a, **kw: shown.append(kw) or real(*a, **kw))
    with FakeOpenAI() as server:
        _reflector(server.url, tmp_path, progress=progress).reflect([_traj(4)])
    assert [kw.get("enabled", True) for kw in shown] == [progress]


def test_self_reflection_through_the_api_is_text_and_cached(tmp_path):
    """Reflexion's self-reflection (the paper preset's api backend) took ``_complete``'s
    (text, finish_reason) tuple for the text and crashed with AttributeError; its replies were
    not cached either, although a rerun in RUN_DIR is documented to cost no finished calls. A
    reply cut off at max_tokens is asked again, not kept as a lesson."""
    import jax

    from sfjax.agents.reflexion import make_self_reflect

    ev = SimpleNamespace(summary="s", suboptimal=1, steps=2, wanted_more=1, wanted_less=0,
                         wanted_same_as_before=0, top_reasons=("late packets",))  # fmt: skip
    with FakeOpenAI(script=["length", "ok:think"]) as server:
        reflect = make_self_reflect(_reflector(server.url, tmp_path), PCFG)
        assert reflect(ev, 1, jax.random.key(0)) == LESSON
        assert len(server.bodies) == 2  # the cut-off reply was asked again
        assert server.bodies[1]["max_tokens"] == 2 * server.bodies[0]["max_tokens"]
        server.refuse_all = True  # a rerun is served from the cache
        again = _reflector(server.url, tmp_path, max_retries=0)
        assert make_self_reflect(again, PCFG)(ev, 1, jax.random.key(0)) == LESSON
    assert len(server.bodies) == 2 and again.stats["cache_hits"] == 1


def test_proxy_from_the_environment_is_used(tmp_path, monkeypatch):
    """openai's own client honours HTTP(S)_PROXY / NO_PROXY; the deadline transport replaced
    its transport, which turns httpx's environment proxies off, so behind a proxy (a cluster's
    compute nodes) every request went direct and failed as a connection error."""
    trajs = [_traj(3)]
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with FakeOpenAI() as server:  # serves as the HTTP proxy too
        proxy = server.url.removesuffix("/v1")
        monkeypatch.setenv("http_proxy", proxy)
        monkeypatch.setenv("HTTP_PROXY", proxy)
        r = _reflector("http://reflector.invalid/v1", tmp_path, max_retries=1)
        _assert_right(trajs, r.reflect(trajs))
    assert server.paths == ["http://reflector.invalid/v1/chat/completions"]


def test_refusals_say_what_to_check(tmp_path, monkeypatch):
    """A base URL without /v1 (vLLM, Ollama) and a request over the server's context were bare
    HTTP 404 / 400 errors; a missing key did not say that a local server takes any value."""
    with FakeOpenAI() as server:
        with pytest.raises(ReflectorError, match=r"HTTP 404 \(is '.*' the API root\? .* under "
                           r"/v1, e\.g\. http://localhost:8000/v1"):
            _reflector(server.url.removesuffix("/v1"), tmp_path).reflect([_traj(3)])
    with FakeOpenAI(script=["context_400"]) as server:
        with pytest.raises(ReflectorError, match=r"HTTP 400 \(a request longer than the model's "
                           r"context\? --reflector\.api\.context-tokens 65536 must not exceed"):
            _reflector(server.url, tmp_path / "b").reflect([_traj(3)])
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ReflectorError, match=rf"takes any value, e\.g\. {KEY_ENV}=EMPTY"):
        _reflector("http://127.0.0.1:9/v1", tmp_path)


def test_placeholder_key_is_not_redacted_and_cache_ignores_a_trailing_slash(tmp_path, monkeypatch):
    """A local server's placeholder key ('x') was 'redacted' out of every word of an error; the
    reply cache missed when the same base URL was given with a trailing '/'."""
    monkeypatch.setenv(KEY_ENV, "x")
    with FakeOpenAI(echo_key_401=True) as server:
        with pytest.raises(ReflectorError, match="Incorrect API key provided: x$"):
            _reflector(server.url, tmp_path).reflect([_traj(3)])
    monkeypatch.setenv(KEY_ENV, SECRET)
    trajs = [_traj(3)]
    with FakeOpenAI() as server:
        _reflector(server.url, tmp_path).reflect(trajs)
        _reflector(server.url + "/", tmp_path).reflect(trajs)
        assert len(server.bodies) == 1  # the second run is served from the cache


def test_token_budget_goes_in_the_field_the_endpoint_takes(tmp_path):
    """OpenAI's reasoning models refuse ``max_tokens``; they take ``max_completion_tokens``."""
    trajs = [_traj(3)]
    with FakeOpenAI() as server:
        _reflector(server.url, tmp_path, max_tokens_field="max_completion_tokens").reflect(trajs)
        _reflector(server.url, tmp_path / "b").reflect(trajs)
    first, second = server.bodies
    assert first["max_completion_tokens"] == 16384 and "max_tokens" not in first
    assert second["max_tokens"] == 16384 and "max_completion_tokens" not in second
    with pytest.raises(ConfigError, match="--reflector.api.max-tokens-field 'max_new_tokens'"):
        check_config(ReflectorConfig(api=ApiReflectorConfig(max_tokens_field="max_new_tokens")),
                     "reflector.")  # fmt: skip


def test_reask_sends_back_the_answer_not_the_reasoning(tmp_path):
    """A re-ask appended the whole invalid reply, reasoning included: with vLLM's thinking in
    the content, each re-ask grew the request by thousands of tokens past the window's plan
    (and DeepSeek refuses reasoning sent back)."""
    trajs = [_traj(3)]
    with FakeOpenAI(script=["think_malformed"]) as server:
        _assert_right(trajs, _reflector(server.url, tmp_path).reflect(trajs))
    first, second = server.bodies
    reply, reask = second["messages"][len(first["messages"]):]
    assert reply["role"] == "assistant" and reply["content"].startswith("[{")
    assert THINKING.strip() not in json.dumps(second) and "invalid" in reask["content"]


def test_first_failure_sends_no_queued_request(tmp_path):
    """reflect() re-raised the first failure only after the pool had run every queued request
    too (each through all its retries): a dead endpoint cost jobs x (max_retries + 1) requests
    and that many backoffs before the error, and Ctrl-C waited for all of them."""
    trajs = [_traj(3, seed=s, env_index=s) for s in range(5)]
    with FakeOpenAI() as server:
        server.refuse_all = True
        r = _reflector(server.url, tmp_path, max_concurrency=1, max_retries=2)
        with pytest.raises(ReflectorError, match="failed 3 times"):
            r.reflect(trajs)
    assert server.counts == {"500": 3}


def test_retry_after_is_waited_in_full(tmp_path):
    """A 429's Retry-After was cut to --backoff-max-s, so the retry came before the server
    allowed it (and would be refused again); openai waits up to 120 s of Retry-After in full
    and refuses to retry beyond that, so the wait stays bounded."""
    with FakeOpenAI(script=["429"], retry_after="0.6") as server:
        r = _reflector(server.url, tmp_path)  # backoff_max_s=0.01
        _assert_right(trajs := [_traj(3)], r.reflect(trajs))
    assert server.arrivals[1] - server.arrivals[0] >= 0.6


def test_retry_after_beyond_openais_limit_is_not_called_a_retry(tmp_path, caplog):
    """openai does not retry a 429 whose Retry-After asks for more than 120 s; the attempt was
    still logged as "retrying", counted as a transport retry, and the error advised raising
    --reflector.api.max-retries, which cannot help."""
    caplog.set_level(logging.WARNING)
    with FakeOpenAI(script=["429"], retry_after="300") as server:
        r = _reflector(server.url, tmp_path)
        with pytest.raises(ReflectorError, match=r"Retry-After 300.*rerun later") as e:
            r.reflect([_traj(3)])
    assert "max-retries" not in str(e.value) and "retrying" not in caplog.text
    assert len(server.bodies) == 1 and r.stats["transport_retries"] == 0


@pytest.mark.parametrize("chars", [160, 40, 0])
def test_agent_text_is_cut_to_agent_text_chars(tmp_path, chars):
    """``--reflector.agent-text-chars``: each step's reflection and analysis (the Actor's own
    text, whitespace collapsed) reach the Reflector cut to that many characters, ending in
    '...'; 0 leaves them out. The labels come back the same."""
    traj = _traj(6)
    for i, s in enumerate(traj.steps):
        s.reflection = f"reflection {i}:" + " demand rises\n" * 30
        s.analysis = f"analysis {i}:" + "  keep   the   margin" * 20
    api = ApiReflectorConfig(base_url="", model="fake-r1", api_key_env=KEY_ENV, timeout_s=30)
    with FakeOpenAI() as server:
        cfg = ReflectorConfig(
            backend="api", api=dataclasses.replace(api, base_url=server.url), agent_text_chars=chars
        )
        _assert_right([traj], make_reflector(cfg, PCFG, tmp_path / "cache").reflect([traj]))
    lines = [ln for ln in server.bodies[0]["messages"][1]["content"].splitlines()
             if ln.startswith("step ")]  # fmt: skip
    assert len(lines) == 6
    for line, s in zip(lines, traj.steps):
        if not chars:
            assert "agent's" not in line and "feedback:" in line
            continue
        shown = re.search(r"agent's reflection: (.*?) \| agent's analysis: (.*?) \| feedback",
                          line).groups()  # fmt: skip
        for text, full in zip(shown, (s.reflection, s.analysis)):
            assert len(text) == chars and text.endswith("...")
            assert " ".join(full.split()).startswith(text[:-3])


def test_agent_text_chars_is_validated_with_its_option_name():
    with pytest.raises(ConfigError, match=r"--reflector\.agent-text-chars -1: must be >= 0"):
        check_config(ReflectorConfig(agent_text_chars=-1), "reflector.")
