"""Refine-from-Reflection dataset construction (Algorithm 2) on constructed labels."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from sfjax.agents import rfr
from sfjax.agents.actor import Actor
from sfjax.agents.prompts import PromptConfig, format_output
from sfjax.agents.trajectory import Reflection, Step, StepLabel, Trajectory

PCFG = PromptConfig(action_lo=1, action_hi=13)
FB = {
    "se": 5.0,
    "violation": 0.0,
    "reconfiguration": 0.0,
    "arrival_rate_bps": 1e6,
    "queue_delta_bytes": 0.0,
    "dropped_bytes": 0.0,
}


def _traj(env, actions, ok=None):
    ok = ok or [True] * len(actions)
    steps = [
        Step(t, {}, f"P{env}-{t}", f"out{env}-{t}", "", a, "", o, FB)
        for t, (a, o) in enumerate(zip(actions, ok))
    ]
    return Trajectory(env, 0, steps)


def _refl(env, labels):
    return Reflection(env, [StepLabel(t, lab, a, "") for t, (lab, a) in enumerate(labels)], "", "x")


def test_base_dataset_labels_and_targets():
    trajs = [_traj(0, [3, 4, 5], ok=[True, True, False]), _traj(1, [6, 7])]
    refls = [
        _refl(0, [("effective", 3), ("suboptimal", 2), ("effective", 5)]),
        _refl(1, [("suboptimal", 8), ("effective", 7)]),
    ]
    base, targets = rfr.base_dataset(trajs, refls[::-1])  # order of reflections does not matter
    assert [(e.prompt, e.completion, e.desirable, e.source) for e in base] == [
        ("P0-0", "out0-0", True, "base"),
        ("P0-1", "out0-1", False, "base"),
        ("P0-2", "out0-2", False, "base"),  # unusable output: undesirable even if 'effective'
        ("P1-0", "out1-0", False, "base"),
        ("P1-1", "out1-1", True, "base"),
    ]
    assert [(t.target_id, t.prompt, t.improved_action) for t in targets] == [
        ("0:1", "P0-1", 2),
        ("0:2", "P0-2", 5),
        ("1:0", "P1-0", 8),
    ]


def test_base_dataset_rejects_incomplete_reflection():
    with pytest.raises(ValueError, match="no complete reflection"):
        rfr.base_dataset([_traj(0, [3, 4])], [_refl(0, [("effective", 3)])])
    with pytest.raises(ValueError, match="no complete reflection"):
        rfr.base_dataset([_traj(0, [3])], [_refl(1, [("effective", 3)])])


def _out(a):
    return format_output("r", a, "a", PCFG)


def test_rollouts_tolerance_tau_and_skip():
    targets = [
        rfr.RolloutTarget("0:1", "PA", 5),
        rfr.RolloutTarget("0:2", "PB", 9),
        rfr.RolloutTarget("1:0", "PC", 2),
    ]
    base = [rfr.KTOExample("PA", "o", False, "base", 0, 1)]
    # per prompt, the actions the fake Actor samples in each of two KTO iterations
    plan = {
        0: {"PA": [5, 5, 6, 5], "PB": [9, 1, 2, 3], "PC": [3, 3, 3, None]},
        1: {"PB": [9, 9, 9, 10], "PC": [1, 2, 2, 3]},
    }
    calls = []

    def sample_fn(prompts, k, key):
        it = len(calls)
        calls.append(list(prompts))
        assert k == 4
        return [[_out(a) if a is not None else "garbage" for a in plan[it][p]] for p in prompts]

    cfg = rfr.RfRConfig(num_rollouts=4, tolerance=0, tau=0.5)
    state = rfr.RfRState()
    key = jax.random.key(0)
    ds, stats, state = rfr.build_dataset(base, targets, state, sample_fn, cfg, PCFG, key)
    assert calls[0] == ["PA", "PB", "PC"]
    assert ds[0] == base[0]
    roll = ds[1:]
    assert [e.desirable for e in roll] == [True, True, False, True] + [
        True,
        False,
        False,
        False,
    ] + [False] * 4
    assert all(e.source == "rollout" for e in roll)
    assert (roll[0].env_index, roll[0].step, roll[8].env_index, roll[8].step) == (0, 1, 1, 0)
    assert stats.n_rollout_desirable == 4 and stats.n_rollout_undesirable == 8
    assert stats.n_base_undesirable == 1 and stats.n_desirable == 4 and stats.n_undesirable == 9
    assert stats.rollout_parse_failures == 1
    assert stats.mean_match_rate == pytest.approx((0.75 + 0.25 + 0.0) / 3)
    assert state.solved == ["0:1"]  # 0.75 > tau; 0.25 and 0.0 are not
    assert stats.n_solved == 1 and stats.n_rolled_out == 3

    # next KTO iteration: the solved step is not rolled out again; tau is strict (> not >=)
    ds2, stats2, state = rfr.build_dataset(base, targets, state, sample_fn, cfg, PCFG, key)
    assert calls[1] == ["PB", "PC"]
    assert stats2.n_rolled_out == 2
    assert state.solved == ["0:1", "0:2"]  # PB: 3/4 > 0.5; PC: 2/4 = 0.5 is not > 0.5
    assert len(ds2) == 1 + 8


def test_rollout_tolerance():
    targets = [rfr.RolloutTarget("0:0", "P", 5)]
    samples = [[_out(a) for a in (3, 4, 5, 6, 7)]]
    for tol, want in ((0, [0, 0, 1, 0, 0]), (1, [0, 1, 1, 1, 0]), (2, [1] * 5)):
        ex, rates, _ = rfr.rollout_examples(targets, samples, rfr.RfRConfig(tolerance=tol), PCFG)
        assert [int(e.desirable) for e in ex] == want
        assert rates == [sum(want) / 5]


def test_no_rollouts_when_disabled_or_all_solved():
    targets = [rfr.RolloutTarget("0:0", "P", 5)]

    def boom(*a):
        raise AssertionError("must not sample")

    key = jax.random.key(0)
    ds, st, _ = rfr.build_dataset(
        [], targets, rfr.RfRState(), boom, rfr.RfRConfig(rollouts=False), PCFG, key
    )
    assert ds == [] and st.n_rolled_out == 0
    ds, st, _ = rfr.build_dataset(
        [], targets, rfr.RfRState(["0:0"]), boom, rfr.RfRConfig(), PCFG, key
    )
    assert st.n_solved == 1 and st.n_rolled_out == 0


def test_improved_examples_copy_suboptimal_outputs_with_the_improved_action():
    """RfRConfig.improved_examples (not Algorithm 2): one desirable copy per suboptimal step."""
    outputs = [_out(3), _out(4), _out(5), "no action field"]
    steps = [Step(t, {}, f"P0-{t}", o, "", 3, "", t < 3, FB) for t, o in enumerate(outputs)]
    trajs = [Trajectory(0, 0, steps)]
    refls = [_refl(0, [("effective", 3), ("suboptimal", 2), ("suboptimal", 5), ("suboptimal", 7)])]
    base, targets = rfr.base_dataset(trajs, refls)
    copies = rfr.improved_examples(base, targets, PCFG)
    # step 1 gets action 2; step 2 already takes the improved 5 (no copy); step 3 has no field
    assert [(e.prompt, e.completion, e.desirable, e.source, e.step) for e in copies] == [
        ("P0-1", _out(2), True, "improved", 1)
    ]

    def sample_fn(prompts, k, key):
        return [[_out(1)] * k for _ in prompts]

    key = jax.random.key(0)
    cfg = rfr.RfRConfig(num_rollouts=2)
    off, stats_off, _ = rfr.build_dataset(base, targets, rfr.RfRState(), sample_fn, cfg, PCFG, key)
    on_cfg = dataclasses.replace(cfg, improved_examples=True)
    on, stats_on, _ = rfr.build_dataset(base, targets, rfr.RfRState(), sample_fn, on_cfg, PCFG, key)
    assert stats_off.n_improved == 0 and not any(e.source == "improved" for e in off)
    assert on == off + copies  # base, rollouts, then the copies
    assert stats_on.n_improved == 1 and stats_on.n_desirable == stats_off.n_desirable + 1
    assert stats_on.to_json()["n_improved"] == 1


def test_config_validation_and_json_round_trip():
    with pytest.raises(ValueError, match="tau"):
        rfr.RfRConfig(tau=1.5)
    with pytest.raises(ValueError):
        rfr.RfRConfig(num_rollouts=0)
    ex = [rfr.KTOExample("p", "c", True, "base", 1, 2)]
    assert rfr.examples_from_json(rfr.examples_to_json(ex)) == ex


# ------------------------------------------------------------------ memory-bounded rollout calls
def _cost(kv=100, new=16):
    return rfr.RolloutCost(kv_bytes_per_token=kv, max_new_tokens=new, count_tokens=len)


def test_plan_splits_by_rows_and_bytes_in_order():
    prompts = ["x" * n for n in (10, 20, 30, 200, 5)]
    cfg = rfr.RfRConfig(num_rollouts=2, max_cache_gib_per_call=0)
    assert rfr.plan_rollout_calls(prompts, cfg, _cost()) == [(0, 5)]
    cfg = rfr.RfRConfig(num_rollouts=2, max_rows_per_call=4, max_cache_gib_per_call=0)
    assert rfr.plan_rollout_calls(prompts, cfg, None) == [(0, 2), (2, 4), (4, 5)]
    # bytes: pow2(prompts) x K x (prompt bucket + new bucket) x kv; 32-slot bucket + 16 = 48
    cost = _cost()
    assert cost.slots(10) == 48 and cost.slots(200) == 256 + 16 and cost.slots(1100) == 1536 + 16
    assert cost.call_bytes(3, 2, 30) == 4 * 2 * 48 * 100
    cfg = rfr.RfRConfig(num_rollouts=2, max_cache_gib_per_call=4 * 2 * 48 * 100 / 2**30)
    # the 200-token prompt alone needs 2 x 272 x 100 = 54,400 B > budget: a call of its own
    assert rfr.plan_rollout_calls(prompts, cfg, cost) == [(0, 3), (3, 4), (4, 5)]
    assert rfr.plan_rollout_calls([], cfg, cost) == []


def test_default_budget_at_qwen3_4b_scale():
    """64 SF prompts (~2.2k tokens) x K = 8 would need ~200 GB of bf16 KV cache in one call;
    the default 32 GiB budget gives 8 calls of 8 prompts (64 rows), with or without the
    prefix cache's extra slots."""
    cfg = rfr.RfRConfig(num_rollouts=8)
    for extra in (0, rfr.PREFIX_CACHE_EXTRA_SLOTS):
        cost = rfr.RolloutCost(144 * 1024, 128, lambda p: 2208, extra)
        assert cost.call_bytes(64, 8, 2208) > 190e9
        plan = rfr.plan_rollout_calls(["p"] * 64, cfg, cost)
        assert plan == [(i, i + 8) for i in range(0, 64, 8)]
        assert cost.call_bytes(8, 8, 2208) <= cfg.max_cache_gib_per_call * 2**30


