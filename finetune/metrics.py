"""Evaluation of a cell-type annotator, with the long tail in view.

Accuracy and weighted F1 are dominated by the abundant cell types, so the report also carries
macro F1, the mean F1 of the rare classes, and calibration (ECE), which is what a user reads from
``celler_confidence``.

Conventions (kept explicit because they change the numbers):

* Labels are integer indices into ``class_names``.
* Macro and weighted F1 are taken over the classes present in ``y_true`` or ``y_pred`` (sklearn's
  ``labels=`` argument with that set): a class the tissue subset never contains and the model never
  predicts says nothing about this evaluation and must not pull the mean towards 0 or 1. A class
  that is predicted but absent from ``y_true`` counts, with F1 0.
* A class is rare when its share of the TRAINING cells is below ``rare_threshold``; ``rare_class_f1``
  is the mean F1 over the rare classes present (as above). It is ``None`` when no rare class is
  present, never NaN, so the report stays JSON- and MLflow-safe.
* ECE uses 15 equal-width bins ``(k/15, (k+1)/15]`` of the max probability; a cell is correct when
  ``argmax(proba)`` equals its label, so ECE measures the probabilities themselves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, precision_recall_fscore_support

__all__ = [
    "ECE_BINS",
    "classification_report",
    "expected_calibration_error",
    "per_class_table",
    "natural_key",
    "plot_confusion_matrix",
    "row_normalised_confusion",
]

ECE_BINS = 15


def expected_calibration_error(proba: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` over equal-width bins of the max probability."""
    proba = np.asarray(proba, dtype=np.float64)
    y_true = np.asarray(y_true)
    if proba.ndim != 2 or proba.shape[0] != y_true.shape[0] or proba.shape[0] == 0:
        raise ValueError(
            f"proba must be (N, C) with N = len(y_true) > 0, got {proba.shape} for {y_true.shape[0]} labels"
        )
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" on the inner edges puts a value equal to an edge in the bin it closes: (lo, hi].
    bins = np.searchsorted(edges[1:-1], confidence, side="left")
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    return float(np.abs(acc_sum - conf_sum).sum() / confidence.size)


