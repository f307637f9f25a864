"""Per-UE FIFOs against a plain Python deque model."""

from collections import deque

import jax
import jax.numpy as jnp
import numpy as np

from sfjax.envs import buffers as fifo

PKT = 512


class RefQueue:
    def __init__(self, capacity):
        self.q = deque()  # [arrival_ms, bytes_left]
        self.capacity = capacity

    def queued(self):
        return sum(b for _, b in self.q)

    def serve(self, nbytes, now, budget):
        done, late, delays = 0, 0, []
        while nbytes > 0 and self.q:
            arr, left = self.q[0]
            take = min(left, nbytes)
            nbytes -= take
            if take == left:
                self.q.popleft()
                done += 1
                delays.append(now - arr)
                late += (now - arr) > budget
            else:
                self.q[0][1] = left - take
        return done, late, max(delays, default=0.0), sum(delays)

    def enqueue(self, times):
        dropped = 0
        for t in times:
            if len(self.q) < self.capacity:
                self.q.append([t, PKT])
            else:
                dropped += 1
        return dropped


def test_fifo_matches_reference_random_ops():
    rng = np.random.default_rng(0)
    n_ues, cap, k = 5, 4, 2
    pkt_U = np.full(n_ues, PKT, np.int32)
    budget_U = np.full(n_ues, 10.0, np.float32)
    buf = fifo.empty_buffers(n_ues, cap, pkt_U)
    refs = [RefQueue(cap) for _ in range(n_ues)]
    serve = jax.jit(fifo.serve)
    enqueue = jax.jit(fifo.enqueue)
    for t in range(200):
        queued = np.asarray(fifo.queued_bytes(buf, pkt_U))
        assert queued.tolist() == [r.queued() for r in refs]
        want = rng.integers(0, 1600, n_ues)
        served = np.minimum(want, queued).astype(np.int32)
        now = float(t + 1)
        buf, done, late, maxd, sumd = serve(buf, jnp.asarray(served), pkt_U, now, budget_U)
        for u, r in enumerate(refs):
            rd, rl, rmax, rsum = r.serve(int(served[u]), now, 10.0)
            assert int(done[u]) == rd and int(late[u]) == rl
            np.testing.assert_allclose(float(maxd[u]), rmax, rtol=1e-5, atol=1e-3)
            np.testing.assert_allclose(float(sumd[u]), rsum, rtol=1e-5, atol=1e-3)
        n_arr = rng.integers(0, k + 1, n_ues).astype(np.int32)
        times = (t + np.sort(rng.random((n_ues, k)), axis=1)).astype(np.float32)
        buf, dropped = enqueue(buf, jnp.asarray(n_arr), jnp.asarray(times))
        for u, r in enumerate(refs):
            assert int(dropped[u]) == r.enqueue(times[u, : n_arr[u]].tolist())


def test_tail_drop_at_capacity():
    buf = fifo.empty_buffers(1, 3, np.array([PKT]))
    times = jnp.array([[0.1, 0.2]])
    buf, d1 = fifo.enqueue(buf, jnp.array([2]), times)
    buf, d2 = fifo.enqueue(buf, jnp.array([2]), times + 1)
    assert int(d1[0]) == 0 and int(d2[0]) == 1 and int(buf.count_U[0]) == 3
    assert int(fifo.queued_bytes(buf, np.array([PKT]))[0]) == 3 * PKT


def test_default_buffer_holds_what_ns3_rlc_um_holds():
    # ns-3 LteRlcUm::DoTransmitPdcpPdu stores a PDCP PDU while txBufferSize + size <=
    # MaxTxBufferSize; the PDU is the 512-byte packet + UDP 8 + IPv4 20 + PDCP 2 header bytes
    from sfjax.envs.scenario import RanSlicingConfig

    cfg = RanSlicingConfig()
    pdu, held = PKT + 8 + 20 + 2, 0
    while (held + 1) * pdu <= cfg.buffer_bytes:
        held += 1
    burst = 25
    buf = fifo.empty_buffers(1, cfg.buffer_packets, np.array([PKT]))
    buf, dropped = fifo.enqueue(buf, jnp.array([burst]), jnp.zeros((1, burst)))
    assert int(buf.count_U[0]) == held == 18
    assert int(dropped[0]) == burst - held
