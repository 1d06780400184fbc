"""UMAP of Celler cell embeddings, coloured by predicted (and true) label."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_embedding_umap"]


def plot_embedding_umap(adata, color_columns: list[str], path: Path, seed: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import umap

    emb = np.asarray(adata.obsm["X_celler"], dtype=np.float32)
    n_neighbors = max(2, min(15, emb.shape[0] - 1))
    xy = umap.UMAP(n_neighbors=n_neighbors, random_state=seed).fit_transform(emb)
    fig, axes = plt.subplots(1, len(color_columns), figsize=(6.5 * len(color_columns), 5.5), dpi=110, squeeze=False)
    for ax, col in zip(axes[0], color_columns):
        values = adata.obs[col].astype(str).to_numpy()
        cats = sorted(set(values))
        cmap = plt.get_cmap("tab20", max(len(cats), 1))
        for i, c in enumerate(cats):
            sel = values == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=cmap(i % 20), label=f"{c} ({sel.sum()})")
        ax.set_title(col)
        ax.set_xticks([])
        ax.set_yticks([])
        if len(cats) <= 25:
            ax.legend(markerscale=3, fontsize=6, loc="best", frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
