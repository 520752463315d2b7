"""`amrlhf segments --config RECIPE.yaml`: render what a recipe's scorer + segmenter keep and mask
on its data, before any training (the same page `SegmentsView` logs during training)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from amrlhf.callbacks.segments_view import describe, pairs_for_page, render_page
from amrlhf.errors import AmrlhfError
from amrlhf.modules.context import scoring_context
from amrlhf.modules.masking import training_batches

log = logging.getLogger(__name__)


def segments_page(recipe: str, overrides: list[str], limit: int, split: str, out: Path) -> Path:
    from amrlhf.lightning_cli import AmrlhfCLI

    cli = AmrlhfCLI(args=["--config", recipe, "--trainer.logger=false", *overrides], run=False)
    module, dm = cli.model, cli.datamodule
    if module.segmenter is None:
        raise AmrlhfError(f"{recipe}: the module has no segmenter to show")
    if getattr(dm, "kind", None) == "prompt":
        raise AmrlhfError(f"{recipe}: a PPO recipe's data are prompts; its responses exist only during training "
                          "(see the segments/* metrics); point `amrlhf segments` at a DPO or SFT recipe")
    dm.setup("fit")
    masker = module.masker.uncached()  # score just the shown examples, without a cache
    masker.setup(scoring_context(module, dm))
    if masker.needs_scale and masker.calibration_batches:
        masker.calibrate_on(training_batches(dm, masker.calibration_batches, module.device))
    data = dm.val_data if split == "val" and dm.val_data else dm.train_data
    pairs = []
    collate = dm.collator()
    for start in range(0, min(limit, len(data)), 4):
        batch = collate(data[start:min(start + 4, limit)])
        with torch.no_grad():
            masked = masker.mask(batch, split, observe=False)
        pairs += pairs_for_page(dm.tokenizer, batch, masked.segmentation, masked.scores)
    header = f"{describe(masker)}; scorer {type(masker.scorer).__name__ if masker.scorer else 'none'}; " \
             f"data {dm.val_source if split == 'val' and dm.val_data else dm.train_source}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(f"segments: {Path(recipe).name}", header, pairs), encoding="utf-8")
    return out
