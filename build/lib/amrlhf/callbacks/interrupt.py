"""SIGTERM (what a cluster scheduler sends on pre-emption, and `kill`) and SIGINT (Ctrl-C) during
`amrlhf fit`: finish the current step, save a resumable `last.ckpt`, and stop with `Interrupted`
(the CLI prints one line saying how to resume and exits 128 + the signal: 143 / 130).

Built on Lightning's own SIGTERM mechanism: while the trainer runs, Lightning's handler sets
`trainer.received_sigterm`, and its loops stop at their safe points (after a training batch, or after
the current validation batch) with a `SIGTERMException`. SIGINT is routed into the same handler, so both
signals stop the same way. The checkpoint is written where Lightning's periodic checkpoint is (at the end
of a training batch: the state an exact resume starts from), to a temporary name that is renamed over
`last.ckpt` once complete. A signal before training starts (loading, caching) or after it ends stops at
once, with nothing to save; a second signal stops at once too.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from amrlhf.errors import Interrupted

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal(L.Callback):
    """Saves `<ckpt_dir>/last.ckpt` when a stop signal arrived (see the module docstring)."""

    def __init__(self, ckpt_dir: Path):
        self.ckpt_dir = Path(ckpt_dir)
        self.signum: int | None = None   # the first stop signal received
        self.saved: Path | None = None   # the checkpoint written because of it
        self.step: int | None = None     # the optimizer step it holds

    # ------------------------------------------------------------------ signals
    _forwarding = False

    def _handler(self, signum, frame) -> None:
        if self._forwarding:
            return  # our own SIGINT, coming back through Lightning's SIGTERM handler
        if self.signum is not None:
            raise Interrupted(self.signum)  # a second signal: stop now
        self.signum = signum
        lightning = signal.getsignal(signal.SIGTERM)
        if lightning == self._handler:  # Lightning's loops are not running (loading, caching, after training)
            raise Interrupted(signum)
        if signum != signal.SIGTERM:  # SIGINT into Lightning's SIGTERM handler: sets trainer.received_sigterm
            self._forwarding = True
            try:
                lightning(signal.SIGTERM, frame)
            finally:
                self._forwarding = False

    @contextmanager
    def handling_signals(self):
        """Our handler for SIGTERM and SIGINT for the duration of a trainer call (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        before = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, self._handler)
        try:
            yield
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)

    # ------------------------------------------------------------------ saving
    def _save(self, trainer) -> None:
        final = self.ckpt_dir / "last.ckpt"
        partial = self.ckpt_dir / "interrupted.ckpt.partial"
        trainer.save_checkpoint(partial)
        if trainer.is_global_zero:
            os.replace(partial, final)  # atomic: a kill mid-write leaves the previous last.ckpt whole
        self.saved, self.step = final, trainer.global_step  # the CLI's closing line says where

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # every rank takes the same decision (a rank may not have received the signal yet)
        if self.saved is None and trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False):
            self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Lightning stopped mid-validation (or at an epoch's end) before a training batch ended: its
        # loops stop there only at a safe point, which a checkpoint resumes from; one process only
        # (under DDP the ranks may be at different points, and saving waits for all of them)
        if (isinstance(exception, SIGTERMException) and self.saved is None and trainer.world_size == 1
                and trainer.state.fn == "fit" and trainer.global_step > 0):
            self._save(trainer)