def test_calls_keep_order_and_key_each_prompt_by_its_index():
    calls = []

    def sample_fn(prompts, k, key):
        calls.append((list(prompts), k, jax.random.key_data(key).tolist()))
        return [[f"{p}/{j}" for j in range(k)] for p in prompts]

    key = jax.random.key(3)
    prompts = [f"p{i}" for i in range(5)]
    cfg = rfr.RfRConfig(num_rollouts=2, max_rows_per_call=4)
    got, n = rfr.sample_in_calls(sample_fn, prompts, cfg, key)
    assert n == 3 and got == [[f"p{i}/0", f"p{i}/1"] for i in range(5)]
    assert [c[0] for c in calls] == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    keys = [k for c in calls for k in c[2]]  # per prompt, across calls
    assert keys == [jax.random.key_data(jax.random.fold_in(key, i)).tolist() for i in range(5)]
    with pytest.raises(ValueError, match="max_rows_per_call"):
        rfr.RfRConfig(num_rollouts=8, max_rows_per_call=4)


@pytest.fixture(scope="module")
def tiny_actor(tiny_checkpoint):
    from sfjax.agents.actor import Actor, ActorConfig
    from sfjax.models import qwen3
    from sfjax.sampling import Sampler
    from sfjax.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_checkpoint)
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jax.numpy.float32)
    acfg = ActorConfig(prompt=PCFG, max_new_tokens=24, free_budget=8, rollout_temperature=0.0)
    return Actor(Sampler(model, tok), tok, acfg)


