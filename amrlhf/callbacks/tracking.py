"""Saves the resolved recipe with the run (folder + MLflow), logs params and data reports,
and logs the final weights (not every checkpoint) as an MLflow artifact."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger

from amrlhf.tracking import record_run

log = logging.getLogger(__name__)


def _flatten(d, prefix=""):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list | tuple) and any(isinstance(x, dict) for x in d):
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = str(d)[:500]
    return out


class TrackRun(L.Callback):
    def __init__(self, run_dir: Path, config_yaml: str, config: dict, log_checkpoint: bool = True):
        self.run_dir, self.config_yaml, self.config = Path(run_dir), config_yaml, config
        self.log_checkpoint = log_checkpoint

    def _mlflow(self, trainer) -> MLFlowLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "config.yaml"
        path.write_text(self.config_yaml)
        logger = self._mlflow(trainer)
        if logger is not None:
            record_run(logger, self.run_dir)
            logger.experiment.log_artifact(logger.run_id, str(path))
            params = _flatten(self.config)
            logger.log_hyperparams({k.replace(",", "_"): v for k, v in list(params.items())[:400]})

    def on_fit_start(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        report = getattr(dm, "report", None)
        logger = self._mlflow(trainer)
        if report and logger is not None and trainer.is_global_zero:
            logger.log_metrics({k: float(v) for k, v in report.items()}, step=0)

    def on_fit_end(self, trainer, pl_module) -> None:
        logger = self._mlflow(trainer)
        if not self.log_checkpoint or logger is None:
            return
        final = self.run_dir / "final.ckpt"
        trainer.save_checkpoint(final, weights_only=True)
        if trainer.is_global_zero:
            log.info("logging final weights to MLflow (%s)", final)
            logger.experiment.log_artifact(logger.run_id, str(final), artifact_path="checkpoints")
