"""Pure tensor functions: tensors and keyword hyper-parameters in, losses and detached stats out."""

from amrlhf.losses.advantages import GroupRelative, LeaveOneOut, ReinforcePlusPlus
from amrlhf.losses.aggregation import ConstantNormalizer, SequenceMean, TokenMean
from amrlhf.losses.dpo import IPO, DPOLoss, HingeDPO, RobustDPO, SigmoidDPO, dpo_stats
from amrlhf.losses.kl_control import AdaptiveKL, FixedKL, KLController
from amrlhf.losses.logprobs import sequence_logps, token_logprobs
from amrlhf.losses.reductions import masked_mean, masked_sum
from amrlhf.losses.reward import bradley_terry_loss, centring_term, reward_stats, token_label_loss
from amrlhf.losses.sft import nll_sums
from amrlhf.losses.shaping import SoftOverlongPunishment, zero_std_groups

__all__ = [
    "GroupRelative", "LeaveOneOut", "ReinforcePlusPlus", "TokenMean", "SequenceMean", "ConstantNormalizer",
    "SoftOverlongPunishment", "zero_std_groups",
    "AdaptiveKL", "FixedKL", "KLController",
    "DPOLoss", "SigmoidDPO", "IPO", "HingeDPO", "RobustDPO", "dpo_stats",
    "token_logprobs", "sequence_logps", "masked_sum", "masked_mean",
    "bradley_terry_loss", "centring_term", "reward_stats", "token_label_loss", "nll_sums",
]
