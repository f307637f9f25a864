"""The KTO loss (paper §IV-C, eq. 8–13) with TRL ``KTOTrainer`` semantics, as pure functions.

Everything here is pure and jit-able; the trainer (:mod:`sfjax.train.kto`) decides where
``jax.jit`` goes.

Maths (KTO, Ethayarajh et al. 2024; paper eq. 8–11), per example ``i`` with prompt ``x_i`` and
completion ``y_i``::

    r_i = log πθ(y_i|x_i) − log πref(y_i|x_i)                         (implied reward / β)
    z   = max(0, mean_j [log πθ(y'_j|x_j) − log πref(y'_j|x_j)])       (KL reference point, eq. 10)
    desirable:   L_i = λD · (1 − σ(β (r_i − z)))                        (eq. 9, 11)
    undesirable: L_i = λU · (1 − σ(β (z − r_i)))
    loss = mean_i L_i                                                   (eq. 8)

where ``y'_j`` is a completion mismatched with prompt ``x_j`` (the neighbouring example's
completion in the micro-batch) and ``z`` carries no gradient. ``loss_type="apo_zero_unpaired"``
(APO-zero, unpaired) drops ``z``: desirable ``1 − σ(β r_i)``, undesirable ``σ(β r_i)``.
λD and λU come from the class counts (eq. 12–13), see :func:`kto_class_weights`.

Log-probs of a completion are sums over its tokens only (prompt and padding masked), in float32.

Shape legend: ``B`` batch (examples), ``T`` sequence length (prompt + completion + padding),
``V`` vocabulary.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

LossType = Literal["kto", "apo_zero_unpaired"]
LOSS_TYPES: tuple[str, ...] = ("kto", "apo_zero_unpaired")

# TRL's metric names (``KTOTrainer._compute_loss``), logged under ``train/<name>``.
METRIC_NAMES: tuple[str, ...] = (
    "loss",
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def completion_logps(
    logits_BTV: jax.Array, input_ids_BT: jax.Array, completion_mask_BT: jax.Array
) -> jax.Array:
    """Sum of ``log π(y_t | x, y_<t)`` over the completion tokens of each row, in >= float32.

    The logit at position ``t`` predicts the token at ``t + 1``; a token counts when
    ``completion_mask_BT`` is true at its own position, so prompt tokens and padding (mask 0)
    contribute nothing, wherever the padding sits.

    Args:
      logits_BTV: model output for ``input_ids_BT`` (any float dtype; upcast to float32).
      input_ids_BT: prompt + completion token ids.
      completion_mask_BT: 1/True on completion tokens, 0 on prompt tokens and padding.

    Returns:
      ``logps_B``: summed completion log-probabilities, float32 (float64 for float64 logits).
    """
    return target_logps(logits_BTV[:, :-1], input_ids_BT[:, 1:], completion_mask_BT[:, 1:])


def target_logps(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """``sum_t mask[t] · log softmax(logits[t])[targets[t]]`` per row, in >= float32.

    Logits and targets are already aligned (``logits[t]`` predicts ``targets[t]``).
    ``log_softmax`` is never materialised: ``log p = logit[target] − logsumexp(logits)``.
    """
    # At least float32 (bf16 log-probs summed over hundreds of tokens lose the reward signal).
    logits_BTV = logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32))
    target_logits_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    logps_BT = target_logits_BT - jax.nn.logsumexp(logits_BTV, axis=-1)
    return jnp.sum(jnp.where(mask_BT.astype(bool), logps_BT, 0.0), axis=-1)


def kto_class_weights(
    num_desirable: int, num_undesirable: int, ratio: float = 1.0
) -> tuple[float, float]:
    """λD, λU from the class counts (paper eq. 12–13; KTO paper eq. 8 recommendation).

    The class with more examples keeps weight 1 (λU = 1 on a tie) and the other weight is set so
    that ``λD·nD / (λU·nU) == ratio``, with ``ratio`` inside the KTO paper's range ``[1, 4/3]``
    (``ratio > 1`` leans towards the desirable examples, as the KTO paper advises).
    If one class is absent there is nothing to balance and ``(1.0, 1.0)`` is returned.

    Args:
      num_desirable: ``nD``, number of desirable examples.
      num_undesirable: ``nU``, number of undesirable examples.
      ratio: target ``λD·nD / (λU·nU)``, in ``[1, 4/3]``.

    Returns:
      ``(desirable_weight, undesirable_weight)`` as Python floats.
    """
    if num_desirable < 0 or num_undesirable < 0:
        raise ValueError(f"class counts must be >= 0, got {num_desirable}, {num_undesirable}")
    if not 1.0 <= ratio <= 4.0 / 3.0 + 1e-12:
        raise ValueError(f"ratio must lie in [1, 4/3] (KTO paper eq. 8), got {ratio}")
    if num_desirable == 0 or num_undesirable == 0:
        return 1.0, 1.0
    if num_desirable <= num_undesirable:
        return ratio * num_undesirable / num_desirable, 1.0
    return 1.0, num_desirable / (ratio * num_undesirable)


def kto_loss(
    policy_logps: jax.Array,
    reference_logps: jax.Array,
    policy_kl_logps: jax.Array,
    reference_kl_logps: jax.Array,
    desirable: jax.Array,
    *,
    beta: float = 0.1,
    desirable_weight: float | jax.Array = 1.0,
    undesirable_weight: float | jax.Array = 1.0,
    loss_type: LossType = "kto",
    valid: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example KTO losses and TRL's metrics (paper eq. 8–11; module docstring for maths).

    The batch loss is ``mean(per_example_losses)`` (``sum(valid·L)/sum(valid)`` with ``valid``).

    Args:
      policy_logps: ``[B]`` completion log-probs under the policy, ``log πθ(y_i|x_i)``.
      reference_logps: ``[B]`` the same under the reference, ``log πref(y_i|x_i)``.
      policy_kl_logps: ``[B]`` policy log-probs of the mismatched pairs ``(x_i, y'_i)``.
      reference_kl_logps: ``[B]`` reference log-probs of the mismatched pairs. Ignored (may be
        anything of shape ``[B]``) for ``"apo_zero_unpaired"``.
      desirable: ``[B]`` bool, True for desirable (chosen) examples.
      beta: β, the reward scale / sensitivity.
      desirable_weight: λD.
      undesirable_weight: λU.
      loss_type: ``"kto"`` or ``"apo_zero_unpaired"``.
      valid: optional ``[B]`` bool; False rows (padding examples of a short final micro-batch)
        get loss 0 and are left out of ``z`` and of every metric.

    Returns:
      ``(per_example_losses_B, metrics)``. ``metrics`` holds scalars named as TRL logs
      them: ``loss``, ``kl`` (z), ``kl_unclamped`` (the batch mean before the clamp at 0: it
      shows how far below the reference the policy's KL estimate is when ``kl`` reads 0),
      ``rewards/chosen`` and ``rewards/rejected`` (means of
      ``β·r`` per class), ``rewards/margins`` (their difference), ``logps/chosen``,
      ``logps/rejected`` (mean policy log-probs per class), plus ``count/chosen`` and
      ``count/rejected``. A class mean over an empty class is NaN (TRL logs nothing then);
      aggregate across steps with ``nanmean``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    desirable = jnp.asarray(desirable, dtype=bool)
    valid_B = jnp.ones(desirable.shape, bool) if valid is None else jnp.asarray(valid, bool)
    n_valid = jnp.maximum(jnp.sum(valid_B), 1)

    logratios_B = policy_logps - reference_logps
    if loss_type == "kto":
        kl_B = jnp.where(valid_B, policy_kl_logps - reference_kl_logps, 0.0)
        kl_raw = jax.lax.stop_gradient(jnp.sum(kl_B) / n_valid)
        z = jnp.maximum(kl_raw, 0.0)
        chosen_B = 1.0 - jax.nn.sigmoid(beta * (logratios_B - z))
        rejected_B = 1.0 - jax.nn.sigmoid(beta * (z - logratios_B))
    else:
        z = kl_raw = jnp.zeros((), logratios_B.dtype)
        chosen_B = 1.0 - jax.nn.sigmoid(beta * logratios_B)
        rejected_B = jax.nn.sigmoid(beta * logratios_B)

    losses_B = jnp.where(desirable, desirable_weight * chosen_B, undesirable_weight * rejected_B)
    losses_B = jnp.where(valid_B, losses_B, 0.0)

    chosen_mask = desirable & valid_B
    rejected_mask = ~desirable & valid_B
    n_chosen = jnp.sum(chosen_mask)
    n_rejected = jnp.sum(rejected_mask)
    rewards_B = jax.lax.stop_gradient(beta * logratios_B)
    logps_B = jax.lax.stop_gradient(policy_logps)

    def class_mean(x_B, mask_B, n):
        total = jnp.sum(jnp.where(mask_B, x_B, 0.0))
        return jnp.where(n > 0, total / jnp.maximum(n, 1), jnp.nan)

    rewards_chosen = class_mean(rewards_B, chosen_mask, n_chosen)
    rewards_rejected = class_mean(rewards_B, rejected_mask, n_rejected)
    metrics = {
        "loss": jax.lax.stop_gradient(jnp.sum(losses_B) / n_valid),
        "kl": z,
        "kl_unclamped": kl_raw,
        "rewards/chosen": rewards_chosen,
        "rewards/rejected": rewards_rejected,
        "rewards/margins": rewards_chosen - rewards_rejected,
        "logps/chosen": class_mean(logps_B, chosen_mask, n_chosen),
        "logps/rejected": class_mean(logps_B, rejected_mask, n_rejected),
        "count/chosen": n_chosen.astype(logratios_B.dtype),
        "count/rejected": n_rejected.astype(logratios_B.dtype),
    }
    return losses_B, metrics
