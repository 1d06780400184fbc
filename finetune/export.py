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

__all__ = ["export_bundle", "log_pyfunc"]


def export_bundle(checkpoint: Path, out: Path, overwrite: bool = False) -> Path:
    if not Path(checkpoint).exists():
        raise InputError(f"--checkpoint {checkpoint} does not exist")
    src, metrics = layout.best_round_dir(checkpoint)
    model = layout.load_trained(src)
    spec = model.spec
    if not spec.is_classifier:
        raise InputError(f"{model.source} is a pretraining checkpoint (no labels.json): fine-tune it first (`hiceller finetune`)")
    if "head.weight" not in model.state_dict or model.state_dict["head.weight"].shape[0] != len(spec.labels):
        raise InputError(f"{model.source}: classifier does not match its {len(spec.labels)} labels")
    model.metrics = {**metrics, "checkpoint": str(model.source)}
    return layout.write_bundle(out, model, overwrite=overwrite)


def log_pyfunc(bundle: Path, tracking_uri: str | None, register: str | None) -> str:
    """Log the bundle as an MLflow pyfunc model (registered under ``register`` when given)."""
    import mlflow

    from finetune.pyfunc import CellerPyfunc, signature

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="mlflow")
    os.environ.setdefault("MLFLOW_ENABLE_PROGRESS_BAR", "false")

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    name = "hiceller-models"
    if mlflow.get_experiment_by_name(name) is None:
        uri = mlflow.get_tracking_uri()
        # Artifacts beside a sqlite tracking file, never in the caller's working directory.
        where = Path(uri[len("sqlite:///"):]).parent if uri.startswith("sqlite:///") else Path(bundle).resolve().parent
        mlflow.create_experiment(name, artifact_location=(where / "mlruns").resolve().as_uri())
    mlflow.set_experiment(name)
    with mlflow.start_run(run_name=f"export-{Path(bundle).name}") as run:
        info = mlflow.pyfunc.log_model(
            name="celler",
            python_model=CellerPyfunc(),
            artifacts={"bundle": str(Path(bundle).resolve())},
            signature=signature(),
            registered_model_name=register,
        )
        mlflow.log_dict(json.loads((Path(bundle) / "metrics.json").read_text()), "metrics.json")
    return info.model_uri if run else ""
