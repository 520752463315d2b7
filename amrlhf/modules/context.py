"""What a LightningModule hands its injected components, so that they never climb to the trainer themselves:
the run's data as a cache sees it (`run_data`) and what a scorer's set-up may read (`scoring_context`)."""

from __future__ import annotations

from amrlhf.cache import RunData
from amrlhf.models import load_tokenizer
from amrlhf.models.forward import DEFAULT_LOGITS_CHUNK
from amrlhf.scorers.base import ScoringContext


def attached_datamodule(module):
    """The trainer's datamodule, or None outside a fit (a module scored on its own, in a study or a test)."""
    return getattr(module.trainer, "datamodule", None) if module._trainer is not None else None


def run_data(module) -> RunData:
    """The train/val examples of the module's fit, their collator, tokenizer and max_length, the trainer's
    precision and forward context, and whether this rank writes cache files."""
    trainer = module.trainer
    dm = trainer.datamodule
    return RunData(splits={"train": dm.train_data, "val": dm.val_data}, collate=dm.collator(), tokenizer=dm.tokenizer,
                   max_length=dm.max_length, precision=str(trainer.precision),
                   forward_context=trainer.precision_plugin.forward_context, write=trainer.is_global_zero)


def scoring_context(module, dm=None) -> ScoringContext:
    """The context for the module's scorers: the policy's tokenizer (the datamodule's: `dm`, else the trainer's;
    without either, loaded by the policy's name), the module's device and logits chunk, whether the rows ship
    token scores, and, inside a fit, its data (what a CachedScorer fills), built when asked for."""
    attached = attached_datamodule(module)
    dm = dm if dm is not None else attached
    tokenizer = getattr(dm, "tokenizer", None)
    if tokenizer is None:
        tokenizer = load_tokenizer(module.policy_spec.name)
    return ScoringContext(tokenizer=tokenizer, device=module.device,
                          logits_chunk=getattr(module, "logits_chunk", DEFAULT_LOGITS_CHUNK),
                          rows_have_token_scores=bool(getattr(dm, "with_token_scores", False)),
                          run_data=(lambda: run_data(module)) if attached is not None else None)
