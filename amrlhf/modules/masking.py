"""The one masking object every masked path shares (DPO, SFT, the on-policy actor, the study's held-out
localisation, `amrlhf segments` and the HTML view): scorer -> segmenter -> mask, with the one-time set-up
(scorer models, the segmenter's tokenizer knowledge) and the score scale measured once on training data."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from amrlhf.distributed import pooled_std
from amrlhf.errors import ConfigError
from amrlhf.modules.context import scoring_context
from amrlhf.scorers import CachedScorer, ScoringContext, TokenScorer, TokenScores
from amrlhf.scorers.base import release_models
from amrlhf.segmenters import (
    PivotSegmenter,
    SampleWiseSegmenter,
    Segmentation,
    SegmentInputs,
    Side,
    check_side,
    on_one_side,
)

log = logging.getLogger(__name__)


@dataclass
class Masked:
    """What masking a batch gives: the loss mask [N, T-1] (the segmenter's 0/1 mask or float weights, times the
    response mask), the Segmentation (None on the unmasked path) and the scorer's signals (None without one)."""

    mask: Tensor
    segmentation: Segmentation | None
    signals: TokenScores | None

    @property
    def scores(self) -> Tensor | None:
        return None if self.signals is None else self.signals.scores


class Masker:
    """Owns the scorer, the segmenter, the side policy and the calibration state.

    `setup(ctx)` loads the scorer (a ScoringContext: the policy's tokenizer, the device, the run's data) and
    gives the segmenter its tokenizer knowledge; `calibrate_on` (batches) or `calibrate` (scores) measure the
    score scale once, when the segmenter reads scores in standard deviations; `mask(batch, split)` scores a
    batch and segments it; `state_dict` is what a checkpoint keeps (the scale, a running baseline). `side`:
    the segmenter decides on `both` sides, or on the `rejected` (label -1) or `chosen` (+1) responses only,
    every token of the others trained as sample-wise does (`segmenters.on_one_side`); calibration and a running
    baseline see every row. Without a segmenter every response token is kept: the unmasked path, the reference
    of every parity test."""

    def __init__(self, segmenter: PivotSegmenter | None = None, scorer: TokenScorer | None = None,
                 calibration_batches: int = 8, side: Side = "both"):
        check_side(side)
        if segmenter is None and side != "both":
            raise ConfigError(f"mask_side: {side} needs a segmenter (model.init_args.segmenter); without one every "
                              "response token is trained")
        self.segmenter, self.scorer, self.calibration_batches = segmenter, scorer, calibration_batches
        self.side = side
        self.calibrated = False

    @property
    def needs_scale(self) -> bool:
        """The segmenter reads scores in standard deviations and there are scores to measure."""
        return self.segmenter is not None and self.scorer is not None and self.segmenter.calibrated_by_scale

    def setup(self, ctx: ScoringContext) -> None:
        if self.scorer is not None:
            self.scorer.setup(ctx)
        if self.segmenter is not None:
            self.segmenter.setup(ctx.tokenizer)

    def uncached(self) -> Masker:
        """The same masker scoring afresh (a CachedScorer's tables hold the training data's scores only), for
        data outside the run: held-out localisation, `amrlhf segments`. Shares the segmenter and its scale."""
        if not isinstance(self.scorer, CachedScorer):
            return self
        other = Masker(self.segmenter, self.scorer.source, self.calibration_batches, self.side)
        other.calibrated = self.calibrated
        return other

    def release(self) -> None:
        """Free the scorer's frozen models (after caching, or after scoring data outside the run)."""
        if self.scorer is not None:
            release_models(self.scorer)

    # ------------------------------------------------------------------ the score scale
    @torch.no_grad()
    def calibrate_on(self, batches: Iterable[dict]) -> dict[str, float]:
        """Scale = std of the response-token scores of these (training) batches -> their distribution."""
        values = []
        for batch in batches:
            scores = self.scorer.score(batch, "train").scores
            values.append(scores[batch["response_mask"].bool()].float().cpu())
        return self.calibrate(torch.cat(values))

    def calibrate(self, flat: Tensor, pooled: bool = False, device: torch.device | None = None) -> dict[str, float]:
        """Give the segmenter the scale (std of these response-token scores) -> their distribution (`segments/
        score_*`, to log). `pooled`: the scores are this rank's own (a rollout): the std is over every rank's
        (on `device`, where the process group communicates); without it every rank scored the same examples."""
        if pooled:
            std = pooled_std(flat.to(device))
        else:
            std = flat.std().item() if flat.numel() > 1 else 1.0
        self.segmenter.calibrate(std)
        self.calibrated = True
        q = torch.quantile(flat, torch.tensor([0.05, 0.5, 0.95])).tolist()
        stats = {"segments/score_mean": flat.mean().item(), "segments/score_std": std, "segments/score_p05": q[0],
                 "segments/score_p50": q[1], "segments/score_p95": q[2]}
        log.info("token scores on %d training tokens: %s", flat.numel(), {k: round(v, 4) for k, v in stats.items()})
        return stats

    # ------------------------------------------------------------------ masking
    def signals(self, batch: dict, split: str) -> TokenScores | None:
        return self.scorer.score(batch, split) if self.scorer is not None else None

    def segment(self, batch: dict, signals: TokenScores | None) -> Segmentation:
        x = SegmentInputs(batch["response_mask"], batch["labels"], batch["input_ids"],
                          **(signals.as_kwargs() if signals is not None else {}))
        seg = self.segmenter.segment(x)
        if self.side == "both":
            return seg
        return on_one_side(seg, SampleWiseSegmenter().segment(x), x.labels, self.side)

    def mask(self, batch: dict, split: str, observe: bool = True, signals: TokenScores | None = None) -> Masked:
        """Score (unless `signals` are given) and segment one batch. `observe`: let a stateful segmenter (a
        running-mean baseline) learn from a training batch."""
        resp = batch["response_mask"]
        if self.segmenter is None:
            return Masked(resp, None, None)
        if signals is None:
            signals = self.signals(batch, split)
        seg = self.segment(batch, signals)
        if observe and split == "train" and signals is not None and signals.scores is not None:
            self.segmenter.observe(signals.scores, resp)
        return Masked(seg.mask.to(resp.dtype) * resp, seg, signals)

    def state_dict(self) -> dict:
        return self.segmenter.state_dict() if self.segmenter is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.segmenter is None:  # e.g. an AM run's checkpoint loaded into a sample-wise module
            log.info("the checkpoint holds a segmenter's state; this module has no segmenter: not used")
            return
        self.segmenter.load_state_dict(state)
        self.calibrated = True


def setup_segmentation(module) -> None:
    """Before training: the masker's set-up, then the score scale from the first training batches (when the
    segmenter reads scores in standard deviations and no checkpoint restored it), logged at step 0."""
    masker, dm = module.masker, module.trainer.datamodule
    if masker.segmenter is None and masker.scorer is None:
        return  # the unmasked path: nothing to set up
    masker.setup(scoring_context(module))
    if masker.needs_scale and masker.calibration_batches and not masker.calibrated:
        log_scale(module, masker.calibrate_on(training_batches(dm, masker.calibration_batches, module.device)))


def training_batches(dm, n_batches: int, device) -> Iterable[dict]:
    """The first `n_batches` training batches of a datamodule, in data order, on `device`."""
    collate = dm.collator()
    n = n_batches * dm.batch_size
    for start in range(0, min(n, len(dm.train_data)), dm.batch_size):
        yield {k: v.to(device) for k, v in collate(dm.train_data[start:start + dm.batch_size]).items()}


def log_scale(module, stats: dict[str, float]) -> None:
    if module.logger is not None:
        module.logger.log_metrics(stats, step=0)
