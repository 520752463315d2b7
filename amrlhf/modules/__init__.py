"""Thin LightningModules: forward -> segmenter -> pure loss -> log."""

from amrlhf.modules.base import AlignmentModule
from amrlhf.modules.critic import SharedValueHead, ValueModel
from amrlhf.modules.dense import DenseAdvantage
from amrlhf.modules.dpo import DPOModule
from amrlhf.modules.grpo import GRPOModule
from amrlhf.modules.onpolicy import OnPolicyModule
from amrlhf.modules.ppo import PPOModule
from amrlhf.modules.reference import AdapterReference, CachedReference, FrozenReference, ReferenceModel
from amrlhf.modules.rejection import BestOfN
from amrlhf.modules.reward import RewardModule, TokenRewardModule, prefix_scores
from amrlhf.modules.sft import SFTModule

__all__ = ["AlignmentModule", "DPOModule", "PPOModule", "GRPOModule", "OnPolicyModule", "SFTModule", "RewardModule", "TokenRewardModule",
           "prefix_scores",
           "SharedValueHead", "ValueModel", "DenseAdvantage",
           "BestOfN", "FrozenReference", "AdapterReference", "CachedReference", "ReferenceModel"]
