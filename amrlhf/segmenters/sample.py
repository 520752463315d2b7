"""Sample-wise segmenter: one segment per response, every response token kept.

This is plain SFT / DPO / PPO: a module run with it equals the unmasked path bit for bit.
"""

from __future__ import annotations

import torch

from amrlhf.segmenters.base import PivotSegmenter, Segmentation, SegmentInputs


class SampleWiseSegmenter(PivotSegmenter):
    """mask = response_mask; sigma = label on the response; no pivots; segment_id = 1."""

    def segment(self, x: SegmentInputs) -> Segmentation:
        resp = x.response_mask.bool()
        return Segmentation(
            mask=resp.to(torch.float32),
            sigma=x.labels.to(torch.long)[:, None] * resp.long(),
            pivot=torch.zeros_like(resp),
            segment_id=resp.long(),
            fell_back=torch.zeros(resp.shape[0], dtype=torch.bool, device=resp.device),
        )
