"""Static description of the RAN slicing scenario (paper section V-A; the scenario table of
``../shared/DESIGN.md``).

:class:`RanSlicingConfig` fixes everything that shapes the simulation (cell, the two slices,
buffers, scheduler, the scoring objective, decision length); the numbers an experiment tunes
without recompiling (eq. 15 weights, episode length, fading traces, the UE drop) are in
:class:`sfjax.envs.state.EnvParams`. The ns-3 bridge (:mod:`sfjax.envs.ns3`) is driven by the
same config, so both simulators describe one scenario.

Scoring (:class:`~sfjax.envs.objective.Objective`, field ``objective``): eq. 1 SE as printed
and violations over every packet of the cell by default; see :mod:`sfjax.envs.objective` for
the readings and why. Fidelity defaults follow ns-3 where ns-3 and the paper agree or the paper
is silent (:mod:`sfjax.envs.calibration`, benchmarks/RESULTS.md): UEs' on-off sources start in
an OFF period as ns-3's OnOffApplication, ns-3's 4.5 ms delay floor, its TBS overhead; the
radio parameters are the paper's Table II.

Shape legend: none (configuration only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sfjax.configcheck import SEED_LIMIT, SEED_RANGE
from sfjax.envs.channel import CellConfig
from sfjax.envs.fading import FadingConfig
from sfjax.envs.objective import Objective
from sfjax.envs.traffic import SliceConfig

TTI_S = 1e-3
"""LTE subframe (transmission time interval)."""

RLC_SDU_OVERHEAD_BYTES = 30
"""Bytes an RLC buffer holds per packet on top of its application payload: the RLC SDU is the
PDCP PDU, i.e. PDCP header 2 + IPv4 20 + UDP 8 + payload. ns-3's ``LteRlcUm`` admits a PDU while
``txBufferSize + size <= MaxTxBufferSize`` counting those bytes, so its 10 KiB buffer holds 18
packets of 512 B (542 B each), not 20."""


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
    """Carrier, bandwidth, power, antenna, RBG rounding, data-RE overhead and drop geometry."""
    slices: tuple[SliceConfig, ...] = (GBR_SLICE, NON_GBR_SLICE)
    """Exactly two slices."""
    controlled_slice: int = 0
    """Index in ``slices`` of the slice the agent sizes; the other gets the remaining RBGs."""
    ttis_per_step: int = 100
    """TTIs of 1 ms per decision (paper: 100 ms decision interval)."""
    episode_steps: int = 300
    """Decisions per episode (paper: 300-step trajectories)."""
    buffer_bytes: int = 10240
    """RLC transmit buffer per UE (ns-3 default 10 KiB), counted as ns-3 does: packets plus
    their UDP/IP/PDCP headers (``RLC_SDU_OVERHEAD_BYTES``); overflow is dropped."""
    min_rbg_per_slice: int = 1
    """RBGs each slice keeps whatever the action (0 allows starving a slice)."""
    initial_prbs: int | None = None
    """Allocation in force before the first decision (nearest valid); None: middle action."""
    scheduler: str = "pf_buffer_aware"
    """Intra-slice scheduler: "pf_buffer_aware" (PF that stops giving RBGs to a UE whose queue
    is covered) or "pf_ns3" (ns-3 PfFfMacScheduler verbatim; see :mod:`sfjax.envs.scheduler`)."""
    pf_window_tti: float = 99.0
    """Window of the PF average-throughput filter (ns-3 PfFfMacScheduler: 99)."""
    objective: Objective = field(default_factory=Objective)
    """What is scored (:mod:`sfjax.envs.objective`): SE definition (eq. 1), which packets eq. 2
    counts, the eq. 15 weights. ``info["se"]``, ``info["violation"]`` and the reward follow it;
    ``info`` also always carries ``se_scheduled``, ``se_allocated`` and the per-slice flags
    ``slice_violation`` / ``other_violation``."""
    pipeline_delay_ms: float = 4.5
    """Fixed latency added to every packet's delay (S1-U backhaul, MAC/PHY processing) on top
    of queueing and the 1 ms TTI. 4.5 ms is ns-3's: an unsaturated slice's mean delay is
    6.0-6.2 ms here vs 5.6-6.1 ms in ns-3 (1.5-1.7 ms without it; benchmarks/RESULTS.md, ns-3
    vs JAX), and it leaves the GBR slice 5.5 ms of queueing, so good static allocations
    violate in 1-4 % of the steps, as Table III's methods (SF: 8.6 of 300). 0: queueing
    and the TTI only (good allocations then almost never violate)."""
    randomize_drop: bool = False
    """False: one fixed UE drop from ``geometry_seed`` (comparable with ns-3); True: a fresh
    drop (positions, LOS, shadowing) on every reset."""
    geometry_seed: int = 0
    """Seed of the fixed drop."""
    observe_other_slice: bool = True
    """Append the other slice's SE, arrival rate, queue delta and drops to the observation."""
    onoff_start: str = "off"
    """How each UE's on-off source starts: "off" (in an OFF period of Exp(mean off) duration,
    as ns-3's OnOffApplication does) or "stationary" (ON with probability on / (on + off))."""

    def __post_init__(self):
        if self.scheduler not in ("pf_buffer_aware", "pf_ns3"):
            raise ValueError(
                f"scheduler must be 'pf_buffer_aware' or 'pf_ns3', got {self.scheduler!r}"
            )
        if self.onoff_start not in ("off", "stationary"):
            raise ValueError(
                f"onoff_start must be 'off' or 'stationary', got {self.onoff_start!r}"
            )
        if len(self.slices) != 2:
            raise ValueError(f"exactly two slices are supported, got {len(self.slices)}")
        if self.controlled_slice not in (0, 1):
            raise ValueError(f"controlled_slice must be 0 or 1, got {self.controlled_slice}")
        if self.ttis_per_step < 1 or self.episode_steps < 1:
            raise ValueError("ttis_per_step and episode_steps must be >= 1")
        if self.pipeline_delay_ms < 0:
            raise ValueError(f"pipeline_delay_ms must be >= 0, got {self.pipeline_delay_ms}")
        if not 0 <= self.geometry_seed < SEED_LIMIT:
            raise ValueError(f"geometry_seed must be {SEED_RANGE}, got {self.geometry_seed}")
        if self.pf_window_tti < 1:
            raise ValueError(f"pf_window_tti must be >= 1, got {self.pf_window_tti}")
        if self.min_rbg_per_slice < 0:
            raise ValueError(f"min_rbg_per_slice must be >= 0, got {self.min_rbg_per_slice}")
        if 2 * self.min_rbg_per_slice > self.cell.n_rbg:
            raise ValueError(
                f"min_rbg_per_slice={self.min_rbg_per_slice} leaves no choice with "
                f"{self.cell.n_rbg} RBGs; lower it"
            )
        for s in self.slices:
            if self.buffer_bytes < s.packet_bytes + RLC_SDU_OVERHEAD_BYTES:
                raise ValueError(
                    f"buffer_bytes must hold at least one packet of {s.name!r} with its "
                    f"{RLC_SDU_OVERHEAD_BYTES} header bytes"
                )

    @property
    def se_definition(self) -> str:
        return self.objective.se_definition

    @property
    def violation_scope(self) -> str:
        return self.objective.violation_scope

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
        """FIFO capacity in packets (of the smallest packet size): whole RLC SDUs (packet +
        ``RLC_SDU_OVERHEAD_BYTES``) that fit in ``buffer_bytes``, 18 at 10 KiB and 512 B. A
        partly sent head packet keeps its slot (ns-3 counts only its unsent bytes, so it may
        admit one packet more until the head is through)."""
        return self.buffer_bytes // (
            min(s.packet_bytes for s in self.slices) + RLC_SDU_OVERHEAD_BYTES
        )

    @property
    def step_s(self) -> float:
        return self.ttis_per_step * TTI_S

    @property
    def initial_action(self) -> int:
        if self.initial_prbs is None:
            return (self.num_actions - 1) // 2
        table = np.asarray(self.prbs_per_action)
        return int(np.argmin(np.abs(table - self.initial_prbs) - 1e-6 * table))
