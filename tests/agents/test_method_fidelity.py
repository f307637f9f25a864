"""Pins the method's order and inputs against the paper (Algorithms 1-2, IV-B, IV-C).

* Algorithm 1 / Algorithm 2: collect -> reflect -> for each KTO iteration, rollouts of the
  *current* Actor (after the previous KTO iteration) on the unsolved suboptimal prompts, then
  KTO on the base set plus exactly those rollouts; the final collection sees the last weights.
* IV-B1 / IV-B3: the Actor is evaluated (held-out protocol, ``LLMEnvAgent``) on exactly the
  prompts -- eq. 14 state and last-k history window -- that the collection it trains on
  (``collect`` over ``JaxRanRunner``) gives it for the same environment trajectory.
"""

from __future__ import annotations

import jax
import numpy as np

from sfjax.agents.actor import ActorDecision
from sfjax.agents.collect import collect
from sfjax.agents.env import JaxRanRunner
from sfjax.agents.loop import SelfFinetuningLoop
from sfjax.agents.loop_config import LoopConfig
from sfjax.agents.prompts import PromptConfig, format_output, parse_output, user_prompt
from sfjax.agents.reflector import ReflectorConfig, make_reflector
from sfjax.agents.rfr import RfRConfig
from sfjax.baselines.llm_agent import LLMEnvAgent, prompt_config_for_env
from sfjax.envs.scenario import RanSlicingConfig

PCFG = PromptConfig(action_lo=1, action_hi=8, history_window=2)


class RecordingFineTuner:
    """'KTO' that only counts its iterations (the Actor's weight version) and records data."""

    def __init__(self, events):
        self.events, self.version = events, 0

    def train(self, examples, key, step_offset):
        rollouts = sorted((e.prompt, e.completion) for e in examples if e.source == "rollout")
        self.events.append(("train", self.version, rollouts))
        self.version += 1
        return {"num_steps": 1}

    def arrays(self):
        return {"version": np.asarray(self.version)}

    def load_arrays(self, a):
        self.version = int(a["version"])


class RecordingActor:
    """Always under-provisions (action 2 < demand 4), so the rule reflector flags steps; its
    rollouts name the weight version that produced them."""

    def __init__(self, ft, events):
        self.ft, self.events = ft, events

    def act(self, states, histories, step, key):
        self.events.append(("act", self.ft.version))
        text = format_output("ok", 2, "fine", PCFG)
        return [ActorDecision(f"t={step}", text, "ok", 2, "fine", True, None) for _ in states]

    def sample(self, prompts, n, keys):
        self.events.append(("sample", self.ft.version, len(prompts)))
        return [[format_output(f"v{self.ft.version}", 3 + r % 2, "a", PCFG) for r in range(n)]
                for _ in prompts]  # fmt: skip


class ShortEnv:
    """Constant demand of 4 units: any allocation below it violates in slice 0."""

    action_lo, action_hi = 1, 8

    def reset(self, key, num_envs):
        self.prev = [4] * num_envs
        return [self._state(e, 0.0) for e in range(num_envs)]

    def _state(self, e, se):
        return {"prev_action": self.prev[e], "se": se, "arrival_rate_bps": 4e6,
                "queue_delta_bytes": 0.0, "dropped_bytes": 0.0}  # fmt: skip

    def step(self, actions, key):
        fbs = []
        for e, a in enumerate(actions):
            fbs.append({"se": 1.0, "violation": float(a < 4), "reconfiguration": float(a != self.prev[e]),
                        "arrival_rate_bps": 4e6, "queue_delta_bytes": 0.0, "dropped_bytes": 0.0})  # fmt: skip
            self.prev[e] = a
        return [self._state(e, 1.0) for e in range(len(actions))], fbs


def test_rollouts_use_the_current_actor_and_feed_the_next_kto_iteration(tmp_path):
    events: list = []
    ft = RecordingFineTuner(events)
    loop = SelfFinetuningLoop(
        LoopConfig(sf_iterations=1, num_envs=2, trajectory_steps=5), RfRConfig(kto_iterations=3,
        num_rollouts=4, tau=0.9), PCFG, RecordingActor(ft, events), ShortEnv(),
        make_reflector(ReflectorConfig(backend="rule"), PCFG), ft, tmp_path, progress=False,
    )  # fmt: skip
    loop.run()
    kinds = [e[0] for e in events]
    # Algorithm 1: collect (10 decisions) -> [reflect] -> 3 x (rollouts -> KTO) -> collect
    assert kinds == ["act"] * 5 + ["sample", "train"] * 3 + ["act"] * 5
    assert all(e[1] == 0 for e in events[:5]) and all(e[1] == 3 for e in events[-5:])
    for k in range(3):
        sample, train = events[5 + 2 * k], events[6 + 2 * k]
        assert sample[1] == train[1] == k  # rolled out by the Actor after k KTO iterations
        assert sample[2] == 10  # every suboptimal step (match rate 0.5 <= tau: never solved)
        # the KTO iteration trains on these rollouts, not on an earlier iteration's
        assert len(train[2]) == 10 * 4
        assert {parse_output(c, PCFG).reflection for _, c in train[2]} == {f"v{k}"}


def test_held_out_prompts_equal_the_collection_prompts():
    steps = 12
    runner = JaxRanRunner(RanSlicingConfig(), steps)
    pcfg = prompt_config_for_env(runner.env, PromptConfig(history_window=3))
    actions = [3, 5, 5, 7, 2, 9, 9, 4, 6, 6, 8, 3]

    class Fake:
        cfg = type("Cfg", (), {"prompt": pcfg})()

        def __init__(self):
            self.prompts = []

        def act(self, states, histories, step, key):
            out = []
            for s, h in zip(states, histories):
                self.prompts.append(user_prompt(s, h, pcfg, step=step))
                a = actions[step]
                out.append(ActorDecision(self.prompts[-1], format_output(f"r{step}", a, "x", pcfg),
                                         f"r{step}", a, "x", True, None))  # fmt: skip
            return out

    env_key = jax.random.key(42)
    trained = Fake()
    collect(trained, runner, pcfg, 1, steps, env_key, jax.random.key(0), progress=False)

    # the same env trajectory (collect's keys) through the held-out evaluation's agent
    evaluated = Fake()
    agent = LLMEnvAgent(evaluated, runner.env, runner.params, jax.random.key(1))
    agent.reset([0])
    reset_key, step_key = jax.random.split(env_key)
    obs, state = runner.env.reset_env(jax.random.split(reset_key, 1)[0], runner.params)
    infos = None
    for _ in range(steps):
        (a,) = agent.act(np.asarray(obs)[None], infos)
        step_key, k = jax.random.split(step_key)
        obs, state, _, _, info = runner.env.step_env(
            jax.random.split(k, 1)[0], state, np.int32(a), runner.params
        )
        infos = [{n: float(np.asarray(v)) for n, v in info.items() if np.ndim(v) == 0}]
    assert len(trained.prompts) == len(evaluated.prompts) == steps
    for t, (p, q) in enumerate(zip(trained.prompts, evaluated.prompts)):
        assert p == q, f"step {t}: the held-out prompt differs from the training prompt"
