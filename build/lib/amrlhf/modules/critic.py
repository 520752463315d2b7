"""PPO critics (value functions), chosen by class_path in the recipe.

- `SharedValueHead`: a linear head on the policy's last hidden state: one backbone, one forward
  pass for log-probs and values (the policy's optimizer trains both).
- `ValueModel`: a critic on its own backbone, a scalar head at every position, initialised from
  a model (usually the trained reward model, as in Ziegler et al. and TRL).

`values(...)` returns V at every position [N, T]: position p is the value of the state that has
read tokens 0..p. Both are registered submodules: a critic trains, so it is checkpointed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from amrlhf.models import ModelSpec


class SharedValueHead(nn.Module):
    shares_policy = True

    def __init__(self):
        super().__init__()
        self.head: nn.Linear | None = None

    def build(self, policy) -> None:
        if self.head is None:
            self.head = nn.Linear(policy.config.hidden_size, 1)
            nn.init.zeros_(self.head.weight)  # V = 0 at the start: the first advantages are the rewards
            nn.init.zeros_(self.head.bias)

    def values(self, batch: dict, hidden: Tensor | None) -> Tensor:
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()


class ValueModel(nn.Module):
    shares_policy = False

    def __init__(self, model: ModelSpec):
        """
        Args:
            model: the backbone (and head, when it is a saved reward model) the critic starts from.
        """
        super().__init__()
        self.spec = model
        self.model = None

    def build(self, policy) -> None:
        from amrlhf.models import load_reward_model

        if self.model is None:
            self.model = load_reward_model(self.spec, trainable=True)

    def values(self, batch: dict, hidden: Tensor | None) -> Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return out.logits.squeeze(-1).float()


def gather_rows(values: Tensor, index: Tensor) -> Tensor:
    """values [N, T] at one position per row [N] -> [N]."""
    return values[torch.arange(values.shape[0], device=values.device), index]
