"""How well a segmenter finds the wrong span: on close pairs with a known difference, the rejected
side's flagged tokens (sigma = -1, i.e. the segments that agree with "rejected") against the tokens
that overlap the differing characters. Micro-averaged precision / recall / F1 over tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from amrlhf.data.records import Example
from amrlhf.data.tokenize import response_offsets


def diff_token_mask(tokenizer, ex: Example, spans: list[list[int]], response_ids: list[int],
                    through_end: bool = False) -> list[bool] | None:
    """Per rejected-response token: does it overlap a differing character span? None when offsets do not
    line up (`response_offsets`). `through_end`: a span that reaches the end of the text also covers the
    end-of-turn token(s) after it (for spans defined as "from the error to the end of the response")."""
    offsets = response_offsets(tokenizer, ex, response_ids, "rejected")
    if offsets is None:
        return None
    limit = len(ex.rejected)
    out = []
    for start, end in offsets:
        end = min(end, limit)
        if start >= limit:
            out.append(through_end and any(b >= limit for _, b in spans))
        else:
            out.append(any(start < b and a < end for a, b in spans))
    return out


def span_of_token(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], limit: int) -> list[int]:
    """For each token (character offsets), the index of the first span it overlaps, -1 for none; tokens past
    `limit` (the end-of-turn tokens after the raw text) belong to no span."""
    out = []
    for start, end in offsets:
        end = min(end, limit)
        out.append(next((k for k, (a, b) in enumerate(spans) if start < end and start < b and a < end), -1))
    return out


@dataclass
class Localization:
    """Running token counts for one (scorer, segmenter) cell."""

    flagged: int = 0
    in_span: int = 0
    hits: int = 0
    tokens: int = 0
    fell_back: list[bool] = field(default_factory=list)

    def add(self, flagged: Tensor, truth: Tensor, fell_back: Tensor) -> None:
        """flagged, truth: bool [N, L] over rejected-response tokens (False elsewhere)."""
        self.flagged += int(flagged.sum())
        self.in_span += int(truth.sum())
        self.hits += int((flagged & truth).sum())
        self.fell_back += fell_back.tolist()

    def row(self) -> dict[str, float]:
        p = self.hits / self.flagged if self.flagged else 0.0
        r = self.hits / self.in_span if self.in_span else 0.0
        return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
                "flagged_frac": self.flagged / max(self.tokens, 1),
                "fallback_frac": sum(self.fell_back) / max(len(self.fell_back), 1)}


def flagged_wrong(sigma: Tensor, resp: Tensor) -> Tensor:
    """Tokens a segmenter marks as disagreeing with a good answer (sigma = -1), fallback aside."""
    return (sigma == -1) & resp.bool()


def truth_tensor(masks: list[list[bool]], batch: dict, rows: list[int]) -> Tensor:
    """Place per-response token truths at their aligned positions for the given batch rows."""
    out = torch.zeros(len(rows), batch["response_mask"].shape[1], dtype=torch.bool)
    for i, (row, m) in enumerate(zip(rows, masks, strict=True)):
        pos = batch["response_mask"][row].bool().nonzero().squeeze(1)
        out[i, pos[: len(m)]] = torch.tensor(m[: len(pos)], dtype=torch.bool)
    return out
