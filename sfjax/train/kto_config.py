"""KTO training hyper-parameters (paper §IV-C, eq. 8–13): :class:`KTOConfig`.

Its own module so that the trainer (:mod:`sfjax.train.kto`) and its jitted step
(:mod:`sfjax.train.step`) both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sfjax.losses.kto import LOSS_TYPES
from sfjax.train.data import default_buckets


@dataclass(frozen=True)
class KTOConfig:
    """KTO training hyper-parameters (defaults follow TRL's KTOConfig / HF Trainer, LoRA lr)."""

    beta: float = 0.1
    """β: scale of the implied reward r = log πθ/πref inside the sigmoid (paper eq. 9–11)."""
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    """"kto" (with the KL reference point z) or "apo_zero_unpaired" (no z, no KL rows)."""
    token_kl_coef: float = 0.0
    """Not in the paper or TRL (0 = off, their loss): add ``token_kl_coef ×`` the summed
    per-token KL divergence ``Σ_t KL(πθ(·|x, y<t) ‖ πref(·|x, y<t))`` over the whole vocabulary
    on each example's own completion prefixes, averaged over the examples like the KTO loss. An
    explicit anchor to the reference on every prompt: KTO's own KL term (z) is a stop-gradient
    batch estimate that holds nothing once it reads 0. Needs the reference forward in the step
    (``precompute_ref_log_probs`` False); the step then runs the LM head twice per completion
    token. The logged ``loss`` includes the term; ``token_kl`` logs the KL itself."""
    desirable_weight: float | None = None
    """λD; None (with undesirable_weight None) = from the class counts (paper eq. 12–13)."""
    undesirable_weight: float | None = None
    """λU; None (with desirable_weight None) = from the class counts (paper eq. 12–13)."""
    class_weight_ratio: float = 1.0
    """Target λD·nD/(λU·nU) in [1, 4/3] when the weights come from the counts."""
    learning_rate: float = 5e-5
    """Peak AdamW learning rate (for LoRA params)."""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup: linear to 0, cosine to 0, or constant."""
    warmup_ratio: float = 0.1
    """Fraction of the optimizer steps of a train() call spent warming up linearly from 0."""
    warmup_steps: int | None = None
    """Warmup steps; overrides warmup_ratio when set."""
    weight_decay: float = 0.0
    """Decoupled AdamW weight decay on the LoRA params."""
    adam_b1: float = 0.9
    """AdamW β1."""
    adam_b2: float = 0.999
    """AdamW β2."""
    adam_eps: float = 1e-8
    """AdamW ε."""
    max_grad_norm: float | None = 1.0
    """Clip the accumulated gradient to this global norm (None: no clipping)."""
    micro_batch_size: int = 4
    """Examples per forward pass; >= 2 for loss_type "kto" (KL pairs come from the batch)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    epochs: int = 1
    """Passes over the dataset per train() call."""
    shuffle: bool = True
    """Shuffle the examples every epoch (deterministically from the train() key)."""
    max_prompt_length: int = 1024
    """Prompts keep their last this-many tokens."""
    max_completion_length: int = 512
    """Completions keep their first this-many tokens."""
    add_eos: bool = True
    """Append the tokenizer's EOS to completions that lack it (as TRL does)."""
    buckets: tuple[int, ...] | None = None
    """Padded prompt lengths (prompts are left-padded to the smallest that fits; one compile
    per (prompt, completion) bucket pair); None = powers of two from 32 to max_prompt_length."""
    completion_buckets: tuple[int, ...] | None = None
    """Padded completion lengths; None = powers of two from 16 to max_completion_length."""
    share_prompt_forward: bool = True
    """Run each prompt once (its keys / values shared as a prefix) for its matched and KL
    completions, in the policy and the reference passes; False runs every (prompt, completion)
    row separately. Same values."""
    precompute_ref_log_probs: bool = False
    """Compute the reference log-probs (adapters off; they never change) once per dataset and
    reuse them every epoch and every train() call on the same examples, instead of a reference
    forward in every step (TRL's ``precompute_ref_log_probs``). As in TRL, each example's KL
    completion is then fixed once (rolled within consecutive groups of micro_batch_size in
    dataset order) rather than re-drawn from its micro-batch every epoch; with shuffle=False the
    two coincide and the losses equal the default path's."""
    remat: bool = False
    """Recompute each decoder layer in the backward pass (activation memory O(layers x tokens x
    hidden) instead of O(layers x attention maps)); for long prompts on large models."""
    logits_chunk_tokens: int = 0
    """Completion tokens per chunk of the LM head + log-softmax (each chunk recomputed in the
    backward pass), so [B, T, V] float32 logits never exist; 0 = automatic (chunks of at most
    64 MiB of logits: one chunk for small vocabularies, ~110 tokens for Qwen3's 151936)."""
    log_every: int = 1
    """Log (TensorBoard + returned history) every this-many optimizer steps."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.loss_type == "kto" and self.micro_batch_size < 2:
            raise ValueError(
                "loss_type='kto' needs micro_batch_size >= 2: the KL reference point z is "
                "estimated from other examples' completions in the same micro-batch (with one "
                "example it would equal the implied reward). Use micro_batch_size >= 2, or "
                "loss_type='apo_zero_unpaired'."
            )
        if not (self.token_kl_coef >= 0.0 and self.token_kl_coef < float("inf")):
            raise ValueError(f"token_kl_coef must be a finite value >= 0, got {self.token_kl_coef}")
        if self.token_kl_coef > 0 and self.precompute_ref_log_probs:
            raise ValueError(
                "token_kl_coef > 0 needs the reference's next-token distributions in every step, "
                "which precompute_ref_log_probs (a table of sequence log-probs) does not keep: "
                "set precompute_ref_log_probs=False, or token_kl_coef=0"
            )
        if self.micro_batch_size < 1 or self.grad_accum_steps < 1 or self.epochs < 1:
            raise ValueError("micro_batch_size, grad_accum_steps and epochs must be >= 1")
        if self.max_prompt_length < 1 or self.max_completion_length < 1:
            raise ValueError("max_prompt_length and max_completion_length must be >= 1")
        for name in ("beta", "learning_rate", "adam_eps"):
            if not 0.0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite value > 0, got {getattr(self, name)}")
        for name in ("desirable_weight", "undesirable_weight", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < float("inf"):
                raise ValueError(f"{name} must be None or a finite value > 0, got {value}")
        if not 1.0 <= self.class_weight_ratio <= 4.0 / 3.0:
            raise ValueError(
                f"class_weight_ratio must be in [1, 4/3] (paper eq. 12-13), "
                f"got {self.class_weight_ratio}"
            )
        for name in ("adam_b1", "adam_b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.weight_decay < float("inf"):
            raise ValueError(f"weight_decay must be a finite value >= 0, got {self.weight_decay}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be None or >= 0, got {self.warmup_steps}")
        if (self.desirable_weight is None) != (self.undesirable_weight is None):
            raise ValueError("set both desirable_weight and undesirable_weight, or neither (auto)")
        if self.lr_schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.log_every < 1:
            raise ValueError("log_every must be >= 1")
        if self.logits_chunk_tokens < 0:
            raise ValueError(
                f"logits_chunk_tokens must be >= 0 (0 = automatic), got {self.logits_chunk_tokens}"
            )
        for name, longest in (("buckets", self.max_prompt_length),
                              ("completion_buckets", self.max_completion_length)):  # fmt: skip
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(sorted(int(b) for b in value))
            object.__setattr__(self, name, value)
            if not value or value[0] < 1 or value[-1] < longest:
                raise ValueError(
                    f"{name}={value}: the largest must be >= {longest} (the longest "
                    f"{'prompt' if name == 'buckets' else 'completion'}); add a bucket of that size"
                )

    @property
    def max_length(self) -> int:
        """Longest possible row: max_prompt_length + max_completion_length."""
        return self.max_prompt_length + self.max_completion_length

    @property
    def prompt_bucket_sizes(self) -> tuple[int, ...]:
        """The padded prompt lengths in use."""
        if self.buckets is not None:
            return self.buckets
        return default_buckets(self.max_prompt_length)

    @property
    def completion_bucket_sizes(self) -> tuple[int, ...]:
        """The padded completion lengths in use."""
        if self.completion_buckets is not None:
            return self.completion_buckets
        return default_buckets(self.max_completion_length, smallest=16)

    @property
    def with_kl(self) -> bool:
        """Whether the loss needs the KL (mismatched) rows."""
        return self.loss_type == "kto"
