"""The RAN slicing environment: conservation, eq. 1-3 semantics, determinism, jit/vmap, API."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfjax import metrics
from sfjax.envs import ran
from sfjax.envs.channel import CellConfig
from sfjax.envs.fading import FadingConfig
from sfjax.envs.ran import Objective, RanSlicingConfig, RanSlicingEnv
from sfjax.envs.traffic import SliceConfig

FAST_FADING = FadingConfig(duration_ms=1000, n_traces=2)
TINY = RanSlicingConfig(
    # RBG size 2: 7 RBGs of 2 PRB + 1 of 1 PRB; half the REs carry data
    cell=CellConfig(n_prb=15, data_re_fraction=0.5),
    slices=(
        SliceConfig("gbr", n_ues=5, bit_rate_bps=1e6, delay_budget_ms=10.0, mean_on_s=0.2,
                    mean_off_s=0.1, fading=FAST_FADING),
        SliceConfig("non_gbr", n_ues=2, bit_rate_bps=4e6, delay_budget_ms=50.0,
                    mean_on_s=0.2, mean_off_s=0.1,
                    fading=dataclasses.replace(FAST_FADING, profile="EVA", speed_kmh=60.0)),
    ),
    ttis_per_step=20,
    episode_steps=6,
    buffer_bytes=2048,  # 3 packets of 542 B: starving the slice overflows it within a step
    pipeline_delay_ms=5.0,
    # the mechanics tests below pin the scheduled SE, controlled-slice violations, the 5-value
    # observation and a stationary traffic start; the defaults have their own tests
    objective=Objective(se_definition="scheduled", violation_scope="controlled"),
    observe_other_slice=False,
    onoff_start="stationary",
)
REQUIRED = ("se", "violation", "reconfiguration", "arrival_rate_bps", "queue_delta_bytes",
            "dropped_bytes")


@pytest.fixture(scope="module")
def tiny():
    env = RanSlicingEnv(TINY)
    return env, env.default_params, jax.jit(env.step), jax.jit(env.reset)


@pytest.mark.parametrize("kw, message", [
    ({"pf_window_tti": 0.0}, "pf_window_tti must be >= 1"),
    ({"min_rbg_per_slice": -1}, "min_rbg_per_slice must be >= 0"),
])  # fmt: skip
def test_bad_scheduler_and_action_values_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        RanSlicingConfig(**kw)


def test_spaces_actions_and_helpers(tiny):
    env, params, _, _ = tiny
    assert env == RanSlicingEnv(TINY) and hash(env) == hash(RanSlicingEnv(TINY))
    assert env != RanSlicingEnv(dataclasses.replace(TINY, episode_steps=7))
    assert env.num_actions == 7 and TINY.prbs_per_action == (2, 4, 6, 8, 10, 12, 14)
    assert env.action_space(params).n == 7
    assert env.observation_space(params).shape == (5,)
    for a in range(env.num_actions):
        assert int(env.action_for_prbs(env.prbs_for_action(a, params), params)) == a
    # nearest valid; ties go to the larger allocation; out of range clamps
    got = ran.action_for_prbs(jnp.array([0, 3, 5, 9, 13, 15, 100]), params)
    assert np.asarray(got).tolist() == [0, 1, 2, 4, 6, 6, 6]
    assert int(jax.jit(ran.prbs_for_action)(3, params)) == 8
    with pytest.raises(ValueError, match="two slices"):
        RanSlicingConfig(slices=(SliceConfig(),))
    with pytest.raises(ValueError, match="scheduler"):
        RanSlicingConfig(scheduler="rr")


def _rollout(step, reset, params, key, actions):
    obs, state = reset(key, params)
    out = []
    for t, a in enumerate(actions):
        out.append(step(jax.random.fold_in(key, t), state, a, params))
        state = out[-1][1]
    return out


def test_info_keys_reward_and_se_definition(tiny):
    env, params, step, reset = tiny
    (obs, state, r, _, _, info), = _rollout(step, reset, params, jax.random.key(0), [2])
    for k in REQUIRED:
        assert k in info and "other_" + k in info
    assert env.observation_space(params).contains(obs)
    prbs = int(info["prbs"])
    assert prbs == 6 and int(info["other_prbs"]) == 9
    delivered = float(info["delivered_bits"])
    assert delivered > 0
    # eq. 1 as printed: delivered bits over the allocated bandwidth
    assert float(info["se_allocated"]) == pytest.approx(delivered / (0.02 * prbs * 180e3), rel=1e-5)
    # default "scheduled": delivered bits before the 50 % RE overhead per scheduled PRB-TTI
    sched_prb_tti = float(info["utilization"]) * prbs * 20
    assert sched_prb_tti > 0 and sched_prb_tti == pytest.approx(round(sched_prb_tti), abs=1e-3)
    se = delivered / 0.5 / (round(sched_prb_tti) * 180e3 * 1e-3)
    assert float(info["se_scheduled"]) == pytest.approx(se, rel=1e-5)
    assert float(info["se"]) == float(info["se_scheduled"]) == float(state.se_S[0])
    # padding only lowers it: at most the CQI efficiency of the blocks, itself <= CQI 15
    assert float(info["se"]) == pytest.approx(float(info["link_se"]) * float(info["tb_fill"]),
                                              rel=1e-4)
    assert float(info["se"]) <= float(info["link_se"]) <= 5.5547 + 1e-4
    expect = metrics.step_utility(info["se"], info["reconfiguration"], info["violation"])
    assert float(r) == pytest.approx(float(expect), rel=1e-6)
    # the scaled observation is the raw eq. 14 state
    np.testing.assert_allclose(
        np.asarray(obs)[:3],
        [prbs / 15, float(state.se_S[0]) / 5.5547, float(state.arrival_rate_bps_S[0]) / 5e6],
        rtol=1e-5,
    )
    d = ran.observation_dict(state)
    assert isinstance(d["se"], float) and d["prbs"] == 6.0
    back = env.observation_to_dict(obs)
    for k, v in back.items():
        assert v == pytest.approx(d[k], rel=1e-4, abs=1e-3)
    assert set(ran.info_dict(info)) == set(info) - {"final_observation"}


def test_byte_conservation_per_slice(tiny):
    env, params, step, reset = tiny
    actions = [0, 0, 6, 3, 0, 1]  # starve the controlled slice at first: drops happen
    total_dropped = 0.0
    for seed in range(3):
        for *_, info in _rollout(step, reset, params, jax.random.key(seed), actions):
            for p in ("", "other_"):
                arrived = float(info[p + "arrival_rate_bps"]) * 0.02 / 8
                out = (float(info[p + "delivered_bits"]) / 8 + float(info[p + "queue_delta_bytes"])
                       + float(info[p + "dropped_bytes"]))
                assert arrived == pytest.approx(out, abs=0.5)
            total_dropped += float(info["dropped_bytes"])
    assert total_dropped > 0


def test_reconfiguration_semantics(tiny):
    env, params, step, reset = tiny
    init = int(params.initial_action)
    actions = [init, init, init + 1, init + 1, 0, 0]
    flags = [bool(o[5]["reconfiguration"]) for o in
             _rollout(step, reset, params, jax.random.key(1), actions)]
    assert flags == [False, False, True, False, True, False]
    prbs = [TINY.prbs_per_action[a] for a in actions]
    ref = metrics.reconfiguration_flags(jnp.array(prbs), TINY.prbs_per_action[init])
    assert np.asarray(ref).tolist() == flags


def _quiet_state(reset, params, key, n):
    """A reset state with every UE OFF for a long time (no arrivals); dtypes kept exact so the
    compiled step is reused."""
    _, state = reset(key, params)
    return state.replace(on_U=jnp.zeros(n, bool), remaining_ms_U=jnp.full(n, 1e9, jnp.float32))


def test_violation_semantics_on_constructed_cases(tiny):
    env, params, step, reset = tiny
    key = jax.random.key(2)
    keep = int(params.initial_action)  # no reconfiguration in these steps
    quiet = _quiet_state(reset, params, key, env.config.n_ues)
    _, _, r, _, _, info = step(key, quiet, keep, params)
    assert not bool(info["violation"]) and float(info["delivered_bits"]) == 0.0
    assert float(r) == pytest.approx(15.0)  # 15 (SE + 1) with SE = 0, no penalties

    # one packet that has already waited 50 ms in UE 0's buffer: delivered late -> violation
    buf = quiet.buffers
    old = buf.replace(arrival_ms_UQ=buf.arrival_ms_UQ.at[0, 0].set(-50.0),
                      count_U=buf.count_U.at[0].set(1))
    _, _, r, _, _, info = step(key, quiet.replace(buffers=old), keep, params)
    assert bool(info["violation"]) and int(info["late_packets"]) == 1
    assert not bool(info["other_violation"])
    assert float(r) == pytest.approx(15 * (float(info["se"]) + 1) - 300, rel=1e-5)

    # the same packet, young enough: delivered in time -> no violation
    young = old.replace(arrival_ms_UQ=old.arrival_ms_UQ.at[0, 0].set(-1.0))
    _, _, _, _, _, info = step(key, quiet.replace(buffers=young), keep, params)
    assert not bool(info["violation"]) and int(info["delivered_packets"]) == 1


def test_drops_alone_count_as_violation(tiny):
    # the other slice (50 ms budget) squeezed to 1 PRB with full buffers of fresh packets and
    # its UEs ON: packets are dropped, none can be 50 ms late within a 20 ms step
    env, params, step, reset = tiny
    key = jax.random.key(5)
    state = _quiet_state(reset, params, key, env.config.n_ues)
    n, q = env.config.n_ues, env.config.buffer_packets
    other = jnp.arange(n) >= TINY.slices[0].n_ues
    buf = state.buffers.replace(
        arrival_ms_UQ=jnp.full((n, q), -1.0, jnp.float32),
        count_U=jnp.where(other, q, 0).astype(jnp.int32),
    )
    state = state.replace(buffers=buf, on_U=other)  # weak types would recompile: keep dtypes
    _, _, _, _, _, info = step(key, state, env.num_actions - 1, params)
    assert float(info["other_dropped_bytes"]) > 0 and int(info["other_late_packets"]) == 0
    assert bool(info["other_violation"])
    assert float(info["other_max_delay_ms"]) < 50.0


def test_cell_scope_counts_the_other_slice():
    # the drop case above under the default objective (violations over the whole cell): the
    # other slice's drops make the step a violation and cost the eq. 15 penalty
    for scope, expect in (("cell", True), ("controlled", False)):
        env = RanSlicingEnv(dataclasses.replace(
            TINY, objective=Objective(se_definition="scheduled", violation_scope=scope)))
        params, key = env.default_params, jax.random.key(5)
        state = _quiet_state(jax.jit(env.reset), params, key, env.config.n_ues)
        n, q = env.config.n_ues, env.config.buffer_packets
        other = jnp.arange(n) >= TINY.slices[0].n_ues
        buf = state.buffers.replace(
            arrival_ms_UQ=jnp.full((n, q), -1.0, jnp.float32),
            count_U=jnp.where(other, q, 0).astype(jnp.int32),
        )
        state = state.replace(buffers=buf, on_U=other)
        _, _, r, _, _, info = env.step(key, state, env.num_actions - 1, params)
        assert bool(info["other_violation"]) and not bool(info["slice_violation"])
        assert bool(info["violation"]) is expect
        penalty = 300.0 if expect else 0.0
        reconf = 15.0 * float(info["reconfiguration"])
        assert float(r) == pytest.approx(15 * (float(info["se"]) + 1) - reconf - penalty,
                                         rel=1e-5)


def test_defaults_objective_observation_and_off_start():
    cfg = RanSlicingConfig()
    assert cfg.objective == Objective("allocated", "cell")
    assert cfg.se_definition == "allocated" and cfg.violation_scope == "cell"
    assert cfg.observe_other_slice and cfg.onoff_start == "off"
    env = RanSlicingEnv(dataclasses.replace(TINY, objective=Objective(), observe_other_slice=True,
                                            onoff_start="off"))
    obs, state = env.reset(jax.random.key(0), env.default_params)
    assert obs.shape == (9,) and env.observation_space(env.default_params).contains(obs)
    # ns-3's OnOffApplication starts silent: every UE in an OFF period, nothing offered
    assert not bool(jnp.any(state.on_U)) and float(jnp.sum(state.arrival_rate_bps_S)) == 0.0
    assert float(jnp.min(state.remaining_ms_U)) > 0
    stat = RanSlicingEnv(dataclasses.replace(TINY, onoff_start="stationary"))
    ons = [bool(jnp.any(stat.reset(jax.random.key(k), stat.default_params)[1].on_U))
           for k in range(4)]
    assert any(ons)
    # eq. 15 weights flow from the objective into the traced params
    w = metrics.UtilityWeights(se_weight=2.0, se_offset=0.0, reconfig_penalty=3.0,
                               violation_penalty=7.0)
    p = RanSlicingEnv(dataclasses.replace(TINY, objective=Objective(weights=w))).default_params
    assert (p.se_weight, p.se_offset, p.reconfig_penalty, p.violation_penalty) == (2, 0, 3, 7)
    with pytest.raises(ValueError, match="onoff_start"):
        RanSlicingConfig(onoff_start="on")


def test_determinism_by_key(tiny):
    env, params, step, reset = tiny
    a = _rollout(step, reset, params, jax.random.key(7), [1, 4, 2])
    b = _rollout(step, reset, params, jax.random.key(7), [1, 4, 2])
    c = _rollout(step, reset, params, jax.random.key(8), [1, 4, 2])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def test_vmap_matches_single_env(tiny):
    env, params, step, reset = tiny
    keys = jax.random.split(jax.random.key(3), 3)
    obs_B, state_B = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(keys, params)
    actions = jnp.array([0, 3, 6])
    vstep = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
    out_B = vstep(keys, state_B, actions, params)
    for i in range(3):
        _, s = reset(keys[i], params)
        out = step(keys[i], s, actions[i], params)
        for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(out_B)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y)[i], rtol=1e-5, atol=1e-4)


def test_auto_reset_after_episode(tiny):
    env, params, step, reset = tiny
    outs = _rollout(step, reset, params, jax.random.key(4), [2] * 7)
    assert all(len(o) == 6 for o in outs)  # gymnax 1.0: terminated and truncated
    assert [bool(o[3]) for o in outs] == [False] * 7  # no natural end
    assert [bool(o[4]) for o in outs] == [False] * 5 + [True, False]  # the time limit
    assert int(outs[5][1].time) == 0 and int(outs[6][1].time) == 1
    assert int(outs[5][1].clock_ms) == 0
    # the info of the truncated step still describes that step
    assert int(outs[5][5]["prbs"]) == 6 and bool(outs[5][5]["truncated"])


def test_gymnax_wrappers_run_on_the_env(tiny):
    from gymnax.wrappers.purerl import FlattenObservationWrapper, LogWrapper

    env, params, _, _ = tiny
    wrapped = LogWrapper(FlattenObservationWrapper(env))
    obs, state = wrapped.reset(jax.random.key(0), params)
    rewards = []
    for t in range(TINY.episode_steps):
        obs, state, r, term, trunc, info = wrapped.step(jax.random.key(t + 1), state, 2, params)
        rewards.append(float(r))
    assert obs.shape == (env.obs_dim,) and bool(trunc) and not bool(term)
    assert bool(info["returned_episode"]) and bool(info["returned_episode_valid"])
    assert int(info["returned_episode_lengths"]) == TINY.episode_steps
    np.testing.assert_allclose(float(info["returned_episode_returns"]), sum(rewards), rtol=1e-5)


def test_gymnasium_wrapper():
    pytest.importorskip("gymnasium")
    from sfjax.envs.gymnasium_env import RanSlicingGymnasiumEnv

    g = RanSlicingGymnasiumEnv(TINY)
    obs, _ = g.reset(seed=0)
    assert g.observation_space.contains(obs)
    trunc = False
    for _ in range(TINY.episode_steps):
        obs, r, term, trunc, info = g.step(g.action_space.sample())
        assert isinstance(r, float) and not term and isinstance(info["se"], float)
    assert trunc
    obs2, _ = g.reset(seed=0)
    np.testing.assert_array_equal(obs2, g.reset(seed=0)[0])
    with pytest.raises(ValueError, match="action"):
        g.step(99)


def test_pipeline_delay_and_data_re_fraction(tiny):
    # TINY adds 5 ms of pipeline latency: a packet that arrived 4.5 ms before the step and is
    # sent in its first TTIs has a delay of k + 4.5 + 5 > 10 ms (k + 4.5 < 10 without it); at
    # half the REs its 4096 bits need two TTIs on the 8 PRBs of the initial allocation (k = 2)
    env, params, step, reset = tiny
    key = jax.random.key(2)
    state = _quiet_state(reset, params, key, env.config.n_ues)
    buf = state.buffers
    pkt = buf.replace(arrival_ms_UQ=buf.arrival_ms_UQ.at[0, 0].set(-4.5),
                      count_U=buf.count_U.at[0].set(1))
    _, _, _, _, _, info = step(key, state.replace(buffers=pkt), int(params.initial_action), params)
    assert bool(info["violation"]) and int(info["late_packets"]) == 1
    assert float(info["max_delay_ms"]) == pytest.approx(11.5)
    # One packet of 4096 bits: at most 5.5547 x 180 x 8 x 0.5 = 4000 bits per TTI on 8 PRB,
    # so it needs a second transport block that is mostly padding. The reported SE counts the
    # bits before the RE overhead: the CQI efficiency (<= 5.5547) scaled by the fill.
    assert int(info["delivered_packets"]) == 1 and float(info["delivered_bits"]) == 4096
    assert 0 < float(info["tb_fill"]) < 0.9
    assert 0 < float(info["se"]) < float(info["link_se"]) <= 5.5547 + 1e-4
    used = float(info["utilization"]) * 8 * 20
    assert float(info["se"]) == pytest.approx(4096 / 0.5 / (used * 180), rel=1e-4)
    with pytest.raises(ValueError, match="data_re_fraction"):
        CellConfig(data_re_fraction=0.0)


def test_quiet_step_carries_the_scheduled_se(tiny):
    # nothing to send: no PRB is scheduled, so the scheduled SE of the previous step stands
    # (eq. 15 sees the link, not an empty step); eq. 1 gives 0
    env, params, step, reset = tiny
    key = jax.random.key(3)
    quiet = _quiet_state(reset, params, key, env.config.n_ues)
    prev = jnp.array([4.25, 3.5], jnp.float32)
    quiet = quiet.replace(se_S=prev, se_scheduled_S=prev)
    _, state, r, _, _, info = step(key, quiet, int(params.initial_action), params)
    assert float(info["utilization"]) == 0.0 and float(info["delivered_bits"]) == 0.0
    assert float(info["se"]) == 4.25 and float(info["other_se"]) == 3.5
    assert float(info["se_allocated"]) == 0.0
    assert float(r) == pytest.approx(15 * (4.25 + 1))
    np.testing.assert_array_equal(np.asarray(state.se_scheduled_S), np.asarray(prev))


def test_allocated_se_definition_and_ns3_rbg_count():
    cfg = dataclasses.replace(
        TINY, objective=Objective(se_definition="allocated", violation_scope="controlled"),
        cell=dataclasses.replace(TINY.cell, rbg_count="ns3"),  # 7 RBGs of 2 PRB, PRB 15 unused
    )
    assert cfg.cell.rbg_prbs == (2,) * 7 and cfg.cell.schedulable_prbs == 14
    assert cfg.num_actions == 6 and cfg.prbs_per_action == (2, 4, 6, 8, 10, 12)
    env = RanSlicingEnv(cfg)
    params = env.default_params
    key = jax.random.key(0)
    _, state = env.reset(key, params)
    _, state, r, _, _, info = env.step(key, state, 2, params)
    assert int(info["prbs"]) == 6 and int(info["other_prbs"]) == 8
    assert float(info["delivered_bits"]) > 0
    assert float(info["se"]) == float(info["se_allocated"]) == pytest.approx(
        float(info["delivered_bits"]) / (0.02 * 6 * 180e3), rel=1e-5)
    assert float(info["se"]) < float(info["se_scheduled"])
    expect = metrics.step_utility(info["se"], info["reconfiguration"], info["violation"])
    assert float(r) == pytest.approx(float(expect), rel=1e-6)
    with pytest.raises(ValueError, match="se_definition"):
        Objective(se_definition="goodput")
    with pytest.raises(ValueError, match="violation_scope"):
        Objective(violation_scope="slice0")
    with pytest.raises(ValueError, match="rbg_count"):
        CellConfig(rbg_count="floor")
