"""Verifiable rewards: programmatic checks of a response, combined into one reward for PPO / GRPO."""

from amrlhf.rewards.checks import (
    ArithmeticAnswerReward,
    ArithmeticStepsReward,
    FunctionReward,
    NumberAnswerReward,
    RegexReward,
)
from amrlhf.rewards.verifiable import RewardComponent, VerifiableReward

__all__ = ["VerifiableReward", "RewardComponent", "NumberAnswerReward", "ArithmeticAnswerReward",
           "ArithmeticStepsReward", "FunctionReward", "RegexReward"]
