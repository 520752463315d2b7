"""The reference's confident surprise as a token scorer: no training, no labels, no task knowledge.

A frozen language model (usually the policy's own starting point, i.e. the reference) reads the response.
Where it was confident (entropy at most `max_entropy`) and the token is much less likely than it expected,
something has probably gone wrong there; in multi-step answers an error is carried forward, so the prefix score
is the worst surprise so far and never recovers. docs/method.md ("Scorers") and docs/studies.md (measured).
"""

from __future__ import annotations

import torch
from torch import Tensor

from amrlhf.errors import ConfigError
from amrlhf.models import ModelSpec
from amrlhf.models.forward import lean_forward
from amrlhf.scorers.base import ScoringContext, TokenScores
from amrlhf.scorers.models import FrozenModelScorer


def confident_surprise(logps: Tensor, entropy: Tensor, resp: Tensor, max_entropy: float | None) -> Tensor:
    """c_t = log p(y_t) + H_t on response tokens whose prediction had entropy H_t <= max_entropy (every token
    when None), 0 elsewhere. Under the model E[log p(y_t)] = -H_t, so c_t is 0 on average: c_t < 0 means the
    token is less likely than the model expected, by |c_t| nats."""
    c = logps.float() + entropy.float()
    keep = resp.bool() if max_entropy is None else resp.bool() & (entropy <= max_entropy)
    return torch.where(keep, c, torch.zeros_like(c))


def worst_so_far(c: Tensor, resp: Tensor, tolerance: float) -> Tensor:
    """s_t = tolerance + min(0, min_{k <= t} c_k) over response tokens, 0 outside the response: s = tolerance
    until a surprise, then it falls by the worst surprise so far and stays there."""
    running = torch.where(resp.bool(), c, torch.zeros_like(c)).clamp(max=0).cummin(dim=-1).values
    return torch.where(resp.bool(), tolerance + running, torch.zeros_like(c))


class SurprisalScorer(FrozenModelScorer):
    """s_t = tolerance + the worst confident surprise of the frozen `model` over y_<=t (nats); s_0 = tolerance.

    Read with the paper-figure preset (raw scores, `ConstantBaseline(0)`, `score_calibration_batches: 0`), the
    adaptive segmenter flags a token once some earlier-or-same token was more than `tolerance + delta` nats
    less likely than expected, and keeps tokens while every surprise is under `tolerance - delta`.

    Args:
        model: the frozen LM, usually the policy's starting point (the reference of DPO / PPO). Named, not
            implied, so that the score cache is keyed by it.
        tolerance: nats of surprise that count as normal (chosen on the validation split, docs/studies.md).
        max_entropy: only positions whose prediction had at most this entropy (nats) count; None = all.
    """

    def __init__(self, model: ModelSpec, tolerance: float = 1.5, max_entropy: float | None = 1.5):
        if tolerance < 0:
            raise ConfigError(f"SurprisalScorer: tolerance must be >= 0 nats, got {tolerance}")
        if max_entropy is not None and max_entropy <= 0:
            raise ConfigError(f"SurprisalScorer: max_entropy must be > 0 nats or null, got {max_entropy}")
        super().__init__()
        self.model, self.tolerance, self.max_entropy = model, tolerance, max_entropy

    def load(self, ctx: ScoringContext) -> None:
        self.add(ctx, "lm", self.model)

    @torch.no_grad()
    def score(self, batch: dict, split: str) -> TokenScores:
        resp = batch["response_mask"]
        out = lean_forward(self._models["lm"], batch, entropy=True, chunk_size=self._logits_chunk)
        c = confident_surprise(out.logps, out.entropy, resp, self.max_entropy)
        prompt = torch.full((resp.shape[0],), float(self.tolerance), device=resp.device)
        return TokenScores(worst_so_far(c, resp, self.tolerance), prompt, out.entropy * resp)
