"""Reward models with a scalar head at EVERY position (prefix scores in one pass).

The sequence score r(x, y) is the head's output at the last response token; the prefix score
s_t (docs/method.md, conventions) is its output at token y_t's own position; s_0 is at the last prompt token.
`RewardModule` trains the sequence score (Bradley-Terry); `TokenRewardModule` trains every position on
per-token labels from annotated flawed spans (a token-level "risk" model). There is no segmenter slot here:
neither loss has a term to mask.
"""

from __future__ import annotations

import torch

from amrlhf.errors import AmrlhfError
from amrlhf.losses import bradley_terry_loss, centring_term, reward_stats, token_label_loss
from amrlhf.models import ModelSpec, load_reward_model
from amrlhf.modules.base import AlignmentModule
from amrlhf.scorers.models import prefix_scores


class _ScalarHeadModule(AlignmentModule):
    """What both reward models share: the recipe names the scalar-head model `model` (`model.init_args.model`);
    it lives in the base class's slot (`self.policy`, so checkpoints and `amrlhf export` read every module
    alike) and reads as `self.reward_model`. A step is `model_step` (loss and statistics) logged under train
    / eval."""

    @property
    def reward_model(self):
        return self.policy

    def load_policy(self):
        return load_reward_model(self.policy_spec)

    def model_step(self, batch: dict):
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int):
        loss, stats = self.model_step(batch)
        self.log_stats({"loss": loss.detach(), **stats}, "train", batch["index"].shape[0])
        return loss

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int):
        loss, stats = self.model_step(batch)
        self.log_stats({"loss": loss, **stats}, "val", batch["index"].shape[0])


class RewardModule(_ScalarHeadModule):
    """Bradley-Terry on (chosen, rejected); `center_coef` adds TRL's centring term
    coef * mean((r_chosen + r_rejected)^2)."""

    progress_keys = ("rm/accuracy",)

    def __init__(self, model: ModelSpec, center_coef: float = 0.0, lr: float = 1e-5, weight_decay: float = 0.0,
                 warmup_steps: int = 0, betas: tuple[float, float] = (0.9, 0.999), optimizer_in_backward: bool = False,
                 fused_adamw: bool = False):
        """
        Args:
            model: the reward model's backbone (hub id, folder, `local:` id; LoRA optional), given a scalar head.
            center_coef: weight of TRL's centring term (0: off).
            optimizer_in_backward: update each weight with AdamW inside the backward pass, as soon as its
                gradient exists (amrlhf.optimizers; docs/performance.md): the same weights bit for bit, without
                the trainable weights' gradients ever held at once. One device, no gradient clipping, no
                gradient accumulation.
            fused_adamw: AdamW's fused kernel (torch's `fused=True`, the transformers Trainer's default): one pass
                over each weight; the AdamW step about 4x faster on CPU, a few per cent of a training step
                (docs/performance.md). The weights agree with the default's to float32 rounding, not bit for bit.
        """
        super().__init__(model, None, None, 0, lr, weight_decay, warmup_steps, betas,
                         optimizer_in_backward=optimizer_in_backward, fused_adamw=fused_adamw)
        self.center_coef = center_coef

    def model_step(self, batch: dict):
        _, _, seq = prefix_scores(self.reward_model, batch)
        B = batch["index"].shape[0]
        chosen, rejected = seq[:B], seq[B:]
        loss = bradley_terry_loss(chosen, rejected).mean()
        if self.center_coef:
            loss = loss + self.center_coef * centring_term(chosen, rejected).mean()
        return loss, reward_stats(chosen, rejected)


class TokenRewardModule(_ScalarHeadModule):
    """A token-level reward model: the head's output s_t at every response token is trained on that token's
    label (`token_label_loss`: good = 1, inside an annotated flawed span = 0), from rows whose spans the data
    module reads (`PreferenceDataModule(span_labels={rejected: rejected_spans, chosen: chosen_flaw_spans})`;
    both responses of a pair are trained on). Exported (`amrlhf export`), it is a token scorer:
    `RewardModelScorer(model=<export>)` reads s_t in one pass, above 0 where the model judges the answer
    still good, below 0 from where it judges it gone wrong."""

    progress_keys = ("rm/token_accuracy",)

    def __init__(self, model: ModelSpec, lr: float = 1e-5, weight_decay: float = 0.0, warmup_steps: int = 0,
                 betas: tuple[float, float] = (0.9, 0.999), optimizer_in_backward: bool = False,
                 fused_adamw: bool = False):
        """
        Args:
            model: the reward model's backbone (hub id, folder, `local:` id; LoRA optional), given a scalar head.
            optimizer_in_backward: update each weight with AdamW inside the backward pass, as soon as its
                gradient exists (amrlhf.optimizers; docs/performance.md): the same weights bit for bit, without
                the trainable weights' gradients ever held at once. One device, no gradient clipping, no
                gradient accumulation.
            fused_adamw: AdamW's fused kernel (torch's `fused=True`, the transformers Trainer's default): one pass
                over each weight; the AdamW step about 4x faster on CPU, a few per cent of a training step
                (docs/performance.md). The weights agree with the default's to float32 rounding, not bit for bit.
        """
        super().__init__(model, None, None, 0, lr, weight_decay, warmup_steps, betas,
                         optimizer_in_backward=optimizer_in_backward, fused_adamw=fused_adamw)

    def model_step(self, batch: dict):
        if "token_flawed" not in batch:
            raise AmrlhfError("TokenRewardModule trains on per-token labels: set data.init_args.span_labels "
                              "(e.g. {rejected: rejected_spans, chosen: chosen_flaw_spans})")
        scores, _, _ = prefix_scores(self.reward_model, batch)
        return token_label_loss(scores, batch["token_flawed"], batch["response_mask"])
