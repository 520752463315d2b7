"""How per-token policy losses become one scalar (chosen by class_path): the choice that separates
GRPO, DAPO and Dr. GRPO as much as their advantages do.

    aggregation.reduce(per_token [N, T-1], mask [N, T-1], max_len) -> scalar

`mask` is the loss mask (response tokens, times the adaptive mask m_t for AM variants, without
truncated responses when they are masked); `max_len` is the sampling budget (max_new_tokens).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from amrlhf.errors import ConfigError


@runtime_checkable
class LossAggregation(Protocol):
    def reduce(self, per_token: Tensor, mask: Tensor, max_len: int) -> Tensor:
        ...


class TokenMean:
    """DAPO's token-level mean (Yu et al. 2025): sum over every masked token of the mini-batch / their
    number; a long response weighs in proportion to its length. That is TRL's `bnpo`; TRL's `dapo`
    divides by the token count of the whole generation batch instead, which is the same when a rollout is
    one mini-batch on one device (with k mini-batches, ours weighs each step's tokens by its own count)."""

    def reduce(self, per_token: Tensor, mask: Tensor, max_len: int) -> Tensor:
        m = mask.to(per_token.dtype)
        return (per_token * m).sum() / m.sum().clamp(min=1)


class SequenceMean:
    """Original GRPO (Shao et al. 2024; TRL's `grpo`): each response's mean over its masked tokens, then
    the mean over responses (a response without masked tokens counts as 0)."""

    def reduce(self, per_token: Tensor, mask: Tensor, max_len: int) -> Tensor:
        m = mask.to(per_token.dtype)
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


class ConstantNormalizer:
    """Dr. GRPO (Liu et al. 2025; TRL's `dr_grpo`): sum over masked tokens / (responses x L), L a
    constant (default: the sampling budget max_new_tokens), so no length bias enters the gradient."""

    def __init__(self, max_tokens: int | None = None):
        if max_tokens is not None and max_tokens < 1:
            raise ConfigError(f"ConstantNormalizer: max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens

    def reduce(self, per_token: Tensor, mask: Tensor, max_len: int) -> Tensor:
        m = mask.to(per_token.dtype)
        return (per_token * m).sum() / (per_token.shape[0] * (self.max_tokens or max_len))
