"""The default geometry's calibration claim (see sfjax.envs.calibration), on a short sweep."""

import numpy as np

from sfjax.envs.calibration import format_sweep, static_sweep
from sfjax.envs.ran import RanSlicingEnv


def test_default_links_run_in_the_paper_se_range():
    env = RanSlicingEnv()
    sweep = static_sweep(env, n_episodes=2, n_steps=12, seed=0)
    prbs = sweep["prbs"]
    unsaturated = prbs >= 10
    # link-level efficiency of the default drop: inside the paper's 5.2-5.7 bit/s/Hz
    assert np.all((sweep["link_se"][unsaturated] > 5.2) & (sweep["link_se"][unsaturated] < 5.7))
    # the trade-off the agent faces: fewer PRBs -> higher eq. 1 SE and more violations
    assert np.all(np.diff(sweep["mean_se"][prbs >= 6]) < 0)
    assert sweep["violations"][prbs == 6][0] > sweep["violations"][prbs == 20][0]
    # a saturated slice uses all its PRBs
    assert sweep["utilization"][0] > 0.95
    assert "best static" in format_sweep(sweep)
