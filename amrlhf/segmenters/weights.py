"""Soft token weights beside binary masks: each response token gets a weight in [lo, hi] instead of 0 / 1,
so no token is ever dropped (TIS-DPO, arXiv 2410.04350, weights every token by its estimated importance and
keeps them in a band around 1). The weight is `Segmentation.mask`, a float that every loss already reads
as a per-token factor: DPO's log-ratio sums, SFT's NLL, the on-policy advantages (A_t = w_t A_seq + d_t).

Both read the token scores in the direction of the response's label: on a chosen response (+1) a token the
scorer rates higher weighs more, on a rejected one (-1) a token it rates lower weighs more (the part that
makes the answer worse carries more of the push down).
"""

from __future__ import annotations

import torch
from torch import Tensor

from amrlhf.errors import ConfigError
from amrlhf.segmenters.base import PivotSegmenter, Segmentation, SegmentInputs


def _check_band(name: str, lo: float, hi: float) -> None:
    if not 0 <= lo <= hi:
        raise ConfigError(f"{name}: need 0 <= lo <= hi, got lo={lo}, hi={hi}")


def _soft(weights: Tensor, resp: Tensor, labels: Tensor, fell_back: Tensor) -> Segmentation:
    return Segmentation(mask=weights * resp.float(), sigma=labels.to(torch.long)[:, None] * resp.long(),
                        pivot=torch.zeros_like(resp), segment_id=resp.long(), fell_back=fell_back)


def _keys(scores: Tensor | None, labels: Tensor, name: str) -> Tensor:
    if scores is None:
        raise ConfigError(f"{name} weights tokens by their scores: set model.init_args.scorer")
    return scores.float() * labels.float()[:, None]


class RankWeightSegmenter(PivotSegmenter):
    """TIS-style rank weights: within each response, tokens ranked by label x score (ties share their mean
    rank), rank r of n mapped linearly onto [lo, hi]: w = lo + (hi - lo) r / (n - 1). A response of one
    token gets (lo + hi) / 2. lo = hi = 1 is plain (sample-wise) training, bit for bit."""

    def __init__(self, lo: float = 0.7, hi: float = 1.3):
        _check_band("RankWeightSegmenter", lo, hi)
        self.lo, self.hi = lo, hi

    def segment(self, x: SegmentInputs) -> Segmentation:
        resp, labels = x.response_mask.bool(), x.labels
        keys = _keys(x.scores, labels, "RankWeightSegmenter").masked_fill(~resp, float("inf"))  # others sort last
        ordered = keys.sort(-1).values.contiguous()
        below = torch.searchsorted(ordered, keys.contiguous(), right=False).float()  # response tokens ranked below t
        equal = torch.searchsorted(ordered, keys.contiguous(), right=True).float() - below  # t and its ties
        rank = below + (equal - 1).clamp(min=0) / 2  # O(B T log T) time, O(B T) memory
        n = resp.sum(-1, keepdim=True).float()
        frac = torch.where(n > 1, rank / (n - 1).clamp(min=1), torch.full_like(rank, 0.5))
        weights = self.lo + (self.hi - self.lo) * frac
        return _soft(weights, resp, labels, torch.zeros(resp.shape[0], dtype=torch.bool, device=resp.device))


class LinearWeightSegmenter(PivotSegmenter):
    """Clipped linear weights: w = clip(1 + slope x label x (s_t - mean of s over the response), lo, hi), the
    score's deviation from its own response's mean in score units (a token as good as its answer's average
    keeps weight 1)."""

    def __init__(self, slope: float = 1.0, lo: float = 0.7, hi: float = 1.3):
        _check_band("LinearWeightSegmenter", lo, hi)
        if slope < 0:
            raise ConfigError(f"LinearWeightSegmenter: slope must be >= 0, got {slope}")
        self.slope, self.lo, self.hi = slope, lo, hi

    def segment(self, x: SegmentInputs) -> Segmentation:
        resp, labels = x.response_mask.bool(), x.labels
        keys = _keys(x.scores, labels, "LinearWeightSegmenter")
        m = resp.float()
        mean = (keys * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        weights = (1 + self.slope * (keys - mean)).clamp(self.lo, self.hi)
        return _soft(weights, resp, labels, torch.zeros(resp.shape[0], dtype=torch.bool, device=resp.device))