def _check_labels(y: np.ndarray, n_classes: int, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D array of integer class indices, got {y.dtype} {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{name} must lie in [0, {n_classes}), got range [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def _rare_classes(present: np.ndarray, train_counts: np.ndarray, rare_threshold: float) -> np.ndarray:
    """Present classes whose share of the training cells is below the threshold."""
    total = train_counts.sum()
    if total <= 0:
        raise ValueError("train_counts must contain at least one training cell")
    share = train_counts / total
    return present[share[present] < rare_threshold]


def classification_report(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    proba: np.ndarray | None,
    class_names: Sequence[str],
    train_counts: Sequence[int] | np.ndarray,
    rare_threshold: float = 0.01,
) -> dict[str, Any]:
    """The evaluation dict logged per run and per mining round (conventions in the module doc).

    Keys: ``n_cells``, ``accuracy``, ``macro_f1``, ``weighted_f1``, ``rare_class_f1`` (None when no
    rare class is present), ``rare_classes``, ``ece`` (None when ``proba`` is None), and per present
    class name: ``per_class_f1``, ``per_class_precision``, ``per_class_recall``,
    ``per_class_support`` (cells in ``y_true``), ``per_class_train_count``.
    """
    names = list(class_names)
    n_classes = len(names)
    counts = np.asarray(train_counts, dtype=np.int64)
    if counts.shape != (n_classes,):
        raise ValueError(f"train_counts must have one entry per class ({n_classes}), got shape {counts.shape}")
    yt = _check_labels(np.asarray(y_true), n_classes, "y_true")
    yp = _check_labels(np.asarray(y_pred), n_classes, "y_pred")
    if yt.size == 0 or yt.shape != yp.shape:
        raise ValueError(f"y_true and y_pred must be non-empty and equally long, got {yt.size} and {yp.size}")

    if proba is not None and np.shape(proba) != (yt.size, n_classes):
        raise ValueError(f"proba must be ({yt.size}, {n_classes}), got {np.shape(proba)}")

    present = np.union1d(yt, yp)
    precision, recall, f1, support = precision_recall_fscore_support(yt, yp, labels=present, zero_division=0)
    f1_by_class = dict(zip(present.tolist(), f1.tolist(), strict=True))
    rare = _rare_classes(present, counts, rare_threshold)

    return {
        "n_cells": int(yt.size),
        "accuracy": float((yt == yp).mean()),
        "macro_f1": float(f1_score(yt, yp, labels=present, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(yt, yp, labels=present, average="weighted", zero_division=0)),
        "rare_class_f1": float(np.mean([f1_by_class[c] for c in rare])) if rare.size else None,
        "rare_classes": [names[c] for c in rare],
        "ece": None if proba is None else expected_calibration_error(np.asarray(proba), yt),
        "per_class_f1": {names[c]: float(v) for c, v in zip(present, f1, strict=True)},
        "per_class_precision": {names[c]: float(v) for c, v in zip(present, precision, strict=True)},
        "per_class_recall": {names[c]: float(v) for c, v in zip(present, recall, strict=True)},
        "per_class_support": {names[c]: int(v) for c, v in zip(present, support, strict=True)},
        "per_class_train_count": {names[c]: int(counts[c]) for c in present},
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row max (no overflow for large logits)."""
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def labelled_report(
    y: np.ndarray,
    proba: np.ndarray,
    class_names: Sequence[str],
    train_counts: Sequence[int] | np.ndarray,
    rare_threshold: float = 0.01,
) -> dict[str, Any]:
    """:func:`classification_report` over the cells whose label is a class of the model.

    ``y`` holds class indices, ``-1`` for a label the model does not know (a type absent from its
    training data); those cells are left out of every metric and counted in
    ``cells_with_unknown_labels``. Raises ValueError when no cell has a known label.
    """
    y = np.asarray(y)
    known = y >= 0
    if not known.any():
        raise ValueError("none of the cells has a label the model knows")
    proba = np.asarray(proba)[known]
    report = classification_report(y[known], proba.argmax(1), proba, class_names, train_counts, rare_threshold)
    report["cells_with_unknown_labels"] = int((~known).sum())
    return report


def write_eval_artifacts(
    report: dict[str, Any], y: np.ndarray, pred: np.ndarray, class_names: Sequence[str], out: Path, prefix: str = ""
) -> list[Path]:
    """Confusion matrix PNG, per-class F1 CSV and the metrics JSON of one evaluation, under ``out``.

    ``y`` and ``pred`` are the known-label cells the report was computed on. Returns the paths
    (the files MLflow logs as artifacts).
    """
    out.mkdir(parents=True, exist_ok=True)
    png = plot_confusion_matrix(y, pred, class_names, out / f"{prefix}confusion.png")
    csv = out / f"{prefix}per_class_f1.csv"
    per_class_table(report).to_csv(csv, index=False)
    metrics = out / f"{prefix}metrics.json"
    metrics.write_text(json.dumps(report, indent=1, default=float))
    return [png, csv, metrics]


def per_class_table(report: dict[str, Any]) -> pd.DataFrame:
    """One row per present class, rarest in training first: where the long tail is read off."""
    names = list(report["per_class_f1"])
    frame = pd.DataFrame(
        {
            "class": names,
            "train_count": [report["per_class_train_count"][n] for n in names],
            "support": [report["per_class_support"][n] for n in names],
            "precision": [report["per_class_precision"][n] for n in names],
            "recall": [report["per_class_recall"][n] for n in names],
            "f1": [report["per_class_f1"][n] for n in names],
        }
    )
    return frame.sort_values(["train_count", "class"], kind="stable").reset_index(drop=True)


def row_normalised_confusion(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Confusion matrix over ``labels`` (rows true, columns predicted), each row summing to 1.

    Row normalisation shows recall per class, so a 20-cell class is as visible as a 20,000-cell one;
    a row with no true cells (a class only ever predicted) stays all zero.
    """
    index = {int(c): i for i, c in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.float64)
    np.add.at(matrix, ([index[int(t)] for t in y_true], [index[int(p)] for p in y_pred]), 1.0)
    rows = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)


def natural_key(name: str) -> list:
    """Sort key that orders the numbers inside names by value: "type 2" before "type 10"."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(name))]


def plot_confusion_matrix(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
) -> Path:
    """Write the row-normalised confusion matrix of the present classes as a PNG and return its path.

    Uses a bare Agg canvas rather than pyplot, so it never touches the global backend or leaks
    figures in a long training process; the figure grows with the class count so ~20 labels stay
    readable.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(class_names)
    yt = _check_labels(np.asarray(y_true), len(names), "y_true")
    yp = _check_labels(np.asarray(y_pred), len(names), "y_pred")
    # natural order of the names ("type 2" before "type 10"), not the order of the class ids
    present = np.array(sorted(np.union1d(yt, yp), key=lambda c: natural_key(names[c])), dtype=np.int64)
    matrix = row_normalised_confusion(yt, yp, present)
    n = len(present)
    side = max(5.0, 0.45 * n + 3.0)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class")
    labels = [names[c] for c in present]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:  # numbers in cells stop being legible beyond this
        for i, j in zip(*np.nonzero(matrix >= 0.005), strict=True):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if matrix[i, j] > 0.5 else "black")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
