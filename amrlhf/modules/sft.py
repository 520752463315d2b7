"""Supervised fine-tuning (and, with a segmenter, masked AM-SFT): token-mean NLL on kept tokens."""

from __future__ import annotations

import torch

from amrlhf.losses import masked_mean, nll_sums
from amrlhf.models import ModelSpec
from amrlhf.models.forward import DEFAULT_LOGITS_CHUNK, check_logits_chunk, lean_forward
from amrlhf.modules.base import AlignmentModule
from amrlhf.modules.rejection import BestOfN
from amrlhf.scorers import TokenScorer
from amrlhf.segmenters import PivotSegmenter, Side, segment_stats


class SFTModule(AlignmentModule):
    """L = sum m_t (-log pi(y_t)) / sum m_t over the batch (all devices).

    With `rollout: BestOfN` it is rejection-sampling fine-tuning: each batch's prompts are answered
    N times by the policy, the reward model keeps the best, and the loss trains on its kept
    segments (AM-SFT / ARJ with an adaptive segmenter; plain RFT with the sample-wise one).

    Under gradient accumulation each micro-batch is normalised by its own (all-device) kept-token
    count, so accumulation equals one large batch exactly when micro-batches hold equal token
    counts; otherwise it is the mean of micro-batch token means (see docs/limits.md).
    """

    progress_keys = ("sft/nll",)

    def model_step(self, batch: dict, split: str):
        out = lean_forward(self.policy, batch, logits_stats=True, chunk_size=self.logits_chunk)
        logps = out.logps
        mask, seg = self.mask_for(batch, split)
        nll, n = nll_sums(logps, mask)
        total = n.sum()
        if self._trainer is not None and self.trainer.world_size > 1:
            # global kept-token count; DDP averages gradients over ranks, so scale by world size
            total = self.all_gather(total.detach()).sum() / self.trainer.world_size
        loss = nll.sum() / total.clamp(min=1)
        stats = {"sft/nll": (nll.sum() / n.sum().clamp(min=1)).detach(),
                 "sft/tokens": n.sum().detach(),
                 "sft/token_acc": masked_mean(out.hits, mask)}  # hits: argmax == token, detached
        if seg is not None:
            stats.update(segment_stats(seg, batch["response_mask"], batch["labels"]))
        return loss, stats

    def __init__(self, policy: ModelSpec, segmenter: PivotSegmenter | None = None, scorer: TokenScorer | None = None,
                 score_calibration_batches: int = 8, mask_side: Side = "both", rollout: BestOfN | None = None, lr: float = 1e-6,
                 weight_decay: float = 0.0, warmup_steps: int = 0, betas: tuple[float, float] = (0.9, 0.999),
                 logits_chunk: int | None = DEFAULT_LOGITS_CHUNK, optimizer_in_backward: bool = False,
                 fused_adamw: bool = False):
        """
        Args:
            policy: the model trained.
            segmenter: SampleWiseSegmenter for plain SFT (None = the unmasked path); an adaptive
                segmenter (fallback `drop`) for AM-SFT.
            scorer: token scores for the segmenter, and the ranking of BestOfN samples.
            mask_side: where the segmenter decides: `both`, or the `rejected` (label -1) or `chosen` rows only.
            rollout: BestOfN for rejection sampling; None trains on the data's completions.
            logits_chunk: predicted tokens per vocabulary-projection chunk (amrlhf.models.forward.lean_forward;
                docs/performance.md): smaller saves memory, larger launches fewer kernels; 0 or null computes
                the batch's logits at once.
            optimizer_in_backward: update each weight with AdamW inside the backward pass, as soon as its
                gradient exists (amrlhf.optimizers; docs/performance.md): the same weights bit for bit, without
                the trainable weights' gradients ever held at once. One device, no gradient clipping, no
                gradient accumulation.
            fused_adamw: AdamW's fused kernel (torch's `fused=True`, the transformers Trainer's default): one pass
                over each weight; the AdamW step about 4x faster on CPU, a few per cent of a training step
                (docs/performance.md). The weights agree with the default's to float32 rounding, not bit for bit.
        """
        super().__init__(policy, segmenter, scorer, score_calibration_batches, lr, weight_decay, warmup_steps,
                         betas, mask_side=mask_side, optimizer_in_backward=optimizer_in_backward,
                         fused_adamw=fused_adamw)
        self.rollout = rollout
        check_logits_chunk(logits_chunk)
        self.logits_chunk = logits_chunk

    def zero_loss(self, batch: dict) -> torch.Tensor:
        """0 with the policy's graph, for a batch with nothing to train on. Under DDP every rank must
        backpropagate through the same parameters, and take part in the all-device token count that
        the other ranks' model_step gathers (with 0 tokens)."""
        if self._trainer is not None and self.trainer.world_size > 1:
            self.all_gather(torch.zeros((), device=self.device))  # float32, as model_step's count
        out = self.policy(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1],
                          logits_to_keep=1, use_cache=False)
        return out.logits.sum() * 0

    def training_step(self, batch: dict, batch_idx: int):
        extra = {}
        if self.rollout is not None:
            kept, extra = self.rollout.make_batch(self, batch)
            if kept is None:  # every prompt's best sample scored below min_score (arj/skipped_batch = 1)
                self.log_stats(extra, "train", 1)
                return self.zero_loss(batch)
            batch = kept
        loss, stats = self.model_step(batch, "train")
        stats.update(extra)
        self.log_stats({"loss": loss.detach(), **stats}, "train", batch["input_ids"].shape[0])
        return loss

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int):
        loss, stats = self.model_step(batch, "val")
        self.log_stats({"loss": loss, **stats}, "val", batch["input_ids"].shape[0])
