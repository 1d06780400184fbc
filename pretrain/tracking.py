"""MLflow tracking for a run, on rank 0 only (other ranks get a tracker that does nothing).

One MLflow home for everything a project does: pretraining, fine-tuning with its rounds, export
and registration, evaluation all log to the same tracking store, so one `hiceller ui` shows a
pretraining run with the fine-tuning runs built on it (nested under it) and the models exported
from them. The store is, first match wins:

1. ``--tracking-uri`` of the command;
2. the store a run folder already logs to (``RUN/mlflow_tracking_uri``; run folders written before
   it logged to ``RUN/mlflow.db``), so a resumed run continues its own MLflow run;
3. ``MLFLOW_TRACKING_URI``;
4. the workspace's SQLite file: ``$HICELLER_WORKSPACE/mlflow.db``, or ``./mlflow.db`` in the
   directory the command runs in (MLflow's own default), artifacts in ``mlruns/`` beside it.

The run id is kept in ``RUN/mlflow_run_id``. The experiment is tagged as model training, so MLflow 3
opens it in its training view rather than the GenAI one.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["Tracker", "experiment_id", "resolve_tracking_uri", "run_id_of", "tracking_store", "workspace_tracking_uri"]

EXPERIMENT = "hiceller"
WORKSPACE_ENV = "HICELLER_WORKSPACE"
RUN_ID_FILE = "mlflow_run_id"
URI_FILE = "mlflow_tracking_uri"
_KIND = ("mlflow.experimentKind", "custom_model_development")


def workspace_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the workspace's SQLite file (module docstring)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    home = Path(os.environ.get(WORKSPACE_ENV) or Path.cwd())
    return f"sqlite:///{(home / 'mlflow.db').resolve()}"


def _recorded_uri(run_dir: Path) -> str | None:
    """The store a run folder logs to, when it already has an MLflow run."""
    run_dir = Path(run_dir)
    if (run_dir / URI_FILE).is_file():
        return (run_dir / URI_FILE).read_text().strip()
    if (run_dir / RUN_ID_FILE).is_file() and (run_dir / "mlflow.db").is_file():
        return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"  # the layout before one MLflow home
    return None


def resolve_tracking_uri(explicit: str | None, run_dir: Path | None = None) -> str:
    """The tracking store for a command (module docstring, in that order)."""
    return explicit or (run_dir is not None and _recorded_uri(run_dir)) or workspace_tracking_uri()


def run_id_of(run_dir: Path, tracking_uri: str) -> str | None:
    """The MLflow run of a run folder, when it logs to ``tracking_uri`` (links between runs)."""
    run_dir = Path(run_dir)
    if (run_dir / RUN_ID_FILE).is_file() and _recorded_uri(run_dir) == tracking_uri:
        return (run_dir / RUN_ID_FILE).read_text().strip()
    return None


@contextmanager
def tracking_store(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for the block (fluent calls such as start_run and
    log_model use it), then put back as it was: mlflow.set_tracking_uri also exports
    MLFLOW_TRACKING_URI, which every later subprocess of this process would otherwise inherit."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def _artifact_root(uri: str) -> str | None:
    """Artifacts beside a SQLite store (never in the caller's working directory); a server decides its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    return None


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


def experiment_id(client, tracking_uri: str, name: str = EXPERIMENT) -> str:
    """The experiment's id, created (tagged as model training, artifacts beside the store) when new."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        exp_id = client.create_experiment(name, artifact_location=_artifact_root(tracking_uri))
    else:
        exp_id = exp.experiment_id
    if exp is None or exp.tags.get(_KIND[0]) != _KIND[1]:
        client.set_experiment_tag(exp_id, *_KIND)
    return exp_id


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
        id_file: str = RUN_ID_FILE,
    ):
        self.enabled = enabled
        self.run_id: str | None = None
        self.run_dir = Path(run_dir)
        if not enabled:
            return
        _quiet_mlflow()
        import mlflow

        self.tracking_uri = resolve_tracking_uri(tracking_uri, self.run_dir)
        self.client = mlflow.MlflowClient(self.tracking_uri)
        self.experiment_id = experiment_id(self.client, self.tracking_uri, experiment)
        id_path = self.run_dir / id_file
        if id_path.is_file():
            self.run_id = id_path.read_text().strip()
        else:
            tags = {"mlflow.runName": run_name or self.run_dir.name}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            self.run_id = self.client.create_run(self.experiment_id, tags=tags).info.run_id
            id_path.parent.mkdir(parents=True, exist_ok=True)
            id_path.write_text(self.run_id)
            (self.run_dir / URI_FILE).write_text(self.tracking_uri)

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
