"""Jit-compiled KV-cache sampling for the Flax Qwen3 (see :mod:`sfjax.sampling.sampler`)."""

from sfjax.sampling.constrained import ActionConstraint
from sfjax.sampling.sampler import Sampler, SamplerOutput, SamplingParams

__all__ = ["ActionConstraint", "Sampler", "SamplerOutput", "SamplingParams"]
