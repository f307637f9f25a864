"""Traced parameters, simulator state and the eq. 14 observation of the RAN slicing env.

* :class:`EnvParams` (gymnax ``EnvParams``): what an experiment may change without
  recompiling: eq. 15 weights, episode length, initial allocation, fading traces, fixed drop.
* :class:`EnvState` (gymnax ``EnvState``): traffic, FIFOs, PF averages, channel draw, and the
  raw eq. 14 state of both slices (``prbs`` and the ``*_S`` fields, index 0 = controlled).
* :class:`UeTables`: per-UE constants (packet size, rates, budgets, slice membership) that the
  TTI loop broadcasts over, built once from a :class:`~sfjax.envs.scenario.RanSlicingConfig`.
* :func:`scaled_observation` / :func:`unscale_observation`: the RL observation (eq. 14 scaled to
  about [0, 1]) and its inverse; :func:`observation_dict` / :func:`info_dict` give prompts the
  raw values as Python floats.

Shape legend: U = UEs (controlled slice first), S = slices (2), R = RBGs, A = actions,
N = fading traces, L = trace length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment

from sfjax.envs import buffers as fifo
from sfjax.envs.channel import CQI_EFFICIENCY_K
from sfjax.envs.scenario import RanSlicingConfig

SE_SCALE = float(CQI_EFFICIENCY_K[-1])
"""Observation scale of SE: the highest 36.213 CQI efficiency (5.5547 bit/s/Hz)."""


@struct.dataclass
class EnvParams(environment.EnvParams):
    """Traced parameters: eq. 15 weights, episode length, fading traces and the fixed drop."""

    max_steps_in_episode: int = 300
    se_weight: float = 15.0
    """alpha of eq. 15 (weights SE)."""
    se_offset: float = 1.0
    """Per-step offset inside the SE term: w_se (SE + offset) (../shared/DESIGN.md: +1)."""
    reconfig_penalty: float = 15.0
    """beta of eq. 15."""
    violation_penalty: float = 300.0
    """gamma of eq. 15."""
    initial_action: int = 0
    """Allocation (action index) in force before the first decision."""
    prbs_per_action_A: Any = None
    gains_db_NLR: Any = None
    """Fading traces of all slices stacked: RBG-mean power gains in dB."""
    trace_first_U: Any = None
    """First trace of each UE's fading model in ``gains_db_NLR``."""
    trace_count_U: Any = None
    d2d_m_U: Any = None
    azimuth_deg_U: Any = None
    los_U: Any = None
    shadowing_db_U: Any = None


@struct.dataclass
class EnvState(environment.EnvState):
    """Full simulator state; ``prbs`` and the ``*_S`` fields are the raw eq. 14 observation."""

    clock_ms: jnp.ndarray
    on_U: jnp.ndarray
    remaining_ms_U: jnp.ndarray
    phase_ms_U: jnp.ndarray
    buffers: fifo.Buffers
    avg_thr_bps_U: jnp.ndarray
    snr_db_U: jnp.ndarray
    trace_U: jnp.ndarray
    trace_offset_U: jnp.ndarray
    prbs: jnp.ndarray
    """PRBs of the controlled slice in force (the previous action of eq. 14)."""
    se_S: jnp.ndarray
    """SE of the last step under ``config.se_definition`` (0 before the first step)."""
    se_scheduled_S: jnp.ndarray
    """Scheduled-PRB SE of the last step that scheduled something (carried over quiet steps)."""
    arrival_rate_bps_S: jnp.ndarray
    queue_delta_bytes_S: jnp.ndarray
    dropped_bytes_S: jnp.ndarray


@dataclass(frozen=True, eq=False)
class UeTables:
    """Per-UE constants of a config (numpy, static under jit); UEs of the controlled slice first."""

    slice_U: np.ndarray
    """0 = controlled slice, 1 = other slice."""
    member_SU: np.ndarray
    """One-hot slice membership (float32): per-slice sums are ``member_SU @ x_U``."""
    packet_bytes_U: np.ndarray
    interval_ms_U: np.ndarray
    budget_ms_U: np.ndarray
    mean_on_ms_U: np.ndarray
    mean_off_ms_U: np.ndarray
    on_frac_U: np.ndarray
    rate_bps_U: np.ndarray
    rbg_prbs_R: np.ndarray
    max_arrivals: int
    """Most packets one UE can emit in one TTI."""
    peak_rate_S: np.ndarray
    """Offered load of a slice with every UE ON (observation scale of the arrival rate)."""
    slice_buffer_S: np.ndarray
    """RLC buffer bytes of a whole slice (observation scale of the queue delta)."""

    @classmethod
    def from_config(cls, cfg: RanSlicingConfig) -> UeTables:
        slices = cfg.ordered_slices
        slice_U = np.repeat([0, 1], [slices[0].n_ues, slices[1].n_ues])

        def per_ue(fn, dtype=np.float32):
            return np.asarray([fn(slices[s]) for s in slice_U], dtype)

        return cls(
            slice_U=slice_U,
            member_SU=np.stack([slice_U == 0, slice_U == 1]).astype(np.float32),
            packet_bytes_U=per_ue(lambda s: s.packet_bytes, np.int32),
            interval_ms_U=per_ue(lambda s: s.packet_interval_ms),
            budget_ms_U=per_ue(lambda s: s.delay_budget_ms),
            mean_on_ms_U=per_ue(lambda s: s.mean_on_s * 1e3),
            mean_off_ms_U=per_ue(lambda s: s.mean_off_s * 1e3),
            on_frac_U=per_ue(lambda s: s.on_fraction),
            rate_bps_U=per_ue(lambda s: s.bit_rate_bps),
            rbg_prbs_R=np.asarray(cfg.cell.rbg_prbs, np.int32),
            max_arrivals=max(s.max_packets_per_tti for s in slices),
            peak_rate_S=np.asarray([s.peak_rate_bps for s in slices], np.float32),
            slice_buffer_S=np.asarray([s.n_ues * cfg.buffer_bytes for s in slices], np.float32),
        )


