"""Masks on one side only: the inner segmenter decides for responses of one label, the others keep every token."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from amrlhf.errors import ConfigError
from amrlhf.segmenters.base import PivotSegmenter, Segmentation, SegmentInputs
from amrlhf.segmenters.sample import SampleWiseSegmenter

SIDES = {"rejected": -1, "chosen": 1}


class OneSidedSegmenter(PivotSegmenter):
    """Applies `segmenter` to the responses labelled `side` (`rejected`: label -1, a rejected answer or a
    negative advantage; `chosen`: +1) and trains every token of the others, as sample-wise does.

    For scorers that are reliable on one side only: the reference's surprise (`SurprisalScorer`) finds where a
    wrong answer goes wrong, but on a right answer it also fires where the reference itself is wrong, which is
    where a chosen answer most needs its gradient (docs/studies.md). The inner segmenter's hooks (`setup`,
    `calibrate`, `observe`, checkpointed state) are passed through; calibration and observation see every row.
    """

    @property
    def calibrated_by_scale(self) -> bool:
        return self.segmenter.calibrated_by_scale

    def __init__(self, segmenter: PivotSegmenter, side: Literal["rejected", "chosen"] = "rejected"):
        if side not in SIDES:
            raise ConfigError(f"OneSidedSegmenter: side must be 'rejected' or 'chosen', got {side!r}")
        self.segmenter, self.side = segmenter, side
        self._all = SampleWiseSegmenter()

    def setup(self, tokenizer) -> None:
        self.segmenter.setup(tokenizer)

    def calibrate(self, scale: float) -> None:
        self.segmenter.calibrate(scale)

    def observe(self, scores: Tensor, response_mask: Tensor) -> None:
        self.segmenter.observe(scores, response_mask)

    def state_dict(self) -> dict:
        return self.segmenter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.segmenter.load_state_dict(state)

    def segment(self, x: SegmentInputs) -> Segmentation:
        inner, whole = self.segmenter.segment(x), self._all.segment(x)
        on = x.labels.long() == SIDES[self.side]
        rows = on[:, None]
        return Segmentation(
            mask=torch.where(rows, inner.mask, whole.mask),
            sigma=torch.where(rows, inner.sigma, whole.sigma),
            pivot=torch.where(rows, inner.pivot, whole.pivot),
            segment_id=torch.where(rows, inner.segment_id, whole.segment_id),
            fell_back=inner.fell_back & on,
        )
