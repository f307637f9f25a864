"""On-off CBR traffic statistics within stated confidence bounds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfjax.envs import traffic
from sfjax.envs.traffic import SliceConfig


def _simulate(key, n_ues, n_tti, mean_on_ms, mean_off_ms, interval_ms):
    on_frac = mean_on_ms / (mean_on_ms + mean_off_ms)
    full = lambda v: jnp.full((n_ues,), v, jnp.float32)  # noqa: E731
    k0, k1 = jax.random.split(key)
    on, rem, phase = traffic.init_onoff(k0, full(on_frac), full(mean_on_ms), full(mean_off_ms),
                                        full(interval_ms))
    k = max(1, math.ceil(1.0 / interval_ms))

    def body(carry, exp_U):
        on, rem, phase = carry
        n, _, phase = traffic.arrivals_in_tti(on, phase, full(interval_ms), k)
        on_now = on
        on, rem = traffic.advance_onoff(on, rem, exp_U, full(mean_on_ms), full(mean_off_ms))
        return (on, rem, phase), (on_now, n, on_now & ~on)

    exp_TU = jax.random.exponential(k1, (n_tti, n_ues))
    _, (on_TU, n_TU, ends_TU) = jax.lax.scan(body, (on, rem, phase), exp_TU)
    return np.asarray(on_TU), np.asarray(n_TU), np.asarray(ends_TU)


def test_on_fraction_period_lengths_and_packet_rate():
    n_ues, n_tti, mean_on, mean_off, interval = 256, 20_000, 200.0, 300.0, 8.192
    on, n, ends = _simulate(jax.random.key(0), n_ues, n_tti, mean_on, mean_off, interval)
    # on fraction: per-UE time averages are independent; 4-sigma bound on their mean
    per_ue = on.mean(0)
    bound = 4 * per_ue.std(ddof=1) / math.sqrt(n_ues)
    assert abs(per_ue.mean() - mean_on / (mean_on + mean_off)) < bound
    # mean ON duration: about n_tti / 500 * 256 ~ 10k complete periods, exp. std = mean
    n_periods = ends.sum()
    mean_len = on.sum() / n_periods  # on-time per ended period (edge effects ~1%)
    assert abs(mean_len - mean_on) < 4 * mean_on / math.sqrt(n_periods) + 0.02 * mean_on
    # CBR while ON: packets per ON-TTI is 1 / interval up to the period edges
    rate = n.sum() / on.sum()
    assert rate == pytest.approx(1.0 / interval, rel=0.01)
    assert n.max() == 1


def test_multiple_packets_per_tti_and_exact_spacing():
    interval = 0.4  # 5 packets per 2 ms
    on = jnp.array([True])
    phase = jnp.array([0.0])
    counts = []
    for _ in range(10):
        n, offs, phase = traffic.arrivals_in_tti(on, phase, jnp.array([interval]), 3)
        counts.append(int(n[0]))
        np.testing.assert_allclose(np.diff(np.asarray(offs[0])), interval, rtol=1e-5)
    assert sum(counts) == 25 and set(counts) <= {2, 3}


def test_phase_frozen_while_off():
    n, _, phase = traffic.arrivals_in_tti(jnp.array([False]), jnp.array([0.3]),
                                          jnp.array([8.0]), 1)
    assert int(n[0]) == 0 and float(phase[0]) == pytest.approx(0.3)


def test_slice_config_properties_and_validation():
    s = SliceConfig()
    assert s.packet_interval_ms == pytest.approx(8.192)
    assert s.mean_rate_bps == pytest.approx(5e6) and s.peak_rate_bps == pytest.approx(10e6)
    assert SliceConfig(bit_rate_bps=2e6).packet_interval_ms == pytest.approx(2.048)
    with pytest.raises(ValueError, match="n_ues"):
        SliceConfig(n_ues=0)
