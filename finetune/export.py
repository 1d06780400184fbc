"""`hiceller export`: a ZeRO checkpoint of any stage -> an annotator bundle (+ an MLflow pyfunc model).

Accepts a fine-tuning run folder (its best round, from summary.json), one round's folder (its
newest complete checkpoint) or a checkpoint folder. The checkpoint is consolidated to fp32 with
DeepSpeed's zero-to-fp32, checked against its labels and vocabulary, and written as a bundle
(pretrain/layout.py: temporary folder + rename, so a killed export leaves nothing behind).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

from hiceller.errors import InputError
from pretrain import layout
from pretrain.tracking import experiment_id, tracking_store

__all__ = ["export_bundle", "log_pyfunc"]

PYFUNC_ENTRY = Path(__file__).with_name("pyfunc_model.py")
"""The models-from-code file of the MLflow model (calls ``mlflow.models.set_model``)."""


def _run_bundle_extras(run: Path, src: Path) -> tuple[dict | None, dict]:
    """Calibration and provenance of the bundle a fine-tuning run wrote, when ``src`` is its best round
    (the same weights): calibration is fitted on the run's own cells at its end, not per round."""
    bundle = layout.bundle_of(run)
    summary = layout.read_summary(run)
    if bundle == run or summary is None or layout.round_dir(run, int(summary.get("round", 0))) != src:
        return None, {}
    made = layout.load_bundle(bundle)
    return made.calibration, made.provenance


def export_bundle(checkpoint: Path, out: Path, overwrite: bool = False) -> Path:
    if not Path(checkpoint).exists():
        raise InputError(f"--checkpoint {checkpoint} does not exist")
    src, metrics = layout.best_round_dir(checkpoint)
    model = layout.load_trained(src)
    model.calibration, model.provenance = _run_bundle_extras(Path(checkpoint), src)
    spec = model.spec
    if not spec.is_classifier:
        raise InputError(f"{model.source} is a pretraining checkpoint (no labels.json): fine-tune it first (`hiceller finetune`)")
    if "head.weight" not in model.state_dict or model.state_dict["head.weight"].shape[0] != len(spec.labels):
        raise InputError(f"{model.source}: classifier does not match its {len(spec.labels)} labels")
    model.metrics = {**metrics, "checkpoint": str(model.source)}
    return layout.write_bundle(out, model, overwrite=overwrite)


def log_pyfunc(bundle: Path, tracking_uri: str, register: str | None) -> str:
    """Log the bundle as an MLflow pyfunc model (registered under ``register`` when given).

    Models-from-code: MLflow stores the entry file (finetune/pyfunc_model.py) and the bundle as an
    artifact, never a pickle of the model object, and the bundle is verified at every load."""
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="mlflow")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    from finetune.pyfunc import signature

    with tracking_store(tracking_uri):
        exp_id = experiment_id(mlflow.MlflowClient(tracking_uri), tracking_uri)
        made = layout.load_bundle(bundle).provenance
        # nested under the fine-tuning run that made the weights, when it logs to this store
        parent = made.get("mlflow_run_id") if made.get("tracking_uri") == tracking_uri else None
        with mlflow.start_run(experiment_id=exp_id, run_name=f"export-{Path(bundle).name}", parent_run_id=parent,
                              tags={"kind": "export"}) as run:
            info = mlflow.pyfunc.log_model(
                name="celler",
                python_model=str(PYFUNC_ENTRY),
                artifacts={"bundle": str(Path(bundle).resolve())},
                signature=signature(),
                registered_model_name=register,
            )
            mlflow.log_dict(json.loads((Path(bundle) / "metrics.json").read_text()), "metrics.json")
    return info.model_uri if run else ""
