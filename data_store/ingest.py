"""Ingest .h5ad files into the corpus store: validated first, then written in bulk at bounded memory.

Each file becomes one dataset. Every file is validated completely before anything is written (bad
input leaves the store untouched, and every bad file is named at once). Then the files are written
in *batches*: consecutive files holding together at most ``chunk_nnz`` non-zeros (and at most
``MAX_BATCH_FILES`` files) share one vocabulary update, one registry write reserving their joinid
ranges, one X and one obs fragment (and one in the extra_obs DataFrame of their other obs columns,
shared by every dataset with those columns), and one registry write marking them complete. A file larger than that is a batch of its own, written chunk by chunk
straight from disk. So a thousand 60-cell files pay per-batch costs about twenty times, not a
thousand; what remains per file is reading it (twice: validation, then writing).

Peak memory is one batch: ``chunk_nnz`` non-zeros plus its obs, whatever the number or size of files.
An ingest that wrote many fragments optimizes what it wrote at the end (data_store/optimize.py).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from data_store.h5ad_reader import H5adFile, ObsColumns, open_h5ad
from data_store.store import OBS_COLUMNS, UNKNOWN, CorpusStore, DatasetRecord, extra_obs_table, obs_table, schema_key
from hiceller.errors import HicellerError, InputError

__all__ = [
    "IngestOptions",
    "IngestResult",
    "SourceCheck",
    "check_h5ad",
    "ingest_files",
    "ingest_sources",
    "iter_csr_chunks",
    "validate_dataset_id",
]

DEFAULT_CHUNK_NNZ = 8_000_000  # ~100 MB of (row, col, value) per chunk while writing
MAX_BATCH_FILES = 64
"""Files per batch at most: bounds the open files, and makes progress (and the registry's
``finished`` times) advance every few dozen files."""
AUTO_OPTIMIZE_FRAGMENTS = 32
"""An ingest that wrote at least this many fragments into one array optimizes what it wrote."""
OBS_CACHE_CELLS = 1_000_000
"""Cells whose obs validation keeps for writing (~150 MB); decoding obs again costs ~5 ms per file."""
PARALLEL_VALIDATION_FILES = 32
"""From this many files on, validation runs in worker processes (one per core, at most 8)."""
MAX_VALIDATION_WORKERS = 8
VALIDATION_PART_FILES = 16
OBS_CACHE_FILE_CELLS = 20_000
"""Files larger than this are decoded again when written (their obs is a small part of their cost)."""
"""An ingest that wrote at least this many fragments into one array optimizes what it wrote."""

Progress = Callable[[int], None]
ProgressFactory = Callable[[str, int], Progress]


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
    gene_list: str | None = None
    """Name of a gene list this file declares it shares with others (same var names, same order;
    manifest column ``gene_list``): the first file of a list is read and checked in full, later
    ones by their gene count and GENE_LIST_SAMPLE names (_gene_names). Not with gene_column."""
    require_overlap: bool = False
    skip_existing: bool = False
    chunk_nnz: int = DEFAULT_CHUNK_NNZ
    optimize: bool = True
    """Optimize what this ingest wrote when it wrote many fragments."""


@dataclass
class SourceCheck:
    """What validation learned about one file. Deliberately small (no genes, obs or X): an ingest of
    thousands of files keeps one per file until they are written, and re-reads the file to write it."""

    path: Path
    dataset_id: str
    n_cells: int
    n_genes: int
    nnz: int
    kind: str
    fingerprint: str
    opts: IngestOptions
    extra_schema: str = ""
    """Arrow schema of the other obs columns ("" when none): datasets that share it share a DataFrame."""
    notes: list[str] = field(default_factory=list)
    genes_key: str = ""
    """Key of the file's gene list in the validated lists (the write pass reuses it without reading)."""
    obs_tables: tuple[dict[str, np.ndarray], pd.DataFrame] | None = field(default=None, repr=False)
    """(OBS_COLUMNS, other columns) of a small file, kept so that writing need not decode obs again;
    dropped for large files and beyond OBS_CACHE_CELLS cells in all (memory)."""


@dataclass
class IngestResult:
    done: list[DatasetRecord]
    skipped: list[str]
    """Datasets already complete in the store (from the same file, or any with ``skip_existing``)."""
    optimized: dict | None = None
    """What the automatic optimize did (data_store.optimize.OptimizeReport as a dict), if it ran."""