def test_cost_is_read_off_the_actor(tiny_actor):
    cost = rfr.rollout_cost_of(tiny_actor.sample)
    assert cost.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # K+V, 2 layers, 2 kv heads, H 16, f32
    on = tiny_actor.sampler.prefix_cache is not None  # ActorConfig.prefix_cache
    assert cost.extra_slots == (rfr.PREFIX_CACHE_EXTRA_SLOTS if on else 0)
    want = len(tiny_actor.tokenizer("Action: 12", add_special_tokens=False)["input_ids"])
    assert cost.max_new_tokens == 24 and cost.count_tokens("Action: 12") == want
    assert rfr.rollout_cost_of(lambda p, k, key: []) is None


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chunked_rollouts_equal_one_call(tiny_actor, temperature):
    """Real tiny Actor + sampler, greedy and sampled rollouts: one call for all prompts, one call
    per prompt and a byte-bounded plan give the same dataset (prompt buckets differ between the
    plans: padding never leaks; each prompt samples with its own key)."""
    tiny_actor = Actor(tiny_actor.sampler, tiny_actor.tokenizer,
                       dataclasses.replace(tiny_actor.cfg, rollout_temperature=temperature))
    targets = [
        rfr.RolloutTarget(f"0:{i}", "<|im_start|>user\n" + "state 4 ok. " * n, 3 + i)
        for i, n in enumerate((1, 4, 2))
    ]
    key = jax.random.key(0)
    cost = rfr.rollout_cost_of(tiny_actor.sample)

    def build(**kw):
        cfg = rfr.RfRConfig(num_rollouts=2, **kw)
        return rfr.build_dataset([], targets, rfr.RfRState(), tiny_actor.sample, cfg, PCFG, key)

    one, s_one, _ = build(max_cache_gib_per_call=0)
    split, s_split, _ = build(max_rows_per_call=2)
    by_bytes, s_bytes, _ = build(max_cache_gib_per_call=cost.call_bytes(2, 2, 40) / 2**30)
    assert (s_one.rollout_calls, s_split.rollout_calls, s_bytes.rollout_calls) == (1, 3, 2)
    assert len(one) == 6 and all(e.completion for e in one)
    assert split == one and by_bytes == one
    assert s_split.mean_match_rate == s_one.mean_match_rate
