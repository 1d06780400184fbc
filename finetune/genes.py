"""The genes a fine-tuned classifier reads: every gene, or the most variable genes of its training cells.

Why restrict: Celler keeps at most ``max_genes`` non-zero genes per cell and samples them at random
when a cell has more. A pancreas cell (inDrop) has ~1,800 non-zero genes, so at ``max_genes`` 512
three quarters of them, marker genes included, are dropped at random, in training and at
annotation alike. Restricting the input to the ``n_hvg`` most variable genes of the training cells
(scGPT's ``n_hvg``, Seurat's selection) leaves ~100-300 informative non-zeros per cell, all kept
(bench/RESULTS.md: Baron human4 macro-F1 0.48 -> 0.70 with 2,000 genes, same model and epochs).

Selection (Seurat flavour, as ``scanpy.pp.highly_variable_genes(flavor="seurat", n_top_genes=N)``):
per cell, expression normalised to 10,000 (log-expression sources are exponentiated back first);
per gene, mean and variance over the training cells; dispersion = variance / mean, logged; genes
are put in 20 equal-width bins of log1p(mean), and the dispersion is z-scored within its bin (a
gene alone in its bin scores 1). The ``n_hvg`` genes with the highest scores are kept; ties are
broken by gene id. Only the training split is looked at, never validation or held-out cells.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_store.store import CorpusStore
from data_store.tokenize import TARGET_SUM, log1p_normalize
from hiceller.errors import InputError

__all__ = ["TARGET_SUM", "N_BINS", "dispersion_scores", "gene_max_expression", "highly_variable_genes", "read_query_genes"]

N_BINS = 20
"""Bins of mean expression within which dispersions are compared."""


def read_query_genes(path: Path) -> set[str]:
    """Upper-cased gene symbols a query measures: an .h5ad's var_names, or a text file of one per line.

    ``finetune --query-genes``: when the target data set is known, the classifier is trained on the
    genes it has, so no decision rests on a gene the query cannot show (Xin measures 980 genes,
    Wang 219; a model trained on 2,000 reference genes would read mostly zeros there)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--query-genes {path}: file does not exist")
    if path.suffix == ".h5ad":
        import anndata as ad

        try:
            names = ad.read_h5ad(path, backed="r").var_names
        except Exception as e:
            raise InputError(f"--query-genes {path}: not a readable .h5ad file ({type(e).__name__})") from None
    else:
        try:
            names = [line.strip() for line in path.read_text().splitlines()]
        except UnicodeDecodeError:
            raise InputError(f"--query-genes {path}: not a text file of gene names (or an .h5ad)") from None
    genes = {str(n).upper() for n in names if str(n).strip() and not str(n).startswith("#")}
    if not genes:
        raise InputError(f"--query-genes {path}: no gene names in it")
    return genes


def highly_variable_genes(store: CorpusStore, joinids: np.ndarray, n_top: int, candidates: np.ndarray) -> np.ndarray:
    """Store gene ids (sorted) of the ``n_top`` most variable of ``candidates`` over the cells ``joinids``.

    Streams X in chunks of cells (memory: two float64 vectors per vocabulary gene plus one chunk).
    """
    if n_top < 1:
        raise ValueError(f"n_top must be >= 1, got {n_top}")
    n_genes = len(store.vocabulary())
    is_log = np.zeros(store.next_joinid, dtype=bool)
    for d in store.complete_datasets():
        is_log[d.start : d.stop] = d.kind == "logexpr"
    total = np.zeros(n_genes)
    total_sq = np.zeros(n_genes)
    n_cells = len(np.unique(joinids))  # cells without any non-zero count count too
    for d0, genes, values in store.iter_x_cells(joinids):
        v = values.astype(np.float64)
        log_rows = is_log[d0]
        v[log_rows] = np.expm1(v[log_rows])
        cells, local = np.unique(d0, return_inverse=True)
        lib = np.bincount(local, weights=v, minlength=len(cells))
        v *= TARGET_SUM / np.maximum(lib, 1e-12)[local]
        total += np.bincount(genes, weights=v, minlength=n_genes)
        total_sq += np.bincount(genes, weights=v * v, minlength=n_genes)
    if n_cells < 2:
        raise InputError(f"need at least 2 training cells to pick variable genes, got {n_cells}")
    cand = np.asarray(candidates, dtype=np.int64)
    scores = dispersion_scores(total[cand], total_sq[cand], n_cells)
    order = np.lexsort((cand, -np.nan_to_num(scores, nan=-np.inf)))
    return np.sort(cand[order[: min(n_top, len(cand))]])


def dispersion_scores(total: np.ndarray, total_sq: np.ndarray, n_cells: int) -> np.ndarray:
    """Seurat's normalised dispersion from per-gene sums; NaN for genes never expressed."""
    mean = total / n_cells
    var = np.maximum(total_sq - n_cells * mean**2, 0.0) / (n_cells - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = np.log(var / mean)
    dispersion[mean == 0] = np.nan
    log_mean = np.log1p(mean)
    finite = np.isfinite(dispersion)
    scores = np.full(mean.shape, np.nan)
    if not finite.any():
        return scores
    edges = np.linspace(log_mean.min(), log_mean.max(), N_BINS + 1)  # over all genes, as pandas.cut
    bins = np.clip(np.searchsorted(edges, log_mean, side="right") - 1, 0, N_BINS - 1)
    for b in np.unique(bins[finite]):
        members = finite & (bins == b)
        d = dispersion[members]
        if d.size == 1:
            scores[members] = 1.0  # Seurat/scanpy: a gene alone in its bin
            continue
        sd = d.std(ddof=1)
        scores[members] = (d - d.mean()) / sd if sd > 0 else 0.0
    return scores


def gene_max_expression(store: CorpusStore, joinids: np.ndarray) -> np.ndarray:
    """Per store gene, its largest ``log1p(counts per 10k)`` over the cells ``joinids`` (0 where never
    expressed): the max-abs scale of a classifier's linear part. One streamed pass over their X."""
    n_genes = len(store.vocabulary())
    is_log = np.zeros(store.next_joinid, dtype=bool)
    for d in store.complete_datasets():
        is_log[d.start : d.stop] = d.kind == "logexpr"
    top = np.zeros(n_genes, dtype=np.float32)
    for d0, genes, values in store.iter_x_cells(joinids):
        cells, local = np.unique(d0, return_inverse=True)
        x = log1p_normalize(local, values, len(cells), is_log[cells])
        np.maximum.at(top, genes, x)
    return top
