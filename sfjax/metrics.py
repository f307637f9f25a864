"""RAN slicing metrics of the paper (section III-B eq. 1-3, section V-B eq. 15), as pure functions.

* eq. 1, spectral efficiency of a slice in one decision interval:
  ``SE_t = sum_{p in P_t} size_p / (T * B_t)`` (delivered bits over interval x bandwidth);
  the simulator's default (``Objective.se_definition = "allocated"``) is this one, so
  over-provisioning costs SE; ``"scheduled"`` (:func:`scheduled_spectral_efficiency`:
  delivered bits over the bandwidth-time of the PRBs actually scheduled) is the alternative
  reading under which Table III's SE range 5.2-5.75 is reachable (with it and controlled-slice
  violations, the former defaults, the largest allocation won: no trade-off; see
  :mod:`sfjax.envs.objective` and benchmarks/RESULTS.md);
* eq. 2, PQoS violation: ``v_t = 1`` if any packet of the step exceeded its QoS threshold;
  the simulator counts delivered packets later than the delay budget and dropped packets, of
  every slice by default (``Objective``);
* eq. 3, reconfiguration: ``c_t = 1`` if ``B_t != B_{t-1}``;
* eq. 15, per-step utility ``U_t = alpha (SE_t + 1) - beta c_t - gamma v_t`` with
  alpha = beta = 15, gamma = 300 (../shared/DESIGN.md: these weights and the +1 offset
  reproduce the utility column of Table III from its other columns over 300-step
  trajectories).

Everything works on numpy or jax arrays (jit-able); reductions are over the last axis (time),
so a batch of trajectories [B, T] gives per-trajectory results [B].

Shape legend: T = decision steps, P = packets.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp


@dataclass(frozen=True)
class UtilityWeights:
    """Weights of the eq. 15 utility."""

    se_weight: float = 15.0
    """alpha: weight of the spectral efficiency."""
    se_offset: float = 1.0
    """Offset added to SE inside the SE term: alpha (SE + offset)."""
    reconfig_penalty: float = 15.0
    """beta: penalty of one reconfiguration."""
    violation_penalty: float = 300.0
    """gamma: penalty of one step with a PQoS violation."""


def spectral_efficiency(delivered_bits, bandwidth_hz, interval_s: float = 0.1):
    """Eq. 1: delivered bits / (interval x allocated bandwidth), bit/s/Hz; 0 where B = 0."""
    bandwidth_hz = jnp.asarray(bandwidth_hz, jnp.float32)
    safe = jnp.where(bandwidth_hz > 0, bandwidth_hz, 1.0)
    return jnp.where(bandwidth_hz > 0, jnp.asarray(delivered_bits) / (interval_s * safe), 0.0)


def scheduled_spectral_efficiency(delivered_bits, scheduled_hz_s, data_re_fraction=1.0,
                                  fallback=0.0):
    """SE of the transmissions, bit/s/Hz: ``delivered_bits / data_re_fraction`` over
    ``scheduled_hz_s`` (sum over scheduled PRB-TTIs of bandwidth x duration).

    With full transport blocks this is the 36.213 efficiency of the CQIs used, weighted by
    PRB-TTIs (``data_re_fraction`` undoes the control/reference-signal overhead that the
    blocks' sizes include); padding lowers it. ``fallback`` where nothing was scheduled.
    """
    scheduled_hz_s = jnp.asarray(scheduled_hz_s, jnp.float32)
    safe = jnp.where(scheduled_hz_s > 0, scheduled_hz_s, 1.0)
    se = jnp.asarray(delivered_bits, jnp.float32) / data_re_fraction / safe
    return jnp.where(scheduled_hz_s > 0, se, fallback)


def violation_flag(delay_ms_P, budget_ms, delivered_P=None, dropped_packets=0):
    """Eq. 2 for one step: any delivered packet later than its budget, or any packet dropped.

    ``delivered_P`` masks the packets that were delivered in the step (all when None).
    """
    delay_ms_P = jnp.asarray(delay_ms_P)
    late_P = delay_ms_P > budget_ms
    if delivered_P is not None:
        late_P = late_P & jnp.asarray(delivered_P, bool)
    return jnp.any(late_P, axis=-1) | (jnp.asarray(dropped_packets) > 0)


def reconfiguration_flags(prbs_T, initial_prbs=None):
    """Eq. 3 per step: ``c_t = [B_t != B_{t-1}]``; the first step compares with
    ``initial_prbs`` (the allocation in force before it), or counts 0 when None."""
    prbs_T = jnp.asarray(prbs_T)
    if initial_prbs is None:
        prev_T = jnp.concatenate([prbs_T[..., :1], prbs_T[..., :-1]], axis=-1)
    else:
        first = jnp.broadcast_to(jnp.asarray(initial_prbs, prbs_T.dtype), prbs_T[..., :1].shape)
        prev_T = jnp.concatenate([first, prbs_T[..., :-1]], axis=-1)
    return prbs_T != prev_T


def step_utility(se, reconfiguration, violation, weights: UtilityWeights = UtilityWeights()):
    """Eq. 15 per step: alpha (SE + offset) - beta c - gamma v."""
    return (
        weights.se_weight * (jnp.asarray(se, jnp.float32) + weights.se_offset)
        - weights.reconfig_penalty * jnp.asarray(reconfiguration, jnp.float32)
        - weights.violation_penalty * jnp.asarray(violation, jnp.float32)
    )


def table_utility(mean_se, reconfigurations, violations, n_steps: int = 300,
                  weights: UtilityWeights = UtilityWeights()):
    """Trajectory utility from Table III's columns: sum_t of eq. 15 over ``n_steps`` steps."""
    return (
        weights.se_weight * n_steps * (jnp.asarray(mean_se, jnp.float32) + weights.se_offset)
        - weights.reconfig_penalty * jnp.asarray(reconfigurations, jnp.float32)
        - weights.violation_penalty * jnp.asarray(violations, jnp.float32)
    )


def summarize(se_T, reconfiguration_T, violation_T, weights: UtilityWeights = UtilityWeights()):
    """Table III statistics of trajectories: mean SE, reconfiguration times, PQoS violation
    times and total utility (reduced over the last axis)."""
    se_T = jnp.asarray(se_T, jnp.float32)
    c_T = jnp.asarray(reconfiguration_T, jnp.float32)
    v_T = jnp.asarray(violation_T, jnp.float32)
    return {
        "mean_se": jnp.mean(se_T, axis=-1),
        "reconfigurations": jnp.sum(c_T, axis=-1),
        "violations": jnp.sum(v_T, axis=-1),
        "utility": jnp.sum(step_utility(se_T, c_T, v_T, weights), axis=-1),
    }
