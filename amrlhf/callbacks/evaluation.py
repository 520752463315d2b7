"""Run an lm-eval suite on the in-memory policy after `fit` (and optionally every N epochs), through
the same function as `amrlhf eval`, and log every metric to the run's MLflow entry."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from amrlhf.tracking import RunWriter

log = logging.getLogger(__name__)


class LmEval(L.Callback):
    """Args:
        suite: a suite YAML (recipes/eval/*.yaml).
        limit: overrides the suite's per-task example limit.
        every_n_epochs: also evaluate after every N training epochs (0 = only after fit).
    Under multi-device training only rank 0 evaluates (the policy is replicated under DDP)."""

    def __init__(self, suite: str = "recipes/eval/quick.yaml", limit: int | None = None, every_n_epochs: int = 0):
        from amrlhf.evaluation.suites import load_suite

        self.suite_path, self.limit, self.every = suite, limit, every_n_epochs
        self.suite = load_suite(suite, limit)  # fail at start, not after hours of training

    def _run(self, trainer, pl_module, tag: str) -> None:
        if not trainer.is_global_zero:
            return
        from amrlhf.evaluation.harness import evaluate, log_to_mlflow

        out = Path(trainer.default_root_dir) / "lm_eval" / tag
        report = evaluate(pl_module.policy, trainer.datamodule.tokenizer, self.suite, out_dir=out, limit=self.limit)
        log.info("lm-eval after %s:\n%s", tag, report.table())
        logger = next((lg for lg in trainer.loggers if hasattr(lg, "run_id")), None)
        if logger is not None:
            log_to_mlflow(RunWriter(client=logger.experiment), logger.run_id, report, step=trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every and (trainer.current_epoch + 1) % self.every == 0:
            self._run(trainer, pl_module, f"epoch{trainer.current_epoch + 1}")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._run(trainer, pl_module, "final")
