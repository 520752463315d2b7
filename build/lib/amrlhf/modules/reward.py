"""Bradley-Terry reward model with a scalar head at EVERY position (prefix scores in one pass).

The sequence score r(x, y) is the head's output at the last response token; the prefix score
s_t (docs/method.md, conventions) is its output at token y_t's own position; s_0 is at the last prompt token.
There is no segmenter slot here: the Bradley-Terry loss has no per-token term to mask.
"""

from __future__ import annotations

import torch

from amrlhf.losses import bradley_terry_loss, centring_term, reward_stats
from amrlhf.models import ModelSpec
from amrlhf.modules.base import AlignmentModule
from amrlhf.scorers.models import prefix_scores


class RewardModule(AlignmentModule):
    """Bradley-Terry on (chosen, rejected); `center_coef` adds TRL's centring term
    coef * mean((r_chosen + r_rejected)^2)."""

    progress_keys = ("rm/accuracy",)

    def __init__(self, policy: ModelSpec, center_coef: float = 0.0, lr: float = 1e-5, weight_decay: float = 0.0,
                 warmup_steps: int = 0, betas: tuple[float, float] = (0.9, 0.999)):
        super().__init__(policy, None, None, 0, lr, weight_decay, warmup_steps, betas)
        self.center_coef = center_coef

    def load_policy(self):
        from amrlhf.models import load_reward_model

        return load_reward_model(self.policy_spec)

    def model_step(self, batch: dict):
        _, _, seq = prefix_scores(self.policy, batch)
        B = batch["index"].shape[0]
        chosen, rejected = seq[:B], seq[B:]
        loss = bradley_terry_loss(chosen, rejected).mean()
        if self.center_coef:
            loss = loss + self.center_coef * centring_term(chosen, rejected).mean()
        return loss, reward_stats(chosen, rejected)

    def training_step(self, batch: dict, batch_idx: int):
        loss, stats = self.model_step(batch)
        self.log_stats({"loss": loss.detach(), **stats}, "train", batch["index"].shape[0])
        return loss

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int):
        loss, stats = self.model_step(batch)
        self.log_stats({"loss": loss, **stats}, "val", batch["index"].shape[0])
