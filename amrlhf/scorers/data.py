"""Scores that are not computed here: shipped in the data set, or a PPO rollout's critic values."""

from __future__ import annotations

from amrlhf.errors import AmrlhfError
from amrlhf.models import load_tokenizer
from amrlhf.scorers.base import ScoringContext, TokenScores, check_same_tokenizer


class DatasetScorer:
    """Per-token scores shipped in the rows (`chosen_token_scores`, `rejected_token_scores`; one
    number per response token, the end-of-turn token included). They are only meaningful for the
    tokenizer they were computed with, named here and checked against the policy's.
    `prompt_score` (optional per row) gives s_0."""

    def __init__(self, tokenizer: str):
        self.tokenizer = tokenizer

    def setup(self, ctx: ScoringContext) -> None:
        check_same_tokenizer(self.tokenizer, load_tokenizer(self.tokenizer), ctx.tokenizer)
        if not ctx.rows_have_token_scores:
            raise AmrlhfError("DatasetScorer needs data.init_args.token_scores: true (rows with *_token_scores)")

    def score(self, batch: dict, split: str) -> TokenScores:
        if "token_scores" not in batch:
            raise AmrlhfError("the batch carries no token scores (data.init_args.token_scores: true)")
        return TokenScores(batch["token_scores"], batch.get("prompt_scores"))


class CriticScorer:
    """The rollout's old critic values v_t as token scores (PPO): the batch carries `values` [N, T-1]
    aligned like every per-token tensor, and optionally `prompt_values` [N]."""

    def setup(self, ctx: ScoringContext) -> None:
        return None

    def score(self, batch: dict, split: str) -> TokenScores:
        if "values" not in batch:
            raise AmrlhfError("CriticScorer needs the rollout's critic values in the batch ('values')")
        return TokenScores(batch["values"], batch.get("prompt_values"))
