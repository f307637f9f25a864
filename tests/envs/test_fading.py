"""Fading traces: determinism, Rayleigh statistics, delay-spread and Doppler behaviour."""

import numpy as np
import pytest

from sfjax.envs import fading
from sfjax.envs.fading import FadingConfig


def test_no_sinusoids_is_refused():
    with pytest.raises(ValueError, match="n_sinusoids must be >= 1"):  # the gains were NaN
        FadingConfig(n_sinusoids=0)


def test_deterministic_cached_and_seeded():
    cfg = FadingConfig(duration_ms=2000, n_traces=2, seed=5)
    a = fading.prb_gain_traces(cfg, 2.12e9, 25)
    b = fading._generate("EPA", cfg.doppler_hz(2.12e9), 25, 2000, 2, 5, cfg.n_sinusoids)
    np.testing.assert_array_equal(a, b)
    assert fading.prb_gain_traces(cfg, 2.12e9, 25) is a  # in-memory cache
    assert not a.flags.writeable
    c = fading.prb_gain_traces(FadingConfig(duration_ms=2000, n_traces=2, seed=6), 2.12e9, 25)
    assert not np.array_equal(a, c)


def test_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFJAX_CACHE_DIR", str(tmp_path))
    cfg = FadingConfig(duration_ms=500, n_traces=1, seed=11)
    a = fading.prb_gain_traces(cfg, 2.0e9, 6)
    files = list((tmp_path / "fading").glob("*.npy"))
    assert len(files) == 1
    np.testing.assert_array_equal(np.load(files[0]), a)


def test_rayleigh_power_statistics():
    g = fading.prb_gain_traces(FadingConfig("EVA", 60.0, n_traces=4, duration_ms=10_000, seed=1),
                               2.12e9, 25)
    assert g.shape == (4, 10_000, 25)
    assert g.mean() == pytest.approx(1.0, abs=0.1)
    # |h|^2 of a Rayleigh channel is Exp(1): P(g < 0.1) = 1 - exp(-0.1) = 0.095
    assert (g < 0.1).mean() == pytest.approx(0.095, abs=0.02)


@pytest.mark.parametrize("profile", ["EPA", "EVA", "ETU"])
def test_frequency_correlation_matches_power_delay_profile(profile):
    # For Rayleigh taps, corr(|H(f)|^2, |H(f + df)|^2) = |sum_l p_l exp(-j 2 pi df tau_l)|^2
    delays, powers = fading.TDL_PROFILES[profile]
    p = 10 ** (np.asarray(powers) / 10)
    p /= p.sum()
    g = fading.prb_gain_traces(FadingConfig(profile, 30.0, n_traces=4, duration_ms=5000,
                                            seed=2), 2.12e9, 25)
    for lag in (1, 3):
        theory = abs(np.sum(p * np.exp(-2j * np.pi * lag * 180e3 * np.asarray(delays) * 1e-9)))
        got = np.corrcoef(g[..., 0].ravel(), g[..., lag].ravel())[0, 1]
        assert got == pytest.approx(theory**2, abs=0.1)


def test_doppler_sets_time_correlation():
    def corr_lag(speed, lag=10):
        g = fading.prb_gain_traces(FadingConfig("EPA", speed, n_traces=2, duration_ms=6000,
                                                seed=3), 2.12e9, 6)
        return np.corrcoef(g[:, :-lag].ravel(), g[:, lag:].ravel())[0, 1]

    assert corr_lag(3.0) > 0.9 > 0.5 > corr_lag(120.0)


def test_rbg_mean_and_ns3_export(tmp_path):
    g = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5) + 1
    r = fading.rbg_mean_gains(g, (2, 2, 1))
    np.testing.assert_allclose(r[..., 0], g[..., :2].mean(-1))
    np.testing.assert_allclose(r[..., 2], g[..., 4])
    fading.write_ns3_fad(tmp_path / "t.fad", g[0])
    rows = (tmp_path / "t.fad").read_text().splitlines()
    assert len(rows) == 5 and len(rows[0].split()) == 3
    assert float(rows[0].split()[1]) == pytest.approx(10 * np.log10(g[0, 1, 0]), abs=1e-3)


def test_bad_profile_raises():
    with pytest.raises(ValueError, match="profile"):
        FadingConfig(profile="XYZ")
