"""Paired before/after intervals on held-out seeds (Student-t)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sfjax.baselines.paired import paired_difference, t_quantile_975


@pytest.mark.parametrize(
    # two-sided 95 % Student-t quantiles from standard tables
    "df, t", [(1, 12.706), (4, 2.776), (15, 2.131), (30, 2.042), (31, 2.040), (40, 2.021),
              (60, 2.000), (120, 1.980)],
)
def test_t_quantile_matches_the_tables(df, t):
    assert t_quantile_975(df) == pytest.approx(t, abs=1e-3)


def test_interval_half_width_is_t_sd_over_root_n():
    rng = np.random.default_rng(0)
    before = rng.normal(size=41)
    after = before + 0.3 + rng.normal(size=41)
    r = paired_difference(before, after)
    d = after - before
    half = 2.021 * d.std(ddof=1) / math.sqrt(41)
    assert r["diff"] == pytest.approx(d.mean())
    assert r["ci_high"] - r["diff"] == pytest.approx(half, rel=1e-3)
    with pytest.raises(ValueError):
        t_quantile_975(0)
