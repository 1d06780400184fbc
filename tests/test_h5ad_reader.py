"""The lean .h5ad reader against anndata: obs columns, gene names and X as anndata reads them.

Ingest reads files with :class:`data_store.h5ad_reader.H5adFile` (low-level h5py reads, no
DataFrame); these tests hold it to ``anndata.read_h5ad`` on synthetic files with every kind of obs
column ingest meets, and on the real files of ../shared/data.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_store.h5ad_reader import GENE_NAME_BYTES, open_h5ad
from data_store.ingest import IngestOptions, _extra_columns, _gene_key
from data_store.store import extra_obs_table
from tests._fixtures import SHARED_DATA, gene_names, make_h5ad

N = 23


def _extra_obs() -> dict[str, object]:
    i = np.arange(N)
    with_missing = pd.Categorical(np.where(i % 5 == 0, None, np.array(["s1", "s2", "s3"], dtype=object)[i % 3]))
    return {
        "sample": with_missing,
        "stage": pd.Categorical(["early", "late"] * 11 + ["early"], categories=["early", "late"], ordered=True),
        "lane": pd.Categorical(i % 4),  # integer categories
        "note": np.array([f"n{k}é" for k in i], dtype=object),  # plain strings, not ASCII
        "flag": i % 2 == 0,
        "n_umi": (i * 7).astype(np.int32),
        "score": np.where(i == 3, np.nan, i / 3.0),
    }


def _assert_obs_equal(path: Path) -> None:
    ref = ad.read_h5ad(path).obs
    with open_h5ad(path) as f:
        ours = f.obs_columns()
    assert ours.index.dtype == object and ours.index.tolist() == ref.index.astype(str).tolist()
    assert list(ours.columns) == [str(c) for c in ref.columns]
    for name, col in ours.columns.items():
        expected = ref[name]
        got = pd.Series(col, index=ref.index, name=name)
        if isinstance(expected.dtype, pd.CategoricalDtype):
            assert isinstance(col, pd.Categorical), name
            assert col.ordered == expected.cat.ordered, name
            assert col.categories.tolist() == expected.cat.categories.tolist(), name
            assert np.array_equal(col.codes, expected.cat.codes.to_numpy()), name
        else:
            pd.testing.assert_series_equal(got, expected, check_dtype=not pd.api.types.is_string_dtype(expected), obj=name)
            if pd.api.types.is_string_dtype(expected):
                assert all(isinstance(v, str) for v in col), name


def _assert_x_equal(path: Path, chunk_nnz: int) -> None:
    X = ad.read_h5ad(path).X
    ref = sp.csr_matrix(X)
    with open_h5ad(path) as f:
        parts = list(f.iter_csr_chunks(chunk_nnz))
        assert f.nnz == (X.nnz if sp.issparse(X) else X.size)
    assert [a for a, _ in parts] == list(np.cumsum([0] + [m.shape[0] for _, m in parts[:-1]]))
    got = sp.vstack([m for _, m in parts], format="csr")
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert (got != ref).nnz == 0


@pytest.mark.parametrize("layout", ["csr", "dense", "csc"])
def test_lean_reader_matches_anndata_on_synthetic_files(tmp_path: Path, layout: str) -> None:
    p = tmp_path / "a.h5ad"
    make_h5ad(p, N, gene_names(40), density=0.4, extra_obs=_extra_obs(), layout=layout)
    _assert_obs_equal(p)
    _assert_x_equal(p, chunk_nnz=37)  # several rows per chunk, chunks cut between rows
    _assert_x_equal(p, chunk_nnz=10**9)
    with open_h5ad(p) as f:
        raw = f.var_names_raw()
        assert raw.dtype == f"S{GENE_NAME_BYTES}" and [v.decode() for v in raw] == gene_names(40) == f.var_names().tolist()


def test_long_gene_names_are_read_whole(tmp_path: Path) -> None:
    """A name that fills the fixed-width buffer may have been cut: the reader falls back to the
    names as stored, so two lists differing past the width keep different fingerprints."""
    long = ["G" * (GENE_NAME_BYTES - 1) + "A", "G" * (GENE_NAME_BYTES - 1) + "B", "SHORT"]
    other = ["G" * (GENE_NAME_BYTES - 1) + "A", "G" * (GENE_NAME_BYTES - 1) + "C", "SHORT"]
    keys = []
    for i, genes in enumerate((long, other)):
        p = tmp_path / f"{i}.h5ad"
        make_h5ad(p, 5, genes)
        with open_h5ad(p) as f:
            raw = f.var_names_raw()
            assert raw.dtype == object and [v.decode() for v in raw] == genes
            keys.append(_gene_key(raw, None))
    assert keys[0] != keys[1]


def test_extra_columns_store_as_through_a_dataframe(tmp_path: Path) -> None:
    """The other obs columns become the same Arrow table whether read as columns (ingest) or as
    anndata's DataFrame: categoricals of strings as strings with nulls, the rest as typed."""
    p = tmp_path / "a.h5ad"
    make_h5ad(p, N, gene_names(10), extra_obs=_extra_obs())
    opts = IngestOptions(label_column="cell_type", batch_column="batch")
    with open_h5ad(p) as f:
        ours = extra_obs_table(_extra_columns(f.obs_columns(), opts), 5)
    ref_obs = ad.read_h5ad(p).obs
    ref = extra_obs_table(ref_obs.drop(columns=["cell_type", "batch"]).reset_index(drop=True), 5)
    assert ours.schema == ref.schema
    assert ours.equals(ref)
    assert ours.column("sample").null_count == 5


def test_string_categories_with_missing_values(tmp_path: Path) -> None:
    p = tmp_path / "a.h5ad"
    make_h5ad(p, N, gene_names(10), labels=None, extra_obs={"cell_type": _extra_obs()["sample"]})
    _assert_obs_equal(p)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real h5ad files) is absent")
@pytest.mark.parametrize("name", sorted(p.name for p in SHARED_DATA.glob("*.h5ad")) if SHARED_DATA.is_dir() else [])
def test_lean_reader_matches_anndata_on_real_files(name: str) -> None:
    path = SHARED_DATA / name
    _assert_obs_equal(path)
    _assert_x_equal(path, chunk_nnz=500_000)
    ref = ad.read_h5ad(path, backed="r")
    with open_h5ad(path) as f:
        assert f.var_names().tolist() == ref.var_names.astype(str).tolist()
        raw = f.var_names_raw()
        assert [v.decode() for v in raw] == ref.var_names.astype(str).tolist()
    ref.file.close()
