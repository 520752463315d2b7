"""The pivot-segmenter interface.

A segmenter turns a sequence-level label (+1 chosen / -1 rejected) and, optionally, per-token
signals into a token mask (or float weights) for the loss. Its inputs travel as one `SegmentInputs`
(a new signal is one field there and one in the scorers' `TokenScores`); every tensor is a batch aligned
with `input_ids[:, 1:]` ([B, T-1], docs/method.md). Implementations subclass `PivotSegmenter`, override
`segment` and whichever optional hook they need (the defaults do nothing), and never loop over tokens in
Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Segmentation:
    """What a segmenter decided, per token ([B, T-1]) and per sequence ([B]).

    mask: float, 1 where the loss keeps the token. sigma: long, +1/-1 per response token.
    pivot: bool, True where sigma flips. segment_id: long, 1, 2, ... within the response.
    fell_back: bool [B], True where the sequence's mask was replaced by a fallback
    (all ones, or dropped: then `mask` is all zero for it). All zero/False outside the response.
    """

    mask: Tensor
    sigma: Tensor
    pivot: Tensor
    segment_id: Tensor
    fell_back: Tensor


@dataclass
class SegmentInputs:
    """Everything a segmenter may read. response_mask [B, T-1] (0/1), labels [B] in {+1, -1}, input_ids [B, T];
    the scorer's signals, each None when the scorer gives none: scores [B, T-1] (s_t after reading y_t),
    prompt_scores [B] (s_0), ref_entropy [B, T-1] (the reference's next-token entropy). Checked on creation."""

    response_mask: Tensor
    labels: Tensor
    input_ids: Tensor
    scores: Tensor | None = None
    prompt_scores: Tensor | None = None
    ref_entropy: Tensor | None = None

    def __post_init__(self) -> None:
        check_inputs(self.response_mask, self.labels, self.input_ids)


class PivotSegmenter:
    """The base of every segmenter. `segment` decides; the hooks are optional, with defaults that do nothing:
    `setup(tokenizer)` once before training (derive token ids), `calibrate(scale)` the std of the training
    scores when `calibrated_by_scale` (so thresholds are in standard deviations), `observe(scores, mask)` after
    each training batch (a running baseline), `state_dict` / `load_state_dict` what a checkpoint keeps."""

    calibrated_by_scale: bool = False

    def segment(self, x: SegmentInputs) -> Segmentation:
        raise NotImplementedError(f"{type(self).__name__} does not implement segment(x)")

    def setup(self, tokenizer) -> None:
        return None

    def calibrate(self, scale: float) -> None:
        return None

    def observe(self, scores: Tensor, response_mask: Tensor) -> None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


def check_inputs(response_mask: Tensor, labels: Tensor, input_ids: Tensor) -> None:
    if response_mask.dim() != 2 or input_ids.shape[0] != response_mask.shape[0]:
        raise ValueError(f"response_mask must be [B, T-1]; got {tuple(response_mask.shape)}")
    if input_ids.shape[1] != response_mask.shape[1] + 1:
        raise ValueError(
            f"response_mask {tuple(response_mask.shape)} must be aligned with input_ids[:, 1:] "
            f"(input_ids {tuple(input_ids.shape)})"
        )
    if labels.shape != (response_mask.shape[0],):
        raise ValueError(f"labels must be [B]={response_mask.shape[0]}; got {tuple(labels.shape)}")
    if not torch.all((labels == 1) | (labels == -1)):
        raise ValueError("labels must be +1 (chosen) or -1 (rejected)")
