"""KTO data pipeline (KL pairing, bucketing) and the jitted KTO trainer on a tiny Qwen3."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfjax.losses.kto import completion_logps
from sfjax.models import lora, qwen3
from sfjax.tokenizer import load_tokenizer
from sfjax.train import KTOConfig, KTOExample, KTOTrainer
from sfjax.train.data import (
    TokenizedExample,
    collate_step,
    default_buckets,
    fixed_kl_partners,
    kl_pairing,
    plan_steps,
    tokenize_examples,
)
from sfjax.train.kto import make_train_step, sequence_logps
from sfjax.train.step import shared_prompt_logps

IDS = np.array([[5, 17, 300, 42, 9, 811, 77, 3], [820, 820, 12, 64, 128, 256, 600, 1]])
MASK = np.array([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]])


# ------------------------------------------------------------------------------ KL pairing
@pytest.mark.parametrize("n", range(2, 17))
def test_kl_pairing_is_a_true_mismatch_for_every_batch_size(n):
    prompts = [(i, i + 1) for i in range(n)]
    src = kl_pairing(prompts)
    assert sorted(src.tolist()) == list(range(n))  # every completion used exactly once
    assert all(src[i] != i for i in range(n))  # nobody gets its own completion
    np.testing.assert_array_equal(src, np.roll(np.arange(n), 1))  # TRL's roll by one

    # RfR-style data: rollouts of the same prompt sit next to each other.
    if n >= 4:
        dup = [(i // 2,) for i in range(n)]
        src = kl_pairing(dup)
        assert all(dup[i] != dup[src[i]] for i in range(n))
        assert sorted(src.tolist()) == list(range(n))


def test_kl_pairing_errors_and_degenerate_batches():
    with pytest.raises(ValueError, match="at least 2 examples"):
        kl_pairing([(1, 2)])
    with pytest.warns(UserWarning, match="identical"):
        src = kl_pairing([(7,)] * 3)
    assert all(src[i] != i for i in range(3))
    with pytest.raises(ValueError, match="micro_batch_size >= 2"):
        KTOConfig(micro_batch_size=1)
    KTOConfig(micro_batch_size=1, loss_type="apo_zero_unpaired")  # no KL term: fine


def test_plan_and_collate_layout():
    exs = [
        TokenizedExample(tuple(range(10, 10 + p)), tuple(range(100, 100 + c)), d)
        for p, c, d in [(3, 2, True), (5, 1, False), (2, 4, True), (4, 3, False), (6, 2, True)]
    ]
    order = np.arange(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps = plan_steps(order, 3, 2, need_pairs=True)  # 3 + 2
    assert [[len(m) for m in s] for s in steps] == [[3, 2]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user cannot act on it: no warning, a debug line
        steps = plan_steps(order, 2, 2, need_pairs=True)  # 2 + 2 + 1: nothing to borrow from
        assert [[len(m) for m in s] for s in steps] == [[2, 2]]
        # 4 + 1: the lone one borrows a partner from the micro-batch before it (3 + 2)
        steps = plan_steps(np.arange(9), 4, 1, need_pairs=True)
    assert [[list(m) for m in s] for s in steps] == [[[0, 1, 2, 3]], [[4, 5, 6]], [[7, 8]]]
    steps = plan_steps(order, 2, 2, need_pairs=False)  # no KL term: keep it
    assert [[len(m) for m in s] for s in steps] == [[2, 2], [1]]

    steps = plan_steps(np.arange(4), 2, 3, need_pairs=True)
    batch = collate_step(exs, steps[0], micro_batch_size=2, grad_accum_steps=3,
                         prompt_buckets=(4, 8), completion_buckets=(2, 4),
                         pad_token_id=0, with_kl=True)  # fmt: skip
    assert batch.prompt_ids_ABP.shape == (3, 2, 8)  # longest prompt 5 -> bucket 8
    assert batch.completion_ids_ABC.shape == (3, 2, 4)  # longest completion 4 -> bucket 4
    assert batch.valid_AB.tolist() == [[True, True], [True, True], [False, False]]
    assert batch.desirable_AB[:2].tolist() == [[True, False], [True, False]]
    # row (0, 0): prompt 0 left-padded, completion 0 right-padded; KL: completion of row (0, 1)
    ids, mask, comp = batch.full_rows()
    np.testing.assert_array_equal(ids[0, 0], [0, 0, 0, 0, 0, 10, 11, 12, 100, 101, 0, 0])
    assert mask[0, 0].tolist() == [0] * 5 + [1] * 5 + [0] * 2
    assert comp[0, 0].tolist() == [0] * 8 + [1, 1, 0, 0]
    kl_ids, _, kl_comp = batch.full_rows(kl=True)
    np.testing.assert_array_equal(kl_ids[0, 0], [0, 0, 0, 0, 0, 10, 11, 12, 100, 0, 0, 0])
    assert kl_comp[0, 0].tolist() == [0] * 8 + [1, 0, 0, 0]
    np.testing.assert_array_equal(kl_ids[0, 1, 8:], [100, 101, 0, 0])  # row 1 gets row 0's
    assert not batch.prompt_mask_ABP[2].any() and not batch.completion_mask_ABC[2].any()
    assert default_buckets(300) == (32, 64, 128, 256, 300)


def test_tokenize_truncates_and_appends_eos(tiny_checkpoint, caplog):
    tok = load_tokenizer(tiny_checkpoint)
    exs = [KTOExample("Action:", " 1", True), KTOExample(list(range(50)), [5, 6, 7, 8], False)]
    with caplog.at_level("WARNING", logger="sfjax.train.data"):
        out = tokenize_examples(exs, tok, max_prompt_length=10, max_completion_length=3)
    # the cut is said, with counts (the eos makes the second completion 5 tokens)
    assert [r.getMessage() for r in caplog.records] == [
        "1 of 2 prompts are longer than max_prompt_length 10 (longest 50 tokens) and lose their "
        "start; raise max_prompt_length to train on what the model saw",
        "1 of 2 completions are longer than max_completion_length 3 (longest 5 tokens) and lose "
        "their end; raise max_completion_length to train on what the model saw"]
    assert out[0].completion_ids[-1] == tok.eos_token_id
    assert tok.decode(list(out[0].prompt_ids) + list(out[0].completion_ids[:-1])) == "Action: 1"
    assert out[1].prompt_ids == tuple(range(40, 50))  # keeps the end of the prompt
    assert out[1].completion_ids == (5, 6, 7)  # keeps the start of the completion
    assert out[1].desirable is False
    caplog.clear()  # a cut text completion also says it may have re-tokenized longer
    with caplog.at_level("WARNING", logger="sfjax.train.data"):
        tokenize_examples([KTOExample("Action:", " 1 2 3 4 5 6", True)], tok,
                          max_prompt_length=10, max_completion_length=3)  # fmt: skip
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith("1 of 1 completions are longer than max_completion_length 3")
    assert msg.endswith("read the completions before raising the limit)")
    with pytest.raises(TypeError, match="both"):
        tokenize_examples([KTOExample("a", [1], True)], tok, max_prompt_length=4,
                          max_completion_length=4)  # fmt: skip


def test_sequence_logps_equals_full_logits_path(tiny_checkpoint):
    """LM head on completion positions only == completion_logps over the full logits."""
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    lora.apply_lora(model, lora.LoRAConfig(rank=4))
    exs = [
        TokenizedExample((5, 6, 7), (8, 9), True),
        TokenizedExample((11,), (12, 13, 14, 15), False),
        TokenizedExample((), (16, 17, 18), True),  # empty prompt: first token unscored
        TokenizedExample(tuple(range(20, 29)), (30,), False),
    ]
    batch = collate_step(exs, [np.arange(4)], micro_batch_size=4, grad_accum_steps=1,
                         prompt_buckets=(16,), completion_buckets=(8,), pad_token_id=0,
                         with_kl=False)  # fmt: skip
    got = sequence_logps(model, batch.prompt_ids_ABP[0], batch.prompt_mask_ABP[0],
                         batch.completion_ids_ABC[0], batch.completion_mask_ABC[0])  # fmt: skip
    ids, mask, comp = (x[0].copy() for x in batch.full_rows())
    comp[2, 16] = False  # the empty prompt's first completion token has no predecessor
    want = completion_logps(model(ids, attention_mask=mask), ids, comp)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # sharing the prompt pass (KV cache) between two completions gives the same values
    other = (
        np.roll(batch.completion_ids_ABC[0], 1, axis=0),
        np.roll(batch.completion_mask_ABC[0], 1, axis=0),
    )
    shared = shared_prompt_logps(model, batch.prompt_ids_ABP[0], batch.prompt_mask_ABP[0],
                                 [(batch.completion_ids_ABC[0], batch.completion_mask_ABC[0]), other])  # fmt: skip
    np.testing.assert_allclose(np.asarray(shared[0]), np.asarray(got), rtol=1e-5, atol=1e-5)
    separate = sequence_logps(model, batch.prompt_ids_ABP[0], batch.prompt_mask_ABP[0], *other)
    np.testing.assert_allclose(np.asarray(shared[1]), np.asarray(separate), rtol=1e-5, atol=1e-5)
    # and each row alone, unpadded, gives the same log-prob
    for i, e in enumerate(exs[:2] + exs[3:]):
        row = np.array([e.prompt_ids + e.completion_ids])
        cm = np.array([[0] * len(e.prompt_ids) + [1] * len(e.completion_ids)])
        alone = completion_logps(model(row), row, cm)
        np.testing.assert_allclose(float(alone[0]), float(got[[0, 1, 3][i]]), rtol=1e-5)


# ------------------------------------------------------------------------------ trainer
def _dataset():
    exs = []
    for i in range(24):
        good = i % 3 != 0
        completion = " 12 PRBs" if good else " 3 PRBs"
        exs.append(KTOExample(f"state {i}: queue {7 * i % 50} Action:", completion, good))
    return exs


class RecordingWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), int(step)))


def _trainer(tiny_checkpoint, lora_dropout=0.0, **overrides):
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    cfg = dict(beta=0.5, epochs=4, micro_batch_size=4, learning_rate=1e-2, warmup_ratio=0.0,
               max_prompt_length=32, max_completion_length=8, progress=False)  # fmt: skip
    cfg.update(overrides)
    trainer = KTOTrainer(model, load_tokenizer(tiny_checkpoint), KTOConfig(**cfg),
                         lora_config=lora.LoRAConfig(rank=8, alpha=16, dropout=lora_dropout))  # fmt: skip
    return model, trainer


def test_kto_training_moves_margins_and_keeps_reference(tiny_checkpoint, tmp_path):
    base = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    base_logits = np.asarray(base(IDS, attention_mask=MASK))
    make_train_step.cache_clear()  # count this test's compilations only
    model, trainer = _trainer(tiny_checkpoint)
    exs = _dataset()
    desirable = np.array([e.desirable for e in exs])
    policy0, ref0 = trainer.completion_logps(exs)
    np.testing.assert_array_equal(policy0, ref0)  # B = 0 at start

    writer = RecordingWriter()
    history = trainer.train(exs, jax.random.key(0), writer=writer)
    assert len(history) == 4 * 6 and history[-1]["step"] == 24
    assert trainer.trace_count == 1  # one bucket -> one compilation for 24 steps
    assert trainer.skipped_steps == 0

    policy1, ref1 = trainer.completion_logps(exs)
    np.testing.assert_array_equal(ref1, ref0)  # reference untouched
    margin = policy1 - ref1
    # Measured on this setup: desirable ≈ +6, undesirable ≈ -1.7 nats.
    assert margin[desirable].mean() > 2.0 and margin[desirable].min() > 0.5
    assert margin[~desirable].mean() < -0.5 and margin[~desirable].max() < 0.0

    # Adapter-off logits stay bit-identical to the untouched base model.
    with lora.adapters_disabled(model):
        off = np.asarray(model(IDS, attention_mask=MASK))
    np.testing.assert_array_equal(off, base_logits)
    assert np.abs(np.asarray(model(IDS, attention_mask=MASK)) - base_logits).max() > 1e-3

    tags = {t for t, _, _ in writer.scalars}
    for name in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                 "logps/chosen", "logps/rejected", "learning_rate", "grad_norm"):  # fmt: skip
        assert f"train/{name}" in tags, name
    margins = [e.get("rewards/margins", np.nan) for e in history]  # absent: one-class batch
    assert np.nanmean(margins[-6:]) > np.nanmean(margins[:6]) + 0.5
    assert history[-1]["loss"] < history[0]["loss"]
    lrs = [e["learning_rate"] for e in history]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] < lrs[0] / 10  # linear decay

    # PEFT export of the trained adapter round-trips into a fresh model.
    trainer.save_adapter(tmp_path / "adapter")
    fresh = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    lora.load_adapter(fresh, tmp_path / "adapter")
    np.testing.assert_array_equal(
        np.asarray(fresh(IDS, attention_mask=MASK)), np.asarray(model(IDS, attention_mask=MASK))
    )


def test_training_is_deterministic_and_state_roundtrips(tiny_checkpoint):
    """Same key -> same run, LoRA dropout included; another key -> other dropout masks."""
    exs = _dataset()[:12]
    kw = dict(epochs=1, grad_accum_steps=2, micro_batch_size=3, lr_schedule="cosine",
              lora_dropout=0.3, shuffle=False)  # fmt: skip
    m1, t1 = _trainer(tiny_checkpoint, **kw)
    m2, t2 = _trainer(tiny_checkpoint, **kw)
    m4, t4 = _trainer(tiny_checkpoint, **kw)
    h1 = t1.train(exs, jax.random.key(3))
    h2 = t2.train(exs, jax.random.key(3))
    t4.train(exs, jax.random.key(4))
    assert h1 == h2 and len(h1) == 2
    for a, b in zip(jax.tree.leaves(lora.lora_state(m1)), jax.tree.leaves(lora.lora_state(m2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    leaves1, leaves4 = jax.tree.leaves(lora.lora_state(m1)), jax.tree.leaves(lora.lora_state(m4))
    assert any(not np.array_equal(a, b) for a, b in zip(leaves1, leaves4))
    # dropout is off outside training: evaluation is deterministic
    p_a, _ = t1.completion_logps(exs)
    p_b, _ = t1.completion_logps(exs)
    np.testing.assert_array_equal(p_a, p_b)

    sd = t1.state_dict()
    m3, t3 = _trainer(tiny_checkpoint, **kw)
    t3.load_state_dict(jax.tree.map(np.asarray, sd))
    assert t3.step == 2
    for a, b in zip(jax.tree.leaves(lora.lora_state(m1)), jax.tree.leaves(lora.lora_state(m3))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(sd["opt_state"]), jax.tree.leaves(t3.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert t3.train(exs, jax.random.key(3), resume=True) == []  # nothing left to do


def _assert_same_training(tiny_checkpoint, variants, lora_atol=1e-5):
    """One epoch on 8 examples per keyword-set in ``variants``: the same metrics and LoRA."""
    runs = []
    for kw in variants:
        model, trainer = _trainer(tiny_checkpoint, epochs=1, **kw)
        history = trainer.train(_dataset()[:8], jax.random.key(5))
        runs.append((history, jax.tree.leaves(lora.lora_state(model))))
    (h1, l1), (h2, l2) = runs
    for name in ("loss", "kl", "rewards/chosen", "grad_norm"):
        np.testing.assert_allclose(h1[-1][name], h2[-1][name], rtol=1e-4, atol=1e-6, err_msg=name)
    for a, b in zip(l1, l2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=lora_atol)


def test_shared_prompt_pass_gives_the_same_training(tiny_checkpoint):
    _assert_same_training(
        tiny_checkpoint, [dict(share_prompt_forward=True), dict(share_prompt_forward=False)]
    )


def test_remat_with_lora_dropout_gives_the_same_training(tiny_checkpoint):
    """Rematerialised layers draw the same dropout masks as the plain path (the RNG state is
    threaded out of jax.checkpoint), and the no-gradient copy is never mutated. Recomputation
    reorders float32 sums; AdamW's normalisation turns that into up to ~5e-5 on a LoRA entry
    whose gradient is near zero, hence 2e-4 there (the metrics agree to 1e-4)."""
    _assert_same_training(
        tiny_checkpoint,
        [dict(lora_dropout=0.3, remat=False), dict(lora_dropout=0.3, remat=True)],
        lora_atol=2e-4,
    )


def test_non_finite_updates_are_skipped_and_counted(tiny_checkpoint):
    model, trainer = _trainer(tiny_checkpoint, epochs=1, desirable_weight=1.0,
                              undesirable_weight=1.0)  # fmt: skip
    # NaN class weights make every loss non-finite; KTOConfig refuses them, so they are set
    # behind its back (the guard under test is for NaNs a run meets, not ones it is given)
    for name in ("desirable_weight", "undesirable_weight"):
        object.__setattr__(trainer.config, name, float("nan"))
    before = [np.asarray(x) for x in jax.tree.leaves(lora.lora_state(model))]
    history = trainer.train(_dataset()[:8], jax.random.key(0))
    assert trainer.skipped_steps == 2 and history[-1]["skipped_steps"] == 2
    after = [np.asarray(x) for x in jax.tree.leaves(lora.lora_state(model))]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_apo_zero_unpaired_trains_without_kl_rows(tiny_checkpoint, tmp_path):
    model, trainer = _trainer(tiny_checkpoint, loss_type="apo_zero_unpaired", epochs=2,
                              micro_batch_size=1, grad_accum_steps=4)  # fmt: skip
    exs = _dataset()[:8]
    history = trainer.train(exs, jax.random.key(1), writer=tmp_path / "tb")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # a real TensorBoard file
    assert all(e["kl"] == 0.0 for e in history)
    policy, ref = trainer.completion_logps(exs)
    desirable = np.array([e.desirable for e in exs])
    assert (policy - ref)[desirable].mean() > (policy - ref)[~desirable].mean() + 0.5


def test_too_few_examples_is_a_clear_error(tiny_checkpoint):
    _, trainer = _trainer(tiny_checkpoint)
    with pytest.raises(ValueError, match="at least 2"):
        trainer.train(_dataset()[:1], jax.random.key(0))
    # fewer examples than micro_batch_size is fine: one short micro-batch, filler rows masked
    history = trainer.train(_dataset()[:3], jax.random.key(0))
    assert len(history) == 4 and all(np.isfinite(e["loss"]) for e in history)
    assert history[0]["count/chosen"] + history[0]["count/rejected"] == 3


def test_precomputed_reference_gives_the_same_training(tiny_checkpoint):
    """precompute_ref_log_probs (TRL semantics) == reference forward in every step, when the
    KL pairs coincide (no shuffling); the table is computed once and reused across calls."""
    exs = _dataset()[:12]
    runs = []
    for pre in (False, True):
        model, trainer = _trainer(tiny_checkpoint, epochs=2, shuffle=False,
                                  precompute_ref_log_probs=pre)  # fmt: skip
        history = trainer.train(exs, jax.random.key(5))
        runs.append((history, jax.tree.leaves(lora.lora_state(model)), trainer))
    (h1, l1, _), (h2, l2, trainer) = runs
    assert len(h1) == len(h2) == 6
    for a, b in zip(h1, h2):
        for name in ("loss", "kl", "rewards/chosen", "rewards/rejected", "grad_norm"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)
    for a, b in zip(l1, l2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # the table holds the adapter-off log-probs of each example's matched completion
    table = trainer._ref_table
    _, ref = trainer.completion_logps(exs)
    np.testing.assert_allclose(table[1], ref, rtol=1e-5, atol=1e-4)
    trainer.train(exs, jax.random.key(6))  # same examples: the cached table is reused
    assert trainer._ref_table is table
    # shuffled epochs keep each example's KL partner fixed (TRL): training still works
    _, shuffled = _trainer(tiny_checkpoint, epochs=2, precompute_ref_log_probs=True)
    assert all(np.isfinite(e["loss"]) for e in shuffled.train(exs, jax.random.key(1)))


def test_reference_lora_is_a_reference_with_its_own_adapters(tiny_checkpoint):
    """reference_lora: πref = the model with those adapters (e.g. the previous SF iterate), not
    the adapters off; the table holds their log-probs, training starts at zero reward, the
    model keeps its own adapters; None goes back to adapters off."""
    exs = _dataset()[:12]
    model, trainer = _trainer(tiny_checkpoint, epochs=1, shuffle=False,
                              precompute_ref_log_probs=True)  # fmt: skip
    trainer.train(exs, jax.random.key(0))  # an iterate with nonzero adapters
    iterate = nnx.state(model, nnx.LoRAParam)
    pol, off = trainer.completion_logps(exs)
    assert np.abs(pol - off).max() > 0.1  # the iterate differs from the adapters-off model
    trainer.reference_lora = iterate
    assert trainer._ref_table is None  # another reference: the cached table is dropped
    history = trainer.train(exs, jax.random.key(1))
    np.testing.assert_allclose(trainer._ref_table[1], pol, rtol=1e-5, atol=1e-4)
    # the first step's policy is the reference: its rewards are zero (they were not before)
    np.testing.assert_allclose(history[0]["rewards/chosen"], 0.0, atol=1e-4)
    np.testing.assert_allclose(history[0]["rewards/rejected"], 0.0, atol=1e-4)
    moved, _ = trainer.completion_logps(exs)  # trained on from the iterate, not from its copy
    assert np.abs(moved - pol).max() > 1e-3
    trainer.reference_lora = None
    trainer.train(exs, jax.random.key(2))
    _, off_now = trainer.completion_logps(exs)
    np.testing.assert_allclose(trainer._ref_table[1], off_now, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(off_now, off, rtol=1e-5, atol=1e-4)  # base untouched


    # in the step (no table): the same training as the table's, shuffle off (same KL partners)
    tabled_model, tabled = _trainer(tiny_checkpoint, epochs=1, shuffle=False,
                                    precompute_ref_log_probs=True)  # fmt: skip
    in_step_model, in_step = _trainer(tiny_checkpoint, epochs=1, shuffle=False)
    for t in (tabled, in_step):
        t.reference_lora = iterate
    h_tabled = tabled.train(exs, jax.random.key(1))
    h_in_step = in_step.train(exs, jax.random.key(1))
    assert len(h_in_step) == len(h_tabled) == 3
    for e_in_step, e_tabled in zip(h_in_step, h_tabled):
        for name in ("loss", "kl", "rewards/chosen", "rewards/rejected", "grad_norm"):
            np.testing.assert_allclose(e_in_step[name], e_tabled[name], rtol=1e-4, atol=1e-6,
                                       err_msg=name)  # fmt: skip
    # The two reference passes sum float32 log-probs in another order (~1e-6); AdamW's
    # normalisation turns that into up to ~7e-5 on a LoRA entry at lr 1e-2 (as the remat test).
    for a, b in zip(jax.tree.leaves(lora.lora_state(in_step_model)),
                    jax.tree.leaves(lora.lora_state(tabled_model))):  # fmt: skip
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4)


def test_reference_lora_travels_with_the_state_dict(tiny_checkpoint):
    """A state dict written with a reference_lora restores it (copied, not the model's own
    adapters), so the restored trainer trains on as the original; one written without it
    restores πref = adapters off."""
    exs = _dataset()[:8]
    model, trainer = _trainer(tiny_checkpoint, epochs=1, shuffle=False)
    trainer.train(exs, jax.random.key(0))
    iterate = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    trainer.train(exs, jax.random.key(1))  # the model's adapters move past the iterate
    trainer.reference_lora = iterate
    sd = jax.tree.map(np.asarray, trainer.state_dict())
    assert "reference_lora" in sd

    _, restored = _trainer(tiny_checkpoint, epochs=1, shuffle=False)
    restored.load_state_dict(sd)
    for a, b in zip(jax.tree.leaves(restored.reference_lora), jax.tree.leaves(iterate)):
        np.testing.assert_array_equal(np.asarray(a), b)
    for a, b in zip(jax.tree.leaves(lora.lora_state(restored.model)),
                    jax.tree.leaves(lora.lora_state(model))):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # its own, not the reference
    h_original = trainer.train(exs, jax.random.key(2))
    h_restored = restored.train(exs, jax.random.key(2))
    for a, b in zip(h_original, h_restored):
        for name in ("loss", "kl", "rewards/chosen", "rewards/rejected"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-7, err_msg=name)

    restored.load_state_dict({k: v for k, v in sd.items() if k != "reference_lora"})
    assert restored.reference_lora is None
    trainer.reference_lora = None
    assert "reference_lora" not in trainer.state_dict()


def test_fixed_kl_partners():
    exs = [TokenizedExample((i % 3,), (100 + i,), True) for i in range(7)]
    partner = fixed_kl_partners(exs, 3)  # groups [0,1,2] [3,4,5,6] (the lone 6 joins)
    assert all(exs[i].prompt_ids != exs[partner[i]].prompt_ids for i in range(7))
    assert sorted(partner[:3].tolist()) == [0, 1, 2] and sorted(partner[3:].tolist()) == [3, 4, 5, 6]  # fmt: skip
    batch = collate_step(exs, [np.arange(3)], micro_batch_size=3, grad_accum_steps=1,
                         prompt_buckets=(4,), completion_buckets=(4,), pad_token_id=0,
                         with_kl=True, kl_partner=partner)  # fmt: skip
    assert batch.kl_completion_ids_ABC[0, :, 0].tolist() == [100 + int(j) for j in partner[:3]]


def test_fixed_kl_partners_mismatch_rfr_rollout_blocks():
    """RfR datasets (paper IV-C) hold K consecutive rollouts of one prompt after the base
    examples; when a block fills a whole group, no roll within it is a mismatch, so its KL
    partners come from the rest of the dataset: z (KTO eq. 10) is estimated from mismatched
    pairs, not from the matched KL of the rollouts' own prompt."""
    K = B = 4
    base = [TokenizedExample((i,), (100 + i,), True) for i in range(8)]  # 2 whole groups
    rollouts = [TokenizedExample((50 + t,), (200 + 10 * t + r,), r == 0)
                for t in range(3) for r in range(K)]  # fmt: skip
    exs = base + rollouts
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dataset with other prompts needs no fallback warning
        partner = fixed_kl_partners(exs, B)
    assert all(exs[i].prompt_ids != exs[partner[i]].prompt_ids for i in range(len(exs)))
    assert all(partner[i] != i for i in range(len(exs)))
    for g in range(len(exs) // B):  # several distinct completions per group
        assert len(set(partner[g * B : (g + 1) * B].tolist())) == B
    # the groups that had a mismatching roll keep it (the on-the-fly path's pairs)
    np.testing.assert_array_equal(partner[:B], np.roll(np.arange(B), 1))
    # a dataset of one prompt has no mismatch anywhere: the roll, with the warning
    with pytest.warns(UserWarning, match="identical"):
        same = fixed_kl_partners([TokenizedExample((7,), (i,), True) for i in range(4)], 4)
    np.testing.assert_array_equal(same, np.roll(np.arange(4), 1))


def test_global_step_continues_across_calls_and_restores(tiny_checkpoint):
    exs = _dataset()[:8]
    model, trainer = _trainer(tiny_checkpoint, epochs=1, remat=True, logits_chunk_tokens=5)
    writer = RecordingWriter()
    h1 = trainer.train(exs, jax.random.key(0), writer=writer)
    h2 = trainer.train(exs, jax.random.key(1), writer=writer)
    assert [e["step"] for e in h1 + h2] == [1, 2, 1, 2]  # per call (schedule, resume)
    assert [e["global_step"] for e in h1 + h2] == [1, 2, 3, 4]
    assert sorted({s for t, _, s in writer.scalars if t == "train/loss"}) == [1, 2, 3, 4]
    sd = trainer.state_dict()
    assert sd["global_step"] == 4
    _, t2 = _trainer(tiny_checkpoint, epochs=1)
    t2.load_state_dict(jax.tree.map(np.asarray, sd))
    assert t2.global_step == 4
    assert t2.train(exs, jax.random.key(2))[-1]["global_step"] == 6
    old = {k: v for k, v in sd.items() if k != "global_step"}  # a pre-global-step state dict
    t2.load_state_dict(jax.tree.map(np.asarray, old))
    assert t2.global_step == 2
    # remat + a chunked LM head (set above) train like the defaults
    _, plain = _trainer(tiny_checkpoint, epochs=1)
    hp = plain.train(exs, jax.random.key(0))
    for a, b in zip(h1, hp):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-3, atol=1e-6)


def test_progress_bar_shows_running_margin_and_raw_kl(tiny_checkpoint, monkeypatch):
    import sfjax.train.kto as kto_mod

    class Bar:
        n = 0
        postfixes: list = []

        def update(self, k):
            self.n += k

        def set_postfix(self, d, refresh=True):
            self.postfixes.append(dict(d))

        def close(self):
            pass

    bar = Bar()
    monkeypatch.setattr(kto_mod, "progress_bar", lambda *a, **k: bar)
    # micro-batches of 2 in dataset order: some logged steps hold one class only
    _, trainer = _trainer(tiny_checkpoint, epochs=1, micro_batch_size=2, shuffle=False)
    history = trainer.train(_dataset()[:8], jax.random.key(0))
    assert any(np.isnan(h.get("rewards/margins", np.nan)) for h in history)
    assert all(h["kl"] == max(h["kl_unclamped"], 0.0) for h in history)
    last = bar.postfixes[-1]
    assert set(last) == {"loss", "margin", "kl", "kl_raw"}
    assert all("n/a" not in v and v != "-" for v in last.values()), last
