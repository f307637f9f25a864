"""The default scenario poses the paper's trade-off (sfjax.envs.calibration), on a small sweep."""

import numpy as np

from sfjax.envs.calibration import format_sweep, static_sweep
from sfjax.envs.ran import RanSlicingEnv


def test_default_scenario_has_an_interior_best_static_allocation():
    env = RanSlicingEnv()
    sweep = static_sweep(env, n_episodes=3, n_steps=300, seed=7)
    prbs, se, util = sweep["prbs"], sweep["mean_se"], sweep["utility"]
    best = int(np.argmax(util))
    # neither extreme: too little starves the controlled slice, too much the other one
    assert 0 < best < len(prbs) - 1
    assert util[best] > util[0] + 10_000 and util[best] > util[-1] + 10_000
    # eq. 1 SE: over-provisioning the controlled slice costs SE, about as 1/allocation
    assert np.all(np.diff(se[best:]) < 0)
    assert se[-1] < 0.8 * se[best]
    # under-provisioning: the controlled slice's own violations; over-provisioning: the
    # other slice's; cell-wide violations count both
    assert sweep["slice_violations"][0] > 10 * max(sweep["slice_violations"][best], 1.0)
    assert sweep["other_violations"][-1] > 10 * max(sweep["other_violations"][best], 1.0)
    assert np.all(sweep["violations"] >= np.maximum(sweep["slice_violations"],
                                                   sweep["other_violations"]) - 1e-9)
    # a good allocation keeps violations rare (Table III's methods: 2-60 of 300)
    assert sweep["violations"][best] < 60
    assert "best static" in format_sweep(sweep)
