"""Critic-free advantage estimators (GRPO, RLOO, REINFORCE++), chosen by class_path.

Every estimator maps one rollout to per-token advantages:

    estimator.estimate(scores [N], non_score [N, T-1], resp [N, T-1], group_size G) -> advantages [N, T-1]

`scores` are the sequence rewards; rows come in groups of G consecutive responses to the same prompt
(group g = rows g*G .. g*G+G-1). `non_score` holds per-token rewards that are not the score (the KL
penalty -beta * KL_t when the KL goes in the reward; zeros otherwise). Advantages are zero outside the
response. PPO's GAE (amrlhf/losses/ppo.py) is the critic-based estimator of the same family.
Variances are unbiased (Bessel), as in torch.std and TRL.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from amrlhf.errors import ConfigError
from amrlhf.losses.ppo import whiten
from amrlhf.losses.reductions import last_response_index


@runtime_checkable
class AdvantageEstimator(Protocol):
    needs_groups: bool  # True: refuses G < 2 (the baseline is the other responses to the same prompt)

    def estimate(self, scores: Tensor, non_score: Tensor, resp: Tensor, group_size: int) -> Tensor:
        ...


def grouped(values: Tensor, group_size: int) -> Tensor:
    """[N] -> [N / G, G] (rows of one prompt together)."""
    if values.shape[0] % group_size:
        raise ValueError(f"{values.shape[0]} responses do not make groups of {group_size}")
    return values.view(-1, group_size)


def sequence_returns(scores: Tensor, non_score: Tensor, resp: Tensor) -> Tensor:
    """R_i = score_i + sum_t non_score_it: the whole response's reward [N] (float32)."""
    return scores.float() + (non_score.float() * resp.to(torch.float32)).sum(-1)


def group_std(values: Tensor, group_size: int) -> Tensor:
    """Each row's group standard deviation (unbiased) [N]; 0 for a group of one."""
    g = grouped(values, group_size)
    std = g.std(-1) if group_size > 1 else torch.zeros_like(g[:, 0])
    return std.repeat_interleave(group_size)


def broadcast(sequence_adv: Tensor, resp: Tensor) -> Tensor:
    """One advantage per response [N] -> the same value at each of its tokens [N, T-1]."""
    return sequence_adv[:, None] * resp.to(sequence_adv.dtype)


class GroupRelative:
    """GRPO (Shao et al. 2024): A_i = (R_i - mean_g R) / (std_g R + eps), the same at every token of
    response i; `scale_by_std: false` keeps R_i - mean_g R (Dr. GRPO's unscaled advantage).
    eps = 1e-4 as in TRL."""

    needs_groups = True

    def __init__(self, scale_by_std: bool = True, eps: float = 1e-4):
        self.scale_by_std, self.eps = scale_by_std, eps

    def estimate(self, scores: Tensor, non_score: Tensor, resp: Tensor, group_size: int) -> Tensor:
        r = sequence_returns(scores, non_score, resp)
        adv = r - grouped(r, group_size).mean(-1).repeat_interleave(group_size)
        if self.scale_by_std:
            adv = adv / (group_std(r, group_size) + self.eps)
        return broadcast(adv, resp)


class LeaveOneOut:
    """RLOO (Ahmadian et al. 2024): A_i = R_i - mean of the other G-1 rewards of its group, the same
    at every token (= G/(G-1) x (R_i - mean_g R))."""

    needs_groups = True

    def estimate(self, scores: Tensor, non_score: Tensor, resp: Tensor, group_size: int) -> Tensor:
        if group_size < 2:
            raise ValueError("leave-one-out needs at least 2 responses per prompt")
        r = sequence_returns(scores, non_score, resp)
        total = grouped(r, group_size).sum(-1).repeat_interleave(group_size)
        return broadcast(r - (total - r) / (group_size - 1), resp)


class ReinforcePlusPlus:
    """REINFORCE++ (Hu 2025): token rewards r_t = non_score_t (the per-token KL penalty) plus the score
    at the last response token, returns-to-go G_t = sum_{t' >= t} gamma^(t'-t) r_t', whitened over every
    response token of the rollout (batch normalisation). `baseline: true` (REINFORCE++-baseline)
    first subtracts the group's mean score from each score."""

    def __init__(self, baseline: bool = True, gamma: float = 1.0):
        if not 0.0 < gamma <= 1.0:
            raise ConfigError(f"ReinforcePlusPlus: gamma must be in (0, 1], got {gamma}")
        self.baseline, self.gamma = baseline, gamma
        self.needs_groups = baseline

    def estimate(self, scores: Tensor, non_score: Tensor, resp: Tensor, group_size: int) -> Tensor:
        s = scores.float()
        if self.baseline:
            s = s - grouped(s, group_size).mean(-1).repeat_interleave(group_size)
        m = resp.to(torch.float32)
        rewards = non_score.float() * m
        rows = torch.arange(s.shape[0], device=s.device)
        rewards[rows, last_response_index(resp, empty=0)] += s * (m.sum(-1) > 0)
        returns = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[:, 0])
        for t in range(rewards.shape[1] - 1, -1, -1):
            running = rewards[:, t] + self.gamma * running * m[:, t]
            returns[:, t] = running * m[:, t]
        return whiten(returns, resp)
