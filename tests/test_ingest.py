"""`hiceller ingest`: exact round trip of X and obs, the append-only vocabulary, every refused input
(one line on stderr, exit 2, nothing written), non-canonical CSR repaired, and a killed ingest
finished by re-running it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tiledbsoma as soma

from _fixtures import (
    REPO_ROOT,
    count_value,
    gene_names,
    logexpr_value,
    make_h5ad,
    run_hiceller,
    source_matrix,
    store_matrix,
    tree_snapshot,
    write_raw_csr,
)
from data_store.ingest import IngestOptions, ingest_files
from data_store.store import CorpusStore
from hiceller.errors import InputError


def _assert_dataset_matches(uri: Path, dataset_id: str, path: Path) -> None:
    """The dataset's rows of the store hold exactly the file's cells and values (genes by name)."""
    store = CorpusStore.open(uri)
    rec = store.datasets[dataset_id]
    content = store_matrix(uri)
    names, expected = source_matrix(path, content.vocab)
    rows = content.obs.set_index("soma_joinid").loc[rec.start : rec.stop - 1]
    assert rows["obs_id"].tolist() == names
    assert (rows["dataset_id"] == dataset_id).all()
    got = content.X[rec.start : rec.stop]
    assert got.shape == expected.shape
    assert (got != expected).nnz == 0, f"{dataset_id}: X differs from {path.name}"


def _ingest(uri: Path, *files: Path, **kw) -> list:
    return ingest_files(str(uri), list(files), IngestOptions(**kw))


# ----------------------------------------------------------------------------- round trip


def test_two_files_with_overlapping_genes_round_trip_exactly(tmp_path: Path) -> None:
    genes_a = gene_names(30)
    # b: 10 of a's genes in reverse order, interleaved with 10 new ones, then 2 more new ones.
    genes_b = [g for pair in zip(gene_names(12, start=100), genes_a[29:19:-1]) for g in pair] + gene_names(2, start=112)
    a = make_h5ad(tmp_path / "a.h5ad", 40, genes_a, count_value, seed=1, extra_obs={"n_counts": np.arange(40), "sample": ["s1", "s2"] * 20})
    b = make_h5ad(tmp_path / "b.h5ad", 25, genes_b, logexpr_value, seed=2, layout="dense", batches=None)
    uri = tmp_path / "store"
    (ra,) = _ingest(uri, tmp_path / "a.h5ad", tissue="lung")
    vocab_after_a = list(CorpusStore.open(uri).vocabulary())
    assert vocab_after_a == genes_a and ra.new_genes == 30
    (rb,) = _ingest(uri, tmp_path / "b.h5ad", disease="COVID-19")

    store = CorpusStore.open(uri)
    vocab = list(store.vocabulary())
    new_b = [g for g in genes_b if g not in genes_a]
    assert vocab == genes_a + new_b, "old ids changed or new genes not appended in file order"
    assert rb.new_genes == len(new_b) == 12 and rb.n_genes == len(genes_b)
    assert (ra.start, ra.stop, rb.start, rb.stop) == (0, 40, 40, 65)

    _assert_dataset_matches(uri, "a", tmp_path / "a.h5ad")
    _assert_dataset_matches(uri, "b", tmp_path / "b.h5ad")
    # And by the value formula itself, independent of anndata: X[cell, gene] = f(cell, file column).
    content = store_matrix(uri)
    col_a = {g: i for i, g in enumerate(genes_a)}
    coo = content.X[0:40].tocoo()
    expected = count_value(coo.row, np.array([col_a[content.vocab[c]] for c in coo.col]))
    assert np.array_equal(coo.data, expected.astype(np.float32))
    assert coo.nnz == a.X.nnz and content.X[40:65].nnz == np.count_nonzero(b.X)
    assert content.x_entries == a.X.nnz + np.count_nonzero(b.X)

    # Kinds, obs columns, labels, donors, tissue/disease flags.
    assert (ra.kind, rb.kind) == ("counts", "logexpr")
    obs = store.obs()
    oa, ob = obs[obs.dataset_id == "a"], obs[obs.dataset_id == "b"]
    assert oa["cell_type"].tolist() == a.obs["cell_type"].astype(str).tolist()
    assert oa["donor_id"].tolist() == a.obs["batch"].tolist()
    assert set(oa["tissue"]) == {"lung"} and set(oa["disease"]) == {"unknown"}
    assert set(ob["tissue"]) == {"unknown"} and set(ob["disease"]) == {"COVID-19"}
    assert set(ob["donor_id"]) == {"unknown"}  # no batch column in b
    assert ra.counts["cell_type"] == {"T": 14, "B": 13, "NK": 13}
    # Unknown obs columns are kept per dataset, joined by soma_joinid.
    with soma.Experiment.open(str(uri)) as exp:
        assert set(exp["extra_obs"].keys()) == {"a"}
        extra = exp["extra_obs"]["a"].read().concat().to_pandas().sort_values("soma_joinid")
    assert extra["soma_joinid"].tolist() == list(range(40))
    assert extra["n_counts"].tolist() == list(range(40))
    assert extra["sample"].tolist() == ["s1", "s2"] * 20
    summary = store.summary()
    assert summary["kind_per_dataset"] == {"a": "counts", "b": "logexpr"}
    assert summary["cells"] == 65 and summary["genes"] == 42 and summary["donors"] == 3


def test_chunk_size_and_layout_do_not_change_what_is_stored(tmp_path: Path) -> None:
    genes = gene_names(50)
    for layout in ("csr", "csc", "dense"):
        make_h5ad(tmp_path / f"{layout}.h5ad", 40, genes, count_value, seed=3, layout=layout)
    _ingest(tmp_path / "small_chunks", tmp_path / "csr.h5ad", chunk_nnz=60)  # ~4 cells per chunk
    _ingest(tmp_path / "one_chunk", tmp_path / "csr.h5ad")
    _ingest(tmp_path / "layouts", tmp_path / "csc.h5ad", tmp_path / "dense.h5ad", chunk_nnz=400)  # dense: 8 rows
    one = store_matrix(tmp_path / "one_chunk")
    small = store_matrix(tmp_path / "small_chunks")
    layouts = store_matrix(tmp_path / "layouts")
    assert (one.X != small.X).nnz == 0 and one.x_entries == small.x_entries
    assert (layouts.X[0:40] != one.X).nnz == 0 and (layouts.X[40:80] != one.X).nnz == 0
    _assert_dataset_matches(tmp_path / "layouts", "dense", tmp_path / "dense.h5ad")


def test_dataset_id_existing_and_skip_existing(tmp_path: Path) -> None:
    make_h5ad(tmp_path / "a.h5ad", 10, gene_names(5))
    uri = tmp_path / "store"
    (rec,) = _ingest(uri, tmp_path / "a.h5ad", dataset_id="custom")
    assert rec.dataset_id == "custom" and set(CorpusStore.open(uri).datasets) == {"custom"}
    assert set(CorpusStore.open(uri).obs()["dataset_id"]) == {"custom"}
    # The same file again (a killed bulk ingest re-run) is skipped; another file under that id is refused.
    assert _ingest(uri, tmp_path / "a.h5ad", dataset_id="custom") == []
    make_h5ad(tmp_path / "other.h5ad", 10, gene_names(5))
    with pytest.raises(InputError, match="'custom' is already in store"):
        _ingest(uri, tmp_path / "other.h5ad", dataset_id="custom")
    assert _ingest(uri, tmp_path / "other.h5ad", dataset_id="custom", skip_existing=True) == []
    (again,) = _ingest(uri, tmp_path / "a.h5ad")  # another id: the same file may be a second dataset
    assert again.dataset_id == "a" and CorpusStore.open(uri).n_cells == 20
    with pytest.raises(InputError, match="--dataset-id names one dataset"):
        _ingest(uri, tmp_path / "a.h5ad", tmp_path / "a.h5ad", dataset_id="x")


def test_genes_differing_only_in_case_are_summed_with_a_note(tmp_path: Path) -> None:
    genes = ["Abc1", "ABC1", "Xyz", "c2orf15"]
    make_h5ad(tmp_path / "case.h5ad", 12, genes, count_value, density=0.6, seed=4)
    uri = tmp_path / "store"
    (rec,) = _ingest(uri, tmp_path / "case.h5ad")
    vocab = list(CorpusStore.open(uri).vocabulary())
    assert vocab == ["ABC1", "XYZ", "C2ORF15"]
    assert rec.n_genes == 4 and rec.new_genes == 3
    assert any("differ only in case" in n and "summed" in n for n in rec.notes)
    src = ad.read_h5ad(tmp_path / "case.h5ad").X.toarray()
    got = store_matrix(uri).X.toarray()
    assert np.array_equal(got[:, 0], src[:, 0] + src[:, 1])
    assert np.array_equal(got[:, 1:], src[:, 2:])


def test_unlabeled_data_with_label_column_none(tmp_path: Path) -> None:
    make_h5ad(tmp_path / "u.h5ad", 8, gene_names(4), labels=None)
    with pytest.raises(InputError, match="no label column 'cell_type'"):
        _ingest(tmp_path / "s", tmp_path / "u.h5ad")
    (rec,) = _ingest(tmp_path / "s", tmp_path / "u.h5ad", label_column=None)
    assert not rec.labeled
    assert set(CorpusStore.open(tmp_path / "s").obs()["cell_type"]) == {"unknown"}


def test_other_label_and_batch_columns(tmp_path: Path) -> None:
    make_h5ad(tmp_path / "o.h5ad", 6, gene_names(4), label_column="celltype", batches=None, extra_obs={"donor": list("xxyyzz")})
    (rec,) = _ingest(tmp_path / "s", tmp_path / "o.h5ad", label_column="celltype", batch_column="donor")
    obs = CorpusStore.open(tmp_path / "s").obs()
    assert obs["cell_type"].tolist() == ["T", "B", "NK"] * 2
    assert obs["donor_id"].tolist() == list("xxyyzz")
    assert rec.counts["donor_id"] == {"x": 2, "y": 2, "z": 2}


def test_cli_ingest_and_info(tmp_path: Path, in_process) -> None:
    make_h5ad(tmp_path / "a.h5ad", 20, gene_names(10), count_value)
    make_h5ad(tmp_path / "b.h5ad", 15, gene_names(10, start=5), logexpr_value)
    uri = tmp_path / "store"
    r = run_hiceller("ingest", "--no-progress", "--store", uri, tmp_path / "a.h5ad", tmp_path / "b.h5ad")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "ingested a: 20 cells, 10 genes (10 new), counts",
        "ingested b: 15 cells, 10 genes (5 new), logexpr",
    ]
    info = run_hiceller("info", "--store", uri, "--json")
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["cells"] == 35 and summary["genes"] == 15 and summary["datasets"] == 2
    assert summary["cells_per_dataset"] == {"a": 20, "b": 15}
    assert summary["kind_per_dataset"] == {"a": "counts", "b": "logexpr"}
    _assert_dataset_matches(uri, "b", tmp_path / "b.h5ad")
    rc, out, _err = in_process("ingest", "--no-progress", "--skip-existing", "--store", uri, tmp_path / "a.h5ad")
    assert rc == 0 and "nothing to ingest" in out
    rc, out, _err = in_process("info", "--store", uri)
    assert rc == 0 and "cells     35" in out and "datasets  2" in out


# ----------------------------------------------------------------------------- non-canonical CSR


@pytest.mark.parametrize(
    "indices, data, expected_row0",
    [
        ([2, 0, 1, 3, 0], [3.0, 1.0, 2.0, 4.0, 5.0], [1.0, 2.0, 3.0, 0.0]),  # unsorted
        ([0, 2, 0, 1, 3], [1.0, 3.0, 5.0, 4.0, 6.0], [6.0, 0.0, 3.0, 0.0]),  # duplicate (0, 0), summed
    ],
    ids=["unsorted", "duplicates"],
)
def test_non_canonical_csr_is_repaired_with_a_note(tmp_path: Path, indices, data, expected_row0) -> None:
    # Row 0 has 3 entries, row 1 has 2; the defect is in row 0 (and row 1 for 'duplicates').
    path = tmp_path / "nc.h5ad"
    write_raw_csr(path, np.array([0, 3, 5]), np.array(indices), np.array(data), ["A", "B", "C", "D"])
    uri = tmp_path / "store"
    r = run_hiceller("ingest", "--no-progress", "--store", uri, path)
    assert r.returncode == 0, r.stderr
    assert "unsorted or duplicate column indices" in r.stdout and "summed" in r.stdout
    got = store_matrix(uri).X.toarray()
    assert got[0].tolist() == expected_row0
    assert np.array_equal(got, source_matrix(path, ["A", "B", "C", "D"])[1].toarray())
    rec = CorpusStore.open(uri).datasets["nc"]
    assert any("unsorted or duplicate" in n for n in rec.notes)


# ----------------------------------------------------------------------------- refused inputs


@dataclass
class Bad:
    """One refused input: build(tmp) -> (extra CLI args before the files, files, what names it, problem)."""

    build: Callable[[Path], tuple[list[str], list[Path], str, str]]
    existing_store_only: bool = False


def _good(tmp: Path, name: str = "good.h5ad", n: int = 12) -> Path:
    make_h5ad(tmp / name, n, gene_names(6), count_value)
    return tmp / name


def _with_value(tmp: Path, value: float, row: int = 37) -> Path:
    """A 50-cell file with one bad value in a late row (found only by a full pass over X)."""
    path = tmp / "bad_value.h5ad"
    m = make_h5ad(path, 50, gene_names(6), count_value)
    X = sp.csr_matrix(m.X)
    X.data[X.indptr[row]] = value
    ad.AnnData(X=X, obs=m.obs, var=m.var).write_h5ad(path)
    return path


def _text(tmp: Path) -> tuple[list[str], list[Path], str, str]:
    p = tmp / "notes.h5ad"
    p.write_text("cell,gene,count\n")
    return [], [p], str(p), "not a readable .h5ad file"


def _missing(tmp: Path) -> tuple[list[str], list[Path], str, str]:
    return [], [tmp / "absent.h5ad"], str(tmp / "absent.h5ad"), "does not exist"


def _truncated(tmp: Path) -> tuple[list[str], list[Path], str, str]:
    good = _good(tmp)
    p = tmp / "truncated.h5ad"
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return [], [p], str(p), "not a readable .h5ad file"


def _no_label(tmp: Path) -> tuple[list[str], list[Path], str, str]:
    p = tmp / "nolabel.h5ad"
    make_h5ad(p, 5, gene_names(3), labels=None)
    return [], [p], str(p), "obs has no label column 'cell_type'"


def _missing_labels(tmp: Path) -> tuple[list[str], list[Path], str, str]:
    p = tmp / "nalabel.h5ad"
    make_h5ad(p, 5, gene_names(3), labels=["T", "B", None])  # type: ignore[list-item]
    return [], [p], str(p), "label column 'cell_type' has 1 missing values"


def _nan(tmp: Path) -> tuple[list[str], list[Path], str, str]:
    p = _with_value(tmp, np.nan)
    return ["--chunk-nnz", "20"], [p], str(p), "NaN or infinite values (first in cell 'cell37')"


def _inf(tmp: Path) -> tuple[list[str], list[Path], str, str]:
    p = _with_value(tmp, np.inf)
    return ["--chunk-nnz", "20"], [p], str(p), "NaN or infinite values (first in cell 'cell37')"


def _negative(tmp: Path) -> tuple[list[str], list[Path], str, str]:
    p = _with_value(tmp, -1.0)
    return ["--chunk-nnz", "20"], [p], str(p), "negative values (first in cell 'cell37')"


def _dup_cells(tmp: Path) -> tuple[list[str], list[Path], str, str]:
    p = tmp / "dupcells.h5ad"
    write_raw_csr(p, np.array([0, 1, 2, 3]), np.array([0, 1, 0]), np.ones(3), ["A", "B"], cells=["c1", "c2", "c1"])
    return [], [p], str(p), "duplicate cell ids in obs (1, e.g. 'c1')"


def _dup_genes(tmp: Path) -> tuple[list[str], list[Path], str, str]:
    p = tmp / "dupgenes.h5ad"
    write_raw_csr(p, np.array([0, 1, 2]), np.array([0, 1]), np.ones(2), ["A", "B", "A"])
    return [], [p], str(p), "duplicate gene names (1, e.g. A)"


def _zero_cells(tmp: Path) -> tuple[list[str], list[Path], str, str]:
    p = tmp / "nocells.h5ad"
    a = ad.AnnData(X=sp.csr_matrix((0, 3), dtype=np.float32), var=pd.DataFrame(index=["A", "B", "C"]))
    a.obs["cell_type"] = pd.Series([], dtype=str)
    a.write_h5ad(p)
    return [], [p], str(p), "has zero cells"


def _zero_genes(tmp: Path) -> tuple[list[str], list[Path], str, str]:
    p = tmp / "nogenes.h5ad"
    obs = pd.DataFrame({"cell_type": ["T", "B"]}, index=["c0", "c1"])
    ad.AnnData(X=sp.csr_matrix((2, 0), dtype=np.float32), obs=obs).write_h5ad(p)
    return [], [p], str(p), "has zero genes"


def _good_then_bad(tmp: Path) -> tuple[list[str], list[Path], str, str]:
    """Every file is validated before any is written: the good first file must not land."""
    good = _good(tmp, "first_good.h5ad")
    p = _with_value(tmp, np.nan)
    return [], [good, p], str(p), "NaN or infinite values"


def _no_gene_column(tmp: Path) -> tuple[list[str], list[Path], str, str]:
    p = _good(tmp)
    return ["--gene-column", "ensembl_id"], [p], str(p), "var has no column 'ensembl_id'"


def _same_id_twice(tmp: Path) -> tuple[list[str], list[Path], str, str]:
    a = _good(tmp)
    (tmp / "other").mkdir()
    b = _good(tmp / "other")
    return [], [a, b], str(b), "dataset id 'good' given twice"


def _no_overlap(tmp: Path) -> tuple[list[str], list[Path], str, str]:
    p = tmp / "disjoint.h5ad"
    make_h5ad(p, 5, gene_names(4, prefix="OTHER"))
    return ["--require-overlap"], [p], str(p), "shares no gene with store"


def _already_there(tmp: Path) -> tuple[list[str], list[Path], str, str]:
    p = tmp / "base.h5ad"  # the dataset id of the existing store's dataset
    make_h5ad(p, 5, gene_names(4))
    return [], [p], str(p), "dataset 'base' is already in store"


BAD = {
    "text_file": Bad(_text),
    "missing_file": Bad(_missing),
    "truncated_file": Bad(_truncated),
    "no_label_column": Bad(_no_label),
    "missing_labels": Bad(_missing_labels),
    "nan": Bad(_nan),
    "inf": Bad(_inf),
    "negative": Bad(_negative),
    "duplicate_cells": Bad(_dup_cells),
    "duplicate_genes": Bad(_dup_genes),
    "zero_cells": Bad(_zero_cells),
    "zero_genes": Bad(_zero_genes),
    "good_then_bad": Bad(_good_then_bad),
    "no_gene_column": Bad(_no_gene_column),
    "same_dataset_id_twice": Bad(_same_id_twice),
    "require_overlap": Bad(_no_overlap, existing_store_only=True),
    "already_present": Bad(_already_there, existing_store_only=True),
}


@pytest.fixture(scope="module")
def base_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small complete store (dataset 'base'), copied by each test that needs an existing one."""
    tmp = tmp_path_factory.mktemp("base")
    make_h5ad(tmp / "base.h5ad", 10, gene_names(8), count_value)
    _ingest(tmp / "store", tmp / "base.h5ad")
    return tmp / "store"


