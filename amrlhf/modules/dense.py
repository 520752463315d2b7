"""DenseAdvantage: the critic-free family's per-token advantage term, read from a token scorer at rollout time
(its math, `token_signal` and `group_normalise`, is pure and lives in amrlhf.losses.dense)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from amrlhf.errors import AmrlhfError, ConfigError
from amrlhf.losses.dense import group_normalise, token_signal
from amrlhf.scorers.base import ScoringContext, TokenScorer


class DenseAdvantage:
    """A_t <- A_t + weight * d_t (or weight * d_t alone with `replace: true`), d the scorer's per-token
    signal normalised over each group's response tokens."""

    def __init__(self, scorer: TokenScorer, signal: Literal["increment", "level"] = "increment",
                 weight: float = 1.0, replace: bool = False):
        if signal not in ("increment", "level"):
            raise ConfigError(f"DenseAdvantage: signal must be increment or level, got {signal!r}")
        self.scorer, self.signal, self.weight, self.replace = scorer, signal, weight, replace

    def setup(self, ctx: ScoringContext) -> None:
        self.scorer.setup(ctx)

    @torch.no_grad()
    def apply(self, batch: dict, advantages: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
        """-> (the new advantages [N, T-1], the normalised dense part)."""
        ts = self.scorer.score(batch, "train")
        resp = batch["response_mask"]
        if ts.scores.shape != resp.shape:
            raise AmrlhfError(f"DenseAdvantage: the scorer gave scores of shape {tuple(ts.scores.shape)} for "
                              f"responses of shape {tuple(resp.shape)}")
        dense = group_normalise(token_signal(ts.scores, ts.prompt_scores, resp, self.signal), resp, group_size)
        dense = self.weight * dense
        return (dense if self.replace else advantages + dense), dense
