"""kto_loss / completion_logps / kto_class_weights against an independent torch port of TRL.

The reference below re-states TRL 1.16 ``KTOTrainer._compute_loss`` (chosen/rejected split,
``kl = mean(KL_logps − ref_KL_logps).detach().clamp(min=0)``, ``losses.nanmean()``) in torch,
written from the formula, not imported from TRL.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sfjax.losses.kto import completion_logps, kto_class_weights, kto_loss


@pytest.fixture
def x64():
    """Enable float64 for one test and restore the previous setting."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def trl_kto_reference(policy, ref, policy_kl, ref_kl, labels, beta, wd, wu, loss_type):
    """TRL's KTO loss and metrics in torch (float64). Returns (loss, chosen, rejected, metrics)."""
    chosen_idx = torch.nonzero(labels).view(-1)
    rejected_idx = torch.nonzero(~labels).view(-1)
    if loss_type == "kto":
        kl = (policy_kl - ref_kl).mean().detach().clamp(min=0)
    else:
        kl = torch.zeros((), dtype=policy.dtype)
    chosen_ratio = policy[chosen_idx] - ref[chosen_idx]
    rejected_ratio = policy[rejected_idx] - ref[rejected_idx]
    if loss_type == "kto":
        chosen = 1 - F.sigmoid(beta * (chosen_ratio - kl))
        rejected = 1 - F.sigmoid(beta * (kl - rejected_ratio))
    else:
        chosen = 1 - F.sigmoid(beta * chosen_ratio)
        rejected = F.sigmoid(beta * rejected_ratio)
    losses = torch.cat((wd * chosen, wu * rejected), 0)
    loss = losses.nanmean()
    metrics = {"kl": kl.item(), "loss": loss.item()}
    if len(chosen_idx):
        metrics["rewards/chosen"] = (beta * chosen_ratio.detach()).sum().item() / len(chosen_idx)
        metrics["logps/chosen"] = policy[chosen_idx].detach().sum().item() / len(chosen_idx)
    if len(rejected_idx):
        metrics["rewards/rejected"] = (beta * rejected_ratio.detach()).sum().item() / len(
            rejected_idx
        )
        metrics["logps/rejected"] = policy[rejected_idx].detach().sum().item() / len(rejected_idx)
    if len(chosen_idx) and len(rejected_idx):
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, wd * chosen, wu * rejected, metrics


def _random_inputs(rng, batch, kl_shift):
    policy = rng.normal(-30.0, 8.0, batch)
    ref = policy + rng.normal(0.0, 3.0, batch)
    ref_kl = rng.normal(-40.0, 8.0, batch)
    policy_kl = ref_kl + rng.normal(kl_shift, 2.0, batch)
    return policy, ref, policy_kl, ref_kl


CASES = [
    # (batch, kl_shift, label pattern)
    (8, 1.5, "mixed"),
    (8, -1.5, "mixed"),  # negative mean KL: z clamps at 0
    (5, 0.7, "all_desirable"),
    (6, 0.7, "all_undesirable"),
    (2, 3.0, "mixed"),
    (33, 0.2, "mixed"),
]


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("batch,kl_shift,pattern", CASES)
def test_kto_loss_matches_trl_values_and_gradients(x64, loss_type, batch, kl_shift, pattern):
    rng = np.random.default_rng(batch * 100 + int(10 * kl_shift) + len(pattern))
    policy, ref, policy_kl, ref_kl = _random_inputs(rng, batch, kl_shift)
    if pattern == "mixed":
        labels = rng.random(batch) < 0.4
        labels[0], labels[1] = True, False
    else:
        labels = np.full(batch, pattern == "all_desirable")
    beta, wd, wu = 0.3, 1.25, 0.8

    def batch_loss(p, pk):
        losses, metrics = kto_loss(
            p,
            jnp.asarray(ref),
            pk,
            jnp.asarray(ref_kl),
            jnp.asarray(labels),
            beta=beta,
            desirable_weight=wd,
            undesirable_weight=wu,
            loss_type=loss_type,
        )
        return jnp.mean(losses), (losses, metrics)

    (loss, (losses, metrics)), (g_policy, g_kl) = jax.value_and_grad(
        batch_loss, argnums=(0, 1), has_aux=True
    )(jnp.asarray(policy), jnp.asarray(policy_kl))
    assert loss.dtype == jnp.float64

    tp = torch.tensor(policy, requires_grad=True)
    tpk = torch.tensor(policy_kl, requires_grad=True)
    t_loss, t_chosen, t_rejected, t_metrics = trl_kto_reference(
        tp, torch.tensor(ref), tpk, torch.tensor(ref_kl), torch.tensor(labels), beta, wd, wu,
        loss_type,
    )
    t_loss.backward()

    np.testing.assert_allclose(float(loss), t_loss.item(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(losses)[labels], t_chosen.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(losses)[~labels], t_rejected.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_policy), tp.grad.numpy(), rtol=0, atol=1e-6)
    # z is stop-gradient in both: no gradient reaches the KL log-probs.
    assert tpk.grad is None or not tpk.grad.any()
    np.testing.assert_array_equal(np.asarray(g_kl), 0.0)
    # Gradients are not trivially zero, so the comparison above can fail.
    assert np.abs(np.asarray(g_policy)).max() > 1e-4

    for name, value in t_metrics.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-9, atol=1e-6, err_msg=name)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        if name not in t_metrics:  # TRL logs nothing for an empty class
            assert np.isnan(float(metrics[name]))
    assert float(metrics["count/chosen"]) == labels.sum()
    if loss_type == "kto" and kl_shift < 0:
        assert float(metrics["kl"]) == 0.0  # clamped
    if loss_type == "kto" and kl_shift > 1:
        assert float(metrics["kl"]) > 0.0


