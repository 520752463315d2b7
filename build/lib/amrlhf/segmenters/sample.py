"""Sample-wise segmenter: one segment per response, every response token kept.

This is plain SFT / DPO / PPO: a module run with it equals the unmasked path bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from amrlhf.segmenters.base import Segmentation, check_inputs


class SampleWiseSegmenter:
    """mask = response_mask; sigma = label on the response; no pivots; segment_id = 1."""

    def segment(
        self,
        *,
        response_mask: Tensor,
        labels: Tensor,
        input_ids: Tensor,
        scores: Tensor | None = None,
        prompt_scores: Tensor | None = None,
        ref_entropy: Tensor | None = None,
    ) -> Segmentation:
        check_inputs(response_mask, labels, input_ids)
        resp = response_mask.bool()
        return Segmentation(
            mask=resp.to(torch.float32),
            sigma=labels.to(torch.long)[:, None] * resp.long(),
            pivot=torch.zeros_like(resp),
            segment_id=resp.long(),
            fell_back=torch.zeros(resp.shape[0], dtype=torch.bool, device=resp.device),
        )
