"""A programmatic step checker as token scorer: an ORACLE for the arith_steps task (it knows the true
running totals), the upper bound a learned scorer can be measured against."""

from __future__ import annotations

import torch

from amrlhf.data.arithmetic import start_value, step_verdicts
from amrlhf.errors import AmrlhfError
from amrlhf.scorers.base import ScoringContext, TokenScores


def token_offsets(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    """-> (decoded text, end character of each token in it), by decoding growing prefixes (exact for
    byte-level tokenizers, whose single tokens may not decode alone)."""
    ends, text = [], ""
    for k in range(len(ids)):
        text = tokenizer.decode(ids[: k + 1], skip_special_tokens=False)
        ends.append(len(text))
    return text, ends


class ArithmeticStepScorer:
    """s_t = the verdict of the latest equation whose result the prefix y_<=t has begun to write:
    +1 if that result is right, -1 if wrong (a carried-forward error stays wrong), 0 before the first
    result; s_0 = 0. With a zero baseline and delta < 1 the adaptive segmenter flags exactly the wrong
    steps. An oracle: label it as such wherever its numbers are reported."""

    def __init__(self) -> None:
        self.tokenizer = None

    def setup(self, ctx: ScoringContext) -> None:
        self.tokenizer = ctx.tokenizer

    @torch.no_grad()
    def score(self, batch: dict, split: str) -> TokenScores:
        resp = batch["response_mask"].bool()
        ids = batch["input_ids"]
        scores = torch.zeros(resp.shape, dtype=torch.float32)
        for i in range(resp.shape[0]):
            pos = resp[i].nonzero().squeeze(1).cpu()
            if not len(pos):
                continue
            prompt = self.tokenizer.decode(ids[i, : int(pos[0]) + 1].tolist(), skip_special_tokens=True)
            start = start_value(prompt)
            if start is None:
                raise AmrlhfError(f"ArithmeticStepScorer: row {int(batch['index'][i % len(batch['index'])])}'s prompt "
                                  "states no starting quantity ('X has N ...'); it scores the arith_steps task only")
            text, ends = token_offsets(self.tokenizer, ids[i, pos + 1].tolist())
            verdicts = step_verdicts(text, start)
            value, k = 0.0, 0
            row = []
            for end in ends:
                while k < len(verdicts) and verdicts[k][0] < end:
                    value = float(verdicts[k][1])
                    k += 1
                row.append(value)
            scores[i, pos] = torch.tensor(row)
        device = batch["response_mask"].device
        return TokenScores(scores.to(device), torch.zeros(resp.shape[0], device=device))
