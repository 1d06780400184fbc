"""Ingest .h5ad files into the corpus store, in chunks of cells, at bounded memory.

Each file becomes one dataset. Every file is validated completely before anything is written
(bad input leaves the store untouched); then its genes extend the store vocabulary, its joinid
range is reserved, and X and obs are written chunk by chunk straight from the backed h5ad.
Peak memory is one chunk (``chunk_nnz`` non-zeros) plus obs, whatever the size of the file.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_store.store import OBS_COLUMNS, UNKNOWN, CorpusStore, DatasetRecord
from hiceller.errors import InputError

__all__ = ["IngestOptions", "SourceCheck", "check_h5ad", "ingest_files", "iter_csr_chunks"]

DEFAULT_CHUNK_NNZ = 8_000_000  # ~100 MB of (row, col, value) per chunk while writing


@dataclass
class IngestOptions:
    label_column: str | None = "cell_type"
    """obs column holding cell-type labels; None for unlabeled data."""
    batch_column: str | None = "batch"
    """obs column naming the donor (or batch); stored as donor_id. Missing -> unknown."""
    tissue: str | None = None
    disease: str | None = None
    dataset_id: str | None = None
    gene_column: str | None = None
    """var column with gene ids to use instead of upper-cased var_names."""
    require_overlap: bool = False
    skip_existing: bool = False
    chunk_nnz: int = DEFAULT_CHUNK_NNZ


@dataclass
class SourceCheck:
    """What validation learned about one file: enough to write it without a second look at obs."""

    path: Path
    dataset_id: str
    n_cells: int
    genes: list[str]
    kind: str
    fingerprint: str
    obs: pd.DataFrame
    extra: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def _fail(path: Path, msg: str) -> InputError:
    return InputError(f"{path}: {msg}")


def _fingerprint(path: Path, n_cells: int, n_genes: int) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{n_cells}|{n_genes}".encode()).hexdigest()[:16]


def _open_backed(path: Path) -> ad.AnnData:
    if not path.is_file():
        raise _fail(path, "file does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ad.read_h5ad(path, backed="r")
    except Exception as e:
        raise _fail(path, f"not a readable .h5ad file ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def iter_csr_chunks(adata: ad.AnnData, chunk_nnz: int) -> Iterator[tuple[int, sp.csr_matrix]]:
    """(first row, CSR chunk) over a backed AnnData, chunks sized by non-zeros, not cells, so a
    dense-ish file and a sparse one both stay within the same memory."""
    n, g = adata.shape
    X = adata.X
    indptr = None
    if isinstance(X, ad.abc.CSRDataset) or (hasattr(X, "format") and getattr(X, "format", "") == "csr"):
        indptr = X.group["indptr"][...] if hasattr(X, "group") else None
    if indptr is not None:
        a = 0
        while a < n:
            # Rows whose cumulative non-zeros stay within the budget (at least one row).
            b = int(np.searchsorted(indptr, indptr[a] + chunk_nnz, side="right")) - 1
            b = min(max(b, a + 1), n)
            yield a, _as_csr(X[a:b])
            a = b
    else:
        step = max(1, chunk_nnz // max(g, 1))
        for a in range(0, n, step):
            yield a, _as_csr(X[a : min(a + step, n)])


def _as_csr(m) -> sp.csr_matrix:
    if sp.issparse(m):
        return sp.csr_matrix(m)
    return sp.csr_matrix(np.asarray(m))


def _check_chunk(path: Path, m: sp.csr_matrix, row0: int, obs_names: pd.Index) -> tuple[bool, bool]:
    """Validate one chunk; returns (all values integer, needed canonicalising)."""
    data = m.data
    if data.size:
        bad = ~np.isfinite(data)
        if bad.any():
            r = int(np.searchsorted(m.indptr, np.flatnonzero(bad)[0], side="right")) - 1
            raise _fail(path, f"X has NaN or infinite values (first in cell {obs_names[row0 + r]!r})")
        neg = data < 0
        if neg.any():
            r = int(np.searchsorted(m.indptr, np.flatnonzero(neg)[0], side="right")) - 1
            raise _fail(path, f"X has negative values (first in cell {obs_names[row0 + r]!r}); give counts or log-normalised data")
    integer = bool(np.all(data == np.floor(data))) if data.size else True
    return integer, not _is_canonical(m)


def _is_canonical(m: sp.csr_matrix) -> bool:
    """Sorted, duplicate-free column indices in every row (checked, not trusted from the flag)."""
    if m.nnz < 2:
        return True
    d = np.diff(m.indices.astype(np.int64))
    row_start = np.zeros(m.nnz - 1, dtype=bool)
    starts = m.indptr[1:-1]
    starts = starts[(starts > 0) & (starts < m.nnz)]
    row_start[starts - 1] = True
    return bool(np.all((d > 0) | row_start))


def _gene_names(path: Path, adata: ad.AnnData, gene_column: str | None) -> tuple[list[str], list[str]]:
    """Store gene names for the file's columns, and notes.

    Exact duplicates are an error (which of the two is meant?). Symbols that differ only in case
    (``C2orf15`` and ``C2ORF15`` in one real PBMC file) name one gene once upper-cased: their
    columns are summed into it, and the note says so.
    """
    if gene_column:
        if gene_column not in adata.var.columns:
            raise _fail(path, f"var has no column {gene_column!r} (columns: {', '.join(map(str, adata.var.columns)) or 'none'})")
        raw = pd.Index(adata.var[gene_column].astype(str).to_numpy(dtype=object))
    else:
        raw = pd.Index(adata.var_names.astype(str).to_numpy(dtype=object))
    if (raw == "").any() or raw.isna().any() or (raw == "nan").any():
        raise _fail(path, "empty gene name in var")
    dup = raw[raw.duplicated()].unique()
    if len(dup):
        shown = ", ".join(map(str, dup[:5]))
        raise _fail(path, f"duplicate gene names ({len(dup)}, e.g. {shown})")
    genes = raw if gene_column else pd.Index(raw.str.upper())
    notes = []
    merged = genes[genes.duplicated()].unique()
    if len(merged):
        notes.append(f"{len(merged)} gene symbols differ only in case (e.g. {merged[0]}): their columns were summed")
    return list(genes), notes


def check_h5ad(path: Path, opts: IngestOptions, progress: Callable[[int], None] | None = None) -> SourceCheck:
    """Validate a file fully (one pass over X in chunks). Raises InputError naming the problem."""
    adata = _open_backed(path)
    try:
        n, g = adata.shape
        if n == 0:
            raise _fail(path, "has zero cells")
        if g == 0:
            raise _fail(path, "has zero genes")
        obs = adata.obs
        if opts.label_column and opts.label_column not in obs.columns:
            raise _fail(
                path,
                f"obs has no label column {opts.label_column!r} (columns: {', '.join(map(str, obs.columns)) or 'none'}; "
                "use --label-column none for unlabeled data)",
            )
        if obs.index.duplicated().any():
            dup = obs.index[obs.index.duplicated()].unique()
            raise _fail(path, f"duplicate cell ids in obs ({len(dup)}, e.g. {dup[0]!r})")
        genes, notes = _gene_names(path, adata, opts.gene_column)
        integer, fixed = True, False
        for row0, m in iter_csr_chunks(adata, opts.chunk_nnz):
            i, f = _check_chunk(path, m, row0, obs.index)
            integer &= i
            fixed |= f
            if progress:
                progress(m.shape[0])
        if fixed:
            notes.append("X had unsorted or duplicate column indices in CSR rows: duplicates summed and rows sorted")
        dataset_id = opts.dataset_id or path.stem
        meta = _obs_table(path, obs, opts, dataset_id)
        known = set(OBS_COLUMNS) | {c for c in (opts.label_column, opts.batch_column) if c}
        extra = obs[[c for c in obs.columns if c not in known]].copy()
        extra.columns = [str(c) for c in extra.columns]
        return SourceCheck(
            path=path,
            dataset_id=dataset_id,
            n_cells=n,
            genes=genes,
            kind="counts" if integer else "logexpr",
            fingerprint=_fingerprint(path, n, g),
            obs=meta,
            extra=extra,
            notes=notes,
        )
    finally:
        adata.file.close()


def _obs_table(path: Path, obs: pd.DataFrame, opts: IngestOptions, dataset_id: str) -> pd.DataFrame:
    """The CELLxGENE-style columns: labels, donor from the batch column, tissue/disease from flags or obs."""
    out = pd.DataFrame(index=range(len(obs)))
    out["obs_id"] = obs.index.astype(str).to_numpy()
    if opts.label_column:
        labels = obs[opts.label_column]
        if labels.isna().any():
            raise _fail(path, f"label column {opts.label_column!r} has {int(labels.isna().sum())} missing values")
        out["cell_type"] = labels.astype(str).to_numpy()
    else:
        out["cell_type"] = UNKNOWN
    out["donor_id"] = (
        obs[opts.batch_column].astype(str).to_numpy() if opts.batch_column and opts.batch_column in obs.columns else UNKNOWN
    )
    for col, flag in (("tissue", opts.tissue), ("disease", opts.disease)):
        if flag:
            out[col] = flag
        elif col in obs.columns:
            out[col] = obs[col].astype(str).to_numpy()
        else:
            out[col] = UNKNOWN
    out["dataset_id"] = dataset_id
    return out


def _value_counts(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    return {c: {str(k): int(v) for k, v in frame[c].value_counts().items()} for c in ("cell_type", "tissue", "disease", "donor_id")}


def write_checked(store: CorpusStore, check: SourceCheck, opts: IngestOptions, progress: Callable[[int], None] | None = None) -> DatasetRecord:
    """Write one validated file into the store (resuming an interrupted ingest of the same file)."""
    col_ids, n_new = store.extend_vocabulary(check.genes)
    record = DatasetRecord(
        dataset_id=check.dataset_id,
        start=0,
        stop=check.n_cells,
        status="writing",
        kind=check.kind,
        source=str(check.path),
        labeled=opts.label_column is not None,
        tissue=opts.tissue or UNKNOWN,
        disease=opts.disease or UNKNOWN,
        n_genes=len(check.genes),
        new_genes=n_new,
        fingerprint=check.fingerprint,
        counts=_value_counts(check.obs),
        notes=check.notes,
    )
    record = store.reserve_dataset(record)
    adata = _open_backed(check.path)
    try:
        for row0, m in iter_csr_chunks(adata, opts.chunk_nnz):
            # Map file columns to vocabulary ids, then sort each row (TileDB's global order), summing
            # duplicates: those of a non-canonical CSR and genes merged by upper-casing.
            m.indices = col_ids[m.indices].astype(np.int32 if col_ids.max() < 2**31 else np.int64)
            m.has_canonical_format = False
            m.sum_duplicates()
            m.eliminate_zeros()
            rows = slice(row0, row0 + m.shape[0])
            extra = check.extra.iloc[rows] if check.extra.shape[1] else None
            store.write_chunk(record, row0, m.indptr, m.indices, m.data, check.obs.iloc[rows], extra)
            if progress:
                progress(m.shape[0])
    finally:
        adata.file.close()
    store.finish_dataset(record)
    return record


def ingest_files(
    store_uri: str,
    files: list[Path],
    opts: IngestOptions,
    progress_factory: Callable[[str, int], Callable[[int], None]] | None = None,
) -> list[DatasetRecord]:
    """Validate every file, then write each one. Nothing is written if any file is bad."""
    checks = []
    ids: set[str] = set()
    if opts.dataset_id and len(files) > 1:
        raise InputError("--dataset-id names one dataset; give one file with it")
    for path in files:
        n_cells = _peek_cells(path)
        bar = progress_factory(f"check {path.name}", n_cells) if progress_factory else None
        c = check_h5ad(path, opts, bar)
        if c.dataset_id in ids:
            raise InputError(f"{path}: dataset id {c.dataset_id!r} given twice; pass --dataset-id")
        ids.add(c.dataset_id)
        checks.append(c)
    store_exists = _store_present(store_uri)
    store = CorpusStore.open(store_uri) if store_exists else None
    todo = []
    for c in checks:
        if store is not None:
            rec = store.datasets.get(c.dataset_id)
            if rec is not None and rec.status == "complete":
                if opts.skip_existing:
                    continue
                raise InputError(f"{c.path}: dataset {c.dataset_id!r} is already in store {store_uri} (use --skip-existing)")
            if opts.require_overlap and store.n_cells > 0:
                vocab = store.vocabulary()
                if not pd.Index(c.genes).isin(vocab).any():
                    raise InputError(f"{c.path}: shares no gene with store {store_uri} (--require-overlap)")
        todo.append(c)
    if store is None and todo:
        store = CorpusStore.create(store_uri)
    done = []
    for c in todo:
        bar = progress_factory(f"ingest {c.path.name}", c.n_cells) if progress_factory else None
        done.append(write_checked(store, c, opts, bar))
    return done


def _peek_cells(path: Path) -> int:
    adata = _open_backed(path)
    try:
        return adata.n_obs
    finally:
        adata.file.close()


def _store_present(uri: str) -> bool:
    if uri.startswith("s3://"):
        from data_store.store import is_store

        return is_store(uri)
    p = Path(uri)
    if not p.exists():
        return False
    if p.is_dir() and not any(p.iterdir()):
        return False
    CorpusStore.open(uri)  # raises StoreError when it is not a store
    return True

