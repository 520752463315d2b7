"""The only place that loads models and tokenizers (hub id, local folder, gguf file, `local:` id)."""

from amrlhf.models.loading import (
    LoraSpec,
    ModelSpec,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve_model,
)

__all__ = ["LoraSpec", "ModelSpec", "load_causal_lm", "load_reward_model", "load_tokenizer", "resolve_model"]
