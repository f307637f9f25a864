"""The offline rule-based hindsight labeller: a Reflector without an LLM, for tests, CI and smoke.

It labels each step from the feedback vectors alone, looking at the whole trajectory in
hindsight (as the paper's Reflector does, but with fixed rules instead of reasoning), and
follows the scoring objective the prompts state (``PromptConfig.objective``): with cell-wide
violations (the default) starving slice 1 is as bad as starving slice 0. For the action a_t
taken at step t (previous allocation a_{t-1}), in this order:

1. *under-provisioned*: slice 0 had a QoS violation or dropped bytes at step t (and slice 1
   did not) -> suboptimal, a*_t = a_t + up_step (when a_t is already the largest action there
   is no better one: effective, with that reason);
2. *other slice starved* (cell-wide objective only): slice 1 violated and slice 0 did not ->
   suboptimal, a*_t = a_t - up_step (or effective at the smallest action); when both slices
   violated the cell lacked capacity and no split is known to be better: effective, with that
   reason;
3. *needless increase*: a_t > a_{t-1}, the previous step was clean (no violation, no drops) and
   the arrival rate did not grow by more than ``demand_slack`` -> suboptimal, a*_t = a_{t-1}
   (the change bought nothing and cost a reconfiguration);
4. *over-provisioned*: hindsight evidence that less was enough — some other step u of the same
   trajectory ran a smaller allocation a_u < a_t cleanly under at least the same arrival rate
   -> suboptimal, a*_t = the largest such a_u (the most conservative proven-safe reduction,
   which raises SE);
5. otherwise effective, a*_t = a_t.

A suboptimal label always carries an improved action different from the action taken. It
never sees the eq. 15 utility. Every label's reason and every Reflection's summary and
backend name say that it comes from this rule-based labeller, never from an LLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sfjax.agents.prompts import PromptConfig
from sfjax.agents.reflectors.base import trajectory_summary
from sfjax.agents.trajectory import Reflection, StepLabel, Trajectory

RULE_BACKEND_NAME = "rule (offline hindsight labeller, no LLM)"
_TAG = "[rule-based hindsight labeller] "


@dataclass(frozen=True)
class RuleReflectorConfig:
    """Thresholds of the rule-based hindsight labeller."""

    up_step: int = 1
    """How many action units to add after a violation or drop."""
    demand_slack: float = 0.05
    """Relative arrival-rate growth below which an increase is called needless."""
    drop_threshold_bytes: float = 0.0
    """Dropped bytes above this count as under-provisioning."""


class RuleReflector:
    """Offline hindsight labeller (no LLM); see the module docstring for the rules."""

    name = RULE_BACKEND_NAME

    def __init__(self, cfg: RuleReflectorConfig, prompt_cfg: PromptConfig):
        self.cfg = cfg
        self.prompt_cfg = prompt_cfg

    def _slice_bad(self, feedback) -> bool:
        """Slice 0 violated or dropped (``violation`` alone in feedback without per-slice
        flags, e.g. from older trajectories)."""
        own = feedback.get("slice_violation", feedback["violation"])
        return bool(own) or feedback["dropped_bytes"] > self.cfg.drop_threshold_bytes

    def _other_bad(self, feedback) -> bool:
        return (self.prompt_cfg.objective.violation_scope == "cell"
                and bool(feedback.get("other_violation", 0)))

    def _clean(self, feedback) -> bool:
        return not (feedback["violation"] or self._slice_bad(feedback)
                    or self._other_bad(feedback))

    def label(self, traj: Trajectory) -> list[StepLabel]:
        lo, hi = self.prompt_cfg.action_lo, self.prompt_cfg.action_hi
        steps = traj.steps
        clean = [self._clean(s.feedback) for s in steps]
        arrival = [float(s.feedback["arrival_rate_bps"]) for s in steps]
        out = []
        for i, s in enumerate(steps):
            a, prev = s.action, int(s.state["prev_action"])
            if not clean[i]:
                out.append(self._unclean_label(s.t, a, s.feedback, lo, hi))
                continue
            prev_clean = i > 0 and clean[i - 1]
            if (
                a > prev
                and prev_clean
                and arrival[i] <= arrival[i - 1] * (1 + self.cfg.demand_slack)
                and lo <= prev <= hi
            ):
                why = "increase without a violation or demand growth; keep the allocation"
                out.append(StepLabel(s.t, "suboptimal", prev, _TAG + why))
                continue
            safe = [
                steps[u].action
                for u in range(len(steps))
                if u != i and clean[u] and steps[u].action < a and arrival[u] >= arrival[i]
            ]
            if safe:
                better = max(safe)
                why = f"{better} sufficed elsewhere under at least this demand; use less"
                out.append(StepLabel(s.t, "suboptimal", better, _TAG + why))
                continue
            out.append(StepLabel(s.t, "effective", a, _TAG + "clean step, no cheaper safe action"))
        return out

    def _unclean_label(self, t: int, a: int, feedback, lo: int, hi: int) -> StepLabel:
        """Rules 1-2 for a step with a violation or drops."""
        mine, other = self._slice_bad(feedback), self._other_bad(feedback)
        if mine and not other:
            if a < hi:
                why = "slice 0 violated or dropped packets under this allocation; give it more"
                return StepLabel(t, "suboptimal", min(a + self.cfg.up_step, hi), _TAG + why)
            why = "slice 0 violated at the largest allocation; no larger action exists"
            return StepLabel(t, "effective", a, _TAG + why)
        if other and not mine:
            if a > lo:
                why = "slice 1 violated: slice 0 held resources slice 1 needed; give slice 0 less"
                return StepLabel(t, "suboptimal", max(a - self.cfg.up_step, lo), _TAG + why)
            why = "slice 1 violated at the smallest allocation of slice 0; no smaller action"
            return StepLabel(t, "effective", a, _TAG + why)
        why = ("both slices violated: the cell lacked capacity and no split is known to be "
               "better" if mine else "violation in the cell that no split is known to avoid")
        return StepLabel(t, "effective", a, _TAG + why)

    def reflect(self, trajectories: Sequence[Trajectory], key=None) -> list[Reflection]:
        del key  # deterministic
        result = []
        for traj in trajectories:
            labels = self.label(traj)
            n_sub = sum(x.label == "suboptimal" for x in labels)
            summary = (
                f"{RULE_BACKEND_NAME}: {n_sub} of {len(labels)} steps suboptimal.\n"
                + trajectory_summary(traj)
            )
            result.append(Reflection(traj.env_index, labels, summary, RULE_BACKEND_NAME))
        return result
