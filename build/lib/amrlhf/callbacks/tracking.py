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
        logger = self._mlflow(trainer)
        existing = logger.experiment.get_run(logger.run_id).data.params if logger is not None else {}
        # a resumed run keeps its first config.yaml; the resuming command's config is saved beside it
        path = self.run_dir / ("config.yaml" if not existing else "config.resumed.yaml")
        path.write_text(self.config_yaml)
        if logger is None:
            return
        record_run(logger, self.run_dir)
        logger.experiment.log_artifact(logger.run_id, str(path))
        params = {k.replace(",", "_"): v for k, v in _flatten(self.config).items() if k != "ckpt_path"}
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            log.warning("resumed with changed settings (kept in %s, not as params): %s", path.name, changed)
        new = {k: v for k, v in params.items() if k not in existing}
        if new:
            logger.log_hyperparams(dict(list(new.items())[:400]))

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
