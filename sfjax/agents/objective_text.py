"""The scoring objective in words, for every LLM that acts or judges (Actor, Reflector, Reflexion).

The agents receive no scalar reward (paper IV): they are told the goal that Table III scores
(:class:`sfjax.envs.objective.Objective`: which SE, which packets count as violations, and how
the three objectives weigh against each other) as text generated from the same object the
simulator and the RL baselines use, so an LLM agent is never told a different goal from the one
it is judged on. The weights appear only as ratios ("one step with a violation costs as much as
20 bit/s/Hz of SE held for one step"), never as a per-step number the agent could read off.
"""

from __future__ import annotations

from sfjax.envs.objective import Objective


def describe_slices(scenario) -> str:
    """The two slices and their traffic in words, from a ``RanSlicingConfig`` (controlled
    slice first, as "slice 0")."""
    parts = []
    for i, s in enumerate(scenario.ordered_slices):
        parts.append(
            f"slice {i} serves {s.n_ues} {s.name.replace('_', '-').replace('gbr', 'GBR')} users "
            f"({s.bit_rate_bps / 1e6:g} Mb/s each while active, {s.delay_budget_ms:g} ms delay "
            "budget)"
        )
    c = scenario.ordered_slices[0]
    return (
        f"{parts[0][0].upper()}{parts[0][1:]}; {parts[1]}. Users switch on and off at random "
        f"(mean {c.mean_on_s:g} s on, {c.mean_off_s:g} s off)."
    )


def _ratio(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.2g}"


def objective_lines(objective: Objective, *, slice_name: str = "slice 0",
                    other_name: str = "slice 1", trade_off: bool = True) -> list[str]:
    """The three objectives, numbered, as one line each (full prompts); with ``trade_off``
    a fourth line says how they weigh against each other."""
    w = objective.weights
    if objective.se_definition == "allocated":
        se = (f"Maximise the spectral efficiency (SE) of {slice_name}: the bits it delivers per "
              f"second per Hz of the bandwidth it is ALLOCATED, so every resource it gets "
              f"beyond what its traffic needs lowers SE.")
    else:
        se = (f"Maximise the spectral efficiency (SE) of {slice_name}'s transmissions: the bits "
              "it delivers per scheduled PRB; padding half-empty transport blocks lowers it.")
    if objective.violation_scope == "cell":
        vio = (f"Avoid packet QoS violations in the whole cell: a step fails if ANY packet of "
               f"{slice_name} or of {other_name} exceeds its delay budget or is dropped, so "
               f"starving either slice is a violation. Queue growth and drops are early "
               "warnings.")
    else:
        vio = (f"Avoid packet QoS violations of {slice_name}: a step fails if any of its packets "
               "exceeds its delay budget or is dropped. Queue growth and drops are early "
               "warnings.")
    rec = ("Avoid needless reconfigurations: every change of the allocation costs signalling; "
           "keep it unless a change is worth it.")
    lines = [f"1. {se}", f"2. {vio}", f"3. {rec}"]
    if trade_off and w.se_weight > 0:
        lines.append(
            f"How they weigh: one step with a violation costs as much as "
            f"{_ratio(w.violation_penalty / w.se_weight)} bit/s/Hz of SE held for one step, one "
            f"reconfiguration as much as {_ratio(w.reconfig_penalty / w.se_weight)} bit/s/Hz "
            "for one step."
        )
    return lines


def objective_compact(objective: Objective, *, trade_off: bool = True) -> str:
    """The same objectives in one sentence (compact prompts for small models)."""
    se = ("high spectral efficiency (SE) of slice 0 per allocated bandwidth (no more resources "
          "than needed)" if objective.se_definition == "allocated"
          else "high spectral efficiency (SE) of slice 0's transmissions")
    vio = ("no QoS violations in either slice (late or dropped packets; starving slice 1 "
           "counts)" if objective.violation_scope == "cell"
           else "no QoS violations of slice 0 (late or dropped packets)")
    w = objective.weights
    weigh = ""
    if trade_off and w.se_weight > 0:
        weigh = (f"; a violation step weighs {_ratio(w.violation_penalty / w.se_weight)}x "
                 f"and a reconfiguration {_ratio(w.reconfig_penalty / w.se_weight)}x one "
                 "bit/s/Hz of SE for one step")
    return f"Objectives: {se}, {vio}, few reconfigurations{weigh}."
