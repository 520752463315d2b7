"""PPO's pure tensor functions: KL estimators, reward shaping, GAE, whitening, clipped losses.

Every per-token tensor is [N, T-1], aligned with input_ids[:, 1:] (docs/method.md, conventions); `resp` is the
response mask (1 on response tokens). Positions outside the response hold zeros in every output.
Conventions follow the usual RLHF PPO (Ziegler et al. 2019; TRL's PPOTrainer): the KL penalty is
per token, the score is added at the last response token, variances are unbiased (Bessel).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from amrlhf.losses.reductions import last_response_index, masked_mean


def kl_estimate(logps: Tensor, ref_logps: Tensor, kind: Literal["k1", "k3"] = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled tokens.
    k1 = log pi - log pi_ref (unbiased, can be negative); k3 = (r - 1) - log r with
    r = pi_ref / pi (unbiased, always >= 0, lower variance; Schulman's "approximating KL")."""
    log_ratio = logps - ref_logps
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator '{kind}': use k1 or k3")


def eos_penalised(scores: Tensor, ended: Tensor, penalty: float | None) -> Tensor:
    """Sequence scores [N] less `penalty` where the response has no EOS (ended [N] False); None: unchanged."""
    return scores if penalty is None else scores - penalty * (~ended).to(scores.dtype)


def shape_rewards(scores: Tensor, kl: Tensor, resp: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """r_t = -beta * kl_t on response tokens, plus the sequence score at the last response token.
    -> (rewards [N, T-1], non-score rewards [N, T-1])."""
    m = resp.to(kl.dtype)
    non_score = -beta * kl * m
    rewards = non_score.clone()
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_response_index(resp, empty=0)] += scores.to(rewards.dtype) * (m.sum(-1) > 0)
    return rewards, non_score


def gae(rewards: Tensor, values: Tensor, resp: Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens; V after the last token is 0.
    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns = A + V.
    -> (advantages, returns), both [N, T-1] and zero outside the response."""
    m = resp.to(values.dtype)
    v = values * m
    r = rewards * m
    adv = torch.zeros_like(v)
    next_adv = torch.zeros_like(v[:, 0])
    next_v = torch.zeros_like(v[:, 0])
    for t in range(v.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_v - v[:, t]
        adv[:, t] = (delta + gamma * lam * next_adv) * m[:, t]
        next_adv, next_v = adv[:, t], v[:, t]
    return adv, (adv + v) * m


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the positions where mask is 1 (unbiased variance);
    zero elsewhere. shift_mean=False keeps the mean (scales only)."""
    m = mask.to(values.dtype)
    n = m.sum()
    mean = (values * m).sum() / n.clamp(min=1)
    var = (((values - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def clipped_surrogate(logps: Tensor, old_logps: Tensor, advantages: Tensor, clip_low: float = 0.2,
                      clip_high: float | None = None) -> tuple[Tensor, Tensor]:
    """Per-token clipped surrogate max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = pi / pi_old;
    clip_high defaults to clip_low (symmetric PPO clipping; a larger one is DAPO's clip-higher).
    -> (per-token loss [N, T-1], ratio r [N, T-1])."""
    ratio = (logps - old_logps).exp()
    high = clip_low if clip_high is None else clip_high
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + high)
    return torch.maximum(unclipped, clipped), ratio


def clip_fractions(ratio: Tensor, advantages: Tensor, mask: Tensor, clip_low: float, clip_high: float
                   ) -> dict[str, Tensor]:
    """TRL GRPO's clip statistics over `mask` (detached): `clip_ratio/low_mean` (r < 1 - clip_low where
    A < 0), `clip_ratio/high_mean` (r > 1 + clip_high where A > 0), `clip_ratio/region_mean` (either)."""
    with torch.no_grad():
        low = (ratio < 1.0 - clip_low) & (advantages < 0)
        high = (ratio > 1.0 + clip_high) & (advantages > 0)
        f = ratio.dtype
        return {"clip_ratio/low_mean": masked_mean(low.to(f), mask), "clip_ratio/high_mean": masked_mean(high.to(f), mask),
                "clip_ratio/region_mean": masked_mean((low | high).to(f), mask)}


def policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate: mean over mask of max(-A r, -A clip(r, 1-eps, 1+eps)), r = pi / pi_old.
    -> (loss, {policy/approxkl, policy/clipfrac, val/ratio}) (stats detached)."""
    per_token, ratio = clipped_surrogate(logps, old_logps, advantages, clip)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        log_ratio = logps - old_logps
        clipped = per_token > -advantages * ratio
        stats = {"policy/approxkl": masked_mean(0.5 * log_ratio ** 2, mask),
                 "policy/clipfrac": masked_mean(clipped.to(logps.dtype), mask),
                 "val/ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """0.5 * mean over mask of max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, +-eps).
    -> (loss, {val/clipfrac})."""
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"val/clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask)}
    return loss, stats
