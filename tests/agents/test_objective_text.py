"""One objective, told to everyone: the Actor's and Reflector's task text follow the env's scoring."""

import dataclasses

import pytest

from sfjax.agents import prompts as P
from sfjax.agents.objective_text import describe_slices, objective_compact, objective_lines
from sfjax.agents.reflectors.base import reflection_system_prompt
from sfjax.baselines.llm_agent import prompt_config_for_env
from sfjax.envs.objective import Objective
from sfjax.envs.ran import RanSlicingConfig, RanSlicingEnv
from sfjax.metrics import UtilityWeights


def test_text_follows_each_reading():
    cell = "\n".join(objective_lines(Objective()))
    assert "ALLOCATED" in cell and "whole cell" in cell and "slice 1" in cell
    assert "20 bit/s/Hz" in cell and "as 1 bit/s/Hz" in cell
    ctrl = "\n".join(objective_lines(Objective("scheduled", "controlled")))
    assert "whole cell" not in ctrl and "scheduled PRB" in ctrl and "ALLOCATED" not in ctrl
    w = UtilityWeights(se_weight=10.0, reconfig_penalty=5.0, violation_penalty=100.0)
    assert "10 bit/s/Hz" in "\n".join(objective_lines(Objective(weights=w)))
    assert "0.5 bit/s/Hz" in "\n".join(objective_lines(Objective(weights=w)))
    assert "starving slice 1" in objective_compact(Objective())
    assert "starving" not in objective_compact(Objective(violation_scope="controlled"))


@pytest.mark.parametrize("objective", [Objective(), Objective("scheduled", "controlled")])
def test_actor_and_reflector_are_told_the_env_objective(objective):
    env = RanSlicingEnv(RanSlicingConfig(objective=objective))
    cfg = prompt_config_for_env(env, P.PromptConfig())
    assert cfg.objective == objective
    assert cfg.slice_description == describe_slices(env.config)
    assert "20 GBR users" in cfg.slice_description and "4 non-GBR" in cfg.slice_description
    lines = objective_lines(objective)
    actor, reflector = P.system_prompt(cfg), reflection_system_prompt(cfg)
    for line in lines:
        assert line in actor and line in reflector
    for text in (actor, reflector):
        assert "reward" not in text.lower() and "utility" not in text.lower()
    compact = P.system_prompt(dataclasses.replace(cfg, style="compact"))
    assert objective_compact(objective) in compact


def test_trade_off_off_states_the_objectives_in_words_only():
    """PromptConfig.trade_off=False (the ablation): no agent hears how the objectives weigh,
    the Actor (full and compact), the Reflector and Reflexion's self-reflection alike; the
    objectives themselves are still stated."""
    from sfjax.agents.reflexion import TrialEvaluation, llm_self_reflection_messages

    env = RanSlicingEnv()
    on = prompt_config_for_env(env, P.PromptConfig())
    off = dataclasses.replace(on, trade_off=False)
    ev = TrialEvaluation(steps=3, suboptimal=1, wanted_more=1, wanted_less=0,
                         wanted_same_as_before=0, avg_se=1.0, reconfigurations=1.0,
                         violations=0.0, summary="s")  # fmt: skip
    for cfg, told in ((on, True), (off, False)):
        texts = [P.system_prompt(cfg), P.system_prompt(dataclasses.replace(cfg, style="compact")),
                 reflection_system_prompt(cfg), llm_self_reflection_messages(ev, 1, cfg)[0]["content"]]
        for text in texts:
            assert ("weigh" in text) is told, text
            assert "QoS violations" in text and "spectral efficiency" in text
    # Reflexion's self-reflection states the env's own objective (cell-wide violations)
    assert "either slice" in llm_self_reflection_messages(ev, 1, on)[0]["content"]


def test_state_and_feedback_show_both_slices():
    state = {"prev_action": 6, "se": 1.5, "arrival_rate_bps": 3e6, "queue_delta_bytes": 0.0,
             "dropped_bytes": 0.0, "other_arrival_rate_bps": 6e6,
             "other_queue_delta_bytes": 2048.0, "other_dropped_bytes": 512.0}
    text = P.format_state(state, P.PromptConfig())
    assert "slice 1: arrivals 6.00 Mb/s, queue change 2.0 kB, dropped 0.5 kB" in text
    fb = {"se": 1.0, "violation": 1.0, "reconfiguration": 0.0, "dropped_bytes": 0.0,
          "slice_violation": 0.0, "other_violation": 1.0}
    assert "QoS violation (slice 1)" in P.format_feedback(fb)
    assert "no QoS violation" in P.format_feedback({**fb, "violation": 0.0})
