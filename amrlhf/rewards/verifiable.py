"""A weighted sum of reward components as a TokenScorer, so PPO and GRPO take it like a reward model.

Its token scores are zero except at each response's last token, which holds the sequence reward
(the on-policy modules read the sequence score there). A component that raises, or returns something
that is not a finite number, stops training with an error naming the prompt's file and line: a
broken check never becomes a silent 0.
"""

from __future__ import annotations

import math
import numbers
from typing import Protocol, runtime_checkable

import torch

from amrlhf.errors import AmrlhfError, ConfigError
from amrlhf.losses.reductions import last_response_index
from amrlhf.scorers.base import ScoringContext, TokenScores


@runtime_checkable
class RewardComponent(Protocol):
    name: str

    def check(self, prompt, response: str, fields: dict) -> float:
        ...


class VerifiableReward:
    """reward = sum_k weight_k * component_k.check(prompt, response, fields). Per-component values are
    returned with the scores (`rewards/<name>/mean`, `/std` in the logs)."""

    token_scores = False  # one score per response: an adaptive mask needs a scorer of its own

    def __init__(self, components: list[RewardComponent], weights: list[float] | None = None):
        if not components:
            raise ConfigError("VerifiableReward needs at least one component")
        if weights is not None and len(weights) != len(components):
            raise ConfigError(f"VerifiableReward: {len(weights)} weights for {len(components)} components")
        names = [c.name for c in components]
        if len(set(names)) != len(names):
            raise ConfigError(f"VerifiableReward: component names must differ (their metrics would clash): {names}")
        self.components, self.weights = components, weights or [1.0] * len(components)
        self.tokenizer = None

    def setup(self, ctx: ScoringContext) -> None:
        self.tokenizer = ctx.tokenizer

    def _one(self, component, prompt, response: str, row: dict, k: int) -> float:
        where = f"{row.get('source', '?')} line {row.get('line', '?')}"
        try:
            value = component.check(prompt, response, row.get("fields", {}))
        except Exception as exc:  # a user's check: name the row, keep the cause
            raise AmrlhfError(f"reward '{component.name}' failed on the prompt of {where} (response {k} of the "
                              f"rollout, {response[:60]!r}...): {type(exc).__name__}: {exc}") from exc
        if not isinstance(value, numbers.Real) or not math.isfinite(value):  # numpy scalars and bools too
            raise AmrlhfError(f"reward '{component.name}' returned {value!r} for the prompt of {where}: "
                              "expected a finite number")
        return float(value)

    @torch.no_grad()
    def score(self, batch: dict, split: str) -> TokenScores:
        resp = batch["response_mask"]
        rows = batch.get("rows")
        if rows is None or len(rows) != resp.shape[0]:
            raise AmrlhfError("VerifiableReward scores rollouts of a PromptDataModule (each response needs its "
                              "prompt row)")
        ids = batch["input_ids"][:, 1:]
        values = torch.zeros(resp.shape[0], len(self.components))
        for i, row in enumerate(rows):
            response = self.tokenizer.decode(ids[i][resp[i].bool()].tolist(), skip_special_tokens=True)
            prompt = row.get("prompt", "")
            for k, component in enumerate(self.components):
                values[i, k] = self._one(component, prompt, response, row, i)
        total = values @ torch.tensor(self.weights)
        scores = torch.zeros(resp.shape, dtype=torch.float32)
        scores[torch.arange(resp.shape[0]), last_response_index(resp, empty=0).cpu()] = total * (resp.sum(-1).cpu() > 0)
        device = resp.device
        return TokenScores(scores.to(device), torch.zeros(resp.shape[0], device=device),
                           components={c.name: values[:, k].to(device) for k, c in enumerate(self.components)})
