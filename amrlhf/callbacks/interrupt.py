"""SIGTERM (what a cluster scheduler sends on pre-emption, and `kill`) and SIGINT (Ctrl-C) during `amrlhf fit`:
finish the current step, save a resumable `last.ckpt`, and stop with `Interrupted` (the CLI prints one line
saying how to resume and exits 128 + the signal: 143 / 130).

The handler only records the signal: no collective, no checkpoint, nothing that waits for another process inside
it. Lightning's own SIGTERM handling is switched off while this one is in place: its handler broadcasts from inside
the handler and forwards the signal to the other processes, and its loops stop each process on its own, which
under several processes (DDP) deadlocks (one rank in the handler's broadcast, another in the backward all-reduce).
Instead, at every step boundary (the end of a training step, or of the validation that follows it, so the step's
metrics are logged), all processes take one decision together: an all-reduce (max) of the signal each received,
so a process that did not receive it, or not yet, stops at the same step. Then all of them take part in saving
`last.ckpt` (the strategy writes it on rank 0) and raise `Interrupted`. Under several processes a repeated signal
changes nothing (a terminal signals each process, a scheduler may signal twice); on one process a second signal
stops at once. A signal while no training loop runs (loading, caching, validate / test, after training) stops at
once, with nothing to save.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

from amrlhf.callbacks.checkpoint import validation_follows
from amrlhf.errors import Interrupted

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _NoSignalHandlers(_SignalConnector):
    """Lightning's signal connector without its handlers (`trainer.received_sigterm` stays False)."""

    def register_signal_handlers(self) -> None:
        self.received_sigterm = False


class StopOnSignal(L.Callback):
    """Saves `<ckpt_dir>/last.ckpt` and stops when a stop signal arrived (see the module docstring)."""

    def __init__(self, ckpt_dir: Path):
        self.ckpt_dir = Path(ckpt_dir)
        self.signum: int | None = None   # the stop signal (received here, or by another process)
        self.saved: Path | None = None   # the checkpoint written because of it
        self.step: int | None = None     # the optimizer step it holds
        self.training = False            # a training loop runs: it reaches a step boundary
        self.processes = 1

    # ------------------------------------------------------------------ signals
    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if not self.training:
                raise Interrupted(signum)
        elif self.processes == 1:
            raise Interrupted(self.signum)  # a second signal: stop now

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

    # ------------------------------------------------------------------ the decision
    def setup(self, trainer, pl_module, stage: str) -> None:
        self.processes = trainer.world_size
        trainer._signal_connector = _NoSignalHandlers(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self.training = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.training = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not validation_follows(trainer):  # else once it has ended
            self._stop_if_signalled(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.training:  # fit's validation, not the sanity check before training
            self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer) -> None:
        signum = self.signum or 0
        if self.processes > 1:  # every process reaches this point of the same step: one all-reduce
            strategy = trainer.strategy
            signum = int(strategy.reduce(torch.tensor(signum, device=strategy.root_device), reduce_op="max"))
        if not signum:
            return
        self.signum = signum
        final = self.ckpt_dir / "last.ckpt"
        if trainer.is_global_zero:
            log.info("%s: saving %s at step %d", signal.Signals(signum).name, final, trainer.global_step)
        trainer.save_checkpoint(final)  # every process takes part; the checkpoint IO replaces the file atomically
        self.saved, self.step = final, trainer.global_step  # the CLI's closing line says where
        raise Interrupted(signum)
