"""The RL hyperparameter search's pure parts: the grid (parsing, its errors, the candidates),
the scores and their intervals against hand-computed numbers, the winner, the table3 options."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sfjax.baselines import rl, search

T_975_DF2 = 4.302652729911275
"""t_{0.975, 2} (statistical tables: 4.303)."""


def test_grid_parses_each_value_to_the_fields_type():
    grid = search.parse_grid(
        [
            "dqn.learning_rate=1e-4,3e-4,1e-3",
            "dqn.batch-size=64,128",
            "dqn.ddqn=true,False",
            "ppo.ent_coef=0,0.01",
            "sac.network.activation=relu,swish",
        ]
    )
    assert grid == {
        "dqn": {
            "learning_rate": (1e-4, 3e-4, 1e-3),
            "batch_size": (64, 128),
            "ddqn": (True, False),
        },
        "ppo": {"ent_coef": (0.0, 0.01)},
        "sac": {"network.activation": ("relu", "swish")},
    }
    assert type(grid["dqn"]["batch_size"][0]) is int
    assert type(grid["ppo"]["ent_coef"][0]) is float
    assert search.parse_grid([]) == {}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("dqn.learning_rate", "expected algo.field=v1,v2,..."),
        ("dqn=1e-3", "expected algo.field=v1,v2,..."),
        ("a2c.learning_rate=1e-3", "unknown algorithm 'a2c'; choose among dqn, ppo, sac"),
        ("dqn.lr=1e-3", "DQNConfig has no field 'lr'; its fields: learning_rate, gamma,"),
        ("ppo.batch_size=64", "PPOConfig has no field 'batch_size'"),
        ("dqn.network.hidden_layer_sizes=64", "a tuple, not searchable here; set it with "
         "--rl.dqn.network.hidden-layer-sizes"),
        ("dqn.batch_size=64,12.5", "'12.5' is not an int"),
        ("dqn.learning_rate=1e-3,fast", "'fast' is not a float"),
        ("dqn.learning_rate=1e-3,", "'' is not a float"),
        ("dqn.learning_rate=nan", "'nan' is not a finite number"),
        ("dqn.ddqn=yes", "'yes' is not a bool (true or false)"),
        ("dqn.learning_rate=1e-3,0.001", "a value is repeated"),
    ],
)  # fmt: skip
def test_grid_errors_name_the_bad_axis(spec, message):
    with pytest.raises(ValueError, match="^grid axis") as e:
        search.parse_grid([spec])
    assert message in str(e.value)


def test_grid_refuses_an_axis_twice_and_an_algorithm_not_searched():
    with pytest.raises(ValueError, match="grid axis dqn.learning_rate is given twice"):
        search.parse_grid(["dqn.learning_rate=1e-3", "dqn.learning-rate=3e-4"])
    with pytest.raises(ValueError, match=r"sac is not searched \(--rl.algos dqn\); add it"):
        search.parse_grid(["sac.learning_rate=1e-3"], algos=("dqn",))


def test_default_axis_is_the_learning_rate_around_the_base():
    assert search.default_axes(rl.DQNConfig()) == {"learning_rate": (1e-4, 3e-4, 9e-4)}
    assert search.default_axes(rl.PPOConfig(learning_rate=1e-3)) == {
        "learning_rate": (3.33e-4, 1e-3, 3e-3)
    }
    base = rl.SACConfig()
    cands = search.candidates("sac", base, search.default_axes(base))
    assert [c.config.learning_rate for c in cands] == [1e-4, 3e-4, 9e-4]
    assert [c.is_default for c in cands] == [False, True, False]
    assert cands[1].config == base and cands[1].label == "learning_rate=0.0003 (default)"
    assert cands[2].config == rl.SACConfig(learning_rate=9e-4)


def test_candidates_are_the_product_with_the_base_always_among_them():
    base = rl.PPOConfig()
    axes = {"learning_rate": (1e-4, 1e-3), "network.activation": ("relu", "tanh")}
    cands = search.candidates("ppo", base, axes)
    # base (lr 3e-4, swish) is not in the product: it comes first, labelled with its values
    assert cands[0].is_default and cands[0].config == base
    assert cands[0].axes == {"learning_rate": 3e-4, "network.activation": "swish"}
    assert [(c.config.learning_rate, c.config.network.activation) for c in cands[1:]] == [
        (1e-4, "relu"), (1e-4, "tanh"), (1e-3, "relu"), (1e-3, "tanh")]  # fmt: skip
    assert cands[1].config.network.hidden_layer_sizes == base.network.hidden_layer_sizes
    assert not any(c.is_default for c in cands[1:])
    assert len({c.id for c in cands}) == 5
    assert cands[1].id == "ppo-learning_rate=0.0001_network.activation=relu"


def test_interval_and_paired_difference_against_hand_computed_numbers():
    # default: training seeds' means over 2 validation seeds are 2, 6, 10 (sd 4)
    default_NS = np.array([[1.0, 3.0], [5.0, 7.0], [9.0, 11.0]])
    # candidate: + (2, 0), (1, 3), (4, 4): per-seed differences 1, 2, 4 (mean 7/3, sd 1.5275)
    cand_NS = default_NS + np.array([[2.0, 0.0], [1.0, 3.0], [4.0, 4.0]])
    per_episode = {"utility": cand_NS, "mean_se": np.full((3, 2), 1.5),
                   "reconfigurations": np.array([[1, 2], [3, 4], [5, 6]]),
                   "violations": np.zeros((3, 2))}  # fmt: skip
    row = search.score(per_episode, default_NS)
    assert row["utility"] == pytest.approx(6.0 + 7 / 3)
    assert row["per_seed_utility"] == pytest.approx([3.0, 8.0, 14.0])
    sd = math.sqrt(((3 - 25 / 3) ** 2 + (8 - 25 / 3) ** 2 + (14 - 25 / 3) ** 2) / 2)
    half = T_975_DF2 * sd / math.sqrt(3)
    assert row["utility_ci"] == pytest.approx([25 / 3 - half, 25 / 3 + half])
    assert (row["mean_se"], row["reconfigurations"], row["violations"]) == (1.5, 3.5, 0.0)
    d = row["vs_default"]
    half_d = T_975_DF2 * 1.5275252316519468 / math.sqrt(3)  # sd of (1, 2, 4)
    assert d["diff"] == pytest.approx(7 / 3) and d["n"] == 3
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((7 / 3 - half_d, 7 / 3 + half_d))
    assert d["ci_low"] < 0 < d["ci_high"] and not d["significant"]  # 3 seeds: not enough
    # pairing removes the seeds' common spread: the same +2 on every trajectory is significant
    # although the seeds' means spread far wider than 2
    sure = search.score({**per_episode, "utility": default_NS + 2.0}, default_NS)["vs_default"]
    assert (sure["diff"], sure["ci_low"], sure["ci_high"], sure["significant"]) == (
        pytest.approx(2.0), pytest.approx(2.0), pytest.approx(2.0), True)  # fmt: skip


def test_one_training_seed_claims_no_interval():
    row = search.score(
        {k: np.array([[1.0, 3.0]]) for k in ("utility", "mean_se", "reconfigurations",
                                              "violations")}, np.array([[0.0, 0.0]]))  # fmt: skip
    assert row["utility"] == 2.0 and row["utility_ci"] is None
    assert row["vs_default"]["ci_low"] is None and not row["vs_default"]["significant"]
    with pytest.raises(ValueError, match="unpaired"):
        search.score({"utility": np.zeros((2, 3))}, np.zeros((2, 4)))


def test_best_is_the_highest_mean_and_a_tie_goes_to_the_default():
    assert search.best([1.0, 5.0, 3.0], default_index=0) == 1
    assert search.best([5.0, 2.0, 5.0], default_index=2) == 2
    assert search.best([5.0, 2.0, 5.0], default_index=1) == 0


def test_table3_flags_are_the_fields_that_differ_from_the_defaults():
    assert search.table3_flags("dqn", rl.DQNConfig()) == []
    cfg = rl.DQNConfig(learning_rate=9e-4, ddqn=False, batch_size=64,
                       network=rl.NetworkConfig(hidden_layer_sizes=(128, 128)))  # fmt: skip
    assert search.table3_flags("dqn", cfg) == [
        "--rl.dqn.learning-rate 0.0009", "--rl.dqn.batch-size 64", "--rl.dqn.no-ddqn",
        "--rl.dqn.network.hidden-layer-sizes 128 128"]  # fmt: skip
    # SAC's default torso is relu; a bool set back on is spelt positively
    sac = rl.SACConfig(normalize_rewards=False, network=rl.NetworkConfig(activation="relu"))
    assert search.table3_flags("sac", sac) == ["--rl.sac.no-normalize-rewards"]
    assert search.table3_flags("sac", rl.SACConfig(), rl.SACConfig(bootstrap_truncation=False)) \
        == ["--rl.sac.bootstrap-truncation"]  # fmt: skip


def test_time_left_uses_each_algorithms_own_pace():
    assert search.time_left({}, ["dqn"]) is None
    walls = {"dqn": [100.0, 200.0]}
    assert search.time_left(walls, ["dqn", "ppo"]) == 150 + 150  # ppo: the mean of all so far
    assert search.time_left({**walls, "ppo": [60.0]}, ["dqn", "ppo", "ppo"]) == 150 + 120
    assert search.time_left(walls, []) == 0
    assert [search.fmt_duration(s) for s in (45, 720, 7500)] == ["45 s", "12 min", "2 h 05 min"]
    assert search.fmt_seeds(range(100, 116)) == "100-115"
    assert search.fmt_seeds((5, 0, 2)) == "0, 2, 5"
