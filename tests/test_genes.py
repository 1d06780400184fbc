"""Variable-gene selection for fine-tuning (finetune/genes.py) against scanpy's Seurat flavour."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_store.ingest import IngestOptions, ingest_files
from data_store.store import CorpusStore
from finetune.genes import highly_variable_genes


def _counts(seed: int, n_cells: int = 400, n_genes: int = 300) -> np.ndarray:
    """NB-like counts; every 10th gene is a marker of one of 4 groups (very variable)."""
    rng = np.random.default_rng(seed)
    rate = rng.gamma(0.5, 1.0, n_genes)
    group = rng.integers(0, 4, n_cells)
    rate_cells = np.tile(rate, (n_cells, 1))
    markers = np.arange(0, n_genes, 10)
    rate_cells[:, markers] *= np.where(group[:, None] == (markers // 10) % 4, 20.0, 0.05)
    depth = rng.lognormal(0, 0.4, (n_cells, 1))
    return rng.poisson(rate_cells * depth).astype(np.float32)


@pytest.fixture(scope="module")
def store_and_matrix(tmp_path_factory):
    base = tmp_path_factory.mktemp("genes")
    counts = _counts(0)
    genes = [f"G{i:03d}" for i in range(counts.shape[1])]
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame({"cell_type": "x"}, index=[f"c{i}" for i in range(len(counts))]),
                       var=pd.DataFrame(index=genes))
    adata.write_h5ad(base / "a.h5ad")
    store_uri = str(base / "store")
    ingest_files(store_uri, [base / "a.h5ad"], IngestOptions())
    return CorpusStore.open(store_uri), adata


def test_matches_scanpy_seurat_flavour(store_and_matrix) -> None:
    sc = pytest.importorskip("scanpy")
    store, adata = store_and_matrix
    joinids = store.obs()["soma_joinid"].to_numpy()
    vocab = list(store.vocabulary())
    for n_top in (10, 60):
        got = highly_variable_genes(store, joinids, n_top, candidates=np.arange(len(vocab)))
        ln = adata.copy()
        sc.pp.normalize_total(ln, target_sum=1e4)
        sc.pp.log1p(ln)
        hv = sc.pp.highly_variable_genes(ln, flavor="seurat", n_top_genes=n_top, inplace=False)
        want = set(adata.var_names[hv["highly_variable"].to_numpy()])
        assert {vocab[g] for g in got} == want
    top = {int(vocab[g][1:]) for g in highly_variable_genes(store, joinids, 20, np.arange(300))}
    assert len(top & set(range(0, 300, 10))) >= 10  # planted markers lead (z-scores are per mean bin)


def test_only_the_given_cells_and_candidates_count(store_and_matrix) -> None:
    store, _ = store_and_matrix
    joinids = store.obs()["soma_joinid"].to_numpy()
    cand = np.arange(1, 300, 2)  # the markers (even ids) are not candidates
    got = highly_variable_genes(store, joinids[:200], 15, candidates=cand)
    assert len(got) == 15 and set(got) <= set(cand) and np.all(np.diff(got) > 0)
    with pytest.raises(ValueError, match="n_top"):
        highly_variable_genes(store, joinids, 0, candidates=cand)


def test_log_normalised_source_selects_the_same_genes(store_and_matrix, tmp_path) -> None:
    """A log1p(normalised) copy of the same cells (ingested as logexpr) gives the same genes as the counts."""
    store, adata = store_and_matrix
    X = adata.X.toarray().astype(np.float64)
    X = np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
    ad.AnnData(X=sp.csr_matrix(X), obs=adata.obs.copy(), var=adata.var.copy()).write_h5ad(tmp_path / "log.h5ad")
    ingest_files(str(tmp_path / "logstore"), [tmp_path / "log.h5ad"], IngestOptions())
    log_store = CorpusStore.open(str(tmp_path / "logstore"))
    assert log_store.complete_datasets()[0].kind == "logexpr"
    pick = [
        [s.vocabulary()[g] for g in highly_variable_genes(s, s.obs()["soma_joinid"].to_numpy(), 40, np.arange(300))]
        for s in (store, log_store)
    ]
    assert pick[0] == pick[1]
