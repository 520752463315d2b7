"""Token scorers: where the per-token scores a segmenter reads come from."""

from amrlhf.scorers.base import ScoringContext, TokenScorer, TokenScores, check_same_tokenizer
from amrlhf.scorers.cached import CachedScorer
from amrlhf.scorers.data import CriticScorer, DatasetScorer
from amrlhf.scorers.models import (
    ContrastiveScorer,
    FrozenModelScorer,
    ImplicitRewardScorer,
    RewardModelScorer,
    next_token_entropy,
    prefix_scores,
)
from amrlhf.scorers.programmatic import TargetTokenReward
from amrlhf.scorers.steps import ArithmeticStepScorer
from amrlhf.scorers.surprisal import SurprisalScorer

__all__ = ["ScoringContext", "FrozenModelScorer", "TokenScorer", "TokenScores", "check_same_tokenizer", "CachedScorer", "CriticScorer", "DatasetScorer",
           "ImplicitRewardScorer", "RewardModelScorer", "TargetTokenReward", "ArithmeticStepScorer", "SurprisalScorer",
           "next_token_entropy", "ContrastiveScorer", "prefix_scores"]
