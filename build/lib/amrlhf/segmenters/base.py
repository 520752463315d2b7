"""The pivot-segmenter interface.

A segmenter turns a sequence-level label (+1 chosen / -1 rejected) and, optionally, per-token
scores into a token mask for the loss. Everything is a batch tensor aligned with
`input_ids[:, 1:]` ([B, T-1], docs/method.md). Implementations copy `segment`'s signature
exactly (jsonargparse checks a Protocol by signature) and never loop over tokens in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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


@runtime_checkable
class PivotSegmenter(Protocol):
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
        """response_mask [B, T-1] (0/1), labels [B] in {+1, -1}, input_ids [B, T],
        scores [B, T-1] or None, prompt_scores [B] or None, ref_entropy [B, T-1] or None."""
        ...


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
