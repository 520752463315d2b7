"""Segment-level baselines: fixed boundaries, one sign per segment (docs/method.md, baselines).

- StepWiseSegmenter: a segment ends at a punctuation / newline token (the delimiter ids are
  derived ONCE from the tokenizer at `setup`, never per batch).
- EntropySegmenter (Yin et al. 2025): a new segment starts where the reference model's
  next-token entropy exceeds a threshold.
Each segment's sign comes from its last token's u (`level`) or the sum of its increments
(`increment`); 0 agrees with the label. mask = 1[segment sign == label].
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from amrlhf.segmenters.adaptive import _ScoredSegmenter
from amrlhf.segmenters.base import Segmentation, SegmentInputs
from amrlhf.segmenters.baselines import Baseline
from amrlhf.segmenters.rules import Fallback, finish, pivots_and_segments, segment_values, sign_agreeing

DEFAULT_DELIMITERS = (".", ",", "!", "?", ";", ":", "\n")


def _segments_from_starts(starts: Tensor, resp: Tensor) -> Tensor:
    """segment_id = 1 + number of segment starts after the first response token; 0 off-response."""
    prev_resp = torch.cat([torch.zeros_like(resp[:, :1]), resp[:, :-1]], dim=1)
    new = starts & resp & prev_resp
    return torch.where(resp, 1 + new.long().cumsum(1), torch.zeros_like(new, dtype=torch.long))


class _SegmentSigns(_ScoredSegmenter):
    def _finish(self, segment_id: Tensor, resp: Tensor, labels: Tensor, x: SegmentInputs) -> Segmentation:
        u = self._u(x, resp)
        value = segment_values(segment_id, u, resp.to(u.dtype), "last" if self.signal == "level" else "sum")
        sigma = torch.where(resp, sign_agreeing(value, labels), 0)
        pivot, _ = pivots_and_segments(sigma, resp)
        return finish(sigma, resp, labels, fallback=self.fallback, min_kept_frac=self.min_kept_frac,
                      pivot=pivot, segment_id=segment_id)


class StepWiseSegmenter(_SegmentSigns):
    """Segments split after punctuation / newline tokens.

    Args:
        delimiters: characters that end a step; every vocabulary token whose text ends with one
            (after stripping spaces) is a delimiter token. Resolved once in `setup(tokenizer)`.
        delimiter_ids: explicit token ids instead (no tokenizer needed).
    """

    def __init__(self, delimiters: list[str] | None = None, delimiter_ids: list[int] | None = None,
                 signal: Literal["level", "increment"] = "level", baseline: Baseline | None = None,
                 scale: float = 1.0, fallback: Fallback = "ones", min_kept_frac: float = 0.0):
        super().__init__(signal, baseline, scale, fallback, min_kept_frac)
        self.delimiters = list(delimiters or DEFAULT_DELIMITERS)
        self.delimiter_ids = None if delimiter_ids is None else torch.tensor(sorted(set(delimiter_ids)))

    def setup(self, tokenizer) -> None:
        if self.delimiter_ids is not None:
            return
        ids = []
        for token, idx in tokenizer.get_vocab().items():
            text = tokenizer.convert_tokens_to_string([token])
            if text.rstrip(" ").endswith(tuple(self.delimiters)):
                ids.append(idx)
        self.delimiter_ids = torch.tensor(sorted(ids))

    def segment(self, x: SegmentInputs) -> Segmentation:
        if self.delimiter_ids is None:
            raise ValueError("StepWiseSegmenter needs setup(tokenizer) or delimiter_ids")
        resp, labels = x.response_mask.bool(), x.labels.long()
        is_delim = torch.isin(x.input_ids[:, 1:], self.delimiter_ids.to(x.input_ids.device))
        starts = torch.cat([torch.zeros_like(is_delim[:, :1]), is_delim[:, :-1]], dim=1)  # after a delimiter
        return self._finish(_segments_from_starts(starts, resp), resp, labels, x)


class EntropySegmenter(_SegmentSigns):
    """A new segment starts at a token whose prediction had entropy > `threshold` (nats) under the
    reference model (`ref_entropy`, from the scorer)."""

    def __init__(self, threshold: float = 2.0, signal: Literal["level", "increment"] = "level",
                 baseline: Baseline | None = None, scale: float = 1.0, fallback: Fallback = "ones",
                 min_kept_frac: float = 0.0):
        super().__init__(signal, baseline, scale, fallback, min_kept_frac)
        self.threshold = threshold

    def segment(self, x: SegmentInputs) -> Segmentation:
        if x.ref_entropy is None:
            raise ValueError("EntropySegmenter needs ref_entropy: use a scorer with `entropy_from` set")
        resp, labels = x.response_mask.bool(), x.labels.long()
        return self._finish(_segments_from_starts(x.ref_entropy > self.threshold, resp), resp, labels, x)
