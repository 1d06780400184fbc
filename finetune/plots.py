"""Pictures of a fine-tuning run and of an annotation (Agg canvases: no display, no global pyplot state).

Labels appear in natural order ("type 2" before "type 10"); one label has one colour in every panel
of a figure, and "Unassigned" is always grey.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from finetune.metrics import expected_calibration_error, natural_key

__all__ = ["label_colors", "plot_embedding_umap", "plot_umap", "plot_per_class_f1", "plot_reliability"]

UNASSIGNED_COLOR = (0.6, 0.6, 0.6, 1.0)


def label_colors(labels: Sequence[str]) -> dict[str, tuple]:
    """One colour per label (tab20, then hsv past 20), grey for "Unassigned"."""
    from matplotlib import colormaps

    names = sorted({str(x) for x in labels} - {"Unassigned"}, key=natural_key)
    cmap = colormaps["tab20"] if len(names) <= 20 else colormaps["hsv"].resampled(len(names) + 1)
    colors = {n: cmap(i % cmap.N) for i, n in enumerate(names)}
    colors["Unassigned"] = UNASSIGNED_COLOR
    return colors


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_umap(emb: np.ndarray, panels: dict[str, Sequence[str]], path: Path, seed: int = 0) -> Path:
    """UMAP of embeddings, one panel per labelling (e.g. true and predicted), shared colours."""
    import umap

    emb = np.asarray(emb, dtype=np.float32)
    n_neighbors = max(2, min(15, emb.shape[0] - 1))
    xy = umap.UMAP(n_neighbors=n_neighbors, random_state=seed, n_jobs=1).fit_transform(emb)
    colors = label_colors([v for values in panels.values() for v in values])
    fig = Figure(figsize=(6.5 * len(panels), 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    for k, (title, values) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), k + 1)
        values = np.asarray(values).astype(str)
        for c in sorted(set(values), key=natural_key):
            sel = values == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=colors[c], label=f"{c} ({sel.sum()})")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        if len(set(values)) <= 25:
            ax.legend(markerscale=3, fontsize=6, loc="best", frameon=False)
    return _save(fig, path)


def plot_embedding_umap(adata, color_columns: list[str], path: Path, seed: int = 0) -> Path:
    """:func:`plot_umap` of ``obsm["X_celler"]`` coloured by obs columns."""
    return plot_umap(adata.obsm["X_celler"], {c: adata.obs[c].astype(str).to_numpy() for c in color_columns}, path, seed)


def plot_per_class_f1(report: dict, path: Path, title: str = "") -> Path:
    """Horizontal bars of F1 per class, rarest in training at the top, training cells in the label."""
    f1, train = report["per_class_f1"], report["per_class_train_count"]
    names = sorted(f1, key=lambda n: (-train.get(n, 0), natural_key(n)))
    fig = Figure(figsize=(7, max(2.5, 0.3 * len(names) + 1.2)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = label_colors(names)
    ax.barh(range(len(names)), [f1[n] for n in names], color=[colors[n] for n in names])
    ax.set_yticks(range(len(names)), [f"{n} ({train.get(n, 0)})" for n in names], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 (training cells in brackets)")
    ax.set_title(title or f"per-class F1, macro {report['macro_f1']:.3f}")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def _reliability_points(proba: np.ndarray, y: np.ndarray, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    conf, correct = proba.max(1), (proba.argmax(1) == y).astype(float)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / np.maximum(count, 1)
    accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / np.maximum(count, 1)
    return mean_conf[count > 0], accuracy[count > 0], count[count > 0]


def plot_reliability(curves: dict[str, np.ndarray], y: np.ndarray, path: Path) -> Path:
    """Reliability diagram (accuracy against confidence, 10 bins) of each set of probabilities, ECE in the legend."""
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="calibrated")
    for name, proba in curves.items():
        conf, acc, count = _reliability_points(proba, y)
        ece = expected_calibration_error(proba, y)
        ax.plot(conf, acc, marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    return _save(fig, path)
