"""Self-checking inputs and store readers shared by the data_store tests (and later ones).

An h5ad made here has X values that encode their (cell, gene): ``count_value`` gives
``1 + cell * 1000 + gene`` for counts, so a test reading the store back can tell exactly which cell
and which gene a value came from. ``store_matrix`` reads a store with plain tiledbsoma (not through
CorpusStore) and ``source_matrix`` reads an h5ad with plain anndata, both into CSR matrices over
the store's vocabulary, so comparing the two checks ingest end to end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import tiledbsoma as soma

__all__ = [
    "REPO_ROOT",
    "SHARED_DATA",
    "ValueFn",
    "count_value",
    "logexpr_value",
    "gene_names",
    "make_h5ad",
    "write_raw_csr",
    "StoreContent",
    "store_matrix",
    "source_matrix",
    "tree_snapshot",
    "run_hiceller",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

ValueFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(cell index, gene column) arrays -> X values of those entries."""


def count_value(cell: np.ndarray, gene: np.ndarray) -> np.ndarray:
    """Integer counts encoding (cell, gene); exact in float32 while cell < 16_000 and gene < 1000."""
    return 1.0 + cell.astype(np.float64) * 1000 + gene


def logexpr_value(cell: np.ndarray, gene: np.ndarray) -> np.ndarray:
    """Non-integer values (log-expression-like) that still encode (cell, gene) in float32."""
    return count_value(cell, gene) + 0.5


def gene_names(n: int, start: int = 0, prefix: str = "GENE") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(start, start + n)]


def _pattern(n_cells: int, n_genes: int, density: float, seed: int) -> sp.csr_matrix:
    """Seeded Bernoulli(density) non-zero pattern, sorted columns, and at least one gene per cell
    (gene ``cell % n_genes``): empty cells are legal but make tests weaker."""
    rng = np.random.default_rng(seed)
    parts = []
    block = max(1, 4_000_000 // max(n_genes, 1))
    for a in range(0, n_cells, block):
        b = min(a + block, n_cells)
        mask = rng.random((b - a, n_genes)) < density
        mask[np.arange(b - a), np.arange(a, b) % max(n_genes, 1)] = True
        parts.append(sp.csr_matrix(mask, dtype=np.float32))
    if not parts:
        return sp.csr_matrix((n_cells, n_genes), dtype=np.float32)
    return sp.vstack(parts, format="csr")


def make_h5ad(
    path: Path,
    n_cells: int,
    genes: list[str],
    value_fn: ValueFn = count_value,
    density: float = 0.3,
    seed: int = 0,
    *,
    cell_prefix: str = "cell",
    labels: list[str] | None = ("T", "B", "NK"),  # type: ignore[assignment]
    label_column: str = "cell_type",
    batches: list[str] | None = ("d1", "d2"),  # type: ignore[assignment]
    extra_obs: dict[str, np.ndarray | list] | None = None,
    layout: str = "csr",
    dtype: type = np.float32,
) -> ad.AnnData:
    """Write an h5ad whose X[c, g] = value_fn(c, g) on a seeded pattern, and return it (in memory).

    ``labels``/``batches`` cycle over the cells into obs[label_column] / obs["batch"] (None leaves
    the column out); ``extra_obs`` adds columns; ``layout`` is csr, csc or dense.
    """
    pat = _pattern(n_cells, len(genes), density, seed)
    rows = np.repeat(np.arange(n_cells), np.diff(pat.indptr))
    pat.data = value_fn(rows, pat.indices).astype(dtype)
    obs = pd.DataFrame(index=pd.Index([f"{cell_prefix}{i}" for i in range(n_cells)], dtype=object))
    if labels is not None:
        obs[label_column] = pd.Categorical([labels[i % len(labels)] for i in range(n_cells)])
    if batches is not None:
        obs["batch"] = [batches[i % len(batches)] for i in range(n_cells)]
    for k, v in (extra_obs or {}).items():
        obs[k] = v
    X: sp.spmatrix | np.ndarray = {"csr": pat, "csc": pat.tocsc(), "dense": pat.toarray()}[layout]
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(list(genes), dtype=object)))
    adata.write_h5ad(path)
    return adata


