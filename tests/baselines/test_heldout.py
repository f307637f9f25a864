"""The held-out evaluation's config is checked like every CLI value (one line, before writing)."""

from sfjax.baselines.heldout import HeldOutConfig
from sfjax.config_rules import RULES
from sfjax.configcheck import problems


def test_heldout_values_are_checked():
    assert problems(HeldOutConfig(), rules=RULES) == []
    assert problems(HeldOutConfig(seeds=()), rules=RULES) == []  # no evaluation at all
    for bad, what in ((HeldOutConfig(num_steps=0), "num_steps"),
                      (HeldOutConfig(seeds=(1, 1)), "distinct"),
                      (HeldOutConfig(seeds=(-1,)), "seeds >= 0")):
        found = problems(bad, rules=RULES)
        assert len(found) == 1 and what.split("_")[0] in found[0], found
