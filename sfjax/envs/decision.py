"""One 100 ms decision of the RAN slicing env: the TTI scan and the per-slice feedback.

:func:`decision_step` is the whole ``step_env`` dynamics (pure, jit-able): it gives the
controlled slice the first ``action + min_rbg_per_slice`` RBGs, runs ``ttis_per_step`` TTIs in
one ``lax.scan`` and turns the accumulated per-UE counters into the eq. 1-3 feedback and the
eq. 15 reward. Each TTI, vectorised over UEs and RBGs:

1. the subband efficiency of every UE on every RBG (mean SNR x fast-fading trace -> CQI at
   10 % BLER -> 36.213 efficiency x ``data_re_fraction``), batched for the whole decision
   before the scan (:func:`data_efficiency`);
2. proportional-fair assignment of each RBG to a backlogged UE of the slice owning it
   (:mod:`sfjax.envs.scheduler`), transport blocks at the worst allocated CQI;
3. bytes leave the per-UE FIFOs; completed packets' delays (+ ``pipeline_delay_ms``) are
   checked against the budget;
4. on-off CBR packets arriving during the TTI join the FIFOs (tail drop when full).

Spectral efficiency of a slice in the step (both always reported, ``se`` is the one named by
``config.se_definition``; see :mod:`sfjax.envs.scenario` for why):

* ``se_scheduled`` = delivered bits / ``data_re_fraction`` / (scheduled PRB-TTIs x 180 kHz x
  1 ms): the 36.213 efficiency of the CQIs the slice's transport blocks were sent with,
  weighted by PRB-TTIs and lowered by padding. A step in which no PRB of the slice was
  scheduled (no data at all) carries the previous step's value: SE then describes the link,
  not the traffic, and a quiet step neither rewards nor punishes the allocation (0 would cost
  ~80 of eq. 15 utility for something no action could change);
* ``se_allocated`` = delivered bits / (0.1 s x allocated bandwidth) (eq. 1 as printed; 0 with
  no bandwidth).

Shape legend: T = TTIs per decision, U = UEs (controlled slice first), R = RBGs, S = slices.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from sfjax import metrics
from sfjax.envs import buffers as fifo
from sfjax.envs import channel, scheduler, traffic
from sfjax.envs.channel import PRB_BANDWIDTH_HZ
from sfjax.envs.scenario import TTI_S, RanSlicingConfig
from sfjax.envs.state import EnvParams, EnvState, UeTables

_COUNTERS_I = ("arrived", "served", "tb_bits", "used_prbs", "dropped", "dropped_pkts",
               "delivered_pkts", "late_pkts")
_COUNTERS_F = ("max_delay", "sum_delay")


def data_efficiency(cfg: RanSlicingConfig, params: EnvParams, state: EnvState):
    """Data bits per second per Hz of every UE on every RBG in every TTI of the decision,
    ``eff_TUR``: the subband CQI efficiency x ``data_re_fraction``, in one batched op."""
    length = params.gains_db_NLR.shape[1]
    t_T = state.clock_ms + jnp.arange(cfg.ttis_per_step, dtype=jnp.int32)
    idx_TU = (state.trace_offset_U[None, :] + t_T[:, None]) % length
    gain_db_TUR = params.gains_db_NLR[state.trace_U[None, :], idx_TU]
    eff_TUR = channel.sinr_db_to_efficiency_lut(state.snr_db_U[None, :, None] + gain_db_TUR)
    if cfg.cell.data_re_fraction != 1.0:
        eff_TUR = eff_TUR * cfg.cell.data_re_fraction
    return eff_TUR


def _tti(cfg: RanSlicingConfig, ues: UeTables, owner_R, carry, xs):
    """One 1 ms TTI: schedule on the queues, serve, then enqueue this TTI's arrivals."""
    exp_U, eff_UR = xs
    state, acc = carry
    buf = state.buffers
    t = state.clock_ms

    queued_U = fifo.queued_bytes(buf, ues.packet_bytes_U)
    eligible_UR = (queued_U > 0)[:, None] & (
        jnp.asarray(ues.slice_U)[:, None] == owner_R[None, :]
    )
    rbg_prbs_R = jnp.asarray(ues.rbg_prbs_R)
    if cfg.scheduler == "pf_ns3":
        winner_R = scheduler.pf_assign(eff_UR, state.avg_thr_bps_U, eligible_UR, rbg_prbs_R)
    else:
        winner_R = scheduler.pf_assign_buffer_aware(
            eff_UR, state.avg_thr_bps_U, eligible_UR, rbg_prbs_R, 8 * queued_U
        )
    tb_bits_U, used_prbs_U = scheduler.transport_blocks(winner_R, eff_UR, rbg_prbs_R)
    served_U = jnp.minimum(tb_bits_U // 8, queued_U)
    # a packet's delay ends when its last byte is through the pipeline after this TTI
    now_ms = (t + 1).astype(jnp.float32) + cfg.pipeline_delay_ms
    buf, done_U, late_U, max_delay_U, sum_delay_U = fifo.serve(
        buf, served_U, ues.packet_bytes_U, now_ms, ues.budget_ms_U
    )
    avg_U = scheduler.update_average_throughput(state.avg_thr_bps_U, tb_bits_U, cfg.pf_window_tti)

    n_arr_U, offsets_UK, phase_U = traffic.arrivals_in_tti(
        state.on_U, state.phase_ms_U, ues.interval_ms_U, ues.max_arrivals
    )
    buf, dropped_U = fifo.enqueue(buf, n_arr_U, t.astype(jnp.float32) + offsets_UK)
    on_U, remaining_U = traffic.advance_onoff(
        state.on_U, state.remaining_ms_U, exp_U, ues.mean_on_ms_U, ues.mean_off_ms_U
    )
    state = state.replace(
        clock_ms=t + 1, on_U=on_U, remaining_ms_U=remaining_U, phase_ms_U=phase_U,
        buffers=buf, avg_thr_bps_U=avg_U,
    )
    acc = {
        "arrived": acc["arrived"] + n_arr_U * ues.packet_bytes_U,
        "served": acc["served"] + served_U,
        "tb_bits": acc["tb_bits"] + tb_bits_U,
        "used_prbs": acc["used_prbs"] + used_prbs_U,
        "dropped": acc["dropped"] + dropped_U * ues.packet_bytes_U,
        "dropped_pkts": acc["dropped_pkts"] + dropped_U,
        "delivered_pkts": acc["delivered_pkts"] + done_U,
        "late_pkts": acc["late_pkts"] + late_U,
        "max_delay": jnp.maximum(acc["max_delay"], max_delay_U),
        "sum_delay": acc["sum_delay"] + sum_delay_U,
    }
    return (state, acc), None


def run_ttis(cfg: RanSlicingConfig, ues: UeTables, params: EnvParams, state: EnvState,
             owner_R, key: jax.Array):
    """``lax.scan`` over the decision's TTIs; returns the new state and per-UE counters."""
    n = cfg.n_ues
    exp_TU = jax.random.exponential(key, (cfg.ttis_per_step, n))
    acc0 = {k: jnp.zeros((n,), jnp.int32) for k in _COUNTERS_I}
    acc0.update({k: jnp.zeros((n,), jnp.float32) for k in _COUNTERS_F})
    (new, acc), _ = jax.lax.scan(
        partial(_tti, cfg, ues, owner_R), (state, acc0),
        (exp_TU, data_efficiency(cfg, params, state)),
    )
    return new, acc


def spectral_efficiencies(cfg: RanSlicingConfig, delivered_bits_S, used_prb_tti_S, prbs_S,
                          prev_scheduled_S):
    """``(se_scheduled_S, se_allocated_S)`` of one step (module docstring)."""
    se_allocated_S = metrics.spectral_efficiency(
        delivered_bits_S, prbs_S * PRB_BANDWIDTH_HZ, cfg.step_s
    )
    se_scheduled_S = metrics.scheduled_spectral_efficiency(
        delivered_bits_S, used_prb_tti_S * PRB_BANDWIDTH_HZ * TTI_S,
        cfg.cell.data_re_fraction, fallback=prev_scheduled_S,
    )
    return se_scheduled_S, se_allocated_S


def decision_step(cfg: RanSlicingConfig, ues: UeTables, key: jax.Array, state: EnvState,
                  action, params: EnvParams):
    """One decision without auto-reset: ``(state, reward, info)`` (see module docstring)."""
    action = jnp.clip(jnp.asarray(action, jnp.int32).reshape(()), 0, cfg.num_actions - 1)
    prbs = params.prbs_per_action_A[action]
    owner_R = (jnp.arange(cfg.cell.n_rbg) >= action + cfg.min_rbg_per_slice).astype(jnp.int32)
    queued0_U = fifo.queued_bytes(state.buffers, ues.packet_bytes_U)
    new, acc = run_ttis(cfg, ues, params, state, owner_R, key)
    queued1_U = fifo.queued_bytes(new.buffers, ues.packet_bytes_U)

    member_SU = jnp.asarray(ues.member_SU)

    def per_slice(x_U):
        return member_SU @ x_U.astype(jnp.float32)

    prbs_S = jnp.stack([prbs, cfg.cell.schedulable_prbs - prbs]).astype(jnp.float32)
    delivered_bits_S = 8.0 * per_slice(acc["served"])
    used_prb_tti_S = per_slice(acc["used_prbs"])
    tb_bits_S = per_slice(acc["tb_bits"])
    se_scheduled_S, se_allocated_S = spectral_efficiencies(
        cfg, delivered_bits_S, used_prb_tti_S, prbs_S, state.se_scheduled_S
    )
    se_S = se_scheduled_S if cfg.se_definition == "scheduled" else se_allocated_S
    link_se_S = tb_bits_S / cfg.cell.data_re_fraction / jnp.maximum(
        used_prb_tti_S * PRB_BANDWIDTH_HZ * TTI_S, 1.0
    )
    late_S = per_slice(acc["late_pkts"])
    dropped_pkts_S = per_slice(acc["dropped_pkts"])
    violation_S = (late_S > 0) | (dropped_pkts_S > 0)
    arrival_rate_S = 8.0 * per_slice(acc["arrived"]) / cfg.step_s
    queue_delta_S = per_slice(queued1_U) - per_slice(queued0_U)
    dropped_bytes_S = per_slice(acc["dropped"])
    reconfiguration = prbs != state.prbs
    delivered_pkts_S = per_slice(acc["delivered_pkts"])
    max_delay_S = jnp.max(jnp.where(member_SU > 0, acc["max_delay"][None, :], 0.0), axis=1)

    violation = violation_S.any() if cfg.violation_scope == "cell" else violation_S[0]
    # EnvParams carries the eq. 15 weights under UtilityWeights' names.
    reward = metrics.step_utility(se_S[0], reconfiguration, violation, params)
    new = new.replace(
        time=state.time + 1,
        prbs=prbs,
        se_S=se_S,
        se_scheduled_S=se_scheduled_S,
        arrival_rate_bps_S=arrival_rate_S,
        queue_delta_bytes_S=queue_delta_S,
        dropped_bytes_S=dropped_bytes_S,
    )
    per_slice_info = {
        "se": se_S,
        "violation": violation_S,
        "arrival_rate_bps": arrival_rate_S,
        "queue_delta_bytes": queue_delta_S,
        "dropped_bytes": dropped_bytes_S,
        "prbs": prbs_S.astype(jnp.int32),
        "se_scheduled": se_scheduled_S,
        "se_allocated": se_allocated_S,
        "delivered_bits": delivered_bits_S,
        "queued_bytes": per_slice(queued1_U),
        "link_se": link_se_S,
        "tb_fill": jnp.where(tb_bits_S > 0, delivered_bits_S / jnp.maximum(tb_bits_S, 1.0), 0.0),
        "utilization": used_prb_tti_S / jnp.maximum(prbs_S * cfg.ttis_per_step, 1.0),
        "late_packets": late_S.astype(jnp.int32),
        "dropped_packets": dropped_pkts_S.astype(jnp.int32),
        "delivered_packets": delivered_pkts_S.astype(jnp.int32),
        "max_delay_ms": max_delay_S,
        "mean_delay_ms": per_slice(acc["sum_delay"]) / jnp.maximum(delivered_pkts_S, 1.0),
    }
    info = {}
    for s, prefix in ((0, ""), (1, "other_")):
        info.update({prefix + k: v[s] for k, v in per_slice_info.items()})
    info["slice_violation"] = info["violation"]
    info["violation"] = violation
    info["reconfiguration"] = reconfiguration
    info["other_reconfiguration"] = reconfiguration
    info["utility"] = reward
    return new, reward, info
