"""Pure-JAX packet-level RAN slicing environment with the gymnax API (paper section V-A).

Two slices share one LTE cell (the scenario table of ``../shared/DESIGN.md``): the *controlled*
slice (default the 20-UE GBR slice) and the *other* slice (4 non-GBR UEs). Every decision
(100 ms) the agent picks how many RBGs the controlled slice owns; the other slice gets the rest. A decision is one
``lax.scan`` over 100 TTIs of 1 ms (:mod:`sfjax.envs.decision`): TR 38.901 SINR per RBG x
fast-fading traces -> CQI -> proportional-fair scheduling inside each slice -> per-UE FIFOs
with on-off CBR arrivals. The code is split by concept:

* :mod:`sfjax.envs.scenario` -- :class:`RanSlicingConfig` (static structure, the SE definition);
* :mod:`sfjax.envs.state` -- :class:`EnvParams`, :class:`EnvState`, the eq. 14 observation;
* :mod:`sfjax.envs.decision` -- the TTI scan, per-slice feedback and eq. 15 reward;
* this module -- :class:`RanSlicingEnv` (gymnax API: params, reset, step with auto-reset).

All of the names above are importable from here (``from sfjax.envs.ran import ...``).

Actions. ``action`` in ``0 .. num_actions-1`` gives the controlled slice
``action + min_rbg_per_slice`` RBGs, the lowest-frequency ones; with the default 25 PRB
(12 RBGs of 2 PRB + 1 of 1 PRB) and ``min_rbg_per_slice = 1`` that is 2, 4, ..., 24 PRBs
(12 actions) and both slices always keep at least one RBG. ``prbs_for_action`` /
``action_for_prbs`` convert to and from PRBs (the LLM Actor talks in RBGs,
``action + min_rbg_per_slice``: :mod:`sfjax.agents.env`).

Per-step feedback (eq. 1-3, for the controlled slice, ``other_``-prefixed for the other one):
``se`` = the spectral efficiency named by ``config.objective.se_definition``: by default eq. 1
as printed (``se_allocated``: delivered bits / (0.1 s x allocated bandwidth)), else
``se_scheduled`` (delivered bits before the data-RE overhead per scheduled PRB-TTI; the
previous value when nothing was scheduled); both are always in ``info``. ``violation`` = eq. 2
as scored (``config.objective.violation_scope``: by default any packet of *either* slice late
or dropped in the step), with the per-slice flags ``slice_violation`` (controlled) and
``other_violation``; ``reconfiguration`` = the allocation differs from the previous step's;
``arrival_rate_bps`` = bits that arrived in the step / 0.1 s; ``queue_delta_bytes`` = bytes
queued at the end minus at the start; ``dropped_bytes``. Also: ``prbs``, ``delivered_bits``,
``queued_bytes``, ``late_packets``, ``dropped_packets``, ``delivered_packets``,
``max_delay_ms``, ``mean_delay_ms``, ``utilization`` (share of the slice's PRB-TTIs that
carried a transport block), ``link_se`` (transport-block bits before overhead per scheduled
PRB-TTI), ``tb_fill`` (delivered / transport-block bits) and ``utility`` (= reward). ``reward``
is the eq. 15 utility ``w_se (SE + offset) - w_c c - w_v v`` with the objective's weights
(15, 1, 15, 300).

Observation (eq. 14), for RL agents: ``[prbs / n_prb, SE / 5.5547, arrival rate / peak rate,
queue delta / buffer bytes of the slice, dropped bytes / peak bytes per step]`` of the
controlled slice, then the same four of the other slice (``observe_other_slice``, default on:
with cell-wide violations a policy must see both slices' demand), float32. The
same quantities in raw units are in ``state.prbs`` and ``state.*_S`` (index 0 = controlled
slice); :func:`observation_dict` / :func:`info_dict` turn them into Python floats for prompts.
On reset the SE, queue delta and drops are 0 and the arrival rate is the offered load of the UEs
that are ON.

API. gymnax 1.0: ``step`` (gymnax's own ``Environment.step``, with auto-reset) returns
``(obs, state, reward, terminated, truncated, info)``. The episode has no natural end
(``terminated`` is always False); the 300-decision time limit is ``truncated``
(``is_truncated``: ``state.time >= params.max_steps_in_episode``). ``info`` describes the step
just taken even when the state was reset, plus gymnax's ``terminated`` / ``truncated`` /
``final_observation``. gymnax's wrappers (``LogWrapper``, ``FlattenObservationWrapper``) work
on it; rejax 0.1.3 still unpacks the 0.x five-tuple, so the RL baselines go through the thin
adapter :class:`sfjax.baselines.wrappers.RejaxEnv`. Tunable numbers (eq. 15 weights, episode
length, initial allocation, fading traces, the fixed drop) live in :class:`EnvParams`, e.g.
``params.replace(violation_penalty=100.0)``; shapes and models in :class:`RanSlicingConfig`.

Calibration (:mod:`sfjax.envs.calibration`): the default scenario poses the paper's trade-off
(the best static allocation is interior; :mod:`sfjax.baselines.reference` measures what
adapting adds). Fidelity knobs vs ns-3 (benchmarks/RESULTS.md): ``scheduler="pf_ns3"`` (ns-3's
PF verbatim; default buffer-aware), ``onoff_start`` (default "off" as ns-3's OnOffApplication),
``cell.data_re_fraction`` (TBS-table overhead, default 0.7 as ns-3), ``cell.rbg_count="ns3"``
(ns-3's 12 RBGs at 25 PRB), ``pipeline_delay_ms`` (ns-3's ~4.5 ms delay floor, default),
``cell.antenna_max_gain_db`` / ``noise_figure_db`` / ``min_distance_m`` /
``sector_half_width_deg`` (paper Table II by default; ns-3's own defaults are 8 dBi, 9 dB and a
full disc). Not modelled: HARQ/BLER (link adaptation sits at the 10% BLER CQI thresholds and
every transport block is delivered), CQI reporting delay, inter-cell interference
(``cell.interference_margin_db`` adds a fixed noise rise).

Shape legend: U = UEs (controlled slice first), R = RBGs, S = slices (2), N = fading traces,
L = trace length, A = actions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from gymnax.environments import environment, spaces

from sfjax.envs import buffers as fifo
from sfjax.envs import channel, traffic
from sfjax.envs.decision import decision_step
from sfjax.envs.fading import prb_gain_traces, rbg_mean_gains
from sfjax.envs.objective import SE_DEFINITIONS, VIOLATION_SCOPES, Objective
from sfjax.envs.scenario import (
    GBR_SLICE,
    NON_GBR_SLICE,
    TTI_S,
    RanSlicingConfig,
)
from sfjax.envs.state import (
    EnvParams,
    EnvState,
    UeTables,
    action_for_prbs,
    info_dict,
    observation_dict,
    prbs_for_action,
    scaled_observation,
    unscale_observation,
)

__all__ = [
    "GBR_SLICE", "NON_GBR_SLICE", "SE_DEFINITIONS", "TTI_S", "VIOLATION_SCOPES", "EnvParams",
    "EnvState", "Objective",
    "RanSlicingConfig", "RanSlicingEnv", "action_for_prbs", "info_dict", "observation_dict",
    "prbs_for_action",
]


class RanSlicingEnv(environment.Environment):
    """gymnax 1.0 environment: ``step`` returns ``(obs, state, reward, terminated, truncated,
    info)`` and auto-resets; the time limit is a truncation (see the module docstring)."""

    def __init__(self, config: RanSlicingConfig | None = None):
        super().__init__()
        self.config = config if config is not None else RanSlicingConfig()
        self.ues = UeTables.from_config(self.config)
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
        for s in cfg.ordered_slices:
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
        drop = channel.sample_drop(jax.random.key(cfg.geometry_seed), cfg.n_ues, cfg.cell)
        slice_U = self.ues.slice_U
        w = cfg.objective.weights
        return EnvParams(
            max_steps_in_episode=cfg.episode_steps,
            se_weight=w.se_weight,
            se_offset=w.se_offset,
            reconfig_penalty=w.reconfig_penalty,
            violation_penalty=w.violation_penalty,
            initial_action=cfg.initial_action,
            prbs_per_action_A=jnp.asarray(cfg.prbs_per_action, jnp.int32),
            gains_db_NLR=jnp.asarray(10.0 * np.log10(np.maximum(gains_NLR, 1e-12)), jnp.float32),
            trace_first_U=jnp.asarray(np.asarray(first, np.int32)[slice_U]),
            trace_count_U=jnp.asarray(np.asarray(count, np.int32)[slice_U]),
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
        cfg, ues = self.config, self.ues
        n = cfg.n_ues
        k_drop, k_traffic, k_trace, k_off = jax.random.split(key, 4)
        if cfg.randomize_drop:
            drop = channel.sample_drop(k_drop, n, cfg.cell)
        else:
            drop = (params.d2d_m_U, params.azimuth_deg_U, params.los_U, params.shadowing_db_U)
        snr_db_U = channel.mean_snr_db(*drop, cfg.cell)
        on_U, remaining_U, phase_U = traffic.init_onoff(
            k_traffic, ues.on_frac_U, ues.mean_on_ms_U, ues.mean_off_ms_U, ues.interval_ms_U,
            start=cfg.onoff_start,
        )
        length = params.gains_db_NLR.shape[1]
        trace_U = params.trace_first_U + jax.random.randint(
            k_trace, (n,), 0, 1 << 30
        ) % params.trace_count_U
        offset_U = jax.random.randint(k_off, (n,), 0, length)
        offered_U = jnp.where(on_U, ues.rate_bps_U, 0.0)
        state = EnvState(
            time=jnp.int32(0),
            clock_ms=jnp.int32(0),
            on_U=on_U,
            remaining_ms_U=remaining_U,
            phase_ms_U=phase_U,
            buffers=fifo.empty_buffers(n, cfg.buffer_packets, ues.packet_bytes_U),
            avg_thr_bps_U=jnp.ones((n,), jnp.float32),
            snr_db_U=snr_db_U.astype(jnp.float32),
            trace_U=trace_U.astype(jnp.int32),
            trace_offset_U=offset_U.astype(jnp.int32),
            prbs=params.prbs_per_action_A[params.initial_action],
            se_S=jnp.zeros((2,), jnp.float32),
            se_scheduled_S=jnp.zeros((2,), jnp.float32),
            arrival_rate_bps_S=jnp.asarray(ues.member_SU) @ offered_U,
            queue_delta_bytes_S=jnp.zeros((2,), jnp.float32),
            dropped_bytes_S=jnp.zeros((2,), jnp.float32),
        )
        return self.get_obs(state, params), state

    # ------------------------------------------------------------------------------- step
    def step_env(self, key: jax.Array, state: EnvState, action, params: EnvParams):
        """One decision without auto-reset (:func:`sfjax.envs.decision.decision_step`).

        Returns gymnax 1.0's ``(obs, state, reward, terminated, info)``; ``terminated`` is
        always False (the time limit is gymnax's ``is_truncated``, applied by ``step``).
        """
        new, reward, info = decision_step(self.config, self.ues, key, state, action, params)
        return self.get_obs(new, params), new, reward, jnp.asarray(False), info

    # ------------------------------------------------------------------------ observation
    def get_obs(self, state: EnvState, params=None, key=None) -> jax.Array:
        """Scaled eq. 14 observation (:func:`sfjax.envs.state.scaled_observation`)."""
        return scaled_observation(self.config, self.ues, state)

    def observation_to_dict(self, obs) -> dict[str, float]:
        """Undo the scaling of one (unbatched) observation: PRBs, SE, Mb/s, bytes as floats.

        Exact except where the queue delta or the drops were clipped; the state
        (:func:`observation_dict`) always has the exact raw values.
        """
        return unscale_observation(self.config, self.ues, obs)

    def is_terminated(self, state: EnvState, params: EnvParams) -> jax.Array:
        return jnp.asarray(False)

    # ------------------------------------------------------------------ PRB <-> action
    def prbs_for_action(self, action, params: EnvParams | None = None):
        return prbs_for_action(action, params if params is not None else self.default_params)

    def action_for_prbs(self, prbs, params: EnvParams | None = None):
        return action_for_prbs(prbs, params if params is not None else self.default_params)
