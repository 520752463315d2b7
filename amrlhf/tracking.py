"""MLflow tracking: a local sqlite store by default, any URI from the recipe or
`MLFLOW_TRACKING_URI`; checked reachable before training; a resumed run reattaches."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from amrlhf.errors import AmrlhfError

log = logging.getLogger(__name__)
RUN_FILE = "mlflow_run.json"
# MLflow 3's UI opens an experiment by its kind; without one it may open the GenAI "evaluation runs" view.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


@dataclass
class Tracking:
    """uri: MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<runs>/mlflow.db).
    experiment: MLflow experiment name. log_checkpoint: log the final weights as an artifact.
    parent_run: an MLflow run id this run is nested under (a study's cells set it)."""

    uri: str | None = None
    experiment: str = "amrlhf"
    log_checkpoint: bool = True
    parent_run: str | None = None


def default_uri(runs_root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs_root.resolve()}/mlflow.db"


def check_reachable(uri: str) -> None:
    """Fail before training, with a clear message, when the tracking server does not answer or the
    store cannot be opened (a `file:` store MLflow refuses, a database it cannot create)."""
    if not uri.startswith(("http://", "https://")):
        from mlflow import MlflowClient

        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as exc:  # any failure to open the store: the user's URI, not a bug here
            line = " ".join(str(exc).split())
            raise AmrlhfError(f"MLflow tracking URI {uri} cannot be used ({exc.__class__.__name__}: {line}); "
                              "unset MLFLOW_TRACKING_URI / tracking.uri to use the local sqlite store") from None
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except Exception as exc:
        raise AmrlhfError(f"MLflow tracking server {uri} is unreachable ({exc.__class__.__name__}); "
                          "start it, or unset MLFLOW_TRACKING_URI / tracking.uri to use a local store") from None


def experiment_id(client, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created if new, and marked as model training (`EXPERIMENT_KIND`, MLflow's
    own tag) so the UI lands on runs and metric charts; an experiment the user gave another kind keeps it."""
    key, kind = EXPERIMENT_KIND
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags={key: kind})
        except Exception:  # another process (a rank started by torchrun) created it first: use theirs
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if key not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, key, kind)
    return exp.experiment_id


def artifact_location(uri: str, runs_root: Path) -> str | None:
    """Local stores keep artifacts beside the runs (`<runs_root>/mlartifacts`); a server chooses its own."""
    return None if uri.startswith("http") else (runs_root / "mlartifacts").resolve().as_uri()


class RunWriter:
    """Every MLflow write outside the Lightning logger goes through here: a study's parent run and its cells'
    held-out metrics, an evaluation-only run, an lm-eval report logged into a training run. `client`: an
    existing MlflowClient (a logger's `experiment`), else one for `uri`."""

    def __init__(self, uri: str | None = None, client=None):
        from mlflow import MlflowClient

        self.client = client if client is not None else MlflowClient(tracking_uri=uri)
        self.uri = uri or self.client.tracking_uri

    def start(self, experiment: str, run_name: str, runs_root: Path, tags: dict[str, str] | None = None) -> str:
        """A new run in `experiment` (created and marked as model training if new) -> its id."""
        exp = experiment_id(self.client, experiment, artifact_location(self.uri, runs_root))
        return self.client.create_run(exp, run_name=run_name, tags=tags or {}).info.run_id

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def metrics(self, run_id: str, values: dict[str, float], step: int = 0) -> None:
        for key, value in values.items():
            self.client.log_metric(run_id, key, value, step=step)

    def params(self, run_id: str, values: dict[str, str]) -> None:
        """Parameters not set yet (MLflow refuses to change one)."""
        existing = self.client.get_run(run_id).data.params
        for key, value in values.items():
            if key not in existing:
                self.client.log_param(run_id, key, value)

    def files(self, run_id: str, paths, artifact_path: str | None = None) -> None:
        for path in paths:
            self.client.log_artifact(run_id, str(path), artifact_path=artifact_path)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)


def make_logger(cfg: Tracking, run_dir: Path, run_name: str, resume: bool):
    """An MLFlowLogger; with `resume`, reattached to the run recorded in run_dir/mlflow_run.json."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    uri = cfg.uri or default_uri(run_dir.parent)
    check_reachable(uri)
    run_id = None
    record = run_dir / RUN_FILE
    if resume and record.exists():
        saved = json.loads(record.read_text())
        if saved.get("uri") == uri:
            run_id = saved["run_id"]
            log.info("resuming: reattaching to MLflow run %s", run_id)
    artifacts = artifact_location(uri, run_dir.parent)
    experiment_id(MlflowClient(tracking_uri=uri), cfg.experiment, artifacts)
    tags = {"mlflow.parentRunId": cfg.parent_run} if cfg.parent_run else None
    logger = MLFlowLogger(experiment_name=cfg.experiment, run_name=run_name, tracking_uri=uri, run_id=run_id,
                          artifact_location=artifacts, log_model=False, tags=tags)
    return logger


def record_run(logger, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_FILE).write_text(json.dumps({"uri": logger._tracking_uri, "run_id": logger.run_id,
                                                "experiment_id": logger.experiment_id}))


def ui_hint(uri: str) -> str:
    if uri.startswith("http"):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)"