def test_kto_loss_valid_mask_equals_dropping_rows(x64):
    rng = np.random.default_rng(7)
    policy, ref, policy_kl, ref_kl = _random_inputs(rng, 6, 1.0)
    labels = np.array([True, False, True, True, False, False])
    valid = np.array([True, True, True, True, False, False])
    kw = dict(beta=0.2, desirable_weight=1.1, undesirable_weight=0.9)
    losses_m, metrics_m = kto_loss(policy, ref, policy_kl, ref_kl, labels, valid=valid, **kw)
    losses_d, metrics_d = kto_loss(
        policy[:4], ref[:4], policy_kl[:4], ref_kl[:4], labels[:4], **kw
    )
    np.testing.assert_allclose(np.asarray(losses_m)[:4], np.asarray(losses_d), atol=1e-12)
    np.testing.assert_array_equal(np.asarray(losses_m)[4:], 0.0)
    for name in metrics_d:
        np.testing.assert_allclose(float(metrics_m[name]), float(metrics_d[name]), atol=1e-12)


def test_kto_loss_is_jittable_and_rejects_unknown_type():
    f = jax.jit(lambda *a: kto_loss(*a, beta=0.1))
    losses, metrics = f(*(jnp.zeros(4),) * 4, jnp.array([True, False, True, False]))
    np.testing.assert_allclose(np.asarray(losses), 0.5, atol=1e-7)
    assert float(metrics["kl"]) == 0.0
    with pytest.raises(ValueError, match="loss_type"):
        kto_loss(*(jnp.zeros(2),) * 4, jnp.array([True, False]), loss_type="sigmoid")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_completion_logps_matches_torch_label_masking(x64, padding_side):
    rng = np.random.default_rng(3)
    B, T, V = 4, 11, 17
    logits = rng.normal(0, 3, (B, T, V))
    ids = rng.integers(0, V, (B, T))
    prompt_lens = [3, 1, 5, 2]
    completion_lens = [4, 6, 2, 1]
    completion_mask = np.zeros((B, T), bool)
    for b, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        start = p if padding_side == "right" else T - c
        completion_mask[b, start : start + c] = True
    ours = completion_logps(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(completion_mask))
    assert ours.dtype == jnp.float64

    # TRL's convention: labels = input_ids with -100 off the completion, shifted by one.
    labels = torch.tensor(ids).masked_fill(~torch.tensor(completion_mask), -100)[:, 1:]
    logp = torch.log_softmax(torch.tensor(logits)[:, :-1], dim=-1)
    per_token = torch.gather(logp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = (per_token * (labels != -100)).sum(-1).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-9)


def test_completion_logps_float32_from_bfloat16_logits():
    logits = jnp.ones((2, 5, 7), jnp.bfloat16)
    out = completion_logps(logits, jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 5), bool))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), 4 * -np.log(7.0), rtol=1e-6)


@pytest.mark.parametrize("n_d,n_u", [(10, 30), (30, 10), (1, 1), (7, 8), (100, 3)])
@pytest.mark.parametrize("ratio", [1.0, 1.2, 4.0 / 3.0])
def test_class_weights_hit_the_kto_ratio(n_d, n_u, ratio):
    wd, wu = kto_class_weights(n_d, n_u, ratio)
    assert (wd if n_d > n_u else wu) == 1.0  # the majority class keeps weight 1
    np.testing.assert_allclose(wd * n_d / (wu * n_u), ratio, rtol=1e-12)
    assert 1.0 <= wd * n_d / (wu * n_u) <= 4.0 / 3.0 + 1e-12


def test_class_weights_edge_cases():
    assert kto_class_weights(0, 5) == (1.0, 1.0)
    assert kto_class_weights(5, 0) == (1.0, 1.0)
    with pytest.raises(ValueError, match="ratio"):
        kto_class_weights(3, 4, ratio=1.5)
    with pytest.raises(ValueError, match=">= 0"):
        kto_class_weights(-1, 4)


@pytest.mark.parametrize("kl_shift", [-3.0, 2.0])
def test_kto_loss_logs_the_unclamped_kl_next_to_z(x64, kl_shift):
    rng = np.random.default_rng(3)
    policy, ref, policy_kl, ref_kl = _random_inputs(rng, 6, kl_shift)
    valid = np.array([True, True, True, True, True, False])
    labels = np.array([True, False, True, False, True, True])
    _, metrics = kto_loss(policy, ref, policy_kl, ref_kl, labels, beta=0.1, valid=valid)
    raw = float(np.mean((policy_kl - ref_kl)[valid]))  # plain numpy, no clamp
    np.testing.assert_allclose(float(metrics["kl_unclamped"]), raw, rtol=1e-12)
    np.testing.assert_allclose(float(metrics["kl"]), max(raw, 0.0), rtol=1e-12)
    assert (raw < 0) == (kl_shift < 0)  # both sides of the clamp are exercised
