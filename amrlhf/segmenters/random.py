"""A control mask that knows nothing of where an answer goes wrong: each response token kept at random."""

from __future__ import annotations

import hashlib

import torch

from amrlhf.errors import ConfigError
from amrlhf.segmenters.base import PivotSegmenter, Segmentation, SegmentInputs
from amrlhf.segmenters.rules import finish


def row_seed(seed: int, tokens: list[int]) -> int:
    """A 63-bit generator seed from `seed` and a row's response tokens: the same row, the same draw."""
    digest = hashlib.sha256(f"{seed}:{','.join(map(str, tokens))}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class RandomTokenSegmenter(PivotSegmenter):
    """Keeps each response token with probability `keep`, whatever the scores say (it reads none).

    The control for a mask's localisation: with the module's `mask_side: rejected` it trains on a
    random share of the rejected answers' tokens, so a study can tell "the mask finds the error" from "the mask
    trains less on the wrong answers" (docs/studies.md). Each row's draw comes from its own generator, seeded
    by `seed` and the row's response tokens: an example gets the same mask in every batch, padding, run and
    study seed (and a study's localisation of it can be reused across seeds). Dropped tokens take the
    opposite sign of the label (sigma), so they count as flagged; a response left with no token falls back
    to keeping all of it."""

    def __init__(self, keep: float = 0.6, seed: int = 0):
        if not 0.0 < keep <= 1.0:
            raise ConfigError(f"RandomTokenSegmenter: keep must be in (0, 1], got {keep}")
        self.keep, self.seed = keep, seed

    def segment(self, x: SegmentInputs) -> Segmentation:
        resp = x.response_mask.bool()
        draws = torch.ones(resp.shape, dtype=torch.float32)
        targets = x.input_ids[:, 1:].cpu()
        on = resp.cpu()
        for i in range(resp.shape[0]):  # one generator per row: its draw does not depend on the batch
            tokens = targets[i][on[i]].tolist()
            g = torch.Generator().manual_seed(row_seed(self.seed, tokens))
            draws[i, on[i]] = torch.rand(len(tokens), generator=g)
        kept = draws.to(resp.device) < self.keep
        labels = x.labels.to(torch.long)[:, None]
        sigma = torch.where(kept, labels, -labels) * resp.long()
        return finish(sigma, resp, x.labels.to(torch.long), fallback="ones", min_kept_frac=0.0)
