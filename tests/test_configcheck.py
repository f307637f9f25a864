"""sfjax.configcheck's seed rule: seeds in [0, 2**32), distinct, at least one (unless empty is
allowed), with the JAX facts that make the range necessary."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
import pytest

from sfjax.configcheck import SEED_LIMIT, Bad, seed_problem, seeds


def test_out_of_range_seeds_fail_or_alias_in_jax():
    """Why the rule exists: ``fold_in`` refuses a seed outside uint32, ``key`` wraps it onto
    another seed's keys."""
    with pytest.raises(OverflowError):
        jax.random.fold_in(jax.random.key(0), -1)
    with pytest.raises(OverflowError):
        jax.random.fold_in(jax.random.key(0), SEED_LIMIT)
    np.testing.assert_array_equal(jax.random.key_data(jax.random.key(SEED_LIMIT + 5)),
                                  jax.random.key_data(jax.random.key(5)))


@pytest.mark.parametrize("given, empty_ok, problem", [
    ((0, 1, SEED_LIMIT - 1), False, None),
    ((), False, "at least one seed"),
    ((), True, None),
    ((3, -1), False, "seeds in [0, 2**32)"),
    ((SEED_LIMIT,), True, "seeds in [0, 2**32)"),
    ((4, 5, 4), False, "distinct seeds"),
])  # fmt: skip
def test_seed_problem(given, empty_ok, problem):
    assert seed_problem(given, empty_ok) == problem


def test_seeds_names_each_bad_field():
    @dataclass(frozen=True)
    class C:
        seed: int = 0
        env_seeds: tuple[int, ...] = (1, 2)

    assert seeds(C(), "seed", "env_seeds") == []
    assert seeds(C(seed=-1, env_seeds=(2, 2)), "seed", "env_seeds") == [
        Bad("seed", "in [0, 2**32)"), Bad("env_seeds", "distinct seeds")]
    assert seeds(C(env_seeds=()), "env_seeds", empty_ok=True) == []
