"""MLflow tracking for a run, on rank 0 only (other ranks get a tracker that does nothing).

Default tracking URI: a SQLite file in the run folder (``sqlite:///RUN/mlflow.db``), artifacts in
``RUN/mlruns``; ``--tracking-uri`` points at a server instead. The run id is kept in
``RUN/mlflow_run_id`` so a resumed run logs into the same MLflow run.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["Tracker", "default_tracking_uri"]

EXPERIMENT = "hiceller"


def default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Tracker:
    """A thin MLflow wrapper: params, metrics, tags, artifacts; nested child runs for finetune."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        tracking_uri: str | None = None,
        run_name: str | None = None,
        experiment: str = EXPERIMENT,
        parent_run_id: str | None = None,
        id_file: str = "mlflow_run_id",
    ):
        self.enabled = enabled
        self.run_id: str | None = None
        self.run_dir = Path(run_dir)
        if not enabled:
            return
        _quiet_mlflow()
        import mlflow

        self.mlflow = mlflow
        self.tracking_uri = tracking_uri or default_tracking_uri(run_dir)
        mlflow.set_tracking_uri(self.tracking_uri)
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            artifacts = None if tracking_uri else (self.run_dir.resolve() / "mlruns").as_uri()
            exp_id = mlflow.create_experiment(experiment, artifact_location=artifacts)
        else:
            exp_id = exp.experiment_id
        self.client = mlflow.MlflowClient(self.tracking_uri)
        id_path = self.run_dir / id_file
        if id_path.is_file():
            self.run_id = id_path.read_text().strip()
        else:
            tags = {"mlflow.runName": run_name or self.run_dir.name}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            self.run_id = self.client.create_run(exp_id, tags=tags).info.run_id
            id_path.parent.mkdir(parents=True, exist_ok=True)
            id_path.write_text(self.run_id)
        self.experiment_id = exp_id

    def child(self, run_dir: Path, run_name: str, id_file: str) -> "Tracker":
        if not self.enabled:
            return Tracker(run_dir, enabled=False)
        return Tracker(run_dir, True, self.tracking_uri, run_name, parent_run_id=self.run_id, id_file=id_file)

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        todo = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(todo), 100):
            self.client.log_batch(self.run_id, params=todo[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled:
            return
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_table(self, frame, artifact_file: str) -> None:
        """A pandas DataFrame as an MLflow table (a JSON artifact the UI shows as a table)."""
        if self.enabled:
            self.client.log_table(self.run_id, data=frame, artifact_file=artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.client.set_terminated(self.run_id, status)
