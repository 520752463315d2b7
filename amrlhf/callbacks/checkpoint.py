"""Checkpoints published only once their step is complete.

Lightning saves the periodic checkpoint in `on_train_batch_end`: before that step's metrics are logged, and
before the validation that runs right after the step. A run resumed from it trains on from the next step and
skips that validation, so a kill between the checkpoint and the rest of the step would lose those metrics for
good. `StepCheckpoint` saves a step followed by validation after the validation (its metrics logged); the
training metrics of a step saved in `on_train_batch_end` travel in the checkpoint (`TrackRun`) and are logged
on resume if they never reached MLflow.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


def validation_follows(trainer) -> bool:
    """Whether Lightning validates right after the training batch whose `on_train_batch_end` is running (its own
    test, which it makes next: the same answer on every rank)."""
    loop = trainer.fit_loop.epoch_loop
    return not loop._skip_next_val and loop._should_check_val_fx(trainer.fit_loop._data_fetcher)


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint whose step-triggered save waits, when validation runs right after the step,
    until that validation has ended (the module docstring)."""

    _deferred = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if validation_follows(trainer):
            self._deferred = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._deferred:
            self._deferred = False
            super().on_train_batch_end(trainer, pl_module, None, None, 0)  # its step test, its save
