"""Thin LightningModules: forward -> segmenter -> pure loss -> log."""

from amrlhf.modules.base import AlignmentModule
from amrlhf.modules.dpo import DPOModule
from amrlhf.modules.reference import AdapterReference, CachedReference, FrozenReference, ReferenceModel
from amrlhf.modules.rejection import BestOfN
from amrlhf.modules.reward import RewardModule, prefix_scores
from amrlhf.modules.sft import SFTModule

__all__ = ["AlignmentModule", "DPOModule", "SFTModule", "RewardModule", "prefix_scores",
           "BestOfN", "FrozenReference", "AdapterReference", "CachedReference", "ReferenceModel"]
