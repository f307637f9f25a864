"""`make demo`'s claim, checked on the real preset: one SF iteration of the smoke preset
(behavioural-prior Actor, offline rule reflector, RfR + KTO) improves the prior on 16 held-out
env seeds the way the reflector asks.

Opt-in (``SFJAX_DEMO_TEST=1``): it builds the prior and runs the whole preset (about 3 min on 2
idle cores); it reproduces the preset's run seed with the default prior, which is bit-for-bit
deterministic on one machine but not across CPUs -- hence opt-in, not part of `make test`. It
passes with the prior the machine where the preset was chosen built; another machine (AMD EPYC,
2026-12-05) built the default prior with other weights, and there it fails (utility +115
[-964, +1,195], violations +0.0): over three priors x two run seeds on that machine the utility
rose in all six runs, significantly in four (benchmarks/RESULTS.md, "The demo across machines
and priors").
What it asserts, at the 95 % level of a paired t interval over the 16 held-out seeds: fewer
violation steps and a higher eq. 15 utility (README, "The self-finetuning experiment"). Before
the simulator fixes of 2026-12-05 it also asserted fewer reconfigurations (the prior's built-in
flaw); on the fixed simulator, with the prior rebuilt on it, the preset no longer shows that
(+2.3 [-2.1, +6.7]), and the README says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from experiment_scripts import experiment  # tests/experiment_scripts.py

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("SFJAX_DEMO_TEST"),
                       reason="builds the demo's prior and runs the smoke preset (~3 min); "
                              "set SFJAX_DEMO_TEST=1"),
]


def test_smoke_sf_iteration_moves_the_prior_as_the_reflector_asks(tmp_path):
    mod = experiment("sf_ranslicing")
    cfg = dataclasses.replace(
        mod.SMOKE, run_dir=str(tmp_path / "run"),
        # a private cache: the test builds the prior from scratch, as a fresh machine does
        prior=dataclasses.replace(mod.SMOKE.prior, cache_dir=str(tmp_path / "priors")))
    mod.run(cfg, progress=False)
    held = json.loads((Path(cfg.run_dir) / "summary.json").read_text())["held_out"]
    assert held["seeds"] == list(range(16))
    m = held["metrics"]
    assert m["violations"]["ci_high"] < 0, m["violations"]
    assert m["utility"]["ci_low"] > 0, m["utility"]
