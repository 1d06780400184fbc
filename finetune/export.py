"""`hiceller export`: a ZeRO checkpoint of any stage -> an annotator bundle (+ an MLflow pyfunc model).

Accepts a fine-tuning run folder (its best round, from summary.json), one round's folder (its
newest complete checkpoint) or a checkpoint folder. The checkpoint is consolidated to fp32 with
DeepSpeed's zero-to-fp32, checked against its labels and vocabulary, and written as a bundle
(finetune/bundle.py: temporary folder + rename, so a killed export leaves nothing behind).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.bundle import write_bundle
from finetune.weights import load_checkpoint_weights
from hiceller.errors import InputError

__all__ = ["resolve_export_source", "export_bundle", "log_pyfunc"]


def resolve_export_source(path: Path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint-bearing folder, metrics) for a fine-tuning run, a round folder or a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"--checkpoint {path} does not exist")
    summary = path / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        rnd = int(s.get("round", 0))
        return path / ("phase1" if rnd == 0 else f"round{rnd}"), s
    parent_summary = path.parent / "summary.json"
    metrics = json.loads(parent_summary.read_text()) if parent_summary.is_file() else {}
    if (path / "val_metrics.json").is_file():
        metrics = {"val": json.loads((path / "val_metrics.json").read_text())}
    return path, metrics


def export_bundle(checkpoint: Path, out: Path, overwrite: bool = False) -> Path:
    src, metrics = resolve_export_source(checkpoint)
    w = load_checkpoint_weights(src)
    if w.labels is None:
        raise InputError(f"{w.source} is a pretraining checkpoint (no labels.json): fine-tune it first (`hiceller finetune`)")
    if "head.weight" not in w.state_dict or w.state_dict["head.weight"].shape[0] != len(w.labels):
        raise InputError(f"{w.source}: classifier does not match its {len(w.labels)} labels")
    state = {k: v for k, v in w.state_dict.items() if not k.startswith("ginf.")}
    return write_bundle(
        out,
        state,
        w.model_cfg,
        w.n_bins,
        w.max_genes,
        w.vocab,
        w.labels,
        w.label_counts or [0] * len(w.labels),
        metrics={**metrics, "checkpoint": str(w.source)},
        overwrite=overwrite,
        input_genes=w.input_genes,
        extra_config={"head": w.head},
    )


def log_pyfunc(bundle: Path, tracking_uri: str | None, register: str | None) -> str:
    """Log the bundle as an MLflow pyfunc model (registered under ``register`` when given)."""
    import logging
    import warnings

    import mlflow

    from finetune.pyfunc import CellerPyfunc, signature

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="mlflow")
    import os

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
