"""`amrlhf segments --config RECIPE.yaml`: render what a recipe's scorer + segmenter keep and mask
on its data, before any training (the same page `SegmentsView` logs during training)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from amrlhf.callbacks.segments_view import describe, pairs_for_page, render_page
from amrlhf.errors import AmrlhfError

log = logging.getLogger(__name__)


def segments_page(recipe: str, overrides: list[str], limit: int, split: str, out: Path) -> Path:
    from amrlhf.lightning_cli import AmrlhfCLI
    from amrlhf.modules.masking import calibrate, segment_batch
    from amrlhf.scorers import CachedScorer

    cli = AmrlhfCLI(args=["--config", recipe, "--trainer.logger=false", *overrides], run=False)
    module, dm = cli.model, cli.datamodule
    if module.segmenter is None:
        raise AmrlhfError(f"{recipe}: the module has no segmenter to show")
    if getattr(dm, "kind", None) == "prompt":
        raise AmrlhfError(f"{recipe}: a PPO recipe's data are prompts; its responses exist only during training "
                          "(see the segments/* metrics); point `amrlhf segments` at a DPO or SFT recipe")
    dm.setup("fit")
    if isinstance(module.scorer, CachedScorer):  # score just the shown examples, without a cache
        module.scorer = module.scorer.source
    if module.scorer is not None:
        module.scorer.setup(module)
    if hasattr(module.segmenter, "setup"):
        module.segmenter.setup(dm.tokenizer)
    if module.scorer is not None and hasattr(module.segmenter, "calibrate") and module.score_calibration_batches:
        calibrate(module, dm)
    data = dm.val_data if split == "val" and dm.val_data else dm.train_data
    pairs = []
    collate = dm._collator()
    for start in range(0, min(limit, len(data)), 4):
        batch = collate(data[start:min(start + 4, limit)])
        with torch.no_grad():
            _, seg, scores = segment_batch(module, batch, split, observe=False)
        pairs += pairs_for_page(dm.tokenizer, batch, seg, scores)
    header = f"{describe(module.segmenter)}; scorer {type(module.scorer).__name__ if module.scorer else 'none'}; " \
             f"data {dm.val_source if split == 'val' and dm.val_data else dm.train_source}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(f"segments: {Path(recipe).name}", header, pairs), encoding="utf-8")
    return out
