"""DPO (and, with a segmenter, AM-DPO): masked log-ratio sums into an injected DPO loss."""

from __future__ import annotations

import torch

from amrlhf.losses import DPOLoss, SigmoidDPO, dpo_stats, masked_sum, nll_sums, sequence_logps
from amrlhf.models import ModelSpec
from amrlhf.models.forward import DEFAULT_LOGITS_CHUNK, check_logits_chunk, lean_forward, response_logit_mean
from amrlhf.modules.base import AlignmentModule, PackedForward
from amrlhf.modules.reference import FrozenReference, ReferenceModel
from amrlhf.scorers import TokenScorer
from amrlhf.segmenters import PivotSegmenter, Side, segment_stats


class DPOModule(PackedForward, AlignmentModule):
    """L = loss(sum_t m^w_t d^w_t, sum_t m^l_t d^l_t) with d_t = log pi - log pi_ref (docs/method.md).

    The same mask applies to policy and reference terms. `nll_alpha` > 0 adds
    alpha * (token-mean NLL of the chosen response's kept tokens), against falling chosen log-probs.
    The `rewards/*`, `logps/*` and `logits/*` metrics are TRL's definitions (unmasked sums; logits
    token-weighted over the batch).
    """

    progress_keys = ("rewards/accuracies", "rewards/margins")

    def __init__(
        self,
        policy: ModelSpec,
        reference: ReferenceModel | None = None,
        loss: DPOLoss | None = None,
        segmenter: PivotSegmenter | None = None,
        scorer: TokenScorer | None = None,
        score_calibration_batches: int = 8,
        mask_side: Side = "both",
        nll_alpha: float = 0.0,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        betas: tuple[float, float] = (0.9, 0.999),
        logits_chunk: int | None = DEFAULT_LOGITS_CHUNK,
        share_prefix: bool = True,
        optimizer_in_backward: bool = False,
        fused_adamw: bool = False,
    ):
        """
        Args:
            policy: the model trained (hub id, folder, gguf, `local:` id; LoRA optional).
            reference: FrozenReference (default), AdapterReference (LoRA base), or CachedReference.
            loss: SigmoidDPO (default, beta=0.1), IPO, HingeDPO, RobustDPO.
            segmenter: SampleWiseSegmenter for plain DPO (None = the unmasked path);
                AdaptivePivotSegmenter for AM-DPO; TokenWise / StepWise / Entropy baselines.
            scorer: token scores for the segmenter (RewardModelScorer, CachedScorer, ...).
            score_calibration_batches: training batches used once to measure the score scale.
            mask_side: where the segmenter decides: `both` responses, or the `rejected` (or `chosen`) one only,
                every token of the other trained as in DPO (for scorers reliable on one side, docs/studies.md).
            nll_alpha: weight of an NLL term on the chosen response.
            logits_chunk: predicted tokens per vocabulary-projection chunk, for the policy and the
                reference (amrlhf.models.forward.lean_forward; docs/performance.md): smaller saves memory,
                larger launches fewer kernels; 0 or null computes the batch's logits at once.
            share_prefix: run each pair as one packed sequence, its prompt (and any common start of its two
                responses) once, for the policy and the reference (amrlhf.models.shared_prefix;
                docs/performance.md); false: the padded batch. The values agree to float32 rounding.
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
        self.reference = reference or FrozenReference()
        self.loss_fn = loss or SigmoidDPO()
        self.nll_alpha = nll_alpha
        check_logits_chunk(logits_chunk)
        self.logits_chunk = logits_chunk
        self.share_prefix = share_prefix

    def _setup_frozen(self) -> None:
        self.reference.setup(self)

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != "fit":
            self.reference.setup(self)
        super().on_validation_start()

    def model_step(self, batch: dict, split: str):
        resp = batch["response_mask"]
        B = batch["index"].shape[0]
        # the frozen passes (reference, scorer) first: their transient buffers are freed before the policy's
        # activations are allocated, not on top of them (docs/performance.md)
        ref = self.reference.logps(self, batch, split)
        mask, seg = self.mask_for(batch, split)
        out = lean_forward(self.policy, batch, logits_stats=True, **self.forward_options())
        logps = out.logps
        d = masked_sum(logps - ref, mask)
        n = mask.sum(-1)
        loss = self.loss_fn.loss(d[:B], d[B:], n[:B], n[B:])
        if self.nll_alpha:
            nll, cnt = nll_sums(logps[:B], mask[:B])
            loss = loss + self.nll_alpha * nll / cnt.clamp(min=1)
        keep = (n[:B] > 0) & (n[B:] > 0)  # a pair whose side was dropped (fallback `drop`) is left out
        if not bool(keep.all()):
            loss = loss * keep / keep.sum().clamp(min=1) * B
        pol, refs = sequence_logps(logps.detach(), resp), sequence_logps(ref, resp)
        stats = dpo_stats(self.loss_fn.beta, pol[:B], pol[B:], refs[:B], refs[B:])
        stats["logits/chosen"] = response_logit_mean(out.logit_mean[:B], resp[:B])
        stats["logits/rejected"] = response_logit_mean(out.logit_mean[B:], resp[B:])
        if seg is not None:
            stats.update(segment_stats(seg, resp, batch["labels"]))
        return loss.mean(), stats

    def training_step(self, batch: dict, batch_idx: int):
        loss, stats = self.model_step(batch, "train")
        self.log_stats({"loss": loss.detach(), **stats}, "train", batch["index"].shape[0])
        return loss

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int):
        loss, stats = self.model_step(batch, "val")
        self.log_stats({"loss": loss, **stats}, "val", batch["index"].shape[0])
