"""Build the ``local`` Reflector's generation function: checkpoint -> Qwen3 -> sfjax Sampler."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sfjax.agents.reflectors.local import GenerateFn, LocalReflectorConfig


def sampler_generate_fn(cfg: LocalReflectorConfig) -> GenerateFn:
    """Load the Reflector checkpoint once; return ``(conversations, key) -> replies``."""
    from sfjax.models import qwen3
    from sfjax.sampling import Sampler, SamplingParams
    from sfjax.tokenizer import chat_prompt, load_tokenizer

    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}.get(cfg.dtype)
    if dtype is None:
        raise ValueError(f"LocalReflectorConfig.dtype must be bfloat16 or float32, got {cfg.dtype}")
    model = qwen3.from_pretrained(cfg.checkpoint, dtype=dtype)
    tokenizer = load_tokenizer(cfg.checkpoint)
    sampler = Sampler(model, tokenizer, prefix_cache=True)  # the system prompt is prefilled once
    params = SamplingParams(
        temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens
    )

    def generate(conversations: list[list[dict]], key: jax.Array) -> list[str]:
        prompts = [
            chat_prompt(tokenizer, c, enable_thinking=cfg.enable_thinking) for c in conversations
        ]
        return list(sampler.generate(prompts, params, key).texts)

    return generate
