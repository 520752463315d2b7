"""Supervised fine-tuning (and, with a segmenter, masked AM-SFT): token-mean NLL on kept tokens."""

from __future__ import annotations

import torch

from amrlhf.losses import masked_mean, nll_sums
from amrlhf.models.forward import response_logps
from amrlhf.modules.base import AlignmentModule
from amrlhf.segmenters import segment_stats


def _hits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """1 where the argmax of the kept logits is the next token; [N, T-1], zero before them."""
    keep = logits.shape[1]
    hits = (logits[:, :-1].argmax(-1) == input_ids[:, input_ids.shape[1] - keep + 1:]).float()
    return torch.cat([hits.new_zeros(hits.shape[0], input_ids.shape[1] - keep), hits], dim=1)


class SFTModule(AlignmentModule):
    """L = sum m_t (-log pi(y_t)) / sum m_t over the batch (all devices).

    Under gradient accumulation each micro-batch is normalised by its own (all-device) kept-token
    count, so accumulation equals one large batch exactly when micro-batches hold equal token
    counts; otherwise it is the mean of micro-batch token means (see README, known limits).
    """

    progress_keys = ("sft/nll",)

    def model_step(self, batch: dict, split: str):
        logps, logits = response_logps(self.policy, batch, with_logits=True)
        mask, seg = self.mask_for(batch)
        nll, n = nll_sums(logps, mask)
        total = n.sum()
        if self._trainer is not None and self.trainer.world_size > 1:
            # global kept-token count; DDP averages gradients over ranks, so scale by world size
            total = self.all_gather(total.detach()).sum() / self.trainer.world_size
        loss = nll.sum() / total.clamp(min=1)
        stats = {"sft/nll": (nll.sum() / n.sum().clamp(min=1)).detach(),
                 "sft/tokens": n.sum().detach(),
                 "sft/token_acc": masked_mean(_hits(logits, batch["input_ids"]), mask).detach()}
        if seg is not None:
            stats.update(segment_stats(seg, batch["response_mask"], batch["labels"]))
        return loss, stats

    def training_step(self, batch: dict, batch_idx: int):
        loss, stats = self.model_step(batch, "train")
        self.log_stats({"loss": loss.detach(), **stats}, "train", batch["input_ids"].shape[0])
        return loss

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int):
        loss, stats = self.model_step(batch, "val")
        self.log_stats({"loss": loss, **stats}, "val", batch["input_ids"].shape[0])
