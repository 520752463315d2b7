"""`segments/*` statistics of docs/method.md, from one Segmentation."""

from __future__ import annotations

from torch import Tensor

from amrlhf.segmenters.base import Segmentation


def segment_stats(seg: Segmentation, response_mask: Tensor, labels: Tensor) -> dict[str, Tensor]:
    resp = response_mask.float()
    n_resp = resp.sum(-1).clamp(min=1)
    kept = (seg.mask * resp).sum(-1) / n_resp
    n_segments = seg.pivot.float().sum(-1) + (resp.sum(-1) > 0).float()
    out = {
        "segments/pivots_per_response": seg.pivot.float().sum(-1).mean(),
        "segments/mean_segment_len": (resp.sum(-1) / n_segments.clamp(min=1)).mean(),
        "segments/fallback_frac": seg.fell_back.float().mean(),
    }
    for name, sel in (("chosen", labels > 0), ("rejected", labels < 0)):
        if sel.any():
            out[f"segments/kept_frac_{name}"] = kept[sel].mean()
    return {k: v.detach() for k, v in out.items()}


