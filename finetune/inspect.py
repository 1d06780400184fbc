"""`hiceller inspect BUNDLE_OR_RUN`: what a bundle or a run folder holds, without loading a model.

A bundle: its classes with their training counts, the genes it reads, its metrics, how it was made
(pretrained model, fine-tuning run, MLflow run), its calibration and format. A pretraining run: its
config, vocabulary, checkpoints, last logged step and MLflow run. A fine-tuning run: its summary and
the bundle it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hiceller.errors import InputError
from pretrain import layout
from pretrain.tracking import RUN_ID_FILE, URI_FILE

__all__ = ["describe"]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path} cannot be read ({e})") from None


def _mlflow(folder: Path) -> dict[str, str]:
    out = {}
    for key, name in (("mlflow_run_id", RUN_ID_FILE), ("tracking_uri", URI_FILE)):
        if (folder / name).is_file():
            out[key] = (folder / name).read_text().strip()
    return out


def _bundle(path: Path) -> dict[str, Any]:
    layout.verify_bundle(path)
    config = _read_json(path / "config.json")
    labels = _read_json(path / layout.LABELS)
    metrics = _read_json(path / "metrics.json")
    cal = _read_json(path / layout.CALIBRATION) if (path / layout.CALIBRATION).is_file() else None
    genes = config["tokenizer"].get("input_genes")
    info = {"kind": "bundle", "path": str(path), "format": config.get("format"), "head": config.get("head", "transformer"),
            "model": config["model"], "classes": dict(zip(labels["names"], labels.get("train_counts", []))),
            "genes_read": len(genes) if genes is not None else config["n_genes"], "genes_read_list": genes,
            "vocabulary": config["n_genes"], "max_genes": config["tokenizer"]["max_genes"], "metrics": metrics,
            "provenance": {k: v for k, v in config.items() if k not in {"format", "model", "n_genes", "n_classes", "tokenizer", "head"}},
            "calibration": None if cal is None else {k: v for k, v in cal.items() if k not in ("centroids", "radius")}}
    lines = [f"bundle {path} ({info['format']}), {info['head']} head, d_model {info['model']['d_model']} x {info['model']['n_layers']} layers",
             f"reads {info['genes_read']} of {info['vocabulary']} vocabulary genes" + (" (all)" if genes is None else "")
             + f", at most {info['max_genes']} per cell",
             f"{len(info['classes'])} classes (training cells):"]
    lines += [f"  {n:>8}  {c}" for c, n in sorted(info["classes"].items(), key=lambda kv: -kv[1])]
    for split in ("val", "test"):
        m = metrics.get(split) if isinstance(metrics, dict) else None
        if isinstance(m, dict):
            lines.append(f"{split}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}")
    for key, value in info["provenance"].items():
        lines.append(f"{key}: {value}")
    if cal:
        lines.append(f"calibration: temperature {cal['temperature']:.3f}, min confidence {cal['min_confidence']:.2f}, "
                     f"validation ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}, novelty margin {cal['margin']}")
    else:
        lines.append("calibration: none (a bundle written before calibration existed)")
    info["lines"] = lines
    return info


def _run(path: Path) -> dict[str, Any]:
    cfg = layout.read_run_config(path)
    cps = layout.list_checkpoints(path)
    rows = (path / layout.METRICS).read_text().splitlines() if (path / layout.METRICS).is_file() else []
    last = json.loads(rows[-1]) if rows else {}
    info = {"kind": "run", "path": str(path), "config": cfg.flat(), "checkpoints": [c.name for c in cps],
            "vocabulary": len(_read_json(path / layout.VOCAB)) if (path / layout.VOCAB).is_file() else None,
            "last_step": last, **_mlflow(path)}
    lines = [f"run {path}: config {cfg.name or 'custom'}, d_model {cfg.model.d_model} x {cfg.model.n_layers} layers, "
             f"{info['vocabulary']} genes",
             f"checkpoints: {', '.join(info['checkpoints']) or 'none complete'}"]
    if last:
        lines.append(f"last step {last.get('step')}: loss {last.get('loss', float('nan')):.4g}")
    lines += [f"{k}: {v}" for k, v in _mlflow(path).items()]
    info["lines"] = lines
    return info


def describe(path: Path) -> dict[str, Any]:
    """What ``path`` is and holds (a dict, with ``lines`` to print)."""
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if (path / layout.CHECKSUMS).is_file():
        return _bundle(path)
    summary = layout.read_summary(path)
    if summary is not None:
        info = {"kind": "finetune run", "path": str(path), "summary": summary, **_mlflow(path)}
        lines = [f"fine-tuning run {path}: best round {summary.get('round')}"] + [f"{k}: {v}" for k, v in _mlflow(path).items()]
        if (path / layout.BUNDLE_DIR / layout.CHECKSUMS).is_file():
            info["bundle"] = _bundle(path / layout.BUNDLE_DIR)
            lines += info["bundle"]["lines"]
        info["lines"] = lines
        return info
    if (path / layout.CONFIG).is_file():
        return _run(path)
    raise InputError(f"{path} is neither a bundle nor a HiCeller run folder")
