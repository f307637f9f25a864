"""Pure-JAX packet-level RAN slicing environment with the gymnax API (paper section V-A).

Two slices share one LTE cell (DESIGN.md scenario table): the *controlled* slice (default the
20-UE GBR slice) and the *other* slice (4 non-GBR UEs). Every decision (100 ms) the agent picks
how many RBGs the controlled slice owns; the other slice gets the rest. The decision interval is
one ``lax.scan`` over 100 TTIs of 1 ms, each TTI doing, vectorised over UEs and RBGs:

1. per-RBG SINR = mean SNR of the UE (TR 38.901 UMa path loss, LOS draw, shadowing, element
   pattern, Tx power over PRBs, noise) x its fast-fading trace -> subband CQI (10% BLER);
2. proportional-fair assignment of each RBG to a backlogged UE of the slice owning it
   (:mod:`sfjax.envs.scheduler`), transport blocks at the worst allocated CQI;
3. bytes leave the per-UE FIFOs; completed packets' delays are checked against the budget;
4. on-off CBR packets arriving during the TTI join the FIFOs (tail drop when full).

Actions. ``action`` in ``0 .. num_actions-1`` gives the controlled slice
``action + min_rbg_per_slice`` RBGs, the lowest-frequency ones; with the default 25 PRB
(12 RBGs of 2 PRB + 1 of 1 PRB) and ``min_rbg_per_slice = 1`` that is 2, 4, ..., 24 PRBs
(12 actions) and both slices always keep at least one RBG. ``prbs_for_action`` /
``action_for_prbs`` convert to and from PRBs (the LLM Actor talks in PRBs).

Per-step feedback (eq. 1-3, for the controlled slice, ``other_``-prefixed for the other one):
``se`` = delivered bits / (0.1 s x allocated bandwidth) [bit/s/Hz] (0 with no bandwidth);
``violation`` = some packet delivered in the step exceeded its delay budget or some packet was
dropped (a lost packet never meets its budget); ``reconfiguration`` = the allocation differs
from the previous step's; ``arrival_rate_bps`` = bits that arrived in the step / 0.1 s;
``queue_delta_bytes`` = bytes queued at the end minus at the start; ``dropped_bytes``.
Also: ``prbs``, ``delivered_bits``, ``queued_bytes``, ``late_packets``, ``dropped_packets``,
``delivered_packets``, ``max_delay_ms``, ``mean_delay_ms``, ``utilization`` (share of the slice's
PRB-TTIs that carried a transport block), ``link_se`` (transport-block bits per used PRB-TTI
per Hz: the link-level efficiency the scheduler achieved) and ``utility`` (= reward).
Eq. 1's SE is goodput over the *allocated* bandwidth, so ``se = link_se x utilization`` up to
padding; it cannot exceed the offered load over the allocated bandwidth.
``reward`` is the eq. 15 utility ``w_se (SE + offset) - w_c c - w_v v`` (15, 1, 15, 300).

Observation (eq. 14), for RL agents: ``[prbs / n_prb, SE / 5.5547, arrival rate / peak rate,
queue delta / buffer bytes of the slice, dropped bytes / peak bytes per step]`` of the
controlled slice, float32 (``observe_other_slice`` appends the other slice's last four). The
same quantities in raw units are in ``state.prbs`` and ``state.*_S`` (index 0 = controlled
slice); :func:`observation_dict` / :func:`info_dict` turn them into Python floats for prompts.
On reset the SE, queue delta and drops are 0 and the arrival rate is the offered load of the UEs
that are ON.

API. gymnax 1.0.1's base ``Environment.step`` returns a 6-tuple (terminated, truncated);
rejax 0.1.3 and the gymnax 0.x convention expect ``(obs, state, reward, done, info)``, which
this class returns (``done`` = end of the 300-decision episode, a truncation; auto-reset as in
gymnax, ``info`` describing the step just taken). Tunable numbers (eq. 15 weights, episode
length, initial allocation, fading traces, the fixed drop) live in :class:`EnvParams`, e.g.
``params.replace(violation_penalty=100.0)``; shapes and models in :class:`RanSlicingConfig`.

Calibration (:mod:`sfjax.envs.calibration`): the default 35-60 m drop puts the links at 5.4
bit/s/Hz (the paper's 5.2-5.7 SE range); eq. 1's goodput SE of the best static allocation is
~1.9, because the paper's traffic cannot fill the band at the 10 ms budget (see there).
Fidelity knobs vs ns-3: ``scheduler="pf_ns3"`` (ns-3's PF verbatim, default is buffer-aware),
``cell.data_re_fraction`` (TBS-table overhead, ~0.7 in ns-3), ``pipeline_delay_ms`` (ns-3's
~4.5 ms delay floor). Not modelled: HARQ/BLER (link adaptation sits at the 10% BLER CQI
thresholds and every transport block is delivered), CQI reporting delay, inter-cell
interference (``cell.interference_margin_db`` adds a fixed noise rise).

Shape legend: U = UEs (controlled slice first), Q = buffer slots, R = RBGs, S = slices (2),
T = TTIs per decision, N = fading traces, L = trace length, A = actions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment, spaces

from sfjax import metrics
from sfjax.envs import buffers as fifo
from sfjax.envs import channel, scheduler, traffic
from sfjax.envs.channel import CQI_EFFICIENCY_K, PRB_BANDWIDTH_HZ, CellConfig
from sfjax.envs.fading import FadingConfig, prb_gain_traces, rbg_mean_gains
from sfjax.envs.traffic import SliceConfig

TTI_S = 1e-3

GBR_SLICE = SliceConfig(
    name="gbr", n_ues=20, bit_rate_bps=0.5e6, delay_budget_ms=10.0,
    fading=FadingConfig(profile="EPA", speed_kmh=3.0, seed=0),
)
"""Paper Table I, GBR column; pedestrian EPA fading."""
NON_GBR_SLICE = SliceConfig(
    name="non_gbr", n_ues=4, bit_rate_bps=2e6, delay_budget_ms=50.0,
    fading=FadingConfig(profile="EVA", speed_kmh=60.0, seed=1),
)
"""Paper Table I, non-GBR column; vehicular EVA fading."""


@dataclass(frozen=True)
class RanSlicingConfig:
    """Static structure of the scenario (shapes, models). Tunable numbers live in EnvParams."""

    cell: CellConfig = field(default_factory=CellConfig)
    """Carrier, bandwidth, power, antenna and drop geometry."""
    slices: tuple[SliceConfig, ...] = (GBR_SLICE, NON_GBR_SLICE)
    """Exactly two slices."""
    controlled_slice: int = 0
    """Index in ``slices`` of the slice the agent sizes; the other gets the remaining RBGs."""
    ttis_per_step: int = 100
    """TTIs of 1 ms per decision (paper: 100 ms decision interval)."""
    episode_steps: int = 300
    """Decisions per episode (paper: 300-step trajectories)."""
    buffer_bytes: int = 10240
    """RLC transmit buffer per UE (ns-3 default 10 KiB); overflow is dropped."""
    min_rbg_per_slice: int = 1
    """RBGs each slice keeps whatever the action (0 allows starving a slice)."""
    initial_prbs: int | None = None
    """Allocation in force before the first decision (nearest valid); None: middle action."""
    scheduler: str = "pf_buffer_aware"
    """Intra-slice scheduler: "pf_buffer_aware" (PF that stops giving RBGs to a UE whose queue
    is covered) or "pf_ns3" (ns-3 PfFfMacScheduler verbatim; see :mod:`sfjax.envs.scheduler`)."""
    pf_window_tti: float = 99.0
    """Window of the PF average-throughput filter (ns-3 PfFfMacScheduler: 99)."""
    pipeline_delay_ms: float = 0.0
    """Fixed latency added to every packet's delay (backhaul, MAC/PHY processing) on top of
    queueing and the 1 ms TTI; ns-3's LTE stack has a floor of ~4.5 ms. 0: queueing only."""
    randomize_drop: bool = False
    """False: one fixed UE drop from ``geometry_seed`` (comparable with ns-3); True: a fresh
    drop (positions, LOS, shadowing) on every reset."""
    geometry_seed: int = 0
    """Seed of the fixed drop."""
    observe_other_slice: bool = False
    """Append the other slice's SE, arrival rate, queue delta and drops to the observation."""

    def __post_init__(self):
        if self.scheduler not in ("pf_buffer_aware", "pf_ns3"):
            raise ValueError(
                f"scheduler must be 'pf_buffer_aware' or 'pf_ns3', got {self.scheduler!r}"
            )
        if len(self.slices) != 2:
            raise ValueError(f"exactly two slices are supported, got {len(self.slices)}")
        if self.controlled_slice not in (0, 1):
            raise ValueError(f"controlled_slice must be 0 or 1, got {self.controlled_slice}")
        if self.ttis_per_step < 1 or self.episode_steps < 1:
            raise ValueError("ttis_per_step and episode_steps must be >= 1")
        if self.pipeline_delay_ms < 0:
            raise ValueError(f"pipeline_delay_ms must be >= 0, got {self.pipeline_delay_ms}")
        if 2 * self.min_rbg_per_slice > self.cell.n_rbg:
            raise ValueError(
                f"min_rbg_per_slice={self.min_rbg_per_slice} leaves no choice with "
                f"{self.cell.n_rbg} RBGs; lower it"
            )
        for s in self.slices:
            if self.buffer_bytes < s.packet_bytes:
                raise ValueError(f"buffer_bytes must hold at least one packet of {s.name!r}")

    @property
    def ordered_slices(self) -> tuple[SliceConfig, SliceConfig]:
        """(controlled, other)."""
        c = self.controlled_slice
        return self.slices[c], self.slices[1 - c]

    @property
    def n_ues(self) -> int:
        return sum(s.n_ues for s in self.slices)

    @property
    def num_actions(self) -> int:
        return self.cell.n_rbg - 2 * self.min_rbg_per_slice + 1

    @property
    def prbs_per_action(self) -> tuple[int, ...]:
        cum = np.cumsum((0,) + self.cell.rbg_prbs)
        return tuple(int(cum[a + self.min_rbg_per_slice]) for a in range(self.num_actions))

    @property
    def buffer_packets(self) -> int:
        """FIFO capacity in packets (of the smallest packet size)."""
        return self.buffer_bytes // min(s.packet_bytes for s in self.slices)

    @property
    def step_s(self) -> float:
        return self.ttis_per_step * TTI_S

    @property
    def initial_action(self) -> int:
        if self.initial_prbs is None:
            return (self.num_actions - 1) // 2
        table = np.asarray(self.prbs_per_action)
        return int(np.argmin(np.abs(table - self.initial_prbs) - 1e-6 * table))