def write_raw_csr(
    path: Path,
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    genes: list[str],
    cells: list[str] | None = None,
    labels: list[str] | None = None,
) -> None:
    """An h5ad whose CSR arrays are stored exactly as given (unsorted, duplicated, NaN...):
    anndata writes CSR arrays as they are, this checks that it did."""
    import h5py

    n = len(indptr) - 1
    m = sp.csr_matrix((np.asarray(data, np.float32), np.asarray(indices), np.asarray(indptr)), shape=(n, len(genes)))
    cells = cells or [f"cell{i}" for i in range(n)]
    obs = pd.DataFrame(index=pd.Index(cells, dtype=object))
    obs["cell_type"] = labels or ["T"] * n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicate names are what some tests want
        ad.AnnData(X=m, obs=obs, var=pd.DataFrame(index=pd.Index(list(genes), dtype=object))).write_h5ad(path)
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["X/indices"][...], np.asarray(indices)), "anndata rewrote the CSR indices"
        assert np.array_equal(f["X/data"][...], np.asarray(data, np.float32), equal_nan=True)


@dataclass
class StoreContent:
    """A store as plain tiledbsoma sees it: every obs row and X entry, complete or not."""

    obs: pd.DataFrame
    """obs sorted by soma_joinid."""
    vocab: list[str]
    """Gene names, position = vocabulary id."""
    X: sp.csr_matrix
    """[next joinid x vocabulary] (duplicated coordinates would be summed here: see x_entries)."""
    x_entries: int
    """Number of (cell, gene) entries TileDB returned."""
    metadata: str


def store_matrix(uri: str | Path) -> StoreContent:
    with soma.Experiment.open(str(uri)) as exp:
        obs = exp.obs.read().concat().to_pandas().sort_values("soma_joinid").reset_index(drop=True)
        var = exp.ms["RNA"].var.read().concat().to_pandas().sort_values("soma_joinid")
        assert np.array_equal(var["soma_joinid"].to_numpy(), np.arange(len(var)))
        tbl = exp.ms["RNA"].X["data"].read().tables().concat()
        meta = str(exp.metadata.get("hiceller"))
    from data_store.store import CorpusStore

    # Rows up to the next joinid: X's shape grows with headroom (data_store/store.py, _GROWTH).
    n_rows = CorpusStore.open(uri).next_joinid
    r = tbl["soma_dim_0"].to_numpy()
    c = tbl["soma_dim_1"].to_numpy()
    v = tbl["soma_data"].to_numpy()
    X = sp.csr_matrix((v, (r, c)), shape=(max(n_rows, int(r.max()) + 1 if len(r) else 0), len(var)))
    return StoreContent(obs=obs, vocab=list(var["gene"]), X=X, x_entries=len(v), metadata=meta)


def source_matrix(path: Path, vocab: list[str], upper: bool = True) -> tuple[list[str], sp.csr_matrix]:
    """(obs names, X) of an h5ad with its columns moved to vocabulary ids (upper-cased names, as the
    store keys genes), duplicates summed: what the store must hold for that file."""
    a = ad.read_h5ad(path)
    X = sp.csr_matrix(a.X).astype(np.float32)
    lookup = {g: i for i, g in enumerate(vocab)}
    names = [str(g).upper() if upper else str(g) for g in a.var_names]
    col = np.array([lookup[g] for g in names], dtype=np.int64)
    coo = X.tocoo()
    out = sp.csr_matrix((coo.data, (coo.row, col[coo.col])), shape=(X.shape[0], len(vocab)))
    out.sum_duplicates()
    out.eliminate_zeros()
    return list(a.obs_names.astype(str)), out


def tree_snapshot(path: Path) -> dict[str, tuple[int, int]] | None:
    """{relative path: (size, mtime_ns)} of every file under path; None when it does not exist.
    Equal snapshots before and after a command mean the command wrote nothing there."""
    if not path.exists():
        return None
    if path.is_file():
        st = path.stat()
        return {".": (st.st_size, st.st_mtime_ns)}
    out = {}
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            st = p.stat()
            out[str(p.relative_to(path))] = (st.st_size, st.st_mtime_ns)
    return out


def run_hiceller(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m hiceller ARGS`` in a subprocess, from the repo root, text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "hiceller", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
