"""On-off CBR traffic per UE (paper section V-A, Table I), advanced one TTI at a time.

Each UE alternates ON and OFF periods with exponentially distributed durations (mean 15 s each in
the paper). While ON it emits fixed-size packets at a constant bit rate, i.e. one packet every
``packet_bytes * 8 / bit_rate`` ms. As in ns-3's ``OnOffApplication`` the time left to the next
packet is frozen while OFF and resumes when the UE turns ON again. Period boundaries are
resolved on the 1 ms TTI grid (a duration is consumed in whole TTIs; the sub-millisecond rest
carries over to the next period), packet times are kept exactly.

At reset every UE starts either in an OFF period of Exp(mean off) duration, as ns-3's
``OnOffApplication`` does (``start="off"``, the scenario default), or in its stationary state
(``start="stationary"``): ON with probability ``on / (on + off)``, with an exponential residual
duration (memoryless). Either way the packet clock starts at a uniform phase.

Shape legend: U = UEs, K = packets one UE can emit in one TTI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from sfjax.envs.fading import FadingConfig


@dataclass(frozen=True)
class SliceConfig:
    """One network slice: its UEs, their traffic model, QoS budget and fading model."""

    name: str = "gbr"
    """Label used in prompts and logs."""
    n_ues: int = 20
    """Number of UEs of the slice (paper Table I: 20 GBR, 4 non-GBR)."""
    bit_rate_bps: float = 0.5e6
    """Constant bit rate while ON (paper Table I: 0.5 Mb/s GBR, 2 Mb/s non-GBR)."""
    mean_on_s: float = 15.0
    """Mean of the exponential ON duration."""
    mean_off_s: float = 15.0
    """Mean of the exponential OFF duration."""
    packet_bytes: int = 512
    """Packet size (paper Table I: 512 bytes)."""
    delay_budget_ms: float = 10.0
    """Packet delay budget; a packet delivered later (or dropped) is a QoS violation (eq. 2)."""
    fading: FadingConfig = field(default_factory=FadingConfig)
    """Fast-fading model of the slice's UEs."""

    def __post_init__(self):
        if self.n_ues < 1:
            raise ValueError(f"slice {self.name!r}: n_ues must be >= 1, got {self.n_ues}")
        if self.bit_rate_bps <= 0 or self.packet_bytes <= 0:
            raise ValueError(f"slice {self.name!r}: bit_rate_bps and packet_bytes must be > 0")
        if self.mean_on_s <= 0 or self.mean_off_s <= 0 or self.delay_budget_ms <= 0:
            raise ValueError(f"slice {self.name!r}: on/off means and delay budget must be > 0")

    @property
    def packet_interval_ms(self) -> float:
        return self.packet_bytes * 8.0 / self.bit_rate_bps * 1e3

    @property
    def max_packets_per_tti(self) -> int:
        return max(1, math.ceil(1.0 / self.packet_interval_ms))

    @property
    def on_fraction(self) -> float:
        return self.mean_on_s / (self.mean_on_s + self.mean_off_s)

    @property
    def mean_rate_bps(self) -> float:
        """Long-run mean offered load of the slice."""
        return self.n_ues * self.bit_rate_bps * self.on_fraction

    @property
    def peak_rate_bps(self) -> float:
        """Offered load with every UE ON."""
        return self.n_ues * self.bit_rate_bps


ONOFF_STARTS = ("off", "stationary")


def init_onoff(key: jax.Array, on_frac_U, mean_on_ms_U, mean_off_ms_U, interval_ms_U,
               start: str = "stationary"):
    """Initial on-off state ``(on_U, remaining_ms_U, phase_ms_U)`` (module docstring)."""
    if start not in ONOFF_STARTS:
        raise ValueError(f"start must be one of {ONOFF_STARTS}, got {start!r}")
    k_on, k_rem, k_ph = jax.random.split(key, 3)
    n = on_frac_U.shape[0]
    if start == "off":
        on_U = jnp.zeros((n,), bool)
    else:
        on_U = jax.random.uniform(k_on, (n,)) < on_frac_U
    remaining_ms_U = jax.random.exponential(k_rem, (n,)) * jnp.where(
        on_U, mean_on_ms_U, mean_off_ms_U
    )
    phase_ms_U = jax.random.uniform(k_ph, (n,)) * interval_ms_U
    return on_U, remaining_ms_U, phase_ms_U


def arrivals_in_tti(on_U, phase_ms_U, interval_ms_U, max_per_tti: int):
    """Packets a UE emits during one 1 ms TTI.

    ``phase_ms_U`` is the time from the TTI start to the UE's next packet. Returns
    ``(n_arrivals_U, offsets_ms_UK, new_phase_ms_U)``; offset k is the emission time of the
    k-th packet within the TTI (valid for ``k < n_arrivals``).
    """
    n_U = jnp.where(
        on_U & (phase_ms_U < 1.0), jnp.ceil((1.0 - phase_ms_U) / interval_ms_U), 0.0
    )
    n_U = jnp.minimum(n_U, max_per_tti).astype(jnp.int32)
    k_K = jnp.arange(max_per_tti, dtype=jnp.float32)
    offsets_ms_UK = phase_ms_U[:, None] + k_K[None, :] * interval_ms_U[:, None]
    new_phase_U = jnp.where(on_U, phase_ms_U + n_U * interval_ms_U - 1.0, phase_ms_U)
    return n_U, offsets_ms_UK, new_phase_U


def advance_onoff(on_U, remaining_ms_U, exp_draw_U, mean_on_ms_U, mean_off_ms_U):
    """Consume one TTI of the current period; at its end flip state and draw a new duration.

    ``exp_draw_U`` are fresh standard exponential draws (used only where a period ends).
    """
    remaining_ms_U = remaining_ms_U - 1.0
    flip_U = remaining_ms_U <= 0.0
    on_next_U = jnp.where(flip_U, ~on_U, on_U)
    new_len_U = exp_draw_U * jnp.where(on_next_U, mean_on_ms_U, mean_off_ms_U)
    remaining_ms_U = jnp.where(flip_U, remaining_ms_U + new_len_U, remaining_ms_U)
    return on_next_U, remaining_ms_U
