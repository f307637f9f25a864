"""Radio models of the RAN slicing scenario (paper section V-A, Table II; the scenario table of
``../shared/DESIGN.md``).

Large-scale channel of a single tri-sector-like cell (one sector simulated, no inter-cell
interference):

* TR 38.901 Table 7.4.1-1 UMa path loss (LOS and NLOS, with the breakpoint distance computed from
  effective antenna heights, ``h_E = 1 m``), Table 7.4.2-1 UMa LOS probability, log-normal
  shadowing (sigma 4 dB LOS / 6 dB NLOS);
* TR 38.901 Table 7.3-1 antenna element pattern (65 deg half-power beamwidths, 30 dB front-back
  and side-lobe limits) with the paper's 0 dB maximum gain;
* Tx power split evenly over the PRBs, thermal noise -174 dBm/Hz plus the UE noise figure.

Link adaptation: SINR -> CQI with the 36.213 Table 7.2.3-1 efficiencies and AWGN SINR thresholds
for a 10% BLER target; the transport block of a UE carries ``efficiency * 180 kHz * 1 ms`` bits
per PRB.

Fast fading (frequency-selective traces) lives in :mod:`sfjax.envs.fading`.

Shape legend: U = UEs, R = RBGs, K = CQI levels (15).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

SPEED_OF_LIGHT = 299_792_458.0
PRB_BANDWIDTH_HZ = 180e3
"""LTE numerology: 12 subcarriers of 15 kHz."""

CQI_EFFICIENCY_K = np.array(
    [0.1523, 0.2344, 0.3770, 0.6016, 0.8770, 1.1758, 1.4766, 1.9141, 2.4063, 2.7305, 3.3223,
     3.9023, 4.5234, 5.1152, 5.5547],
    dtype=np.float32,
)
"""36.213 Table 7.2.3-1 (4-bit CQI, up to 64QAM): spectral efficiency of CQI 1..15, bit/s/Hz."""

CQI_SINR_THRESHOLD_DB_K = np.array(
    [-6.7, -4.7, -2.3, 0.2, 2.4, 4.3, 5.9, 8.1, 10.3, 11.7, 14.1, 16.3, 18.7, 21.0, 22.7],
    dtype=np.float32,
)
"""Lowest SINR (dB) at which CQI 1..15 meets a 10% BLER on an AWGN link (the widely used
link-level thresholds of the Vienna LTE simulator / Kawser et al. 2012). Below CQI 1: out of
range, nothing can be sent."""


@dataclass(frozen=True)
class CellConfig:
    """One cell sector: carrier, bandwidth, power budget, antenna and UE drop geometry."""

    carrier_hz: float = 2.12e9
    """Carrier frequency (paper Table II: 2120 MHz)."""
    n_prb: int = 25
    """Downlink bandwidth in PRBs of 180 kHz (25 PRB = 5 MHz)."""
    tx_power_dbm: float = 30.0
    """Total BS transmit power, split evenly over the PRBs (paper Table II: 30 dBm)."""
    noise_figure_db: float = 5.0
    """UE noise figure (paper Table II: 5 dB)."""
    noise_psd_dbm_hz: float = -174.0
    """Thermal noise power spectral density."""
    interference_margin_db: float = 0.0
    """Extra noise rise standing in for other-cell interference (0: an isolated cell)."""
    data_re_fraction: float = 0.7
    """Share of a PRB's resource elements that carry data: a transport block holds
    ``efficiency * 180 kHz * 1 ms * data_re_fraction`` bits per PRB (throughput, queues and
    delivery; the reported SE is the CQI efficiency itself, see :mod:`sfjax.envs.decision`).
    0.7 is the overhead (PDCCH region, reference signals) built into the 36.213 TBS table that
    ns-3 uses: ns-3's TBS(MCS(CQI), n PRB) / (CQI efficiency x 180 kHz x 1 ms) is 0.73-0.75 at
    CQI 15 and 0.65-0.67 at CQI 10-14 for 2-24 PRB, and the saturated SE measured in ns-3 is
    0.69 x the plain-efficiency SE (benchmarks/RESULTS.md, ns-3 vs JAX). 1.0: no overhead."""
    rbg_count: str = "36.213"
    """How ``n_prb`` is cut into RBGs of ``rbg_size`` PRBs: "36.213" (resource allocation type
    0: ceil(n_prb / P) RBGs, the last one smaller; 13 RBGs at 25 PRB) or "ns3" (ns-3 3.37's
    schedulers and FFR algorithms: floor(n_prb / P) RBGs, the leftover PRBs are never
    scheduled; 12 RBGs at 25 PRB)."""
    bs_height_m: float = 25.0
    """BS antenna height (TR 38.901 UMa: 25 m)."""
    ue_height_m: float = 1.5
    """UE antenna height."""
    antenna_max_gain_db: float = 0.0
    """Maximum directional gain of the BS element (paper Table II: 0 dB)."""
    downtilt_deg: float = 0.0
    """Electrical downtilt of the BS element, degrees below the horizon."""
    min_distance_m: float = 35.0
    """Smallest 2-D BS-UE distance of the drop (TR 38.901 Table 7.2-1 UMa minimum: 35 m)."""
    max_distance_m: float = 50.0
    """Largest 2-D BS-UE distance of the drop: the calibration knob of the default scenario
    (see :mod:`sfjax.envs.calibration`)."""
    sector_half_width_deg: float = 60.0
    """UEs are dropped uniformly over the area of a sector spanning +-this azimuth around
    the antenna boresight."""

    def __post_init__(self):
        if self.n_prb < 1 or self.n_prb > 110:
            raise ValueError(f"n_prb must be in 1..110 (LTE), got {self.n_prb}")
        if self.rbg_count not in ("36.213", "ns3"):
            raise ValueError(f"rbg_count must be '36.213' or 'ns3', got {self.rbg_count!r}")
        if not 0.0 < self.data_re_fraction <= 1.0:
            raise ValueError(f"data_re_fraction must be in (0, 1], got {self.data_re_fraction}")
        if not 0.5e9 <= self.carrier_hz <= 100e9:
            raise ValueError(
                f"carrier_hz must be in [0.5e9, 100e9] (TR 38.901 validity), got {self.carrier_hz}"
            )
        if not 1.0 < self.ue_height_m < self.bs_height_m:
            raise ValueError(
                "need 1 m < ue_height_m < bs_height_m (TR 38.901's breakpoint distance takes both "
                f"above its 1 m environment height), got {self.ue_height_m}, {self.bs_height_m}"
            )
        if not 10.0 <= self.min_distance_m < self.max_distance_m <= 5000.0:
            raise ValueError(
                "need 10 m <= min_distance_m < max_distance_m <= 5000 m (TR 38.901 UMa validity), "
                f"got {self.min_distance_m}, {self.max_distance_m}"
            )

    @property
    def rbg_size(self) -> int:
        """PRBs per RBG, as 36.213 Table 7.1.6.1-1 and ns-3: 1/2/3/4 for <=10/<=26/<=63/<=110."""
        return rbg_size_for(self.n_prb)

    @property
    def rbg_prbs(self) -> tuple[int, ...]:
        """PRBs in each RBG; with "36.213" the last one is smaller when ``n_prb`` is not a
        multiple of the RBG size, with "ns3" the rest is dropped."""
        size = self.rbg_size
        full, rest = divmod(self.n_prb, size)
        return (size,) * full + ((rest,) if rest and self.rbg_count == "36.213" else ())

    @property
    def schedulable_prbs(self) -> int:
        """PRBs covered by RBGs (``n_prb`` except with ``rbg_count="ns3"``)."""
        return sum(self.rbg_prbs)

    @property
    def n_rbg(self) -> int:
        return len(self.rbg_prbs)

    @property
    def prb_tx_power_dbm(self) -> float:
        return self.tx_power_dbm - 10.0 * math.log10(self.n_prb)

    @property
    def prb_noise_dbm(self) -> float:
        return (
            self.noise_psd_dbm_hz + 10.0 * math.log10(PRB_BANDWIDTH_HZ) + self.noise_figure_db
            + self.interference_margin_db
        )


def rbg_size_for(n_prb: int) -> int:
    """RBG size P of 36.213 Table 7.1.6.1-1 (resource allocation type 0)."""
    if n_prb <= 10:
        return 1
    if n_prb <= 26:
        return 2
    if n_prb <= 63:
        return 3
    return 4


def breakpoint_distance_m(carrier_hz, bs_height_m, ue_height_m, env_height_m=1.0):
    """d'_BP = 4 h'_BS h'_UT f_c / c with effective heights h' = h - h_E (TR 38.901 note 1)."""
    return (
        4.0 * (bs_height_m - env_height_m) * (ue_height_m - env_height_m) * carrier_hz
        / SPEED_OF_LIGHT
    )


def uma_los_pathloss_db(d2d_m, carrier_hz, bs_height_m, ue_height_m):
    """TR 38.901 Table 7.4.1-1 UMa LOS: PL1 up to the breakpoint, PL2 beyond (d in metres)."""
    d3d = jnp.sqrt(d2d_m**2 + (bs_height_m - ue_height_m) ** 2)
    fc_ghz = carrier_hz / 1e9
    d_bp = breakpoint_distance_m(carrier_hz, bs_height_m, ue_height_m)
    pl1 = 28.0 + 22.0 * jnp.log10(d3d) + 20.0 * math.log10(fc_ghz)
    pl2 = (
        28.0 + 40.0 * jnp.log10(d3d) + 20.0 * math.log10(fc_ghz)
        - 9.0 * jnp.log10(d_bp**2 + (bs_height_m - ue_height_m) ** 2)
    )
    return jnp.where(d2d_m <= d_bp, pl1, pl2)


def uma_nlos_pathloss_db(d2d_m, carrier_hz, bs_height_m, ue_height_m):
    """TR 38.901 Table 7.4.1-1 UMa NLOS: max(PL_LOS, PL'_NLOS)."""
    d3d = jnp.sqrt(d2d_m**2 + (bs_height_m - ue_height_m) ** 2)
    pl_nlos = (
        13.54 + 39.08 * jnp.log10(d3d) + 20.0 * math.log10(carrier_hz / 1e9)
        - 0.6 * (ue_height_m - 1.5)
    )
    return jnp.maximum(uma_los_pathloss_db(d2d_m, carrier_hz, bs_height_m, ue_height_m), pl_nlos)


def uma_los_probability(d2d_m, ue_height_m):
    """TR 38.901 Table 7.4.2-1 UMa LOS probability (outdoor UE)."""
    d = jnp.maximum(d2d_m, 1e-3)
    c_prime = 0.0 if ue_height_m <= 13.0 else ((ue_height_m - 13.0) / 10.0) ** 1.5
    base = 18.0 / d + jnp.exp(-d / 63.0) * (1.0 - 18.0 / d)
    p = base * (1.0 + c_prime * 1.25 * (d / 100.0) ** 3 * jnp.exp(-d / 150.0))
    return jnp.where(d2d_m <= 18.0, 1.0, p)


def uma_shadowing_std_db(los):
    """Shadow-fading standard deviation, TR 38.901 Table 7.4.1-1 UMa: 4 dB LOS, 6 dB NLOS."""
    return jnp.where(los, 4.0, 6.0)


def element_gain_db(zenith_deg, azimuth_deg, max_gain_db=0.0, downtilt_deg=0.0):
    """TR 38.901 Table 7.3-1 element pattern: G_max - min(-(A_V + A_H), 30 dB).

    A_V = -min(12 ((theta - 90 - tilt) / 65)^2, 30), A_H = -min(12 (phi / 65)^2, 30), angles in
    degrees, theta the zenith angle of the UE seen from the BS, phi the azimuth from boresight.
    """
    a_v = -jnp.minimum(12.0 * ((zenith_deg - 90.0 - downtilt_deg) / 65.0) ** 2, 30.0)
    a_h = -jnp.minimum(12.0 * (azimuth_deg / 65.0) ** 2, 30.0)
    return max_gain_db - jnp.minimum(-(a_v + a_h), 30.0)


def sample_drop(key: jax.Array, n_ues: int, cell: CellConfig):
    """Uniform-in-area drop over the sector ring, LOS draw and shadowing (jit-able).

    Returns ``(d2d_m_U, azimuth_deg_U, los_U, shadowing_db_U)``.
    """
    k_r, k_az, k_los, k_sf = jax.random.split(key, 4)
    r2 = jax.random.uniform(
        k_r, (n_ues,), minval=cell.min_distance_m**2, maxval=cell.max_distance_m**2
    )
    d2d_m_U = jnp.sqrt(r2)
    azimuth_deg_U = jax.random.uniform(
        k_az, (n_ues,), minval=-cell.sector_half_width_deg, maxval=cell.sector_half_width_deg
    )
    p_los_U = uma_los_probability(d2d_m_U, cell.ue_height_m)
    los_U = jax.random.uniform(k_los, (n_ues,)) < p_los_U
    shadowing_db_U = uma_shadowing_std_db(los_U) * jax.random.normal(k_sf, (n_ues,))
    return d2d_m_U, azimuth_deg_U, los_U, shadowing_db_U


def mean_snr_db(d2d_m_U, azimuth_deg_U, los_U, shadowing_db_U, cell: CellConfig):
    """Per-PRB wideband SNR before fast fading: P_prb + G(theta, phi) - PL - SF - N_prb (dB)."""
    pl_db_U = jnp.where(
        los_U,
        uma_los_pathloss_db(d2d_m_U, cell.carrier_hz, cell.bs_height_m, cell.ue_height_m),
        uma_nlos_pathloss_db(d2d_m_U, cell.carrier_hz, cell.bs_height_m, cell.ue_height_m),
    )
    zenith_deg_U = 90.0 + jnp.degrees(jnp.arctan2(cell.bs_height_m - cell.ue_height_m, d2d_m_U))
    gain_db_U = element_gain_db(
        zenith_deg_U, azimuth_deg_U, cell.antenna_max_gain_db, cell.downtilt_deg
    )
    return cell.prb_tx_power_dbm + gain_db_U - pl_db_U - shadowing_db_U - cell.prb_noise_dbm


def sinr_to_cqi(sinr_db):
    """Highest CQI (0..15) whose 10%-BLER threshold the SINR reaches; 0 = out of range."""
    thresholds_K = jnp.asarray(CQI_SINR_THRESHOLD_DB_K)
    return jnp.sum(sinr_db[..., None] >= thresholds_K, axis=-1).astype(jnp.int32)


LUT_MIN_DB = -10.0
LUT_STEP_DB = 0.1
EFFICIENCY_LUT = np.concatenate([[0.0], CQI_EFFICIENCY_K])[
    np.sum(
        LUT_MIN_DB + LUT_STEP_DB * np.arange(int(40.0 / LUT_STEP_DB) + 1)[:, None]
        >= CQI_SINR_THRESHOLD_DB_K[None, :] - 1e-6,
        axis=1,
    )
].astype(np.float32)
"""Efficiency of :func:`sinr_to_cqi` tabulated on a 0.1 dB grid from -10 dB to 30 dB (the
thresholds lie on that grid, so the table is exact away from float rounding at a threshold)."""


def sinr_db_to_efficiency_lut(sinr_db):
    """``cqi_to_efficiency(sinr_to_cqi(sinr_db))`` by one table look-up (the simulator's hot
    loop evaluates it for every UE, RBG and TTI)."""
    idx = jnp.floor((sinr_db - LUT_MIN_DB) / LUT_STEP_DB + 1e-3).astype(jnp.int32)
    return jnp.asarray(EFFICIENCY_LUT)[jnp.clip(idx, 0, EFFICIENCY_LUT.shape[0] - 1)]


def cqi_to_efficiency(cqi):
    """Spectral efficiency (bit/s/Hz) of a CQI index; CQI 0 carries nothing."""
    table = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.asarray(CQI_EFFICIENCY_K)])
    return table[cqi]


def transport_block_bits(efficiency, n_prb, tti_s: float = 1e-3):
    """Bits one TTI carries on ``n_prb`` PRBs at a given efficiency: eff * 180 kHz * n * TTI."""
    return jnp.floor(efficiency * PRB_BANDWIDTH_HZ * tti_s * n_prb).astype(jnp.int32)
