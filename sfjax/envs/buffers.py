"""Per-UE RLC transmit buffers: fixed-capacity FIFOs of packet arrival times (vectorised over UEs).

A buffer holds at most ``Q`` packets (the RLC buffer: ns-3's default 10 KiB holds 18 packets of
512 B, each with 30 B of UDP/IP/PDCP headers, see ``RanSlicingConfig.buffer_packets``); a
packet arriving to a full buffer is dropped (tail drop, as ns-3's ``LteRlcUm``). All packets
of a UE have the same size, so the queue is a ring of arrival times plus the number of bytes
still to send of the head packet (RLC segmentation lets a transport block carry part of a
packet). Serving ``b`` bytes therefore completes packets in closed form, without a loop.

Delay of a packet = time its last byte is delivered (end of the TTI) - its arrival time.

Shape legend: U = UEs, Q = buffer capacity in packets, K = arrivals per UE in one TTI.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Buffers:
    """Ring buffers of all UEs."""

    arrival_ms_UQ: jnp.ndarray
    """Arrival time of each stored packet (ms since the episode start)."""
    head_U: jnp.ndarray
    """Ring index of the oldest packet."""
    count_U: jnp.ndarray
    """Packets stored (the head one possibly partly sent)."""
    head_left_U: jnp.ndarray
    """Bytes of the head packet not yet sent."""

    @property
    def capacity(self) -> int:
        return self.arrival_ms_UQ.shape[-1]


def empty_buffers(n_ues: int, capacity: int, packet_bytes_U) -> Buffers:
    return Buffers(
        arrival_ms_UQ=jnp.zeros((n_ues, capacity), jnp.float32),
        head_U=jnp.zeros((n_ues,), jnp.int32),
        count_U=jnp.zeros((n_ues,), jnp.int32),
        head_left_U=jnp.asarray(packet_bytes_U, jnp.int32),
    )


def queued_bytes(buf: Buffers, packet_bytes_U):
    """Bytes waiting in each buffer."""
    return jnp.where(buf.count_U > 0, buf.head_left_U + (buf.count_U - 1) * packet_bytes_U, 0)


def serve(buf: Buffers, served_bytes_U, packet_bytes_U, now_ms, budget_ms_U):
    """Remove ``served_bytes_U`` (<= queued bytes) from the heads of the queues at ``now_ms``.

    Returns ``(buffers, completed_U, late_U, max_delay_ms_U, sum_delay_ms_U)`` where
    ``completed_U`` counts packets whose last byte left in this call and ``late_U`` those among
    them whose delay exceeded the budget.
    """
    q = buf.capacity
    finishes_head_U = (served_bytes_U >= buf.head_left_U) & (buf.count_U > 0)
    rest_U = served_bytes_U - buf.head_left_U
    completed_U = jnp.where(finishes_head_U, 1 + rest_U // packet_bytes_U, 0)
    completed_U = jnp.minimum(completed_U, buf.count_U)
    partial_U = jnp.where(finishes_head_U, rest_U % packet_bytes_U, 0)
    head_left_U = jnp.where(
        finishes_head_U, packet_bytes_U - partial_U, buf.head_left_U - served_bytes_U
    )
    count_U = buf.count_U - completed_U
    head_left_U = jnp.where(count_U > 0, head_left_U, packet_bytes_U)

    rel_UQ = (jnp.arange(q)[None, :] - buf.head_U[:, None]) % q
    done_UQ = rel_UQ < completed_U[:, None]
    late_UQ = done_UQ & (buf.arrival_ms_UQ < now_ms - budget_ms_U[:, None])
    late_U = jnp.sum(late_UQ, axis=1).astype(jnp.int32)
    # FIFO: the head packet is the oldest of those completed
    head_arrival_U = jnp.take_along_axis(buf.arrival_ms_UQ, buf.head_U[:, None], axis=1)[:, 0]
    max_delay_U = jnp.where(completed_U > 0, now_ms - head_arrival_U, 0.0)
    sum_delay_U = completed_U * now_ms - jnp.sum(
        jnp.where(done_UQ, buf.arrival_ms_UQ, 0.0), axis=1
    )
    new = Buffers(
        arrival_ms_UQ=buf.arrival_ms_UQ,
        head_U=(buf.head_U + completed_U) % q,
        count_U=count_U,
        head_left_U=head_left_U.astype(jnp.int32),
    )
    return new, completed_U.astype(jnp.int32), late_U, max_delay_U, sum_delay_U


def enqueue(buf: Buffers, n_arrivals_U, arrival_ms_UK):
    """Append up to K packets per UE in time order; packets finding the buffer full are dropped.

    Returns ``(buffers, dropped_U)`` (dropped packet counts).
    """
    q = buf.capacity
    q_Q = jnp.arange(q)
    arrival_ms_UQ, count_U = buf.arrival_ms_UQ, buf.count_U
    dropped_U = jnp.zeros_like(count_U)
    for k in range(arrival_ms_UK.shape[1]):
        wants_U = k < n_arrivals_U
        fits_U = wants_U & (count_U < q)
        slot_U = (buf.head_U + count_U) % q
        write_UQ = fits_U[:, None] & (q_Q[None, :] == slot_U[:, None])
        arrival_ms_UQ = jnp.where(write_UQ, arrival_ms_UK[:, k : k + 1], arrival_ms_UQ)
        count_U = count_U + fits_U
        dropped_U = dropped_U + (wants_U & ~fits_U)
    return buf.replace(arrival_ms_UQ=arrival_ms_UQ, count_U=count_U), dropped_U.astype(jnp.int32)
