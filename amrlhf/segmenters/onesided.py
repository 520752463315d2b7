"""Masks on one side only: a segmentation kept for the responses of one label, every token of the others."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from amrlhf.errors import ConfigError
from amrlhf.segmenters.base import Segmentation

Side = Literal["both", "rejected", "chosen"]
SIDES: dict[str, int | None] = {"both": None, "rejected": -1, "chosen": 1}


def check_side(side: str) -> None:
    if side not in SIDES:
        raise ConfigError(f"mask_side must be one of {', '.join(SIDES)}, got {side!r}")


def on_one_side(seg: Segmentation, whole: Segmentation, labels: Tensor, side: Side) -> Segmentation:
    """`seg` on the rows labelled `side` (`rejected`: label -1, a rejected answer or a negative advantage;
    `chosen`: +1), `whole` (the sample-wise segmentation: every token trained) on the others; `both`: `seg`.

    For scorers reliable on one side only: the reference's surprise (`SurprisalScorer`) finds where a wrong
    answer goes wrong, but on a right answer it also fires where the reference itself is wrong, which is where
    a chosen answer most needs its gradient (docs/studies.md)."""
    check_side(side)
    if SIDES[side] is None:
        return seg
    on = labels.long() == SIDES[side]
    rows = on[:, None]
    return Segmentation(
        mask=torch.where(rows, seg.mask, whole.mask),
        sigma=torch.where(rows, seg.sigma, whole.sigma),
        pivot=torch.where(rows, seg.pivot, whole.pivot),
        segment_id=torch.where(rows, seg.segment_id, whole.segment_id),
        fell_back=seg.fell_back & on,
    )