def _fail(path: Path, msg: str) -> InputError:
    return InputError(f"{path}: {msg}")


def _fingerprint(path: Path, n_cells: int, n_genes: int) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{n_cells}|{n_genes}".encode()).hexdigest()[:16]


def validate_dataset_id(dataset_id: str) -> str | None:
    """Why ``dataset_id`` cannot name a dataset (it becomes a SOMA member name), or None."""
    if not dataset_id or not dataset_id.strip():
        return "empty dataset id"
    if any(c in dataset_id for c in "/\\") or dataset_id in (".", "..") or dataset_id != dataset_id.strip():
        return f"dataset id {dataset_id!r} may not contain '/' or '\\', be '.' or '..', or start or end with spaces"
    return None


def iter_csr_chunks(adata, chunk_nnz: int) -> Iterator[tuple[int, sp.csr_matrix]]:
    """(first row, CSR chunk) over an AnnData's X (backed or not), chunks of about ``chunk_nnz``
    non-zeros. Ingest itself reads files with :class:`H5adFile`; this serves in-memory callers."""
    n = adata.n_obs
    X = adata.X
    indptr = X.group["indptr"][...] if hasattr(X, "group") and "indptr" in X.group else None
    if indptr is None and sp.issparse(X):
        indptr = sp.csr_matrix(X).indptr
    a = 0
    while a < n:
        if indptr is not None:
            b = min(max(int(np.searchsorted(indptr, indptr[a] + chunk_nnz, side="right")) - 1, a + 1), n)
        else:
            b = min(n, a + max(1, chunk_nnz // max(adata.n_vars, 1)))
        m = X[a:b]
        yield a, sp.csr_matrix(m) if sp.issparse(m) else sp.csr_matrix(np.asarray(m))
        a = b


# ----------------------------------------------------------------------------- validation
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


class _GeneLists:
    """Gene lists already validated, by a hash of the names as stored. Files of one study or
    pipeline share their gene list; validating and upper-casing 20k names costs ~15 ms, reading
    them as bytes and hashing ~4 ms. A few lists are kept, not all (memory)."""

    def __init__(self, size: int = 16):
        self.size = size
        self._lists: dict[str, tuple[list[str], list[str]]] = {}

    def get(self, key: str) -> tuple[list[str], list[str]] | None:
        hit = self._lists.pop(key, None)
        if hit is not None:
            self._lists[key] = hit  # most recently used last
        return hit

    def put(self, key: str, value: tuple[list[str], list[str]]) -> None:
        self._lists[key] = value
        while len(self._lists) > self.size:
            self._lists.pop(next(iter(self._lists)))


_GENE_LISTS = _GeneLists()

GENE_LIST_SAMPLE = 64
"""Names compared per file of a declared gene list (the first, the last, and the rest at positions
drawn from the dataset id, so that the files of one list check different names)."""

_DECLARED: dict[str, tuple[str, np.ndarray]] = {}
"""Declared gene list name -> (key in _GENE_LISTS, the names as stored in its first file); as many
lists as _GENE_LISTS keeps (a list it dropped is read in full again)."""


def _sample_positions(n: int, dataset_id: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha1(dataset_id.encode()).digest()[:8], "little")
    k = min(n, GENE_LIST_SAMPLE)
    drawn = np.random.default_rng(seed).choice(n, size=max(k - 2, 0), replace=False) if n > 2 else np.arange(0)
    return np.unique(np.concatenate([[0, n - 1], drawn]).astype(np.int64))


def _declared_genes(path: Path, f: H5adFile, name: str, dataset_id: str) -> str | None:
    """The _GENE_LISTS key of a file that declares gene list ``name``, after checking its gene count
    and a sample of its names against the list's first file; None when this process has not read
    the list yet (or the file's names are not a plain string dataset: then it is read in full)."""
    known = _DECLARED.get(name)
    if known is None or _GENE_LISTS.get(known[0]) is None:
        return None
    key, names = known
    n = f.shape[1]
    if n != len(names):
        raise _fail(path, f"declares gene list {name!r} of {len(names)} genes but has {n}")
    pos = _sample_positions(n, dataset_id)
    got = f.var_names_at(pos)
    if got is None:
        return None
    diff = np.flatnonzero(got != names[pos])
    if len(diff):
        i = int(pos[diff[0]])
        raise _fail(path, f"declares gene list {name!r} but gene {i} is {_shown(got[diff[0]])}, not {_shown(names[i])} "
                          "as in the list's first file (give this file another gene_list, or none)")
    return key


def _shown(v) -> str:
    return repr(v.decode(errors="replace") if isinstance(v, bytes) else str(v))


def _gene_key(raw: np.ndarray, gene_column: str | None) -> str:
    h = hashlib.sha1(f"{gene_column or ''}|{len(raw)}|{raw.dtype.str}|".encode())
    if raw.dtype.kind == "S":  # fixed-width names (H5adFile.var_names_raw): hashed as one buffer
        h.update(raw.tobytes())
        return h.hexdigest()
    values = raw.tolist()
    if not all(isinstance(v, bytes) for v in values[:1]) or not values:
        values = [str(v).encode() for v in values]
    try:
        h.update(b"\0".join(values))  # one C call: ~0.4 ms for 20k names
    except TypeError:  # bytes mixed with other values
        h.update(b"\0".join(v if isinstance(v, bytes) else str(v).encode() for v in values))
    return h.hexdigest()


def _gene_names(path: Path, f: H5adFile, gene_column: str | None, gene_list: str | None = None,
                dataset_id: str = "") -> tuple[list[str], list[str], str]:
    """Store gene names for the file's columns, notes, and the key of the list (_GENE_LISTS).

    A file that declares ``gene_list`` is checked against the list's first file by its gene count
    and a sample of names (_declared_genes): reading 20k variable-length names costs ~6-9 ms a file,
    the largest fixed cost of a small file.

    Exact duplicates are an error (which of the two is meant?). Symbols that differ only in case
    (``C2orf15`` and ``C2ORF15`` in one real PBMC file) name one gene once upper-cased: their
    columns are summed into it, and the note says so.
    """
    if gene_list and not gene_column:
        key = _declared_genes(path, f, gene_list, dataset_id)
        if key is not None:
            hit = _GENE_LISTS.get(key)
            return hit[0], list(hit[1]), key
    raw_bytes = None if gene_column else f.var_names_raw()
    if raw_bytes is not None:
        key = _gene_key(raw_bytes, None)
        if gene_list:
            _DECLARED.pop(gene_list, None)
            _DECLARED[gene_list] = (key, raw_bytes)  # used once the list is validated (_GENE_LISTS has it)
            while len(_DECLARED) > _GENE_LISTS.size:
                _DECLARED.pop(next(iter(_DECLARED)))
        hit = _GENE_LISTS.get(key)
        if hit is not None:
            return hit[0], list(hit[1]), key
    if gene_column:
        raw = f.var_column(gene_column)
        if raw is None:
            raise _fail(path, f"var has no column {gene_column!r} (columns: {', '.join(f.var_columns()) or 'none'})")
    else:
        raw = f.var_names()
    genes, notes = _checked_genes(path, raw, upper=not gene_column)
    key = _gene_key(raw_bytes if raw_bytes is not None else raw.to_numpy(dtype=object), gene_column)
    _GENE_LISTS.put(key, (genes, notes))
    return genes, list(notes), key


def _checked_genes(path: Path, raw: pd.Index, upper: bool) -> tuple[list[str], list[str]]:
    if (raw == "").any() or raw.isna().any() or (raw == "nan").any():
        raise _fail(path, "empty gene name in var")
    dup = raw[raw.duplicated()].unique()
    if len(dup):
        shown = ", ".join(map(str, dup[:5]))
        raise _fail(path, f"duplicate gene names ({len(dup)}, e.g. {shown})")
    genes = pd.Index(raw.str.upper()) if upper else raw
    notes = []
    merged = genes[genes.duplicated()].unique()
    if len(merged):
        notes.append(f"{len(merged)} gene symbols differ only in case (e.g. {merged[0]}): their columns were summed")
    return list(genes), notes


def _read_obs(path: Path, f: H5adFile, opts: IngestOptions) -> ObsColumns:
    obs = f.obs_columns()
    lengths = {len(obs.index), *(len(v) for v in obs.columns.values())}
    if lengths != {f.n_obs}:
        raise _fail(path, f"obs has {max(lengths - {f.n_obs})} rows but X has {f.n_obs}")
    if opts.label_column and opts.label_column not in obs.columns:
        raise _fail(
            path,
            f"obs has no label column {opts.label_column!r} (columns: {', '.join(map(str, obs.columns)) or 'none'}; "
            "use --label-column none for unlabeled data)",
        )
    index = pd.Index(obs.index)
    if index.has_duplicates:
        dup = index[index.duplicated()].unique()
        raise _fail(path, f"duplicate cell ids in obs ({len(dup)}, e.g. {dup[0]!r})")
    return obs


def _check_x(path: Path, f: H5adFile, chunk_nnz: int, names: np.ndarray, progress: Progress | None) -> tuple[bool, bool]:
    """One pass over X: (all values integer, some rows needed sorting or de-duplicating)."""
    integer, fixed = True, False
    for row0, m in f.iter_csr_chunks(chunk_nnz):
        i, fx = _check_chunk(path, m, row0, names)
        integer &= i
        fixed |= fx
        if progress:
            progress(m.shape[0])
    return integer, fixed


def check_h5ad(path: Path, opts: IngestOptions, progress: Progress | None = None) -> SourceCheck:
    """Validate a file fully (one pass over X in chunks). Raises InputError naming the problem."""
    with open_h5ad(path) as f:
        n, g = f.shape
        if n == 0:
            raise _fail(path, "has zero cells")
        if g == 0:
            raise _fail(path, "has zero genes")
        obs = _read_obs(path, f, opts)
        _genes, notes, genes_key = _gene_names(path, f, opts.gene_column, opts.gene_list, opts.dataset_id or path.stem)
        integer, fixed = _check_x(path, f, opts.chunk_nnz, obs.index, progress)
        nnz = f.nnz
    if fixed:
        notes.append("X had unsorted or duplicate column indices in CSR rows: duplicates summed and rows sorted")
    dataset_id = opts.dataset_id or path.stem
    meta = _obs_table(path, obs, opts, dataset_id)  # refuses missing labels now, not half way through writing
    extra = _extra_columns(obs, opts)
    try:
        schema = extra_obs_table(extra, 0).schema if extra.shape[1] else None
    except (pa.ArrowException, ValueError, TypeError) as e:
        raise _fail(path, f"obs columns cannot be stored ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return SourceCheck(
        path=path,
        dataset_id=dataset_id,
        n_cells=n,
        n_genes=g,
        nnz=nnz,
        kind="counts" if integer else "logexpr",
        fingerprint=_fingerprint(path, n, g),
        opts=opts,
        extra_schema="" if schema is None else schema_key(schema),
        notes=notes,
        genes_key=genes_key,
        obs_tables=(meta, extra),
    )


def _extra_columns(obs: ObsColumns, opts: IngestOptions) -> pd.DataFrame:
    """The other obs columns, as the store keeps them: categoricals of strings become strings here
    (extra_obs_table would make them strings anyway, at 10x the cost for a small file)."""
    known = set(OBS_COLUMNS) | {c for c in (opts.label_column, opts.batch_column) if c}
    cols = {str(c): _storable(v) for c, v in obs.columns.items() if c not in known}
    return pd.DataFrame(cols, index=pd.RangeIndex(len(obs.index)), copy=False)


def _storable(col):
    if isinstance(col, pd.Categorical) and col.categories.dtype == object:
        values = np.asarray(col.categories, dtype=object)
        if all(isinstance(v, str) for v in values):
            out = values[col.codes]
            out[col.codes < 0] = None
            return out
    return col


ObsMeta = dict[str, np.ndarray]
"""The OBS_COLUMNS of a file's cells, each an object array of strings."""


def _as_str(col) -> np.ndarray:
    """An obs column as an object array of str (categoricals by their codes: no per-cell Python)."""
    if isinstance(col, pd.Series):
        col = col.array
    if isinstance(col, pd.Categorical):
        # code -1 (missing) picks the appended "nan", as astype(str) writes a missing value below
        return np.append(np.asarray(col.categories.astype(str), dtype=object), "nan")[col.codes]
    return pd.Series(col).astype(str).to_numpy(dtype=object)


def _obs_table(path: Path, obs: ObsColumns, opts: IngestOptions, dataset_id: str) -> ObsMeta:
    """The CELLxGENE-style columns: labels, donor from the batch column, tissue/disease from flags or obs."""
    n = len(obs.index)
    columns = obs.columns

    def const(v: str) -> np.ndarray:
        return np.full(n, v, dtype=object)

    out: ObsMeta = {"obs_id": obs.index}
    if opts.label_column:
        labels = columns[opts.label_column]
        missing = int(pd.isna(labels).sum())
        if missing:
            raise _fail(path, f"label column {opts.label_column!r} has {missing} missing values")
        out["cell_type"] = _as_str(labels)
    else:
        out["cell_type"] = const(UNKNOWN)
    for col, flag in (("tissue", opts.tissue), ("disease", opts.disease)):
        out[col] = const(flag) if flag else _as_str(columns[col]) if col in columns else const(UNKNOWN)
    batch = opts.batch_column
    out["donor_id"] = _as_str(columns[batch]) if batch and batch in columns else const(UNKNOWN)
    out["dataset_id"] = const(dataset_id)
    return {c: out[c] for c in OBS_COLUMNS}


def _value_counts(meta: ObsMeta) -> dict[str, dict[str, int]]:
    return {c: dict(Counter(meta[c].tolist())) for c in ("cell_type", "tissue", "disease", "donor_id")}


def _slice_meta(meta: ObsMeta, rows: slice) -> ObsMeta:
    return {c: v[rows] for c, v in meta.items()}


# ----------------------------------------------------------------------------- writing
@dataclass
class _Source:
    """A validated file opened for writing, with what its records need."""

    check: SourceCheck
    file: H5adFile
    genes: list[str]
    obs: ObsMeta
    """The OBS_COLUMNS of every cell."""
    extra: pd.DataFrame


def _open_source(check: SourceCheck) -> _Source:
    """Open a validated file; its gene list and obs come from validation when it kept them."""
    f = open_h5ad(check.path)
    try:
        hit = _GENE_LISTS.get(check.genes_key)
        genes = hit[0] if hit is not None else _gene_names(check.path, f, check.opts.gene_column)[0]  # in full
        if check.obs_tables is not None:
            meta, extra = check.obs_tables
        else:
            obs = _read_obs(check.path, f, check.opts)
            meta, extra = _obs_table(check.path, obs, check.opts, check.dataset_id), _extra_columns(obs, check.opts)
        return _Source(check, f, genes, meta, extra)
    except Exception:
        f.close()
        raise


class _CellWriter:
    """Buffers consecutive cells of reserved datasets; writes them as one X and one obs fragment
    (and one fragment per extra_obs DataFrame) once ``chunk_nnz`` non-zeros are pending."""

    def __init__(self, store: CorpusStore, chunk_nnz: int):
        self.store = store
        self.chunk_nnz = chunk_nnz
        self.fragments = 0
        self._parts: list[tuple[sp.csr_matrix, ObsMeta]] = []
        self._extra: dict[str, list[tuple[np.ndarray, pd.DataFrame]]] = {}
        self._first = self._next = -1
        self._nnz = 0

    def add(self, first: int, m: sp.csr_matrix, obs: ObsMeta, extra: tuple[str, pd.DataFrame] | None) -> None:
        if self._parts and first != self._next:
            self.flush()  # a resumed dataset elsewhere in joinid space: X writes need consecutive rows
        if not self._parts:
            self._first = first
        self._parts.append((m, obs))
        self._next = first + m.shape[0]
        self._nnz += m.nnz
        if extra is not None:
            name, frame = extra
            self._extra.setdefault(name, []).append((np.arange(first, first + len(frame), dtype=np.int64), frame))
        if self._nnz >= self.chunk_nnz:
            self.flush()

    def flush(self) -> None:
        if not self._parts:
            return
        mats = [m for m, _ in self._parts]
        indptr = np.concatenate([[0], np.cumsum(np.concatenate([np.diff(m.indptr) for m in mats]))])
        indices = np.concatenate([m.indices for m in mats])
        data = np.concatenate([m.data for m in mats])
        obs = {c: np.concatenate([o[c] for _, o in self._parts]) for c in OBS_COLUMNS}
        self.store.write_cells(self._first, indptr, indices, data, obs_table(obs, self._first))
        for name, parts in self._extra.items():  # one Arrow conversion per flush, not per file
            frame = pd.concat([f for _, f in parts], ignore_index=True) if len(parts) > 1 else parts[0][1]
            self.store.write_extra_obs(name, extra_obs_table(frame, np.concatenate([j for j, _ in parts])))
        self.fragments += 1
        self._parts, self._extra, self._nnz = [], {}, 0


def _to_vocab(m: sp.csr_matrix, col_ids: np.ndarray) -> sp.csr_matrix:
    """Map file columns to vocabulary ids, then sort each row (TileDB's global order), summing
    duplicates: those of a non-canonical CSR and genes merged by upper-casing."""
    m.indices = col_ids[m.indices].astype(np.int32 if col_ids.max() < 2**31 else np.int64)
    m.has_canonical_format = False
    m.sum_duplicates()
    m.eliminate_zeros()
    return m


def _new_records(sources: list[_Source], vocab_ids: list[np.ndarray], n_before: int, shared: dict[str, str]) -> list[DatasetRecord]:
    """Records to reserve for ``sources`` (new_genes counted in batch order), extra_obs named: the
    datasets that share their other obs columns share one DataFrame (``shared``: those of the store),
    a new one named after the first of them."""
    seen = np.zeros(0, dtype=np.int64)
    lists_seen: set[str] = set()
    groups: dict[str, str] = {}
    records = []
    for s, ids in zip(sources, vocab_ids):
        c = s.check
        fresh = ids[ids >= n_before] if c.genes_key not in lists_seen else ids[:0]  # a list seen adds nothing
        new = np.setdiff1d(fresh, seen) if len(fresh) else fresh  # set operations cost ~10 ms on 20k genes
        if len(new):
            seen = np.union1d(seen, new)
        lists_seen.add(c.genes_key)
        extra_name = (shared.get(c.extra_schema) or groups.setdefault(c.extra_schema, c.dataset_id)) if c.extra_schema else ""
        records.append(
            DatasetRecord(
                dataset_id=c.dataset_id,
                start=0,
                stop=c.n_cells,
                status="writing",
                kind=c.kind,
                source=str(c.path),
                labeled=c.opts.label_column is not None,
                tissue=c.opts.tissue or UNKNOWN,
                disease=c.opts.disease or UNKNOWN,
                n_genes=c.n_genes,
                new_genes=int(len(new)),
                fingerprint=c.fingerprint,
                counts=_value_counts(s.obs),
                notes=c.notes,
                extra_obs=extra_name,
            )
        )
    return records


def _vocab_ids(vocab: pd.Index, sources: list[_Source]) -> list[np.ndarray]:
    """Vocabulary id of every file column, looked up once per distinct gene list."""
    by_list: dict[str, np.ndarray] = {}
    out = []
    for s in sources:
        key = s.check.genes_key or str(id(s))
        if key not in by_list:
            by_list[key] = vocab.get_indexer(s.genes).astype(np.int64)
        out.append(by_list[key])
    return out


def _write_batch(store: CorpusStore, writer: _CellWriter, checks: list[SourceCheck], progress: Progress | None) -> list[DatasetRecord]:
    """Write one batch of validated files: reserve, write, mark complete."""
    sources: list[_Source] = []
    try:
        for c in checks:
            sources.append(_open_source(c))
        n_before = len(store.vocabulary())
        lists = {s.check.genes_key or str(id(s)): s.genes for s in sources}
        union = pd.unique(np.concatenate([np.asarray(g, dtype=object) for g in lists.values()]))
        store.extend_vocabulary(union)
        vocab_ids = _vocab_ids(store.vocabulary(), sources)
        reserved = store.reserve_datasets(_new_records(sources, vocab_ids, n_before, store.shared_extra_obs()))
        # A resumed dataset of a format-1 store kept its other obs columns under its own name.
        reserved = [replace(r, extra_obs=r.extra_obs or (r.dataset_id if s.extra.shape[1] else "")) for r, s in zip(reserved, sources)]
        for s, rec, ids in zip(sources, reserved, vocab_ids):
            _write_source(writer, s, rec, ids, progress)
        writer.flush()
    finally:
        for s in sources:
            s.file.close()
    store.finish_datasets(reserved)
    return reserved


def _write_source(writer: _CellWriter, s: _Source, rec: DatasetRecord, ids: np.ndarray, progress: Progress | None) -> None:
    for row0, m in s.file.iter_csr_chunks(s.check.opts.chunk_nnz):
        rows = slice(row0, row0 + m.shape[0])
        extra = (rec.extra_obs, s.extra.iloc[rows]) if s.extra.shape[1] else None
        writer.add(rec.start + row0, _to_vocab(m, ids), _slice_meta(s.obs, rows), extra)
        if progress:
            progress(m.shape[0])


def _batches(checks: list[SourceCheck], chunk_nnz: int) -> Iterator[list[SourceCheck]]:
    batch: list[SourceCheck] = []
    nnz = 0
    for c in checks:
        if batch and (nnz + c.nnz > chunk_nnz or len(batch) >= MAX_BATCH_FILES):
            yield batch
            batch, nnz = [], 0
        batch.append(c)
        nnz += c.nnz
    if batch:
        yield batch


# ----------------------------------------------------------------------------- the whole ingest
def _check_one(path: Path, opts: IngestOptions, progress: Progress | None = None) -> SourceCheck | str:
    """check_h5ad, with a refusal returned as its message (what a worker process hands back)."""
    try:
        why = validate_dataset_id(opts.dataset_id or path.stem)
        if why:
            raise _fail(path, why)
        c = check_h5ad(path, opts, progress)
        if c.n_cells > OBS_CACHE_FILE_CELLS:
            c.obs_tables = None
        return c
    except HicellerError as e:
        return str(e)


_SENT_LISTS: set[str] = set()
"""Gene lists a validation worker already handed back (each list crosses the pipe once)."""


def _check_part(part: list[tuple[int, Path, IngestOptions]]) -> list[tuple[int, SourceCheck | str, dict[str, tuple[list[str], list[str]]]]]:
    """Validate a part of the sources in a worker process; new gene lists go back with them, so
    the write pass finds them without reading the files' var again."""
    out = []
    for i, path, opts in part:
        c = _check_one(path, opts)
        lists = {}
        if isinstance(c, SourceCheck) and c.genes_key not in _SENT_LISTS:
            hit = _GENE_LISTS.get(c.genes_key)
            if hit is not None:
                lists[c.genes_key] = hit
                _SENT_LISTS.add(c.genes_key)
        out.append((i, c, lists))
    return out


def _validation_workers(n_files: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cpus, MAX_VALIDATION_WORKERS) if n_files >= PARALLEL_VALIDATION_FILES else 1


def _check_in_parallel(sources: list[tuple[Path, IngestOptions]], workers: int, advance: Progress | None) -> list[SourceCheck | str]:
    """Validate many small files in worker processes: reading a file's obs and gene names costs
    ~10 ms of Python per file, the bulk of an ingest of thousands of small files."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    items = [(i, p, o) for i, (p, o) in enumerate(sources)]
    parts = [items[a : a + VALIDATION_PART_FILES] for a in range(0, len(items), VALIDATION_PART_FILES)]
    # fork: the workers start without importing anything again; they only read h5ad files (no TileDB).
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    results: list[SourceCheck | str] = [""] * len(sources)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for fut in as_completed([pool.submit(_check_part, part) for part in parts]):
            done = fut.result()
            for i, c, lists in done:
                results[i] = c
                for key, value in lists.items():
                    _GENE_LISTS.put(key, value)
            if advance:
                advance(len(done))
    return results


def _check_all(
    sources: list[tuple[Path, IngestOptions]], labels: list[str], progress_factory: ProgressFactory | None, manifest: Path | None
) -> list[tuple[SourceCheck, str]]:
    """Validate every source: (check, label) each, or every problem at once, each prefixed by its
    label (a manifest's ``"row 7: "``)."""
    _DECLARED.clear()  # a gene list name means one list within one ingest, not across calls
    many = len(sources) > 1
    bar = progress_factory(f"check {len(sources)} files", len(sources)) if progress_factory and many else None
    workers = _validation_workers(len(sources))
    if workers > 1:
        results = _check_in_parallel(sources, workers, bar)
    else:
        results = []
        for path, opts in sources:
            cell_bar = progress_factory(f"check {path.name}", _peek_cells(path)) if progress_factory and not many else None
            results.append(_check_one(path, opts, cell_bar))
            if bar:
                bar(1)
    checks, errors = [], []
    ids: set[str] = set()
    kept = 0
    for (path, _opts), label, c in zip(sources, labels, results):
        if isinstance(c, str):
            errors.append(f"{label}{c}")
            continue
        if c.dataset_id in ids:
            errors.append(f"{label}{_fail(path, f'dataset id {c.dataset_id!r} given twice; pass --dataset-id')}")
            continue
        ids.add(c.dataset_id)
        if c.obs_tables is not None and kept + c.n_cells > OBS_CACHE_CELLS:
            c.obs_tables = None
        elif c.obs_tables is not None:
            kept += c.n_cells
        checks.append((c, label))
    _raise_all(errors, manifest)
    return checks


def _peek_cells(path: Path) -> int:
    try:
        with open_h5ad(path) as f:
            return f.n_obs
    except HicellerError:
        return 0  # check_h5ad says what is wrong


def _raise_all(errors: list[str], manifest: Path | None = None) -> None:
    """One error line naming every bad input (each manifest row, each file)."""
    if not errors:
        return
    if manifest is not None:
        raise InputError(f"{manifest}: {len(errors)} bad row{'s' if len(errors) > 1 else ''}: " + "; ".join(errors))
    if len(errors) == 1:
        raise InputError(errors[0])
    raise InputError(f"{len(errors)} files cannot be ingested: " + "; ".join(errors))


def _plan(
    store: CorpusStore | None, store_uri: str, checks: list[tuple[SourceCheck, str]], manifest: Path | None
) -> tuple[list[SourceCheck], list[str]]:
    """(checks to write, dataset ids skipped). A dataset already complete from the same file is
    skipped (re-running a killed bulk ingest finishes it); from another file it is refused."""
    if store is None:
        return [c for c, _ in checks], []
    todo, skipped, errors = [], [], []
    vocab = store.vocabulary() if any(c.opts.require_overlap for c, _ in checks) and store.n_cells > 0 else None
    for c, label in checks:
        rec = store.record(c.dataset_id)
        if rec is not None and rec.status == "complete":
            if c.opts.skip_existing or rec.fingerprint == c.fingerprint:
                skipped.append(c.dataset_id)
            else:
                errors.append(f"{label}{c.path}: dataset {c.dataset_id!r} is already in store {store_uri} (use --skip-existing)")
            continue
        if rec is not None and (rec.fingerprint != c.fingerprint or rec.n_cells != c.n_cells):
            errors.append(f"{label}{c.path}: dataset {c.dataset_id!r} was being ingested from another source ({rec.source}); re-run that ingest to finish it, or use another --dataset-id")
            continue
        if vocab is not None and c.opts.require_overlap and not _overlaps(c, vocab):
            errors.append(f"{label}{c.path}: shares no gene with store {store_uri} (--require-overlap)")
            continue
        todo.append(c)
    _raise_all(errors, manifest)
    return todo, skipped


def _overlaps(check: SourceCheck, vocab: pd.Index) -> bool:
    with open_h5ad(check.path) as f:
        genes = _gene_names(check.path, f, check.opts.gene_column)[0]
    return bool(pd.Index(genes).isin(vocab).any())


def ingest_sources(
    store_uri: str,
    sources: list[tuple[Path, IngestOptions]],
    progress_factory: ProgressFactory | None = None,
    labels: list[str] | None = None,
    manifest: Path | None = None,
) -> IngestResult:
    """Validate every (file, options), then write them in batches. Nothing is written if any is bad.

    ``labels`` prefix each source's errors (a manifest gives ``"row 7: "``), ``manifest`` the line
    that names them all."""
    labels = labels or [""] * len(sources)
    checks = _check_all(sources, labels, progress_factory, manifest)
    store = CorpusStore.open(store_uri) if _store_present(store_uri) else None
    todo, skipped = _plan(store, store_uri, checks, manifest)
    if store is None and todo:
        store = CorpusStore.create(store_uri)
    if not todo:
        return IngestResult([], skipped)
    t0_ms = int(time.time() * 1000) - 1
    name = todo[0].path.name if len(todo) == 1 else f"{len(todo)} files"
    bar = progress_factory(f"ingest {name}", sum(c.n_cells for c in todo)) if progress_factory else None
    writer = _CellWriter(store, min(c.opts.chunk_nnz for c in todo))
    done: list[DatasetRecord] = []
    for batch in _batches(todo, writer.chunk_nnz):
        done += _write_batch(store, writer, batch, bar)
    optimized = None
    if todo[0].opts.optimize and writer.fragments >= AUTO_OPTIMIZE_FRAGMENTS:
        from data_store.optimize import optimize_store

        optimized = optimize_store(store_uri, since_ms=t0_ms).as_dict()
    return IngestResult(done, skipped, optimized)


def ingest_files(
    store_uri: str,
    files: list[Path],
    opts: IngestOptions,
    progress_factory: ProgressFactory | None = None,
) -> list[DatasetRecord]:
    """Validate every file, then write them. Nothing is written if any file is bad."""
    if opts.dataset_id and len(files) > 1:
        raise InputError("--dataset-id names one dataset; give one file with it")
    return ingest_sources(store_uri, [(Path(f), opts) for f in files], progress_factory).done


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
