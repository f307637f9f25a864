"""The Actor around a sampler: prompts, constraint wiring, unparsable outputs, rollout shapes."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import pytest

from sfjax.agents.actor import Actor, ActorConfig
from sfjax.agents.prompts import HistoryEntry, PromptConfig
from sfjax.sampling import ActionConstraint, SamplingParams

STATE = {
    "prev_action": 4,
    "se": 5.0,
    "arrival_rate_bps": 3e6,
    "queue_delta_bytes": 0.0,
    "dropped_bytes": 0.0,
}


class FakeSampler:
    def __init__(self, texts):
        self.texts = texts
        self.calls = []

    def generate(self, prompts, params, key, *, n=1, action_constraint=None):
        self.calls.append((list(prompts), params, n, action_constraint))
        return SimpleNamespace(
            texts=[self.texts[i % len(self.texts)] for i in range(len(prompts) * n)]
        )


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from sfjax.tokenizer import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


@pytest.mark.parametrize("order", ["reflection_first", "action_first"])
def test_constraint_on_by_default(tokenizer, order):
    pcfg = PromptConfig(action_lo=1, action_hi=12, field_order=order)
    sampler = FakeSampler(["Reflection: ok\nAction: 7\nAnalysis: fine"])
    actor = Actor(sampler, tokenizer, ActorConfig(prompt=pcfg, free_budget=5))
    hist = [HistoryEntry(STATE, "r", 4, "a", {"se": 5.0, "violation": 0, "reconfiguration": 0})]
    out = actor.act([STATE, STATE], [hist, []], 1, jax.random.key(0))
    prompts, params, n, cons = sampler.calls[0]
    assert n == 1 and isinstance(params, SamplingParams)
    assert cons == ActionConstraint(1, 12, field="Action:", action_first=order == "action_first",
                                    free_budget=5)  # fmt: skip
    assert prompts[0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "Recent steps" in prompts[0] and "No previous steps" in prompts[1]
    assert [d.action for d in out] == [7, 7] and all(d.parsed_ok for d in out)
    assert out[0].reflection == "ok" and out[0].analysis == "fine"


def test_unparsable_output_keeps_previous_allocation(tokenizer):
    pcfg = PromptConfig(action_lo=1, action_hi=12)
    sampler = FakeSampler(["gibberish without a field", "Action: 40"])
    actor = Actor(sampler, tokenizer, ActorConfig(prompt=pcfg, constrained_action=False))
    out = actor.act([STATE, {**STATE, "prev_action": 9}], [[], []], 0, jax.random.key(0))
    assert sampler.calls[0][3] is None  # constraints off
    assert [(d.action, d.parsed_ok) for d in out] == [(4, False), (9, False)]
    assert "no 'Action:' field" in out[0].parse_error and "outside" in out[1].parse_error


def test_rollouts_grouped_per_prompt(tokenizer):
    sampler = FakeSampler([f"Action: {a}" for a in range(1, 7)])
    cfg = ActorConfig(prompt=PromptConfig(action_lo=1, action_hi=12), rollout_temperature=1.3)
    groups = Actor(sampler, tokenizer, cfg).sample(["p1", "p2"], 3, jax.random.key(0))
    assert groups == [
        ["Action: 1", "Action: 2", "Action: 3"],
        ["Action: 4", "Action: 5", "Action: 6"],
    ]
    assert sampler.calls[0][2] == 3 and sampler.calls[0][1].temperature == 1.3
    assert Actor(sampler, tokenizer, cfg).sample([], 3, jax.random.key(0)) == []
