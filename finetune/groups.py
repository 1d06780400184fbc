"""Metrics per group of cells (disease, donor, dataset), and the cells of a disease a model never saw.

A model fine-tuned on some conditions is used on others: Celler-75's long tail is one of diseases.
One number over a whole query hides where the transfer fails, so `hiceller evaluate --group-by`
scores every group on its own, with the conventions of finetune/metrics.py inside each group:

* a group's macro-F1 is over the classes present in that group's truth or predictions: a class the
  model predicts in a group that has none of it counts, with F1 0; one the group lacks and the
  model never predicts there does not;
* cells whose label the model does not know are left out of the metrics (``n_unknown_labels``);
* a group with no scorable cell (all its labels unknown to the model, or an unused category of
  the column) is a row with ``n_scored`` 0 and no metrics, never an error or a NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finetune.metrics import classification_report
from hiceller.errors import InputError

__all__ = ["GROUP_BY", "group_column", "group_reports", "log_group_table", "train_diseases", "unseen_disease_line"]

GROUP_BY = {"disease": "disease", "donor": "donor_id", "dataset": "dataset_id"}
"""--group-by choice -> the obs column it reads by default (the CELLxGENE / store names)."""
GROUP_METRICS = ("accuracy", "macro_f1", "rare_class_f1", "ece")


def group_column(obs: pd.DataFrame, by: str, column: str | None) -> pd.Series:
    """The per-cell group values: ``column`` when given, else the column that ``by`` names."""
    name = column or GROUP_BY[by]
    if name not in obs.columns:
        hint = "" if column else f" (name the column holding the {by} with --group-column)"
        raise InputError(f"obs has no column {name!r} to group by{hint}")
    return obs[name]


def _groups(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Per-cell group names and every group, a categorical's unused categories included."""
    per_cell = values.astype(str).to_numpy()
    names = set(per_cell)
    if isinstance(values.dtype, pd.CategoricalDtype):
        names |= {str(c) for c in values.cat.categories}
    return per_cell, sorted(names)


def group_reports(
    y: np.ndarray,
    proba: np.ndarray,
    groups: pd.Series,
    class_names: Sequence[str],
    train_counts: Sequence[int] | np.ndarray,
    rare_threshold: float = 0.01,
    seen: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per group: cells, scored cells, accuracy, macro-F1, rare-class F1, ECE.

    ``y``: class indices, -1 for a label the model does not know. ``seen``: the groups present in
    training (for diseases), adding a ``seen_in_training`` column; None when unknown.
    """
    y, proba = np.asarray(y), np.asarray(proba)
    per_cell, names = _groups(groups)
    rows: list[dict[str, Any]] = []
    for name in names:
        sel = per_cell == name
        scored = sel & (y >= 0)
        row: dict[str, Any] = {"group": name, "n_cells": int(sel.sum()), "n_scored": int(scored.sum()),
                               "n_unknown_labels": int((sel & (y < 0)).sum())}
        row.update(dict.fromkeys(GROUP_METRICS))
        if scored.any():
            p = proba[scored]
            report = classification_report(y[scored], p.argmax(1), p, class_names, train_counts, rare_threshold)
            row.update({k: report[k] for k in GROUP_METRICS})
            row["classes"] = ", ".join(sorted(report["per_class_f1"]))
        else:
            row["classes"] = ""
        if seen is not None:
            row["seen_in_training"] = name in set(seen)
        rows.append(row)
    return pd.DataFrame(rows)


def train_diseases(trained) -> list[str] | None:
    """The diseases a bundle's classifier was trained on (its summary in metrics.json), or None for a
    bundle that does not record them (made before they were recorded, or outside `hiceller finetune`)."""
    found = trained.metrics.get("train_diseases") if isinstance(trained.metrics, dict) else None
    return [str(d) for d in found] if isinstance(found, list) else None


def unseen_disease_line(trained, obs: pd.DataFrame, column: str = "disease") -> str | None:
    """One line for the annotation report about the query cells of diseases the model never saw in
    training; None when the query has no such column or the bundle does not record its diseases."""
    seen = train_diseases(trained)
    if seen is None or column not in obs.columns:
        return None
    values = obs[column].astype(str)
    unseen = values[~values.isin(seen)].value_counts()
    if unseen.empty:
        return f"diseases: every cell is of a disease seen in training ({', '.join(seen)})"
    n, total = int(unseen.sum()), len(values)
    named = ", ".join(f"{d} {c}" for d, c in unseen.head(8).items()) + (", ..." if len(unseen) > 8 else "")
    return (f"diseases: {n} of {total} cells ({n / total:.1%}) are of a disease not seen in training ({named}); "
            f"their labels are transferred from {', '.join(seen)} (check them: hiceller evaluate --group-by disease)")


def log_group_table(frame: pd.DataFrame, by: str, out, tracker=None) -> Path:
    """The per-group table as ``OUT/metrics_by_<by>.csv`` and, with a tracker (the evaluation's MLflow
    run), as an MLflow table; returns the CSV's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / f"metrics_by_{by}.csv"
    frame.to_csv(csv, index=False)
    if tracker is not None:
        tracker.log_params({"group_by": by})
        # MLflow's table wants JSON-able cells: None stays null, numpy scalars become Python numbers.
        tracker.log_table(frame.astype(object).where(frame.notna(), None), f"metrics_by_{by}.json")
        tracker.log_artifact(csv)
    return csv
