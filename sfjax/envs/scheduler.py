"""Intra-slice proportional-fair scheduling per RBG (ns-3 ``PfFfMacScheduler`` semantics).

Every TTI, each RBG is given to the UE of the slice that owns it maximising

    metric(u, r) = achievable_rate(u, r) / average_throughput(u),

among UEs with data queued and a usable CQI on that RBG (strictly-greater comparison, so
ties go to the lowest UE index, as ns-3's loop over RNTIs). ``achievable_rate`` is the
transport block the RBG alone would carry at the UE's subband CQI. The UE's transport block is
then sized, as in ns-3, at the worst CQI among its allocated RBGs over all its PRBs. The
average throughput is an exponential moving average with a window of ``W`` TTIs (ns-3: 99)
updated every TTI with the transport block each UE got (0 when not scheduled).

``pf_assign_buffer_aware`` is the variant real schedulers (and ns-3's newer ones) use and the
default of the environment: RBGs are visited in order and a UE stops competing once the RBGs it
already holds carry its whole queue (in the transport block it will get, sized at the worst CQI
among them), so a UE with one packet does not take the whole band while others wait.
``pf_assign`` (ns-3 ``PfFfMacScheduler`` verbatim) wastes the rest of the band on padding,
which at this load (many UEs with one 512-byte packet each) makes most packets wait several
TTIs.

Shape legend: U = UEs, R = RBGs.
"""

from __future__ import annotations

import jax.numpy as jnp

from sfjax.envs.channel import PRB_BANDWIDTH_HZ

NO_UE = -1


def pf_assign(eff_UR, avg_thr_bps_U, eligible_UR, rbg_prbs_R, tti_s: float = 1e-3):
    """UE chosen for each RBG, or ``NO_UE`` when no eligible UE can use it.

    ``eff_UR``: spectral efficiency of each UE's subband CQI on each RBG (0 = unusable);
    ``eligible_UR``: UE has data and belongs to the slice owning the RBG.
    """
    rate_bps_UR = eff_UR * PRB_BANDWIDTH_HZ * rbg_prbs_R[None, :]
    metric_UR = rate_bps_UR / jnp.maximum(avg_thr_bps_U, 1e-9)[:, None]
    usable_UR = eligible_UR & (eff_UR > 0)
    metric_UR = jnp.where(usable_UR, metric_UR, -1.0)
    winner_R = jnp.argmax(metric_UR, axis=0).astype(jnp.int32)
    return jnp.where(jnp.any(usable_UR, axis=0), winner_R, NO_UE)


def pf_assign_buffer_aware(eff_UR, avg_thr_bps_U, eligible_UR, rbg_prbs_R, queued_bits_U,
                           tti_s: float = 1e-3):
    """Like :func:`pf_assign`, but RBGs are given in index order and a UE leaves the race once
    the transport block of the RBGs it holds (:func:`transport_blocks`: worst efficiency among
    them x their PRBs) covers ``queued_bits_U``. Unrolled over R (static)."""
    rate_bps_UR = eff_UR * PRB_BANDWIDTH_HZ * rbg_prbs_R[None, :]
    metric_UR = rate_bps_UR / jnp.maximum(avg_thr_bps_U, 1e-9)[:, None]
    usable_UR = eligible_UR & (eff_UR > 0)
    need_U = queued_bits_U.astype(jnp.float32)
    ue_U = jnp.arange(eff_UR.shape[0], dtype=jnp.int32)
    worst_eff_U = jnp.zeros(eff_UR.shape[0], jnp.float32)
    held_prbs_U = jnp.zeros(eff_UR.shape[0], jnp.int32)
    winners = []
    for r in range(eff_UR.shape[1]):
        tb_U = jnp.floor(worst_eff_U * PRB_BANDWIDTH_HZ * tti_s * held_prbs_U)
        ok_U = usable_UR[:, r] & (tb_U < need_U)
        w = jnp.argmax(jnp.where(ok_U, metric_UR[:, r], -1.0)).astype(jnp.int32)
        any_ok = jnp.any(ok_U)
        won_U = (ue_U == w) & any_ok
        worst_eff_U = jnp.where(
            won_U,
            jnp.where(held_prbs_U > 0, jnp.minimum(worst_eff_U, eff_UR[:, r]), eff_UR[:, r]),
            worst_eff_U,
        )
        held_prbs_U = held_prbs_U + jnp.where(won_U, rbg_prbs_R[r], 0)
        winners.append(jnp.where(any_ok, w, NO_UE))
    return jnp.stack(winners)


def transport_blocks(winner_R, eff_UR, rbg_prbs_R, tti_s: float = 1e-3):
    """Bits each UE's transport block carries: worst allocated CQI efficiency x its PRBs.

    Returns ``(bits_U, prbs_U)``.
    """
    n_ues = eff_UR.shape[0]
    alloc_UR = winner_R[None, :] == jnp.arange(n_ues, dtype=jnp.int32)[:, None]
    prbs_U = jnp.sum(jnp.where(alloc_UR, rbg_prbs_R[None, :], 0), axis=1)
    worst_eff_U = jnp.min(jnp.where(alloc_UR, eff_UR, jnp.inf), axis=1)
    worst_eff_U = jnp.where(prbs_U > 0, worst_eff_U, 0.0)
    bits_U = jnp.floor(worst_eff_U * PRB_BANDWIDTH_HZ * tti_s * prbs_U).astype(jnp.int32)
    return bits_U, prbs_U.astype(jnp.int32)


def update_average_throughput(avg_thr_bps_U, bits_U, window: float, tti_s: float = 1e-3):
    """ns-3 PF moving average: T <- (1 - 1/W) T + (1/W) (bits / TTI)."""
    return (1.0 - 1.0 / window) * avg_thr_bps_U + (1.0 / window) * (bits_U / tti_s)