def _assert_refused(rc: int, out: str, err: str, names: str, problem: str) -> None:
    assert rc == 2, (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hiceller ingest: error: ")
    assert names in lines[0] and problem in lines[0], lines[0]
    assert "Traceback" not in err and out == ""


def _refuse(tmp_path: Path, base_store: Path | None, case: str, run: Callable[..., tuple[int, str, str]]) -> None:
    """Run a refused case against a copy of base_store (or no store) and check nothing was written."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    args, files, names, problem = BAD[case].build(inputs)
    uri = tmp_path / "store"
    if base_store is not None:
        shutil.copytree(base_store, uri)
        before = CorpusStore.open(uri).summary()
    snap = tree_snapshot(uri)
    rc, out, err = run("ingest", "--no-progress", *args, "--store", uri, *files)
    _assert_refused(rc, out, err, names, problem)
    assert tree_snapshot(uri) == snap, "the store was written to"
    if base_store is not None:
        assert CorpusStore.open(uri).summary() == before
    else:
        assert not uri.exists()
    # No temporary sibling left behind either.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "in") == (["store"] if base_store else [])


def _subprocess(*args: str | Path) -> tuple[int, str, str]:
    r = run_hiceller(*args)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_and_an_existing_store_is_untouched(tmp_path: Path, base_store: Path, case: str) -> None:
    _refuse(tmp_path, base_store, case, _subprocess)


NEW_STORE_CASES = [c for c, b in BAD.items() if not b.existing_store_only]


@pytest.mark.parametrize("case", NEW_STORE_CASES)
def test_bad_input_is_refused_and_no_store_is_created(tmp_path: Path, case: str, in_process) -> None:
    _refuse(tmp_path, None, case, in_process)


@pytest.mark.slow
@pytest.mark.parametrize("case", NEW_STORE_CASES)
def test_bad_input_is_refused_and_no_store_is_created_subprocess(tmp_path: Path, case: str) -> None:
    _refuse(tmp_path, None, case, _subprocess)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads a chmod-000 file anyway")
def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    p = _good(tmp_path)
    p.chmod(0)
    try:
        r = run_hiceller("ingest", "--no-progress", "--store", tmp_path / "store", p)
    finally:
        p.chmod(0o644)
    _assert_refused(r.returncode, r.stdout, r.stderr, str(p), "not a readable .h5ad file")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("kind", ["plain_dir", "file", "foreign_experiment"])
def test_store_path_that_is_not_a_store(tmp_path: Path, kind: str) -> None:
    good = _good(tmp_path)
    uri = tmp_path / "target"
    if kind == "plain_dir":
        uri.mkdir()
        (uri / "readme.txt").write_text("my notes")
        problem = "is not a TileDB-SOMA experiment"
    elif kind == "file":
        uri.write_text("my notes")
        problem = "is a file; name a folder"
    else:
        soma.Experiment.create(str(uri)).close()
        problem = "is a SOMA experiment but not a HiCeller store"
    snap = tree_snapshot(uri)
    r = run_hiceller("ingest", "--no-progress", "--store", uri, good)
    _assert_refused(r.returncode, r.stdout, r.stderr, str(uri), problem)
    assert tree_snapshot(uri) == snap
    if kind == "plain_dir":
        info = run_hiceller("info", "--store", uri, "--json")
        assert info.returncode == 2 and info.stdout == "" and "Traceback" not in info.stderr
        assert info.stderr.splitlines() == [f"hiceller info: error: store {uri} {problem} " + info.stderr.split(problem, 1)[1].strip()]


def test_bad_chunk_size_is_refused(tmp_path: Path, in_process) -> None:
    _assert_refused(*in_process("ingest", "--no-progress", "--chunk-nnz", "0", "--store", tmp_path / "s", _good(tmp_path)), "--chunk-nnz", "must be >= 1")
    assert not (tmp_path / "s").exists()


def test_refusal_with_progress_bars_ends_with_the_error(tmp_path: Path) -> None:
    """Without --no-progress the bar output comes first; the error is still the last line, whole."""
    p = _with_value(tmp_path, np.nan)
    r = run_hiceller("ingest", "--store", tmp_path / "s", p)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.replace("\r", "\n").rstrip("\n").splitlines()[-1]
    assert "hiceller ingest: error: " in last and str(p) in last and "NaN" in last
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- kill and re-run


def _kill_value(cell: np.ndarray, gene: np.ndarray) -> np.ndarray:
    return 1.0 + (cell % 8000) * 2000 + gene  # exact in float32 for any cell, 2000 genes


def test_killed_ingest_is_finished_by_rerunning(tmp_path: Path) -> None:
    src = tmp_path / "big.h5ad"
    n_cells = 20_000
    make_h5ad(src, n_cells, gene_names(2000), _kill_value, density=0.05, seed=5)  # ~70 chunks of 30k nnz
    uri = tmp_path / "store"
    cmd = [sys.executable, "-m", "hiceller", "ingest", "--no-progress", "--chunk-nnz", "30000", "--store", str(uri), str(src)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fragments = uri / "ms" / "RNA" / "X" / "data" / "__fragments"
    killed_at = None
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                rec = CorpusStore.open(uri).datasets.get("big")
            except Exception:  # not created yet
                rec = None
            if rec is not None and rec.status == "writing" and fragments.is_dir() and len(list(fragments.iterdir())) >= 3:
                proc.send_signal(signal.SIGKILL)
                killed_at = len(list(fragments.iterdir()))
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait(timeout=30)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the ingest finished before it could be killed"

    # The killed store opens, counts none of the dataset's cells, and names it incomplete.
    info = run_hiceller("info", "--store", uri, "--json")
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["cells"] == 0 and summary["datasets"] == 0 and summary["incomplete_datasets"] == ["big"]
    assert len(CorpusStore.open(uri).obs()) == 0
    partial = store_matrix(uri)
    expected_nnz = ad.read_h5ad(src, backed="r").X.group["data"].shape[0]  # type: ignore[union-attr]
    assert 0 < partial.x_entries < expected_nnz, "the kill was not mid-write"

    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    store = CorpusStore.open(uri)
    summary = store.summary()
    assert summary["cells"] == n_cells and summary["incomplete_datasets"] == [] and summary["datasets"] == 1
    assert store.next_joinid == n_cells, "the re-run reserved a second range"
    content = store_matrix(uri)
    assert len(content.obs) == n_cells
    assert content.obs["soma_joinid"].tolist() == list(range(n_cells))
    assert content.obs["obs_id"].is_unique
    assert content.x_entries == expected_nnz
    names, expected = source_matrix(src, content.vocab)
    assert content.obs["obs_id"].tolist() == names
    assert (content.X != expected).nnz == 0


# ----------------------------------------------------------------------------- shared real data


@pytest.mark.shared_data
def test_ingest_every_shared_file(tmp_path: Path, shared_data: Path) -> None:
    files = sorted(shared_data.glob("*.h5ad"))
    uri = tmp_path / "store"
    done = _ingest(uri, *files)  # the unlabeled file says so in obs["cell_type"]
    store = CorpusStore.open(uri)
    summary = store.summary()
    n_cells = {f.stem: ad.read_h5ad(f, backed="r").n_obs for f in files}
    assert summary["datasets"] == len(files) and summary["incomplete_datasets"] == []
    assert summary["cells_per_dataset"] == n_cells and summary["cells"] == sum(n_cells.values())
    for f in files:
        assert summary["kind_per_dataset"][f.stem] == ("logexpr" if "logexpr" in f.stem else "counts"), f.name
    assert sum(r.new_genes for r in done) == summary["genes"] == len(store.vocabulary())
    content = store_matrix(uri)
    for f in files:
        rec = store.datasets[f.stem]
        a = ad.read_h5ad(f, backed="r")
        rows = content.obs[rec.start : rec.stop]
        assert rows["obs_id"].tolist() == list(a.obs_names), f.name
        assert rows["cell_type"].tolist() == a.obs["cell_type"].astype(str).tolist(), f.name
        assert rows["donor_id"].tolist() == a.obs["batch"].astype(str).tolist(), f.name
        _names, expected = source_matrix(f, content.vocab)
        assert (content.X[rec.start : rec.stop] != expected).nnz == 0, f.name


def test_missing_values_of_categorical_obs_columns_read_as_nan_not_as_a_category():
    """A categorical donor/tissue/disease column with missing cells (code -1) gives "nan" for them,
    as a string column with missing values does, never the last category."""
    import pandas as pd

    from data_store.ingest import _as_str

    cat = pd.Categorical(["d1", None, "d2", None], categories=["d1", "d2"])
    assert _as_str(pd.Series(cat)).tolist() == ["d1", "nan", "d2", "nan"]
    assert _as_str(pd.Series(["d1", float("nan")], dtype=object)).tolist() == ["d1", "nan"]
