"""Baselines b for the `level` signal u_t = s_t - b (docs/method.md 3). Components, chosen by class_path.

A Bradley-Terry reward is defined only up to an offset, so b carries the meaning of "neutral".
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from amrlhf.distributed import all_sum


@runtime_checkable
class Baseline(Protocol):
    def value(self, scores: Tensor, resp: Tensor, prompt_scores: Tensor | None) -> Tensor:
        """The baseline b per sequence [B]."""
        ...


class PromptScoreBaseline:
    """b = s_0, the score of the prompt alone (default for reward-model scores)."""

    def value(self, scores: Tensor, resp: Tensor, prompt_scores: Tensor | None) -> Tensor:
        if prompt_scores is None:
            raise ValueError("PromptScoreBaseline needs prompt scores (s_0) from the scorer")
        return prompt_scores.to(scores.dtype)


class ConstantBaseline:
    """b = a constant (in raw score units)."""

    def __init__(self, value: float = 0.0):
        self.constant = value

    def value(self, scores: Tensor, resp: Tensor, prompt_scores: Tensor | None) -> Tensor:
        return torch.full((scores.shape[0],), self.constant, dtype=scores.dtype, device=scores.device)


class BatchMeanBaseline:
    """b = the mean of the response-token scores of the whole batch (one value for every row): "neutral"
    is what this batch scores on average, with no state to carry."""

    def value(self, scores: Tensor, resp: Tensor, prompt_scores: Tensor | None) -> Tensor:
        r = resp.to(scores.dtype)
        mean = (scores * r).sum() / r.sum().clamp(min=1)
        return mean.expand(scores.shape[0])


class RunningMeanBaseline:
    """b = running mean of response-token scores (exponential, `momentum`), updated after use in
    training; its state is checkpointed (`state_dict`) and the update is reduced across devices."""

    def __init__(self, momentum: float = 0.99, initial: float = 0.0):
        self.momentum, self.mean, self.count = momentum, float(initial), 0

    def value(self, scores: Tensor, resp: Tensor, prompt_scores: Tensor | None) -> Tensor:
        return torch.full((scores.shape[0],), self.mean, dtype=scores.dtype, device=scores.device)

    @torch.no_grad()
    def update(self, scores: Tensor, resp: Tensor) -> None:
        stats = all_sum(torch.stack([(scores * resp).sum(), resp.sum()]))
        if stats[1] == 0:
            return
        batch_mean = (stats[0] / stats[1]).item()
        self.mean = batch_mean if self.count == 0 else self.momentum * self.mean + (1 - self.momentum) * batch_mean
        self.count += 1

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])
