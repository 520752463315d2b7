"""Saves the resolved recipe with the run (folder + MLflow), logs params and data reports,
logs the final weights (not every checkpoint) as an MLflow artifact, and keeps a resumed run's history whole:
the metrics of a step whose checkpoint was written before they were logged travel in the checkpoint and are
logged on resume (or when a stop signal ends the run) unless MLflow has them already."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning.pytorch.loggers import MLFlowLogger

from amrlhf.errors import Interrupted
from amrlhf.tracking import RunWriter, record_run

log = logging.getLogger(__name__)
UNLOGGED = "unlogged_step_metrics"  # the checkpoint's entry


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


def unlogged_step_metrics(trainer) -> dict | None:
    """What Lightning logs for the training step whose `on_train_batch_end` is running, where checkpoints are
    saved (it logs them after that hook), as it logs them: {"step": int, "metrics": {name: float}}. None outside
    that window, or when Lightning logs nothing at this step."""
    loop, connector = trainer.fit_loop.epoch_loop, trainer._logger_connector
    progress = loop.batch_progress.total
    if (trainer.state.fn != "fit" or progress.processed == progress.completed or not trainer.loggers
            or (loop._should_accumulate() and trainer.lightning_module.automatic_optimization)
            or not connector.should_update_logs):
        return None
    metrics = convert_tensors_to_scalars(connector.metrics["log"])
    if not metrics:
        return None
    step = metrics.pop("step", None)  # as LoggerConnector.log_metrics chooses the step
    if step is None:
        metrics.setdefault("epoch", trainer.current_epoch)
        step = loop._batches_that_stepped
    return {"step": int(step), "metrics": metrics}


class TrackRun(L.Callback):
    def __init__(self, run_dir: Path, config_yaml: str, config: dict, log_checkpoint: bool = True):
        self.run_dir, self.config_yaml, self.config = Path(run_dir), config_yaml, config
        self.log_checkpoint = log_checkpoint
        self.unlogged: dict | None = None  # from the checkpoint a run resumes from

    def _mlflow(self, trainer) -> MLFlowLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)

    @staticmethod
    def _logged(logger: MLFlowLogger, key: str, step: int) -> bool:
        return any(m.step == step for m in logger.experiment.get_metric_history(logger.run_id, key))

    def _log_unless_logged(self, trainer, metrics: dict, step: int) -> bool:
        """Metrics logged in one batch (all of them reach MLflow or none): logged unless they were."""
        logger = self._mlflow(trainer)
        if not metrics or logger is None or not trainer.is_global_zero or self._logged(logger, next(iter(metrics)), step):
            return False
        logger.log_metrics(metrics, step=step)
        return True

    def _log_unlogged(self, trainer, unlogged: dict | None) -> None:
        if unlogged is not None and self._log_unless_logged(trainer, unlogged["metrics"], unlogged["step"]):
            log.info("logged the metrics of step %d (its checkpoint was saved before they were)", unlogged["step"])

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
        RunWriter(client=logger.experiment).files(logger.run_id, [path])
        params = {k.replace(",", "_"): v for k, v in _flatten(self.config).items() if k != "ckpt_path"}
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            log.warning("resumed with changed settings (kept in %s, not as params): %s", path.name, changed)
        new = {k: v for k, v in params.items() if k not in existing}
        if new:
            logger.log_hyperparams(dict(list(new.items())[:400]))

    def on_fit_start(self, trainer, pl_module) -> None:
        report = getattr(trainer.datamodule, "report", None)
        if report:  # once per run, not again by each resume
            self._log_unless_logged(trainer, {k: float(v) for k, v in report.items()}, 0)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        unlogged = unlogged_step_metrics(trainer)
        if unlogged is not None:
            checkpoint[UNLOGGED] = unlogged

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.unlogged = checkpoint.get(UNLOGGED)

    def on_train_start(self, trainer, pl_module) -> None:
        unlogged, self.unlogged = self.unlogged, None
        self._log_unlogged(trainer, unlogged)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, Interrupted):  # the stop may follow a checkpoint saved in on_train_batch_end
            self._log_unlogged(trainer, unlogged_step_metrics(trainer))

    def on_fit_end(self, trainer, pl_module) -> None:
        logger = self._mlflow(trainer)
        if not self.log_checkpoint or logger is None:
            return
        final = self.run_dir / "final.ckpt"
        trainer.save_checkpoint(final, weights_only=True)
        if trainer.is_global_zero:
            log.info("logging final weights to MLflow (%s)", final)
            RunWriter(client=logger.experiment).files(logger.run_id, [final], artifact_path="checkpoints")
