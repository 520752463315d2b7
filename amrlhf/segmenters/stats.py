"""`segments/*` statistics of docs/method.md, from one Segmentation."""

from __future__ import annotations

from torch import Tensor

from amrlhf.segmenters.base import Segmentation


def segment_stats(seg: Segmentation, response_mask: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Per side: `kept_frac` (share of response tokens with a weight above 0), `weight_mean` and `weight_std`
    (mean and spread of the token weights within a response: for a 0/1 mask the kept share and its spread, for
    soft weights how far they move from 1), averaged over responses; pivots, segment length, fallbacks."""
    resp = response_mask.float()
    n_resp = resp.sum(-1).clamp(min=1)
    kept = ((seg.mask > 0).float() * resp).sum(-1) / n_resp
    weight = seg.mask.float() * resp
    mean_w = weight.sum(-1) / n_resp
    std_w = ((((weight - mean_w[:, None]) * resp) ** 2).sum(-1) / n_resp).sqrt()
    n_segments = seg.pivot.float().sum(-1) + (resp.sum(-1) > 0).float()
    out = {
        "segments/pivots_per_response": seg.pivot.float().sum(-1).mean(),
        "segments/mean_segment_len": (resp.sum(-1) / n_segments.clamp(min=1)).mean(),
        "segments/fallback_frac": seg.fell_back.float().mean(),
    }
    for name, sel in (("chosen", labels > 0), ("rejected", labels < 0)):
        if sel.any():
            out[f"segments/kept_frac_{name}"] = kept[sel].mean()
            out[f"segments/weight_mean_{name}"] = mean_w[sel].mean()
            out[f"segments/weight_std_{name}"] = std_w[sel].mean()
    return {k: v.detach() for k, v in out.items()}


