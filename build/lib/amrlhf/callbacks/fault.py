"""Fault injection for crash/resume tests and drills: kill the process after step N."""

from __future__ import annotations

import logging
import os

import lightning as L

log = logging.getLogger(__name__)


class CrashAtStep(L.Callback):
    """Hard-exits the process (no clean-up, like a kill) when the batch after optimizer step
    `step` starts: the checkpoints of step `step` have been written by then."""

    def __init__(self, step: int, once: str | None = None):
        """once: a marker file; the crash happens only while it does not exist (it is created just
        before), so the resumed run goes on (a drill of kill-and-continue)."""
        self.step, self.once = step, once

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            if self.once is not None:
                from pathlib import Path

                if Path(self.once).exists():
                    return
                Path(self.once).write_text(f"crashed at step {trainer.global_step}\n")
            log.warning("CrashAtStep: exiting at step %d", trainer.global_step)
            os._exit(17)