@struct.dataclass
class EnvParams(environment.EnvParams):
    """Traced parameters: eq. 15 weights, episode length, fading traces and the fixed drop."""

    max_steps_in_episode: int = 300
    se_weight: float = 15.0
    """alpha of eq. 15 (weights SE)."""
    se_offset: float = 1.0
    """Per-step offset inside the SE term: w_se (SE + offset) (DESIGN.md: +1)."""
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
    arrival_rate_bps_S: jnp.ndarray
    queue_delta_bytes_S: jnp.ndarray
    dropped_bytes_S: jnp.ndarray


class RanSlicingEnv(environment.Environment):
    """gymnax environment; ``step`` returns ``(obs, state, reward, done, info)`` and auto-resets."""

    def __init__(self, config: RanSlicingConfig | None = None):
        super().__init__()
        self.config = config if config is not None else RanSlicingConfig()
        cfg = self.config
        ctrl, other = cfg.ordered_slices
        self._slices = (ctrl, other)
        slice_U = np.repeat([0, 1], [ctrl.n_ues, other.n_ues])
        self._slice_U = slice_U
        self._member_SU = np.stack([slice_U == 0, slice_U == 1]).astype(np.float32)

        def per_ue(fn, dtype=np.float32):
            return np.asarray([fn(self._slices[s]) for s in slice_U], dtype)

        self._packet_bytes_U = per_ue(lambda s: s.packet_bytes, np.int32)
        self._interval_ms_U = per_ue(lambda s: s.packet_interval_ms)
        self._budget_ms_U = per_ue(lambda s: s.delay_budget_ms)
        self._mean_on_ms_U = per_ue(lambda s: s.mean_on_s * 1e3)
        self._mean_off_ms_U = per_ue(lambda s: s.mean_off_s * 1e3)
        self._on_frac_U = per_ue(lambda s: s.on_fraction)
        self._rate_bps_U = per_ue(lambda s: s.bit_rate_bps)
        self._rbg_prbs_R = np.asarray(cfg.cell.rbg_prbs, np.int32)
        self._max_arrivals = max(s.max_packets_per_tti for s in self._slices)
        self._peak_rate_S = np.asarray([s.peak_rate_bps for s in self._slices], np.float32)
        self._slice_buffer_S = np.asarray(
            [s.n_ues * cfg.buffer_bytes for s in self._slices], np.float32
        )
        self._default_params = self._build_default_params()

    # Envs built from equal configs are interchangeable: the jit caches (``step`` and ``reset``
    # take ``self`` as a static argument) are then shared instead of recompiled.
    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.config == self.config

    def __hash__(self) -> int:
        return hash((type(self), self.config))

    # ----------------------------------------------------------------------------- params
    def _build_default_params(self) -> EnvParams:
        cfg = self.config
        traces, first, count = [], [], []
        start = 0
        for s in self._slices:
            g = rbg_mean_gains(
                prb_gain_traces(s.fading, cfg.cell.carrier_hz, cfg.cell.n_prb), cfg.cell.rbg_prbs
            )
            traces.append(g)
            first.append(start)
            count.append(g.shape[0])
            start += g.shape[0]
        length = max(g.shape[1] for g in traces)
        # Flat (disabled) traces have length 1; tile them so all stack to one array.
        traces = [np.resize(g, (g.shape[0], length, g.shape[2])) for g in traces]
        gains_NLR = np.concatenate(traces, axis=0)
        drop = channel.sample_drop(
            jax.random.key(cfg.geometry_seed), cfg.n_ues, cfg.cell
        )
        return EnvParams(
            max_steps_in_episode=cfg.episode_steps,
            initial_action=cfg.initial_action,
            prbs_per_action_A=jnp.asarray(cfg.prbs_per_action, jnp.int32),
            gains_db_NLR=jnp.asarray(10.0 * np.log10(np.maximum(gains_NLR, 1e-12)), jnp.float32),
            trace_first_U=jnp.asarray(np.asarray(first, np.int32)[self._slice_U]),
            trace_count_U=jnp.asarray(np.asarray(count, np.int32)[self._slice_U]),
            d2d_m_U=drop[0],
            azimuth_deg_U=drop[1],
            los_U=drop[2],
            shadowing_db_U=drop[3],
        )

    @property
    def default_params(self) -> EnvParams:
        return self._default_params

    @property
    def name(self) -> str:
        return "RanSlicing-v0"

    @property
    def num_actions(self) -> int:
        return self.config.num_actions

    def action_space(self, params: EnvParams | None = None) -> spaces.Discrete:
        return spaces.Discrete(self.num_actions)

    @property
    def obs_dim(self) -> int:
        return 9 if self.config.observe_other_slice else 5

    def observation_space(self, params: EnvParams | None = None) -> spaces.Box:
        low = np.zeros(self.obs_dim, np.float32)
        high = np.ones(self.obs_dim, np.float32)
        low[3] = -1.0
        high[2] = 2.0  # packets quantise the arrival rate of a step: it can exceed the peak
        if self.config.observe_other_slice:
            low[7], high[6] = -1.0, 2.0
        return spaces.Box(jnp.asarray(low), jnp.asarray(high), (self.obs_dim,), jnp.float32)

    # ------------------------------------------------------------------------------ reset
    def reset_env(self, key: jax.Array, params: EnvParams):
        cfg = self.config
        n = cfg.n_ues
        k_drop, k_traffic, k_trace, k_off = jax.random.split(key, 4)
        if cfg.randomize_drop:
            drop = channel.sample_drop(k_drop, n, cfg.cell)
        else:
            drop = (params.d2d_m_U, params.azimuth_deg_U, params.los_U, params.shadowing_db_U)
        snr_db_U = channel.mean_snr_db(*drop, cfg.cell)
        on_U, remaining_U, phase_U = traffic.init_onoff(
            k_traffic, self._on_frac_U, self._mean_on_ms_U, self._mean_off_ms_U,
            self._interval_ms_U,
        )
        length = params.gains_db_NLR.shape[1]
        trace_U = params.trace_first_U + jax.random.randint(
            k_trace, (n,), 0, 1 << 30
        ) % params.trace_count_U
        offset_U = jax.random.randint(k_off, (n,), 0, length)
        offered_U = jnp.where(on_U, self._rate_bps_U, 0.0)
        state = EnvState(
            time=jnp.int32(0),
            clock_ms=jnp.int32(0),
            on_U=on_U,
            remaining_ms_U=remaining_U,
            phase_ms_U=phase_U,
            buffers=fifo.empty_buffers(n, cfg.buffer_packets, self._packet_bytes_U),
            avg_thr_bps_U=jnp.ones((n,), jnp.float32),
            snr_db_U=snr_db_U.astype(jnp.float32),
            trace_U=trace_U.astype(jnp.int32),
            trace_offset_U=offset_U.astype(jnp.int32),
            prbs=params.prbs_per_action_A[params.initial_action],
            se_S=jnp.zeros((2,), jnp.float32),
            arrival_rate_bps_S=jnp.asarray(self._member_SU) @ offered_U,
            queue_delta_bytes_S=jnp.zeros((2,), jnp.float32),
            dropped_bytes_S=jnp.zeros((2,), jnp.float32),
        )
        return self.get_obs(state, params), state

    # ------------------------------------------------------------------------------- step
    def _efficiency(self, params: EnvParams, state: EnvState):
        """Subband CQI efficiency of every TTI of the decision, [T, U, R], in one batch."""
        length = params.gains_db_NLR.shape[1]
        t_T = state.clock_ms + jnp.arange(self.config.ttis_per_step, dtype=jnp.int32)
        idx_TU = (state.trace_offset_U[None, :] + t_T[:, None]) % length
        gain_db_TUR = params.gains_db_NLR[state.trace_U[None, :], idx_TU]
        eff_TUR = channel.sinr_db_to_efficiency_lut(state.snr_db_U[None, :, None] + gain_db_TUR)
        if self.config.cell.data_re_fraction != 1.0:
            eff_TUR = eff_TUR * self.config.cell.data_re_fraction
        return eff_TUR

    def _tti(self, params: EnvParams, owner_R, carry, xs):
        """One 1 ms TTI: schedule on the queues, serve, then enqueue this TTI's arrivals."""
        exp_U, eff_UR = xs
        state, acc = carry
        buf = state.buffers
        t = state.clock_ms

        queued_U = fifo.queued_bytes(buf, self._packet_bytes_U)
        eligible_UR = (queued_U > 0)[:, None] & (
            jnp.asarray(self._slice_U)[:, None] == owner_R[None, :]
        )
        rbg_prbs_R = jnp.asarray(self._rbg_prbs_R)
        if self.config.scheduler == "pf_ns3":
            winner_R = scheduler.pf_assign(eff_UR, state.avg_thr_bps_U, eligible_UR, rbg_prbs_R)
        else:
            winner_R = scheduler.pf_assign_buffer_aware(
                eff_UR, state.avg_thr_bps_U, eligible_UR, rbg_prbs_R, 8 * queued_U
            )
        tb_bits_U, used_prbs_U = scheduler.transport_blocks(winner_R, eff_UR, rbg_prbs_R)
        served_U = jnp.minimum(tb_bits_U // 8, queued_U)
        # a packet's delay ends when its last byte is through the pipeline after this TTI
        now_ms = (t + 1).astype(jnp.float32) + self.config.pipeline_delay_ms
        buf, done_U, late_U, max_delay_U, sum_delay_U = fifo.serve(
            buf, served_U, self._packet_bytes_U, now_ms, self._budget_ms_U
        )
        avg_U = scheduler.update_average_throughput(
            state.avg_thr_bps_U, tb_bits_U, self.config.pf_window_tti
        )

        n_arr_U, offsets_UK, phase_U = traffic.arrivals_in_tti(
            state.on_U, state.phase_ms_U, self._interval_ms_U, self._max_arrivals
        )
        buf, dropped_U = fifo.enqueue(buf, n_arr_U, t.astype(jnp.float32) + offsets_UK)
        on_U, remaining_U = traffic.advance_onoff(
            state.on_U, state.remaining_ms_U, exp_U, self._mean_on_ms_U, self._mean_off_ms_U
        )
        state = state.replace(
            clock_ms=t + 1, on_U=on_U, remaining_ms_U=remaining_U, phase_ms_U=phase_U,
            buffers=buf, avg_thr_bps_U=avg_U,
        )
        acc = {
            "arrived": acc["arrived"] + n_arr_U * self._packet_bytes_U,
            "served": acc["served"] + served_U,
            "tb_bits": acc["tb_bits"] + tb_bits_U,
            "used_prbs": acc["used_prbs"] + used_prbs_U,
            "dropped": acc["dropped"] + dropped_U * self._packet_bytes_U,
            "dropped_pkts": acc["dropped_pkts"] + dropped_U,
            "delivered_pkts": acc["delivered_pkts"] + done_U,
            "late_pkts": acc["late_pkts"] + late_U,
            "max_delay": jnp.maximum(acc["max_delay"], max_delay_U),
            "sum_delay": acc["sum_delay"] + sum_delay_U,
        }
        return (state, acc), None

    def step_env(self, key: jax.Array, state: EnvState, action, params: EnvParams):
        cfg = self.config
        n = cfg.n_ues
        action = jnp.clip(jnp.asarray(action, jnp.int32).reshape(()), 0, self.num_actions - 1)
        prbs = params.prbs_per_action_A[action]
        n_rbg_ctrl = action + cfg.min_rbg_per_slice
        owner_R = (jnp.arange(cfg.cell.n_rbg) >= n_rbg_ctrl).astype(jnp.int32)
        exp_TU = jax.random.exponential(key, (cfg.ttis_per_step, n))

        zeros_i, zeros_f = jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.float32)
        acc0 = {
            "arrived": zeros_i, "served": zeros_i, "tb_bits": zeros_i, "used_prbs": zeros_i, "dropped": zeros_i, "dropped_pkts": zeros_i,
            "delivered_pkts": zeros_i, "late_pkts": zeros_i, "max_delay": zeros_f,
            "sum_delay": zeros_f,
        }
        queued0_U = fifo.queued_bytes(state.buffers, self._packet_bytes_U)
        (new, acc), _ = jax.lax.scan(
            partial(self._tti, params, owner_R), (state, acc0),
            (exp_TU, self._efficiency(params, state)),
        )
        queued1_U = fifo.queued_bytes(new.buffers, self._packet_bytes_U)

        member_SU = jnp.asarray(self._member_SU)

        def per_slice(x_U):
            return member_SU @ x_U.astype(jnp.float32)

        prbs_S = jnp.stack([prbs, cfg.cell.n_prb - prbs]).astype(jnp.float32)
        delivered_bits_S = 8.0 * per_slice(acc["served"])
        bandwidth_S = prbs_S * PRB_BANDWIDTH_HZ
        se_S = metrics.spectral_efficiency(delivered_bits_S, bandwidth_S, cfg.step_s)
        used_prb_tti_S = per_slice(acc["used_prbs"])
        link_se_S = per_slice(acc["tb_bits"]) / jnp.maximum(
            used_prb_tti_S * PRB_BANDWIDTH_HZ * TTI_S, 1.0
        )
        utilization_S = used_prb_tti_S / jnp.maximum(prbs_S * cfg.ttis_per_step, 1.0)
        late_S = per_slice(acc["late_pkts"])
        dropped_pkts_S = per_slice(acc["dropped_pkts"])
        violation_S = (late_S > 0) | (dropped_pkts_S > 0)
        arrival_rate_S = 8.0 * per_slice(acc["arrived"]) / cfg.step_s
        queue_delta_S = per_slice(queued1_U) - per_slice(queued0_U)
        dropped_bytes_S = per_slice(acc["dropped"])
        reconfiguration = prbs != state.prbs
        delivered_pkts_S = per_slice(acc["delivered_pkts"])
        max_delay_S = jnp.max(
            jnp.where(member_SU > 0, acc["max_delay"][None, :], 0.0), axis=1
        )
        mean_delay_S = per_slice(acc["sum_delay"]) / jnp.maximum(delivered_pkts_S, 1.0)

        # EnvParams carries the eq. 15 weights under UtilityWeights' names.
        reward = metrics.step_utility(se_S[0], reconfiguration, violation_S[0], params)
        new = new.replace(
            time=state.time + 1,
            prbs=prbs,
            se_S=se_S,
            arrival_rate_bps_S=arrival_rate_S,
            queue_delta_bytes_S=queue_delta_S,
            dropped_bytes_S=dropped_bytes_S,
        )
        info = {}
        for s, prefix in ((0, ""), (1, "other_")):
            info.update({
                f"{prefix}se": se_S[s],
                f"{prefix}violation": violation_S[s],
                f"{prefix}arrival_rate_bps": arrival_rate_S[s],
                f"{prefix}queue_delta_bytes": queue_delta_S[s],
                f"{prefix}dropped_bytes": dropped_bytes_S[s],
                f"{prefix}prbs": prbs_S[s].astype(jnp.int32),
                f"{prefix}delivered_bits": delivered_bits_S[s],
                f"{prefix}queued_bytes": per_slice(queued1_U)[s],
                f"{prefix}link_se": link_se_S[s],
                f"{prefix}utilization": utilization_S[s],
                f"{prefix}late_packets": late_S[s].astype(jnp.int32),
                f"{prefix}dropped_packets": dropped_pkts_S[s].astype(jnp.int32),
                f"{prefix}delivered_packets": delivered_pkts_S[s].astype(jnp.int32),
                f"{prefix}max_delay_ms": max_delay_S[s],
                f"{prefix}mean_delay_ms": mean_delay_S[s],
            })
        info["reconfiguration"] = reconfiguration
        info["other_reconfiguration"] = reconfiguration
        info["utility"] = reward
        done = new.time >= params.max_steps_in_episode
        return self.get_obs(new, params), new, reward, done, info

    @partial(jax.jit, static_argnames=("self",))
    def step(self, key: jax.Array, state: EnvState, action, params: EnvParams | None = None):
        """Step with auto-reset; returns ``(obs, state, reward, done, info)`` (gymnax 0.x / rejax).

        ``info`` describes the step just taken even when ``done`` reset the state.
        """
        if params is None:
            params = self.default_params
        key_step, key_reset = jax.random.split(key)
        obs_st, state_st, reward, done, info = self.step_env(key_step, state, action, params)
        obs_re, state_re = self.reset_env(key_reset, params)
        state = jax.tree.map(lambda x, y: jax.lax.select(done, x, y), state_re, state_st)
        obs = jax.lax.select(done, obs_re, obs_st)
        return obs, state, reward, done, info

    # ------------------------------------------------------------------------ observation
    def get_obs(self, state: EnvState, params=None, key=None) -> jax.Array:
        """Scaled eq. 14 observation (see module docstring)."""
        cfg = self.config
        scale = jnp.asarray(self._peak_rate_S) * cfg.step_s / 8.0

        def feats(s):
            return [
                state.se_S[s] / float(CQI_EFFICIENCY_K[-1]),
                state.arrival_rate_bps_S[s] / self._peak_rate_S[s],
                jnp.clip(state.queue_delta_bytes_S[s] / self._slice_buffer_S[s], -1.0, 1.0),
                jnp.clip(state.dropped_bytes_S[s] / scale[s], 0.0, 1.0),
            ]

        parts = [state.prbs.astype(jnp.float32) / cfg.cell.n_prb] + feats(0)
        if cfg.observe_other_slice:
            parts += feats(1)
        return jnp.stack(parts).astype(jnp.float32)

    def observation_to_dict(self, obs) -> dict[str, float]:
        """Undo the scaling of one (unbatched) observation: PRBs, SE, Mb/s, bytes as floats.

        Exact except where the queue delta or the drops were clipped; the state
        (:func:`observation_dict`) always has the exact raw values.
        """
        cfg = self.config
        o = np.asarray(jax.device_get(obs), np.float64)
        peak_bytes = self._peak_rate_S * cfg.step_s / 8.0

        def feats(i, s, prefix):
            return {
                f"{prefix}se": o[i] * float(CQI_EFFICIENCY_K[-1]),
                f"{prefix}arrival_rate_mbps": o[i + 1] * self._peak_rate_S[s] / 1e6,
                f"{prefix}queue_delta_bytes": o[i + 2] * self._slice_buffer_S[s],
                f"{prefix}dropped_bytes": o[i + 3] * peak_bytes[s],
            }

        out = {"prbs": o[0] * cfg.cell.n_prb, **feats(1, 0, "")}
        if cfg.observe_other_slice:
            out.update(feats(5, 1, "other_"))
        return {k: float(v) for k, v in out.items()}

    def is_terminal(self, state: EnvState, params: EnvParams) -> jax.Array:
        return state.time >= params.max_steps_in_episode

    def is_terminated(self, state: EnvState, params: EnvParams) -> jax.Array:
        return jnp.asarray(False)

    # ------------------------------------------------------------------ PRB <-> action
    def prbs_for_action(self, action, params: EnvParams | None = None):
        return prbs_for_action(action, params if params is not None else self.default_params)

    def action_for_prbs(self, prbs, params: EnvParams | None = None):
        return action_for_prbs(prbs, params if params is not None else self.default_params)


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
    """One (unbatched) step's info as Python floats (flags become 0.0 / 1.0)."""
    return {k: float(np.asarray(v)) for k, v in jax.device_get(info).items()}
