"""Reflexion baseline: verbal memory in the prompt, evaluator, self-reflection, trials on the env."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from sfjax.agents.actor import ActorConfig
from sfjax.agents.prompts import PromptConfig
from sfjax.agents.reflectors.rule import RuleReflector, RuleReflectorConfig
from sfjax.agents.reflexion import (
    RULE_SELF_REFLECTION_TAG,
    ReflexionActor,
    ReflexionConfig,
    evaluate_trial,
    make_self_reflect,
    memory_block,
    run_reflexion,
)
from sfjax.agents.trajectory import Reflection, Step, StepLabel, Trajectory
from sfjax.baselines.evaluation import EvalProtocol, evaluate_agent
from sfjax.baselines.llm_agent import LLMEnvAgent, prompt_config_for_env
from sfjax.envs.ran import RanSlicingConfig, RanSlicingEnv
from sfjax.tokenizer import load_tokenizer


class FakeSampler:
    """Stands in for sfjax.sampling.Sampler: records prompts, always answers ``Action: a``."""

    def __init__(self, action: int):
        self.action = action
        self.calls: list[list[str]] = []
        self.keys: list[list[int]] = []

    def generate(self, prompts, params, key, *, n=1, action_constraint=None):
        self.calls.append(list(prompts))
        self.keys.append(np.asarray(jax.random.key_data(key)).tolist())
        text = f"Reflection: ok\nAction: {self.action}\nAnalysis: steady"
        return SimpleNamespace(texts=[text] * (len(prompts) * n))


@pytest.fixture(scope="module")
def small_env():
    # traffic from the first step (the default starts every UE OFF, as ns-3)
    env = RanSlicingEnv(
        RanSlicingConfig(ttis_per_step=10, episode_steps=12, onoff_start="stationary")
    )
    return env, env.default_params


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


def _actor(env, tokenizer, action, memory=()):
    prompt = prompt_config_for_env(env, PromptConfig(history_window=2))
    return ReflexionActor(FakeSampler(action), tokenizer, ActorConfig(prompt=prompt), memory)


def test_memory_goes_into_the_system_prompt(small_env, tokenizer):
    env, _ = small_env
    state = {"prev_action": 3, "se": 2.0, "arrival_rate_bps": 1e6, "queue_delta_bytes": 0.0,
             "dropped_bytes": 0.0}  # fmt: skip
    plain = _actor(env, tokenizer, 3).prompt_text(state, [], 0)
    actor = _actor(env, tokenizer, 3, ["give more when queues grow", "avoid changes"])
    messages = actor.messages(state, [], 0)
    assert messages[0]["content"].endswith(memory_block(actor.memory))
    text = actor.prompt_text(state, [], 0)
    assert "Trial reflection 1: give more when queues grow" in text
    assert "Trial reflection 2: avoid changes" in text
    assert "Trial reflection" not in plain
    assert memory_block([]) == ""


def test_llm_env_agent_records_trajectories_on_protocol_seeds(small_env, tokenizer):
    env, params = small_env
    actor = _actor(env, tokenizer, 3)
    agent = LLMEnvAgent(actor, env, params, jax.random.key(0))
    protocol = EvalProtocol(seeds=(4, 9), num_steps=6)
    rollouts = evaluate_agent(agent, env, params, protocol)
    # Actor action 3 RBGs -> env action 3 - min_rbg_per_slice.
    assert np.all(rollouts.actions == 3 - env.config.min_rbg_per_slice)
    assert [t.seed for t in agent.trajectories] == [4, 9]
    for traj in agent.trajectories:
        assert [s.t for s in traj.steps] == list(range(6))
        assert all(s.action == 3 and s.parsed_ok for s in traj.steps)
        assert all(s.state["prev_action"] == 3 for s in traj.steps[1:])
    # Feedback recorded per step is the env's (same SE as the rollouts record).
    se = np.array([[s.feedback["se"] for s in t.steps] for t in agent.trajectories])
    np.testing.assert_allclose(se, rollouts.se, rtol=1e-5)
    # The history window (k = 2) is in the prompts: the 4th decision shows steps 1 and 2.
    prompts = actor.sampler.calls[3]
    assert "[t=1]" in prompts[0] and "[t=2]" in prompts[0] and "[t=0]" not in prompts[0]


def test_evaluator_counts_corrections():
    def step(t, prev, a, vio):
        fb = {
            "se": 1.0,
            "violation": vio,
            "reconfiguration": float(a != prev),
            "arrival_rate_bps": 1e6,
            "queue_delta_bytes": 0.0,
            "dropped_bytes": 0.0,
        }
        return Step(t, {"prev_action": prev}, "", "", "", a, "", True, fb)  # fmt: skip

    traj = Trajectory(0, 0, [step(0, 2, 2, 1.0), step(1, 2, 5, 0.0), step(2, 5, 5, 0.0),
                             step(3, 5, 5, 0.0)])  # fmt: skip
    labels = [
        StepLabel(0, "suboptimal", 3, "violation"),
        StepLabel(1, "suboptimal", 2, "needless increase"),
        StepLabel(2, "suboptimal", 4, "over-provisioned"),
        StepLabel(3, "effective", 5, ""),
    ]
    ev = evaluate_trial([traj], [Reflection(0, labels, "summary", "test")])
    assert (ev.steps, ev.suboptimal) == (4, 3)
    assert (ev.wanted_more, ev.wanted_less, ev.wanted_same_as_before) == (1, 1, 1)
    assert ev.violations == 1 and ev.reconfigurations == 1
    assert ev.suboptimal_share == pytest.approx(0.75)
    with pytest.raises(ValueError):
        evaluate_trial([traj], [])


def test_reflexion_trials_build_a_bounded_memory(small_env, tokenizer):
    env, params = small_env
    actor = _actor(env, tokenizer, 1)  # starving slice 0 -> violations -> "MORE resources"
    reflector = RuleReflector(RuleReflectorConfig(), actor.cfg.prompt)
    cfg = ReflexionConfig(trials=3, trial_seeds=(7,), trial_steps=8, memory_size=2)
    calls_per_trial = cfg.trial_steps
    run = run_reflexion(actor, reflector, env, params, cfg)
    assert len(run.reflections) == 3 and run.memory == run.reflections[-2:]
    assert actor.memory == run.memory
    assert run.env_samples == 3 * 8
    assert all(r.startswith(RULE_SELF_REFLECTION_TAG) for r in run.reflections)
    assert "MORE resources" in run.reflections[0]
    # Trial 1 acted without memory, trial 2 with reflection 1, trial 3 with reflections 1-2.
    calls = actor.sampler.calls
    trial_prompts = [calls[i * calls_per_trial][0] for i in range(3)]
    assert "Trial reflection" not in trial_prompts[0]
    assert run.reflections[0][:60] in " ".join(trial_prompts[1].split())
    assert "Trial reflection 2" in trial_prompts[2]


def test_a_run_continues_after_its_saved_trials_to_the_same_result(small_env, tokenizer,
                                                                   tmp_path):
    """A run killed after trial 1 (its trajectories and state saved by the experiment's
    on_trial) continues with trial 2: the same memory, reflections, metrics, evaluations,
    samples and Actor keys as an uninterrupted run; trial 1 is not run again."""
    from sfjax.agents.reflexion import load_done_trials, trial_state
    from sfjax.agents.trajectory import save_json, save_trajectories

    env, params = small_env
    cfg = ReflexionConfig(trials=3, trial_seeds=(7,), trial_steps=8, memory_size=2)

    def reflector(actor):
        return RuleReflector(RuleReflectorConfig(), actor.cfg.prompt)

    whole = _actor(env, tokenizer, 1)
    ref = run_reflexion(whole, reflector(whole), env, params, cfg)

    def save(k, record):
        save_trajectories(tmp_path / f"trial_{k + 1}.json", record.trajectories[-1])
        save_json(tmp_path / f"state_{k + 1}.json", trial_state(record))

    first = _actor(env, tokenizer, 1)
    run_reflexion(first, reflector(first), env, params, ReflexionConfig(
        trials=1, trial_seeds=(7,), trial_steps=8, memory_size=2), on_trial=save)  # fmt: skip
    assert load_done_trials(tmp_path, 0) is None
    done = load_done_trials(tmp_path, 3)
    assert len(done.reflections) == 1
    rest = _actor(env, tokenizer, 1)
    run = run_reflexion(rest, reflector(rest), env, params, cfg, on_trial=save, done=done)
    assert len(rest.sampler.calls) == 2 * cfg.trial_steps  # trials 2 and 3 only
    assert rest.sampler.keys == whole.sampler.keys[cfg.trial_steps:]
    assert (run.memory, run.reflections, run.env_samples) == (ref.memory, ref.reflections,
                                                              ref.env_samples)  # fmt: skip
    assert run.trial_metrics == ref.trial_metrics and run.trial_evaluations == ref.trial_evaluations
    assert [[t.to_json() for t in ts] for ts in run.trajectories] == \
        [[t.to_json() for t in ts] for ts in ref.trajectories]  # fmt: skip
    assert len(load_done_trials(tmp_path, 3).reflections) == 3  # all saved: nothing to run
    (tmp_path / "state_2.json").write_text('{"memory": ')  # damaged: trial 2 on runs again
    assert len(load_done_trials(tmp_path, 3).reflections) == 1


def test_llm_self_reflection_uses_the_backend_model():
    seen = {}

    class FakeLocal:
        name = "local (fake)"

        def generate(self, conversations, key):
            seen["messages"] = conversations[0]
            return ["<think>hmm</think>\n Lesson: keep 4 RBGs steady. "]

    reflect = make_self_reflect(FakeLocal(), PromptConfig())
    ev = SimpleNamespace(summary="s", suboptimal=1, steps=2, wanted_more=1, wanted_less=0,
                         wanted_same_as_before=0, top_reasons=("late packets",))  # fmt: skip
    assert reflect(ev, 1, jax.random.key(0)) == "Lesson: keep 4 RBGs steady."
    assert "late packets" in seen["messages"][1]["content"]


@pytest.mark.parametrize("backend", ["local", "api"])
def test_self_reflection_drops_reasoning_up_to_the_last_think_end(backend):
    """Reflexion cut the reply at the FIRST ``</think>``, the Reflector at the last: R1 served
    without a reasoning parser sends its reasoning and ``</think>`` with no opening tag, and
    reasoning may mention ``</think>`` itself, so the memory kept the rest of the reasoning."""
    reply = (
        "The lesson must come after the </think> tag, not inside it.\nSlice 0 queued late."
        "\n</think>\n\nLesson: raise slice 0 to 6 RBGs   before\nits queue grows."
    )

    class Fake:
        name = f"{backend} (fake)"

    fake = Fake()
    if backend == "local":
        fake.generate = lambda conversations, key: [reply]
    else:
        fake.complete = lambda messages: reply
    ev = SimpleNamespace(summary="s", suboptimal=1, steps=2, wanted_more=1, wanted_less=0,
                         wanted_same_as_before=0, top_reasons=("late packets",))  # fmt: skip
    lesson = make_self_reflect(fake, PromptConfig())(ev, 1, jax.random.key(0))
    assert lesson == "Lesson: raise slice 0 to 6 RBGs before its queue grows."
