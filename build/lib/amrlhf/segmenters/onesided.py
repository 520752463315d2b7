"""Masks on one side only: the inner segmenter decides for responses of one label, the others keep every token."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from amrlhf.errors import ConfigError
from amrlhf.segmenters.base import PivotSegmenter, Segmentation, check_inputs
from amrlhf.segmenters.sample import SampleWiseSegmenter

SIDES = {"rejected": -1, "chosen": 1}


class OneSidedSegmenter:
    """Applies `segmenter` to the responses labelled `side` (`rejected`: label -1, a rejected answer or a
    negative advantage; `chosen`: +1) and trains every token of the others, as sample-wise does.

    For scorers that are reliable on one side only: the reference's surprise (`SurprisalScorer`) finds where a
    wrong answer goes wrong, but on a right answer it also fires where the reference itself is wrong, which is
    where a chosen answer most needs its gradient (docs/studies.md). The inner segmenter's hooks (`setup`,
    `calibrate`, `observe`, checkpointed state) are passed through; calibration and observation see every row.
    """

    def __init__(self, segmenter: PivotSegmenter, side: Literal["rejected", "chosen"] = "rejected"):
        if side not in SIDES:
            raise ConfigError(f"OneSidedSegmenter: side must be 'rejected' or 'chosen', got {side!r}")
        self.segmenter, self.side = segmenter, side
        self._all = SampleWiseSegmenter()

    def __getattr__(self, name: str):
        if name in ("setup", "calibrate", "observe", "state_dict", "load_state_dict") and "segmenter" in vars(self):
            return getattr(self.segmenter, name)  # AttributeError when the inner segmenter has no such hook
        raise AttributeError(name)

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
        inner = self.segmenter.segment(response_mask=response_mask, labels=labels, input_ids=input_ids,
                                       scores=scores, prompt_scores=prompt_scores, ref_entropy=ref_entropy)
        whole = self._all.segment(response_mask=response_mask, labels=labels, input_ids=input_ids)
        on = labels.long() == SIDES[self.side]
        rows = on[:, None]
        return Segmentation(
            mask=torch.where(rows, inner.mask, whole.mask),
            sigma=torch.where(rows, inner.sigma, whole.sigma),
            pivot=torch.where(rows, inner.pivot, whole.pivot),
            segment_id=torch.where(rows, inner.segment_id, whole.segment_id),
            fell_back=inner.fell_back & on,
        )
