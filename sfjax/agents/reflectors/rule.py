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
3. *needless increase* (off by default, ``one_step_increase``): a_t > a_{t-1}, the previous
   step was clean (no violation, no drops) and the arrival rate did not grow by more than
   ``demand_slack`` -> suboptimal, a*_t = a_{t-1}. Off because one clean step is too little
   evidence for the objective's weights: holding a_{t-1} pays only if it violates in fewer
   than reconfig_penalty / violation_penalty (1 in 20) of such steps, and on the demo's
   prior this rule was the largest source of "use less" labels, which taught the Actor to
   under-react to rising load (benchmarks/RESULTS.md, "Behavioural-prior demo"). Rule 5 judges
   increases on stronger evidence (a smaller allocation clean under the whole hold's demand);
4. *short-lived decrease*: a_t < a_{t-1}, the allocation is back at a_{t-1} or above at a later
   step r, and every step of the dip [t, r) was clean: the dip cost reconfigurations (two for
   a plain dip) and bought only the SE of the bandwidth it freed. Priced with the objective's
   own weights (``PromptConfig.objective``): holding a_{t-1} would have delivered the same
   bits (the dip was clean) over more bandwidth, so under eq. 1's allocated bandwidth the dip
   gained about ``se_weight * sum_u SE_u (1 - a_u / a_{t-1})`` (nothing under the
   "scheduled" SE) against ``reconfig_penalty`` per reconfiguration it added over holding
   a_{t-1}. When the gain is smaller -> suboptimal, a*_t = a_{t-1} (keep: more than the dip's
   clean allocation, so no violation is risked). The paper's Reflector flags frequent
   reconfigurations the same way, in hindsight;
5. *over-provisioned change*: a_t != a_{t-1} (the step reconfigured anyway) and some other
   step u of the same trajectory ran a smaller allocation a_u < a_t cleanly under at least
   the highest arrival rate of the steps a_t was then held for -> suboptimal, a*_t = the
   largest such a_u (the most conservative proven-safe level, which raises SE at no extra
   reconfiguration), or a_{t-1} when that is between them (an increase that was not needed).
   A hold (a_t = a_{t-1}) is never told to move by this rule: moving adds a reconfiguration
   that hindsight cannot price without knowing how long the lower level would have lasted.
   ``proven_levels=False`` turns the rule off (such a step is then effective): its labels were
   right 77-94 % of the time but worth no utility on net, a miss costing a violation; off, two
   SF iterations ended no better on net and with lower SE (benchmarks/RESULTS.md, "Are the rule
   labeller's labels right?" and "The rule labeller without rule 5"), so it stays on;
6. otherwise effective, a*_t = a_t.

A suboptimal label always carries an improved action different from the action taken. It
never sees the eq. 15 utility (rule 4 uses only the weights the prompts state in words). Every
label's reason and every Reflection's summary and backend name say that it comes from this
rule-based labeller, never from an LLM.
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
    """Relative arrival-rate growth below which rule 3 calls an increase needless."""
    one_step_increase: bool = False
    """Rule 3 (an increase judged needless from one clean step) on; off by default."""
    drop_threshold_bytes: float = 0.0
    """Dropped bytes above this count as under-provisioning."""
    short_dips: bool = True
    """Rule 4 (short-lived decreases, priced with the objective's weights) on; False: off."""
    proven_levels: bool = True
    """Rule 5 (an over-provisioned change -> a smaller level proven clean elsewhere) on;
    False: off, and such a step is labelled effective."""


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
                self.cfg.one_step_increase
                and a > prev
                and prev_clean
                and arrival[i] <= arrival[i - 1] * (1 + self.cfg.demand_slack)
                and lo <= prev <= hi
            ):
                why = "increase without a violation or demand growth; keep the allocation"
                out.append(StepLabel(s.t, "suboptimal", prev, _TAG + why))
                continue
            dip = self._short_lived_decrease(steps, clean, i)
            if dip is not None:
                out.append(StepLabel(s.t, "suboptimal", prev, _TAG + dip))
                continue
            better = self._over_provisioned_change(steps, clean, arrival, i)
            if better is not None:
                why = f"{better} sufficed elsewhere under at least this demand; use less"
                out.append(StepLabel(s.t, "suboptimal", better, _TAG + why))
                continue
            out.append(StepLabel(s.t, "effective", a, _TAG + "clean step, no cheaper safe action"))
        return out

    def _over_provisioned_change(self, steps, clean, arrival, i: int) -> int | None:
        """Rule 5: the improved action of step ``i``'s over-provisioned change, else None."""
        if not self.cfg.proven_levels:
            return None
        a, prev = steps[i].action, int(steps[i].state["prev_action"])
        if a == prev:
            return None  # a hold: moving would add a reconfiguration (rule 4 prices those)
        held = next((r for r in range(i + 1, len(steps)) if steps[r].action != a), len(steps))
        need = max(arrival[i:held])
        safe = [steps[u].action for u in range(len(steps))
                if u != i and clean[u] and steps[u].action < a and arrival[u] >= need]
        if not safe:
            return None
        better = max(safe)
        return prev if better <= prev < a else better

    def _short_lived_decrease(self, steps, clean, i: int) -> str | None:
        """Rule 4: why step ``i``'s decrease was not worth its reconfigurations, else None."""
        a, prev = steps[i].action, int(steps[i].state["prev_action"])
        lo, hi = self.prompt_cfg.action_lo, self.prompt_cfg.action_hi
        if not self.cfg.short_dips or a >= prev or not lo <= prev <= hi:
            return None
        back = next((r for r in range(i + 1, len(steps)) if steps[r].action >= prev), None)
        if back is None or not all(clean[i:back]):
            return None
        acts = [prev] + [u.action for u in steps[i:back + 1]]
        added = sum(x != y for x, y in zip(acts, acts[1:])) - (acts[-1] != prev)
        objective = self.prompt_cfg.objective
        w = objective.weights
        freed = (sum(float(u.feedback["se"]) * (1 - u.action / prev) for u in steps[i:back])
                 if objective.se_definition == "allocated" else 0.0)
        if w.se_weight * freed >= w.reconfig_penalty * added:
            return None
        return (f"decrease undone {back - i} steps later: {added} extra reconfigurations for "
                f"~{freed:.2f} bit/s/Hz-steps of SE; keep the allocation")

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
