"""Radio models against TR 38.901 / 36.213 values worked out by hand."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from sfjax.envs import channel
from sfjax.envs.channel import CellConfig

FC = 2.12e9


@pytest.mark.parametrize("kw, message", [
    ({"carrier_hz": 0.0}, r"carrier_hz must be in \[0.5e9, 100e9\]"),
    ({"bs_height_m": 1.0}, "need 1 m < ue_height_m < bs_height_m"),
    ({"ue_height_m": 30.0}, "need 1 m < ue_height_m < bs_height_m"),
])  # fmt: skip
def test_cell_outside_the_models_validity_is_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        CellConfig(**kw)


def test_breakpoint_distance():
    # 4 * (25 - 1) * (1.5 - 1) * 2.12e9 / c = 339.43 m
    assert channel.breakpoint_distance_m(FC, 25.0, 1.5) == pytest.approx(339.43, abs=0.01)


@pytest.mark.parametrize(
    "d2d, los_db, nlos_db",
    [
        # d3D = 102.724 m: PL1 = 28 + 22*2.01167 + 6.5267; NLOS' = 13.54 + 39.08*2.01167 + 6.5267
        (100.0, 78.783, 98.683),
        # beyond dBP: PL2 = 28 + 40*2.69945 + 6.5267 - 9*log10(339.43^2 + 23.5^2);
        # NLOS: 13.54 + 39.08*log10(500.552) + 6.5267
        (500.0, 96.933, 125.561),
    ],
)
def test_uma_pathloss_by_hand(d2d, los_db, nlos_db):
    los = float(channel.uma_los_pathloss_db(jnp.float32(d2d), FC, 25.0, 1.5))
    nlos = float(channel.uma_nlos_pathloss_db(jnp.float32(d2d), FC, 25.0, 1.5))
    assert los == pytest.approx(los_db, abs=0.01)
    assert nlos == pytest.approx(nlos_db, abs=0.01)


def test_nlos_never_below_los():
    d = jnp.linspace(10.0, 5000.0, 500)
    assert bool(jnp.all(channel.uma_nlos_pathloss_db(d, FC, 25.0, 1.5)
                        >= channel.uma_los_pathloss_db(d, FC, 25.0, 1.5)))


def test_los_probability_by_hand():
    # 18/100 + exp(-100/63) * (1 - 18/100) = 0.18 + 0.204475 * 0.82
    assert float(channel.uma_los_probability(jnp.float32(100.0), 1.5)) == pytest.approx(
        0.347669, abs=1e-5
    )
    assert float(channel.uma_los_probability(jnp.float32(10.0), 1.5)) == 1.0
    # 18/300 + exp(-300/63) * 0.94 = 0.06 + 0.008036
    assert float(channel.uma_los_probability(jnp.float32(300.0), 1.5)) == pytest.approx(
        0.068036, abs=1e-5
    )


@pytest.mark.parametrize(
    "zenith, azimuth, gain",
    [(90.0, 0.0, 0.0), (90.0, 65.0, -12.0), (155.0, 0.0, -12.0), (155.0, 65.0, -24.0),
     (90.0, 90.0, -12.0 * (90 / 65) ** 2), (180.0, 65.0, -30.0), (90.0, 180.0, -30.0)],
)
def test_element_pattern(zenith, azimuth, gain):
    assert float(channel.element_gain_db(zenith, azimuth)) == pytest.approx(gain, abs=1e-4)


def test_element_pattern_max_gain_and_tilt():
    assert float(channel.element_gain_db(100.0, 0.0, 8.0, 10.0)) == pytest.approx(8.0)


def test_cqi_mapping_thresholds_and_efficiency():
    sinr = jnp.array([-10.0, -6.7, -6.71, 0.2, 22.69, 22.7, 40.0])
    cqi = channel.sinr_to_cqi(sinr)
    np.testing.assert_array_equal(np.asarray(cqi), [0, 1, 0, 4, 14, 15, 15])
    eff = np.asarray(channel.cqi_to_efficiency(cqi))
    np.testing.assert_allclose(eff, [0.0, 0.1523, 0.0, 0.6016, 5.1152, 5.5547, 5.5547],
                               rtol=1e-6)
    # CQI efficiencies are increasing, thresholds too (monotone link adaptation)
    assert np.all(np.diff(channel.CQI_EFFICIENCY_K) > 0)
    assert np.all(np.diff(channel.CQI_SINR_THRESHOLD_DB_K) > 0)


def test_transport_block_bits():
    # 5.5547 bit/s/Hz * 180 kHz * 1 ms * 2 PRB = 1999.69 bits
    assert int(channel.transport_block_bits(jnp.float32(5.5547), 2)) == 1999


def test_cell_derived_quantities():
    cell = CellConfig()
    assert cell.rbg_size == 2 and cell.rbg_prbs == (2,) * 12 + (1,) and cell.n_rbg == 13
    assert cell.schedulable_prbs == 25
    # ns-3 3.37: floor(25 / 2) RBGs, the 25th PRB is never scheduled
    ns3 = CellConfig(rbg_count="ns3")
    assert ns3.rbg_prbs == (2,) * 12 and ns3.n_rbg == 12 and ns3.schedulable_prbs == 24
    assert CellConfig(n_prb=50, rbg_count="ns3").rbg_prbs == (3,) * 16
    assert cell.prb_tx_power_dbm == pytest.approx(30 - 10 * math.log10(25))
    # -174 + 10 log10(180e3) + 5
    assert cell.prb_noise_dbm == pytest.approx(-116.447, abs=1e-3)
    assert [channel.rbg_size_for(n) for n in (6, 10, 15, 25, 50, 100)] == [1, 1, 2, 2, 3, 4]
    with pytest.raises(ValueError, match="n_prb"):
        CellConfig(n_prb=0)
    with pytest.raises(ValueError, match="max_distance_m"):
        CellConfig(min_distance_m=100.0, max_distance_m=50.0)


def test_mean_snr_composition():
    cell = CellConfig()
    d = jnp.array([100.0])
    snr = channel.mean_snr_db(d, jnp.array([0.0]), jnp.array([True]), jnp.array([3.0]), cell)
    zenith = 90 + math.degrees(math.atan2(23.5, 100.0))
    gain = -12 * ((zenith - 90) / 65) ** 2
    expected = 30 - 10 * math.log10(25) + gain - 78.783 - 3.0 - (-116.447)
    assert float(snr[0]) == pytest.approx(expected, abs=0.02)


def test_drop_geometry_within_sector():
    import jax

    cell = CellConfig()
    d, az, los, sf = channel.sample_drop(jax.random.key(3), 2000, cell)
    assert float(d.min()) >= cell.min_distance_m and float(d.max()) <= cell.max_distance_m
    assert float(jnp.abs(az).max()) <= cell.sector_half_width_deg
    # uniform in area: median radius sqrt((r_min^2 + r_max^2) / 2) (43.2 m for 35-50 m)
    median = math.sqrt((cell.min_distance_m**2 + cell.max_distance_m**2) / 2)
    assert float(jnp.median(d)) == pytest.approx(median, abs=1.0)
    # shadowing std: 4 dB LOS, 6 dB NLOS
    assert float(jnp.std(sf[los])) == pytest.approx(4.0, rel=0.12)
    assert float(jnp.std(sf[~los])) == pytest.approx(6.0, rel=0.12)


def test_efficiency_lut_matches_threshold_search():
    x = np.random.default_rng(0).uniform(-15.0, 45.0, 100_000).astype(np.float32)
    x = np.concatenate([x, channel.CQI_SINR_THRESHOLD_DB_K, channel.CQI_SINR_THRESHOLD_DB_K - 0.01])
    ref = np.asarray(channel.cqi_to_efficiency(channel.sinr_to_cqi(jnp.asarray(x))))
    lut = np.asarray(channel.sinr_db_to_efficiency_lut(jnp.asarray(x)))
    dist = np.abs(x[:, None] - channel.CQI_SINR_THRESHOLD_DB_K[None, :]).min(axis=1)
    assert np.all((ref == lut) | (dist < 2e-4))
    assert (ref != lut).sum() < 20
