"""PF scheduler against plain Python-loop references on random inputs (exact)."""

import jax
import numpy as np
import pytest

from sfjax.envs import scheduler
from sfjax.envs.channel import CQI_EFFICIENCY_K


def _random_case(seed, n_ues=7, n_rbg=9):
    rng = np.random.default_rng(seed)
    table = np.concatenate([[0.0], CQI_EFFICIENCY_K]).astype(np.float32)
    eff = table[rng.integers(0, 16, (n_ues, n_rbg))]
    avg = rng.choice([1.0, 1e5, 3e5, 7e5, 2e6], n_ues).astype(np.float32)
    avg[rng.integers(n_ues)] = avg[0]  # a tie in the average somewhere
    eligible = rng.random((n_ues, n_rbg)) < 0.7
    rbg_prbs = np.array([2] * (n_rbg - 1) + [1], np.int32)
    queued_bits = rng.choice([0, 4096, 8192, 20000], n_ues).astype(np.int32)
    return eff, avg, eligible, rbg_prbs, queued_bits


def _ref_ns3(eff, avg, eligible, rbg_prbs):
    winners = []
    for r in range(eff.shape[1]):
        best, best_metric = -1, -1.0
        for u in range(eff.shape[0]):
            if not eligible[u, r] or eff[u, r] <= 0:
                continue
            metric = np.float32(eff[u, r] * np.float32(180e3) * rbg_prbs[r]) / np.float32(avg[u])
            if metric > best_metric:  # strictly greater: first UE wins ties, as ns-3
                best, best_metric = u, metric
        winners.append(best)
    return winners


def _ref_buffer_aware(eff, avg, eligible, rbg_prbs, queued_bits):
    held = {u: [] for u in range(eff.shape[0])}
    winners = []
    for r in range(eff.shape[1]):
        best, best_metric = -1, -1.0
        for u in range(eff.shape[0]):
            carried = _ref_tb([u if r2 in held[u] else -1 for r2 in range(eff.shape[1])],
                              eff, rbg_prbs)[0][u]
            if not eligible[u, r] or eff[u, r] <= 0 or carried >= queued_bits[u]:
                continue
            metric = np.float32(eff[u, r] * np.float32(180e3) * rbg_prbs[r]) / np.float32(avg[u])
            if metric > best_metric:
                best, best_metric = u, metric
        if best >= 0:
            held[best].append(r)
        winners.append(best)
    return winners


def _ref_tb(winners, eff, rbg_prbs):
    bits, prbs = [], []
    for u in range(eff.shape[0]):
        mine = [r for r, w in enumerate(winners) if w == u]
        n = sum(int(rbg_prbs[r]) for r in mine)
        worst = min((eff[u, r] for r in mine), default=0.0)
        bits.append(int(np.floor(np.float32(worst) * np.float32(180e3) * np.float32(1e-3)
                                 * np.float32(n))))
        prbs.append(n)
    return bits, prbs


@pytest.mark.parametrize("seed", range(12))
def test_pf_matches_python_loop(seed):
    eff, avg, eligible, rbg_prbs, queued = _random_case(seed)
    got = np.asarray(scheduler.pf_assign(eff, avg, eligible, rbg_prbs))
    assert got.tolist() == _ref_ns3(eff, avg, eligible, rbg_prbs)
    got_ba = np.asarray(
        scheduler.pf_assign_buffer_aware(eff, avg, eligible, rbg_prbs, queued)
    )
    assert got_ba.tolist() == _ref_buffer_aware(eff, avg, eligible, rbg_prbs, queued)
    bits, prbs = scheduler.transport_blocks(got, eff, rbg_prbs)
    ref_bits, ref_prbs = _ref_tb(got.tolist(), eff, rbg_prbs)
    assert np.asarray(prbs).tolist() == ref_prbs
    np.testing.assert_allclose(np.asarray(bits), ref_bits, atol=1)  # float rounding only


def test_pf_is_jittable_and_vmappable():
    cases = [_random_case(s) for s in range(4)]
    stacked = [np.stack(x) for x in zip(*cases)]
    fn = jax.jit(jax.vmap(scheduler.pf_assign_buffer_aware))
    out = np.asarray(fn(*stacked))
    for i, case in enumerate(cases):
        assert out[i].tolist() == _ref_buffer_aware(*case)


def test_buffer_aware_does_not_overallocate():
    # one UE with one packet, excellent channel: ns-3 PF gives it every RBG, the
    # buffer-aware variant only as many as its 4096 bits need (1999 bits per RBG -> 3)
    eff = np.full((2, 6), CQI_EFFICIENCY_K[-1], np.float32)
    avg = np.ones(2, np.float32)
    eligible = np.array([[True] * 6, [False] * 6])
    rbg = np.full(6, 2, np.int32)
    assert np.asarray(scheduler.pf_assign(eff, avg, eligible, rbg)).tolist() == [0] * 6
    ba = scheduler.pf_assign_buffer_aware(eff, avg, eligible, rbg, np.array([4096, 0]))
    assert np.asarray(ba).tolist() == [0, 0, 0, -1, -1, -1]


def test_buffer_aware_keeps_a_ue_until_its_transport_block_carries_the_queue():
    # the block is sized at the worst CQI of the UE's RBGs: two RBGs of 2 PRB at 3.0 and 2.0
    # bit/s/Hz carry 2.0 x 360 x 2 = 1440 bits, not 1080 + 720 = 1800, so a 1700-bit queue
    # needs the third RBG (2160 bits) while it is free
    eff = np.array([[3.0, 2.0, 2.0]], np.float32)
    rbg = np.full(3, 2, np.int32)
    ba = scheduler.pf_assign_buffer_aware(eff, np.ones(1, np.float32), np.ones((1, 3), bool),
                                          rbg, np.array([1700]))
    assert np.asarray(ba).tolist() == [0, 0, 0]
    bits, _ = scheduler.transport_blocks(ba, eff, rbg)
    assert int(bits[0]) == 2160


def test_average_throughput_filter():
    avg = scheduler.update_average_throughput(np.array([1e6, 0.0]), np.array([0, 990]), 99.0)
    np.testing.assert_allclose(np.asarray(avg), [1e6 * 98 / 99, 990e3 / 99], rtol=1e-6)
