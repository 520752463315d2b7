"""The segmentation step every masked module shares: scorer -> segmenter -> mask, plus the
one-time setup (scorer models, delimiter ids, score scale measured on training data)."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from amrlhf.distributed import pooled_std
from amrlhf.segmenters import Segmentation

log = logging.getLogger(__name__)


def setup_segmentation(module) -> None:
    """Before training: load the scorer, give a segmenter its tokenizer knowledge, calibrate the scale."""
    dm = module.trainer.datamodule
    if module.scorer is not None:
        module.scorer.setup(module)
    if module.segmenter is not None and hasattr(module.segmenter, "setup"):
        module.segmenter.setup(dm.tokenizer)
    needs_scale = module.scorer is not None and hasattr(module.segmenter, "calibrate")
    if needs_scale and module.score_calibration_batches and not module._calibrated:
        calibrate(module, dm)


@torch.no_grad()
def calibrate(module, dm) -> None:
    """Scale = standard deviation of response-token scores over the first training batches, so that
    delta is in standard deviations; logged with quantiles (the score distribution) and stored in
    checkpoints (a resumed run keeps it)."""
    collate = dm._collator()
    n = module.score_calibration_batches * dm.batch_size
    values = []
    for start in range(0, min(n, len(dm.train_data)), dm.batch_size):
        batch = {k: v.to(module.device) for k, v in collate(dm.train_data[start:start + dm.batch_size]).items()}
        scores = module.scorer.score(module, batch, "train").scores
        values.append(scores[batch["response_mask"].bool()].float().cpu())
    record_scale(module, torch.cat(values))


def record_scale(module, flat: torch.Tensor, pooled: bool = False) -> None:
    """Give the segmenter the scale (std of these response-token scores) and log their distribution.
    `pooled`: the scores are this rank's own (a PPO rollout): the std is over every rank's (the logged
    quantiles are this rank's); without it every rank scored the same examples."""
    if pooled:
        std = pooled_std(flat.to(module.device))  # on the device the process group communicates on
    else:
        std = flat.std().item() if flat.numel() > 1 else 1.0
    module.segmenter.calibrate(std)
    module._calibrated = True
    q = torch.quantile(flat, torch.tensor([0.05, 0.5, 0.95])).tolist()
    stats = {"segments/score_mean": flat.mean().item(), "segments/score_std": std, "segments/score_p05": q[0],
             "segments/score_p50": q[1], "segments/score_p95": q[2]}
    log.info("token scores on %d training tokens: %s", flat.numel(), {k: round(v, 4) for k, v in stats.items()})
    if module.logger is not None:
        module.logger.log_metrics(stats, step=0)


def segment_batch(module, batch: dict, split: str, observe: bool = True
                  ) -> tuple[Tensor, Segmentation | None, Tensor | None]:
    """-> (loss mask [N, T-1], Segmentation or None on the unmasked path, token scores or None).
    `observe`: let a stateful segmenter (running-mean baseline) learn from a training batch."""
    resp = batch["response_mask"]
    if module.segmenter is None:
        return resp, None, None
    kwargs = module.scorer.score(module, batch, split).as_kwargs() if module.scorer is not None else {}
    seg = module.segmenter.segment(response_mask=resp, labels=batch["labels"], input_ids=batch["input_ids"],
                                   **kwargs)
    if observe and split == "train" and kwargs.get("scores") is not None and hasattr(module.segmenter, "observe"):
        module.segmenter.observe(kwargs["scores"], resp)
    return seg.mask.to(resp.dtype) * resp, seg, kwargs.get("scores")
