"""Programmatic rewards: exact, model-free token scores, for learning tests and method studies
where the "right" tokens are known (a reward model's would only be estimates)."""

from __future__ import annotations

import torch

from amrlhf.errors import AmrlhfError
from amrlhf.scorers.base import ScoringContext, TokenScores


class TargetTokenReward:
    """s_t = fraction of the response tokens up to and including y_t that are `token`; s_0 = 0.
    The sequence score (s at the last response token) is the target's share of the response, so
    it is in [0, 1]. `token` must be one token of the policy's tokenizer."""

    def __init__(self, token: str):
        self.token = token
        self.token_id: int | None = None

    def setup(self, ctx: ScoringContext) -> None:
        tok = ctx.tokenizer
        ids = tok(self.token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise AmrlhfError(f"TargetTokenReward: '{self.token}' is {len(ids)} tokens for this tokenizer; "
                              "it must be exactly one")
        self.token_id = ids[0]

    @torch.no_grad()
    def score(self, batch: dict, split: str) -> TokenScores:
        resp = batch["response_mask"].float()
        hits = (batch["input_ids"][:, 1:] == self.token_id).float() * resp
        scores = hits.cumsum(-1) / resp.cumsum(-1).clamp(min=1)
        return TokenScores(scores * resp, torch.zeros(resp.shape[0], device=resp.device))
