"""Fault injection for crash/resume tests and drills: kill the process after step N."""

from __future__ import annotations

import logging
import os

import lightning as L

log = logging.getLogger(__name__)


class CrashAtStep(L.Callback):
    """Hard-exits the process (no clean-up, like a kill) when the batch after optimizer step
    `step` starts: the checkpoints of step `step` have been written by then."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            log.warning("CrashAtStep: exiting at step %d", trainer.global_step)
            os._exit(17)
