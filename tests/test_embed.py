"""`hiceller embed`: <cls> embeddings into obsm X_celler, read as annotation reads a query."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

ASSETS = Path(__file__).parent / "assets"


def _query(path: Path) -> ad.AnnData:
    """tests/test_bundle_compat.py's fixed query: 30 cells over the bundle's genes (lower case) + 3 unknown genes."""
    rng = np.random.default_rng(7)
    genes = [f"gene{i}" for i in range(20)] + ["OTHER1", "OTHER2", "OTHER3"]
    x = sp.csr_matrix(rng.poisson(1.5, (30, len(genes))).astype(np.float32))
    a = ad.AnnData(X=x, obs=pd.DataFrame({"donor": ["d1", "d2"] * 15}, index=[f"c{i}" for i in range(30)]),
                   var=pd.DataFrame(index=genes))
    a.write_h5ad(path)
    return a


def test_embed_from_a_bundle_is_what_annotate_writes(tmp_path, in_process):
    q = _query(tmp_path / "q.h5ad")
    rc, out, err = in_process("embed", "--model", ASSETS / "bundle_v1", "--input", tmp_path / "q.h5ad",
                              "--output", tmp_path / "out.h5ad", "--batch-size", "8", "--no-progress")
    assert rc == 0, err
    got = ad.read_h5ad(tmp_path / "out.h5ad")
    expected = json.loads((ASSETS / "bundle_v1_expected.json").read_text())["emb"]  # annotate's X_celler
    np.testing.assert_allclose(got.obsm["X_celler"], np.array(expected), atol=2e-6)
    assert (got.X != q.X).nnz == 0 and got.obs.equals(q.obs) and list(got.var_names) == list(q.var_names)
    assert got.uns["celler_embed"]["gene_overlap_rule"] == "read" and "embedded 30 cells" in out


def test_embed_refuses_a_query_of_other_genes_and_writes_nothing(tmp_path, in_process):
    a = ad.AnnData(X=np.ones((4, 3), np.float32), var=pd.DataFrame(index=["CD3E", "MS4A1", "LYZ"]))
    a.write_h5ad(tmp_path / "q.h5ad")
    rc, _, err = in_process("embed", "--model", ASSETS / "bundle_v1", "--input", tmp_path / "q.h5ad",
                            "--output", tmp_path / "out.h5ad", "--no-progress")
    assert rc == 2 and err.strip().splitlines() == [err.strip()] and "gene overlap too small" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.h5ad"]