def scaled_observation(cfg: RanSlicingConfig, ues: UeTables, state: EnvState) -> jax.Array:
    """Eq. 14 observation: ``[prbs / n_prb, SE / 5.5547, arrival rate / peak rate, queue delta /
    slice buffer (clipped to [-1, 1]), drops / peak bytes per step (clipped to [0, 1])]`` of the
    controlled slice, plus the other slice's last four with ``observe_other_slice``."""
    scale_S = jnp.asarray(ues.peak_rate_S) * cfg.step_s / 8.0

    def feats(s):
        return [
            state.se_S[s] / SE_SCALE,
            state.arrival_rate_bps_S[s] / ues.peak_rate_S[s],
            jnp.clip(state.queue_delta_bytes_S[s] / ues.slice_buffer_S[s], -1.0, 1.0),
            jnp.clip(state.dropped_bytes_S[s] / scale_S[s], 0.0, 1.0),
        ]

    parts = [state.prbs.astype(jnp.float32) / cfg.cell.n_prb] + feats(0)
    if cfg.observe_other_slice:
        parts += feats(1)
    return jnp.stack(parts).astype(jnp.float32)


def unscale_observation(cfg: RanSlicingConfig, ues: UeTables, obs) -> dict[str, float]:
    """Inverse of :func:`scaled_observation` for one observation (exact unless clipped)."""
    o = np.asarray(jax.device_get(obs), np.float64)
    peak_bytes_S = ues.peak_rate_S * cfg.step_s / 8.0

    def feats(i, s, prefix):
        return {
            f"{prefix}se": o[i] * SE_SCALE,
            f"{prefix}arrival_rate_mbps": o[i + 1] * ues.peak_rate_S[s] / 1e6,
            f"{prefix}queue_delta_bytes": o[i + 2] * ues.slice_buffer_S[s],
            f"{prefix}dropped_bytes": o[i + 3] * peak_bytes_S[s],
        }

    out = {"prbs": o[0] * cfg.cell.n_prb, **feats(1, 0, "")}
    if cfg.observe_other_slice:
        out.update(feats(5, 1, "other_"))
    return {k: float(v) for k, v in out.items()}


def prbs_for_action(action, params: EnvParams):
    """PRBs the controlled slice gets for an action index (jit-able)."""
    return params.prbs_per_action_A[action]


def action_for_prbs(prbs, params: EnvParams):
    """Action whose PRB count is nearest to ``prbs`` (ties go to the larger allocation)."""
    table_A = params.prbs_per_action_A
    dist_A = jnp.abs(table_A - jnp.asarray(prbs)[..., None]).astype(jnp.float32)
    return jnp.argmin(dist_A - 1e-3 * table_A / (1 + table_A.max()), axis=-1).astype(jnp.int32)


def observation_dict(state: EnvState) -> dict[str, float]:
    """Raw eq. 14 state of one (unbatched) env as Python floats: PRBs, SE, Mb/s, bytes."""
    s = jax.device_get(state)
    out = {"prbs": float(s.prbs)}
    for i, prefix in ((0, ""), (1, "other_")):
        out[f"{prefix}se"] = float(s.se_S[i])
        out[f"{prefix}arrival_rate_mbps"] = float(s.arrival_rate_bps_S[i]) / 1e6
        out[f"{prefix}queue_delta_bytes"] = float(s.queue_delta_bytes_S[i])
        out[f"{prefix}dropped_bytes"] = float(s.dropped_bytes_S[i])
    return out


def info_dict(info: dict[str, Any]) -> dict[str, float]:
    """One (unbatched) step's info as Python floats (flags become 0.0 / 1.0); array entries
    (gymnax's ``final_observation``) are left out."""
    host = jax.device_get(info)
    return {k: float(np.asarray(v)) for k, v in host.items() if np.ndim(v) == 0}
