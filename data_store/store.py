"""The corpus store: one TileDB-SOMA Experiment holding every cell HiCeller trains on.

Layout (all SOMA objects, readable by any TileDB-SOMA client)::

    STORE/                      SOMAExperiment, metadata["hiceller"] = {"format": 2, "registry": "datasets"}
      datasets                  SOMADataFrame, one row per dataset: the registry (data_store/registry.py)
      obs                       soma_joinid, obs_id, cell_type, tissue, disease, donor_id, dataset_id
      extra_obs/<name>          SOMADataFrame: soma_joinid + every other obs column, shared by every
                                dataset with the same other columns (the registry row's ``extra_obs``
                                names it; named after the first such dataset)
      ms/RNA/var                soma_joinid = vocabulary id, gene (the store-wide gene vocabulary)
      ms/RNA/X/data             SparseNDArray float32 [cells x vocabulary], values as ingested

The gene vocabulary is append-only: a new dataset's genes that are not yet known get the next ids,
so every X row of every dataset uses the same column space.

Crash safety. Datasets are first *reserved* in the registry (status ``writing``, joinid ranges
fixed), then their X and obs chunks are written, then they are marked ``complete``. Readers only
ever look at complete datasets' joinid ranges, so a killed ingest leaves a readable store; re-running
the same ingest rewrites the reserved ranges. TileDB sparse arrays keep the newest value for a
coordinate, so the rewrite replaces, never duplicates, a cell.

Costs that stay flat as the store grows. A registry write holds the rows it changes, never the
whole registry. obs, var and X grow their domains by at least 2x at a time: TileDB writes a
schema version per domain change and loads every version at each open (measured: 0.06 ms more per
open and 0.09 ms more per change, per version), so growing per dataset would be quadratic.
``hiceller store optimize`` (data_store/optimize.py) merges the fragments that many writes leave.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import tiledbsoma as soma

from data_store.registry import (
    FORMAT_VERSION,
    LEGACY_FORMAT,
    META_KEY,
    REGISTRY_KEY,
    UNKNOWN,
    DatasetRecord,
    create_registry,
    parse_store_meta,
    SPAN_COLUMNS,
    records_from_legacy,
    records_from_table,
    records_to_table,
    store_meta,
    write_records,
)
from hiceller.errors import StoreError

__all__ = [
    "OBS_COLUMNS",
    "LAYER",
    "DatasetRecord",
    "CorpusStore",
    "is_store",
    "read_x_cells",
    "retry_if_vacuumed",
    "schema_key",
    "soma_context",
]

LAYER = "data"
OBS_COLUMNS = ("obs_id", "cell_type", "tissue", "disease", "donor_id", "dataset_id")
_GROWTH = 2.0
"""Domains grow to at least this factor of their size (O(log n) schema versions, see above)."""
_MIN_CELLS_STEP = 1 << 16
_MIN_GENES_STEP = 1 << 12
"""...and by at least this much: a domain change cost ~0.5 s on a loaded machine, and headroom costs
nothing (a SOMA domain is a bound on joinids, not storage)."""
EXTRA_OBS_DOMAIN = (0, (1 << 40) - 1)
"""Joinids an extra_obs DataFrame accepts: every dataset with the same other obs columns shares one
(a DataFrame per dataset would make the extra_obs group, read at each addition, grow per dataset)."""

# Row tiles of 2048 cells, one column tile spanning every gene: TileDB's global order is then plain
# (cell, gene) order, so a CSR chunk with sorted columns is written without TileDB re-sorting it
# (measured 1.3k cells/s with sort_coords=True vs 8.4k in global order). zstd level 1 after delta
# filters wrote faster and smaller than the default (44 vs 56 MB, 8.4k vs 5.3k cells/s, 8k cells x
# 1000 non-zeros), and reads contiguous row blocks faster.
_ZSTD1 = [{"_type": "ZstdFilter", "level": 1}]
_X_PLATFORM = {
    "tiledb": {
        "create": {
            "capacity": 100_000,
            "dims": {
                "soma_dim_0": {"tile": 2048, "filters": [{"_type": "DoubleDeltaFilter"}] + _ZSTD1},
                "soma_dim_1": {"tile": 1 << 24, "filters": [{"_type": "DeltaFilter"}] + _ZSTD1},
            },
            "attrs": {"soma_data": {"filters": _ZSTD1}},
        }
    }
}
_GLOBAL_ORDER_WRITE = {"tiledb": {"write": {"sort_coords": False}}}

T = TypeVar("T")


def soma_context(uri: str) -> soma.SOMATileDBContext | None:
    """A SOMA context carrying S3 settings from the environment for ``s3://`` URIs.

    TileDB reads AWS_* variables itself; an S3-compatible server that is not AWS (MinIO, moto) also
    needs its endpoint and path-style addressing, taken from HICELLER_S3_ENDPOINT.
    """
    if not uri.startswith("s3://"):
        return None
    cfg: dict[str, str] = {}
    endpoint = os.environ.get("HICELLER_S3_ENDPOINT")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        cfg.update(
            {
                "vfs.s3.endpoint_override": host or scheme,
                "vfs.s3.scheme": scheme if host else "https",
                "vfs.s3.use_virtual_addressing": "false",
            }
        )
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        cfg["vfs.s3.region"] = region
    return soma.SOMATileDBContext(tiledb_config=cfg)


def member_uri(uri: str, *parts: str) -> str:
    """URI of a member of the store (every member lives under the experiment, named by its key)."""
    return "/".join([uri.rstrip("/"), *parts])


def _is_vacuumed(e: Exception) -> bool:
    msg = str(e)
    return "No such file or directory" in msg or "Cannot get file size" in msg or "does not exist" in msg


def retry_if_vacuumed(read: Callable[[], T], attempts: int = 3) -> T:
    """Run ``read`` again when it failed because `hiceller store optimize` vacuumed the fragments
    the array was opened with. Consolidation keeps every cell, so a read from a fresh open returns
    the same data; ``read`` must open the array itself."""
    for i in range(attempts):
        try:
            return read()
        except soma.SOMAError as e:
            if i == attempts - 1 or not _is_vacuumed(e):
                raise
            time.sleep(0.05 * (i + 1))
    raise AssertionError("unreachable")


def is_store(uri: str) -> bool:
    try:
        with soma.Experiment.open(uri, context=soma_context(uri)) as exp:
            return META_KEY in exp.metadata
    except Exception:
        return False


def _grown(current: int, need: int, step: int) -> int:
    """A size >= need for a domain of size ``current``: unchanged when it fits, else at least
    ``_GROWTH`` times larger and ``step`` more."""
    if need <= current:
        return current
    return max(need, int(current * _GROWTH), current + step)


@dataclass(frozen=True)
class Spans:
    """Joinid ranges and status of every dataset, as arrays (in registry order)."""

    dataset_id: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    complete: np.ndarray

    @classmethod
    def of(cls, records: list[DatasetRecord]) -> "Spans":
        return cls(
            np.array([r.dataset_id for r in records], dtype=object),
            np.array([r.start for r in records], dtype=np.int64),
            np.array([r.stop for r in records], dtype=np.int64),
            np.array([r.status == "complete" for r in records], dtype=bool),
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> "Spans":
        col = {c: table.column(c).to_numpy(zero_copy_only=False) for c in SPAN_COLUMNS}
        return cls(col["dataset_id"].astype(object), col["start"].astype(np.int64), col["stop"].astype(np.int64), col["status"] == "complete")


class CorpusStore:
    """Read access to a HiCeller store, and the few write steps ingest and synth are built from.

    The object is a snapshot of the registry taken at open (``reload()`` takes a new one); its own
    writes keep the snapshot current. One process writes a store at a time. Opening reads only the
    registry's ranges and status (what a reader of cells needs: constant per dataset, a few bytes);
    the full records (counts, notes) are read when first asked for.
    """

    def __init__(
        self, uri: str, records: dict[str, DatasetRecord] | None, store_format: int, legacy_n_genes: int = 0, spans: Spans | None = None
    ):
        self.uri = uri
        self._record_map = records
        self._spans_cache = spans
        self.format = store_format
        """1: registry as one JSON value (read, migrated on the first write); 2: registry DataFrame."""
        self._legacy_n_genes = legacy_n_genes
        self._vocab: pd.Index | None = None
        self._n_genes: int | None = None
        self._complete: list[DatasetRecord] | None = None
        self._ctx = soma_context(uri)

    @property
    def _records(self) -> dict[str, DatasetRecord]:
        if self._record_map is None:
            self._record_map = retry_if_vacuumed(self._read_records)
            self._spans_cache = None  # from the records from now on: one consistent snapshot
        return self._record_map

    def _read_records(self) -> dict[str, DatasetRecord]:
        with soma.DataFrame.open(member_uri(self.uri, REGISTRY_KEY), context=self._ctx) as reg:
            return records_from_table(reg.read().concat())

    def _spans(self) -> Spans:
        if self._spans_cache is None:
            self._spans_cache = Spans.of(list(self._records.values()))
        return self._spans_cache

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open(cls, uri: str | Path) -> "CorpusStore":
        uri = str(uri)
        if not uri.startswith("s3://") and not Path(uri).exists():
            raise StoreError(f"store {uri} does not exist (create it with `hiceller ingest` or `hiceller synth`)")
        return retry_if_vacuumed(lambda: cls._read(uri))

    @classmethod
    def _read(cls, uri: str) -> "CorpusStore":
        try:
            exp = soma.Experiment.open(uri, context=soma_context(uri))
        except Exception as e:  # tiledbsoma raises several types for "not a SOMA object"
            raise StoreError(f"store {uri} is not a TileDB-SOMA experiment ({type(e).__name__}: {e})") from None
        with exp:
            meta = parse_store_meta(uri, exp.metadata.get(META_KEY))
            if meta["format"] == LEGACY_FORMAT:
                records = records_from_legacy(meta)
                extra = set(exp["extra_obs"].keys())
                for rec in records.values():  # format 1 named a dataset's other obs columns after it
                    rec.extra_obs = rec.dataset_id if rec.dataset_id in extra else ""
                return cls(uri, records, LEGACY_FORMAT, int(meta.get("n_genes", 0)))
            spans = Spans.from_table(exp[REGISTRY_KEY].read(column_names=SPAN_COLUMNS).concat())
            return cls(uri, None, FORMAT_VERSION, spans=spans)

    @classmethod
    def open_or_create(cls, uri: str | Path) -> "CorpusStore":
        uri = str(uri)
        if uri.startswith("s3://"):
            return cls.open(uri) if is_store(uri) else cls.create(uri)
        p = Path(uri)
        if p.exists() and not (p.is_dir() and not any(p.iterdir())):
            return cls.open(uri)
        return cls.create(uri)

    @classmethod
    def create(cls, uri: str | Path) -> "CorpusStore":
        """Create an empty store. Locally it is built in a temporary sibling and renamed into place,
        so a killed create leaves either no store or a whole one."""
        uri = str(uri)
        if uri.startswith("s3://"):
            _create_experiment(uri, soma_context(uri))
            return cls.open(uri)
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.creating-", dir=target.parent))
        try:
            _create_experiment(str(tmp / "exp"), None)
            if target.exists():
                target.rmdir()  # only an empty directory gets here
            os.replace(tmp / "exp", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(uri)

    # ------------------------------------------------------------------ registry
    @property
    def datasets(self) -> dict[str, DatasetRecord]:
        """Every dataset (copies: changing them changes nothing in the store)."""
        return {k: replace(v) for k, v in self._records.items()}

    def record(self, dataset_id: str) -> DatasetRecord | None:
        """The registry record of one dataset (a copy), or None."""
        rec = self._records.get(dataset_id)
        return None if rec is None else replace(rec)

    def complete_datasets(self) -> list[DatasetRecord]:
        if self._complete is None:
            self._complete = sorted((d for d in self._records.values() if d.status == "complete"), key=lambda d: d.start)
        return [replace(d) for d in self._complete]

    @property
    def next_joinid(self) -> int:
        stop = self._spans().stop
        return int(stop.max()) if len(stop) else 0

    @property
    def n_cells(self) -> int:
        sp = self._spans()
        return int((sp.stop - sp.start)[sp.complete].sum())

    def complete_spans(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dataset ids, starts, stops) of complete datasets in joinid order, without reading the
        full records."""
        sp = self._spans()
        order = np.argsort(sp.start[sp.complete], kind="stable")
        return sp.dataset_id[sp.complete][order], sp.start[sp.complete][order], sp.stop[sp.complete][order]

    @property
    def n_genes(self) -> int:
        """Genes in the vocabulary (from var's non-empty domain: no read of the gene names)."""
        if self._n_genes is None:
            if self.format == LEGACY_FORMAT:
                self._n_genes = self._legacy_n_genes
            else:
                self._n_genes = retry_if_vacuumed(self._count_var)
        return self._n_genes

    def _count_var(self) -> int:
        with soma.DataFrame.open(member_uri(self.uri, "ms", "RNA", "var"), context=self._ctx) as var:
            return 0 if var.count == 0 else int(var.non_empty_domain()[0][1]) + 1

    def complete_ranges(self) -> list[tuple[int, int]]:
        """[start, stop) joinid ranges of complete datasets, merged where adjacent."""
        _ids, start, stop = self.complete_spans()
        if not len(start):
            return []
        cut = np.flatnonzero(start[1:] != stop[:-1]) + 1  # a gap (or an unfinished dataset) between
        firsts, lasts = np.concatenate([[0], cut]), np.concatenate([cut - 1, [len(start) - 1]])
        return [(int(a), int(b)) for a, b in zip(start[firsts], stop[lasts])]

    def reload(self) -> None:
        fresh = CorpusStore.open(self.uri)
        self.__dict__.update(fresh.__dict__)

    def _changed(self, records: list[DatasetRecord]) -> None:
        for r in records:
            self._records[r.dataset_id] = replace(r)
        self._complete = None
        self._spans_cache = None

    def ensure_current_format(self) -> None:
        """Migrate a format-1 store to the registry DataFrame (every write starts here).

        The rows are written before the metadata that points to them, so a migration killed half
        way leaves a format-1 store that the next write migrates again (same slots, rows replaced).
        """
        if self.format == FORMAT_VERSION:
            return
        records = sorted(self._records.values(), key=lambda r: r.slot)
        with soma.Experiment.open(self.uri, "w", context=self._ctx) as exp:
            create_registry(exp)
            write_records(exp, records)
            exp.metadata[META_KEY] = store_meta()
        self.format = FORMAT_VERSION
        from data_store.optimize import consolidate_group_metadata

        # The format-1 registry's copies (one metadata fragment per write) would still be read at
        # every open: merge them into one.
        consolidate_group_metadata(self.uri)

    # ------------------------------------------------------------------ vocabulary
    def vocabulary(self) -> pd.Index:
        """Gene names in vocabulary-id order (position = id)."""
        if self._vocab is None:
            self._vocab = retry_if_vacuumed(self._read_vocabulary)
        return self._vocab.copy()

    def _read_vocabulary(self) -> pd.Index:
        with soma.DataFrame.open(member_uri(self.uri, "ms", "RNA", "var"), context=self._ctx) as var_df:
            var = var_df.read(column_names=["soma_joinid", "gene"]).concat().to_pandas()
        var = var.sort_values("soma_joinid")
        if not np.array_equal(var["soma_joinid"].to_numpy(), np.arange(len(var))):
            raise StoreError(f"store {self.uri}: the gene vocabulary has gaps; the store is damaged")
        return pd.Index(var["gene"].to_numpy(dtype=object), name="gene")

    def extend_vocabulary(self, genes: list[str] | np.ndarray) -> tuple[np.ndarray, int]:
        """Vocabulary ids for ``genes``, appending the unknown ones. Returns (ids, n_new)."""
        self.ensure_current_format()
        vocab = self.vocabulary()
        genes = pd.Index(genes)
        new = genes[~genes.isin(vocab)].unique()
        if len(new):
            start = len(vocab)
            ids = np.arange(start, start + len(new), dtype=np.int64)
            with soma.DataFrame.open(member_uri(self.uri, "ms", "RNA", "var"), "w", context=self._ctx) as var:
                size = int(var.domain[0][1]) + 1
                if start + len(new) > size:
                    var.change_domain([(0, _grown(size, start + len(new), _MIN_GENES_STEP) - 1)])
            with soma.DataFrame.open(member_uri(self.uri, "ms", "RNA", "var"), "w", context=self._ctx) as var:
                var.write(pa.table({"soma_joinid": ids, "gene": pa.array(list(new), pa.large_string())}))
            vocab = vocab.append(pd.Index(new, name="gene"))
        self._vocab = vocab
        self._n_genes = len(vocab)
        # Also when nothing is new: a run killed after writing var but before growing X left genes
        # that X has no columns for; the next write would fail.
        self._grow_x(n_genes=len(vocab))
        lookup = pd.Series(np.arange(len(vocab), dtype=np.int64), index=vocab)
        return lookup.reindex(genes).to_numpy(dtype=np.int64), len(new)

    def _grow_x(self, n_cells: int | None = None, n_genes: int | None = None) -> None:
        with soma.SparseNDArray.open(self._x_uri, "w", context=self._ctx) as x:
            rows, cols = x.shape
            new = (_grown(rows, n_cells or 0, _MIN_CELLS_STEP), _grown(cols, n_genes or 0, _MIN_GENES_STEP))
            if new != (rows, cols):
                x.resize(new)

    def _grow_obs(self, n_cells: int) -> None:
        with soma.DataFrame.open(member_uri(self.uri, "obs"), "w", context=self._ctx) as obs:
            size = int(obs.domain[0][1]) + 1
            if n_cells > size:
                obs.change_domain([(0, _grown(size, n_cells, _MIN_CELLS_STEP) - 1)])

    @property
    def _x_uri(self) -> str:
        return member_uri(self.uri, "ms", "RNA", "X", LAYER)

    # ------------------------------------------------------------------ datasets
    def reserve_dataset(self, record: DatasetRecord) -> DatasetRecord:
        """Fix the joinid range of a new dataset, or return the range of the interrupted ingest of the
        same source. The registry is written before any cell, so a crash leaves a known range."""
        return self.reserve_datasets([record])[0]

    def reserve_datasets(self, records: list[DatasetRecord]) -> list[DatasetRecord]:
        """:meth:`reserve_dataset` for many datasets with one registry write (a bulk ingest)."""
        self.ensure_current_format()
        out, new = [], []
        next_joinid = self.next_joinid
        next_slot = max((r.slot for r in self._records.values()), default=-1) + 1
        seen: set[str] = set()
        for record in records:
            if record.dataset_id in seen:
                raise StoreError(f"dataset {record.dataset_id!r} reserved twice in one write")
            seen.add(record.dataset_id)
            old = self._resumable(record)
            if old is not None:
                out.append(old)
                continue
            n = record.n_cells
            rec = replace(record, start=next_joinid, stop=next_joinid + n, status="writing", created=time.time(), slot=next_slot)
            next_joinid, next_slot = rec.stop, next_slot + 1
            new.append(rec)
            out.append(rec)
        if new:
            self._grow_obs(next_joinid)
            self._grow_x(n_cells=next_joinid)
            with soma.DataFrame.open(member_uri(self.uri, REGISTRY_KEY), "w", context=self._ctx) as reg:
                reg.write(records_to_table(new))
            self._changed(new)
        return out

    def _resumable(self, record: DatasetRecord) -> DatasetRecord | None:
        """The reserved record of an interrupted ingest of the same source, None for a new dataset."""
        old = self._records.get(record.dataset_id)
        if old is None:
            return None
        if old.status == "complete":
            raise StoreError(f"dataset {record.dataset_id!r} is already in store {self.uri}")
        if old.fingerprint != record.fingerprint or old.n_cells != record.n_cells:
            raise StoreError(
                f"dataset {record.dataset_id!r} was being ingested from another source "
                f"({old.source}); re-run that ingest to finish it, or use another --dataset-id"
            )
        return replace(old)

    def finish_dataset(self, record: DatasetRecord) -> None:
        self.finish_datasets([record])

    def finish_datasets(self, records: list[DatasetRecord]) -> None:
        """Mark datasets complete, in one registry write: their cells become visible together."""
        if not records:
            return
        now = time.time()
        done = [replace(r, status="complete", finished=now) for r in records]
        for r in records:
            r.status, r.finished = "complete", now
        with soma.DataFrame.open(member_uri(self.uri, REGISTRY_KEY), "w", context=self._ctx) as reg:
            reg.write(records_to_table(done))
        self._changed(done)

    def write_chunk(
        self,
        record: DatasetRecord,
        offset: int,
        indptr: np.ndarray,
        indices: np.ndarray,
        data: np.ndarray,
        obs: pd.DataFrame,
        extra: pd.DataFrame | None = None,
    ) -> None:
        """Write cells [offset, offset + n) of a reserved dataset.

        ``indices`` are vocabulary ids, sorted within each row (TileDB global order), ``obs`` holds
        the OBS_COLUMNS for these cells; ``extra`` other obs columns, kept in ``extra_obs/<dataset>``.
        """
        n = len(indptr) - 1
        first = record.start + offset
        if first + n > record.stop:
            raise StoreError(f"dataset {record.dataset_id}: chunk beyond its reserved range")
        self.write_cells(first, indptr, indices, data, obs_table(obs, first))
        if extra is not None and extra.shape[1]:
            self.write_extra_obs(record.extra_obs or record.dataset_id, extra_obs_table(extra, first))

    def write_cells(self, first: int, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, obs: pa.Table) -> None:
        """X and obs of the consecutive cells [first, first + n), which may span several reserved
        datasets (a bulk write): one X fragment and one obs fragment."""
        n = len(indptr) - 1
        if len(data):
            rows = np.repeat(np.arange(first, first + n, dtype=np.int64), np.diff(indptr))
            table = pa.table(
                {
                    "soma_dim_0": rows,
                    "soma_dim_1": indices.astype(np.int64, copy=False),
                    "soma_data": data.astype(np.float32, copy=False),
                }
            )
            with soma.SparseNDArray.open(self._x_uri, "w", context=self._ctx) as x:
                x.write(table, platform_config=_GLOBAL_ORDER_WRITE)
        with soma.DataFrame.open(member_uri(self.uri, "obs"), "w", context=self._ctx) as obs_df:
            obs_df.write(obs.combine_chunks(), platform_config=_GLOBAL_ORDER_WRITE)  # joinids ascending

    def write_extra_obs(self, name: str, table: pa.Table, domain: tuple[int, int] = EXTRA_OBS_DOMAIN) -> None:
        """Rows of ``extra_obs/<name>`` (created on first use for ``domain``)."""
        uri = member_uri(self.uri, "extra_obs", name)
        if not _exists(uri, self._ctx):
            with soma.Collection.open(member_uri(self.uri, "extra_obs"), "w", context=self._ctx) as coll:
                if name not in coll:
                    coll.add_new_dataframe(name, schema=table.schema, domain=[domain])
        with soma.DataFrame.open(uri, "w", context=self._ctx) as df:
            # One chunk in global order (joinids ascending): one TileDB write, one fragment.
            df.write(table.combine_chunks(), platform_config=_GLOBAL_ORDER_WRITE)

    def shared_extra_obs(self) -> dict[str, str]:
        """Schema key (:func:`schema_key`) -> name of the extra_obs DataFrames that any later dataset
        with those columns can share (created for every joinid). Few: one per set of columns."""
        names = sorted({r.extra_obs for r in self._records.values() if r.extra_obs})
        out: dict[str, str] = {}
        for name in names:
            uri = member_uri(self.uri, "extra_obs", name)
            if not _exists(uri, self._ctx):
                continue
            with soma.DataFrame.open(uri, context=self._ctx) as df:
                if int(df.domain[0][1]) >= EXTRA_OBS_DOMAIN[1]:
                    out.setdefault(schema_key(df.schema), name)
        return out

    # ------------------------------------------------------------------ reading
    def obs(self, column_names: list[str] | None = None, value_filter: str | None = None) -> pd.DataFrame:
        """obs rows of complete datasets (rows of an interrupted ingest are never returned)."""
        cols = None if column_names is None else list(dict.fromkeys(["soma_joinid", *column_names]))

        def read() -> pd.DataFrame:
            with soma.DataFrame.open(member_uri(self.uri, "obs"), context=self._ctx) as obs:
                return obs.read(column_names=cols, value_filter=value_filter or None).concat().to_pandas()

        df = retry_if_vacuumed(read)
        return df[_in_ranges(df["soma_joinid"].to_numpy(), self.complete_ranges())].reset_index(drop=True)

    def extra_obs(self, dataset_id: str) -> pd.DataFrame:
        """The other obs columns of one complete dataset (an empty frame when it had none)."""
        rec = self._records.get(dataset_id)
        if rec is None or rec.status != "complete":
            raise StoreError(f"store {self.uri} has no complete dataset {dataset_id!r}")
        uri = member_uri(self.uri, "extra_obs", rec.extra_obs)
        if not rec.extra_obs or not _exists(uri, self._ctx):
            return pd.DataFrame({"soma_joinid": np.arange(rec.start, rec.stop)})

        def read() -> pd.DataFrame:
            with soma.DataFrame.open(uri, context=self._ctx) as df:
                return df.read(coords=(slice(rec.start, rec.stop - 1),)).concat().to_pandas()

        return retry_if_vacuumed(read).sort_values("soma_joinid").reset_index(drop=True)

    def to_anndata(self, joinids: np.ndarray):
        """Cells ``joinids`` (of complete datasets) as an AnnData with the store's gene names.

        Reads the covering joinid range once (fast contiguous read) and keeps the asked cells."""
        import anndata as ad
        import scipy.sparse as sp

        joinids = np.unique(np.asarray(joinids, dtype=np.int64))
        obs = self.obs()
        obs = obs[obs["soma_joinid"].isin(joinids)].sort_values("soma_joinid")
        if len(obs) != len(joinids):
            raise StoreError(f"store {self.uri}: {len(joinids) - len(obs)} of the asked cells are not in complete datasets")
        vocab = self.vocabulary()

        def read() -> pa.Table:
            with soma.SparseNDArray.open(self._x_uri, context=self._ctx) as x:
                return x.read(coords=(slice(int(joinids[0]), int(joinids[-1])),)).tables().concat()

        t = retry_if_vacuumed(read)
        d0 = t.column("soma_dim_0").to_numpy()
        keep = np.isin(d0, joinids)
        rows = np.searchsorted(joinids, d0[keep])
        X = sp.csr_matrix(
            (t.column("soma_data").to_numpy()[keep], (rows, t.column("soma_dim_1").to_numpy()[keep])),
            shape=(len(joinids), len(vocab)),
            dtype=np.float32,
        )
        obs = obs.set_index(obs["obs_id"].astype(str)).rename_axis(None)
        return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(vocab.astype(str), name=None)))

    def iter_x_blocks(self, start: int, stop: int, block: int) -> Iterator[pa.Table]:
        for a in range(start, stop, block):
            b = min(a + block, stop) - 1

            def read(a: int = a, b: int = b) -> pa.Table:
                with soma.SparseNDArray.open(self._x_uri, context=self._ctx) as x:
                    return x.read(coords=(slice(a, b),)).tables().concat()

            yield retry_if_vacuumed(read)

    def iter_x_cells(self, joinids: np.ndarray, chunk: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """X of the cells ``joinids`` (sorted and de-duplicated first) as :func:`read_x_cells` COO,
        ``chunk`` cells per query."""
        joinids = np.unique(np.asarray(joinids, dtype=np.int64))
        reader = XReader(self.uri)
        try:
            for a in range(0, len(joinids), chunk):
                yield reader.read(joinids[a : a + chunk])
        finally:
            reader.close()

    def summary(self) -> dict[str, Any]:
        """What `hiceller info` prints: totals and cells per tissue / disease / cell type."""
        done = self.complete_datasets()
        by: dict[str, dict[str, int]] = {"tissue": {}, "disease": {}, "cell_type": {}, "donor_id": {}}
        for d in done:
            for col, counts in d.counts.items():
                if col in by:
                    for k, v in counts.items():
                        by[col][k] = by[col].get(k, 0) + v
        return {
            "store": self.uri,
            "cells": sum(d.n_cells for d in done),
            "genes": self.n_genes,
            "datasets": len(done),
            "incomplete_datasets": sorted(d.dataset_id for d in self._records.values() if d.status != "complete"),
            "cells_per_dataset": {d.dataset_id: d.n_cells for d in done},
            "kind_per_dataset": {d.dataset_id: d.kind for d in done},
            "tissue_per_dataset": {d.dataset_id: d.tissue for d in done},
            "cells_per_tissue": _sorted_counts(by["tissue"]),
            "cells_per_disease": _sorted_counts(by["disease"]),
            "cells_per_cell_type": _sorted_counts(by["cell_type"]),
            "donors": len(by["donor_id"]),
            "cells_per_donor": _sorted_counts(by["donor_id"]),
        }


class XReader:
    """X reads of cell sets through one open handle, reopened when `hiceller store optimize`
    vacuumed the fragments it was opened with (a reader that has the store open keeps working)."""

    def __init__(self, uri: str):
        self._uri = member_uri(uri, "ms", "RNA", "X", LAYER)
        self._ctx = soma_context(uri)
        self._x = soma.SparseNDArray.open(self._uri, context=self._ctx)
        self.reopened = 0

    def read(self, jids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`read_x_cells` of ``jids`` (sorted, unique)."""
        try:
            return read_x_cells(self._x, jids)
        except soma.SOMAError as e:
            if not _is_vacuumed(e):
                raise
        self._x.close()
        self.reopened += 1
        self._x = retry_if_vacuumed(lambda: soma.SparseNDArray.open(self._uri, context=self._ctx))
        return retry_if_vacuumed(lambda: read_x_cells(self._x, jids))

    def close(self) -> None:
        self._x.close()


def read_x_cells(x: "soma.SparseNDArray", jids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(soma_dim_0, soma_dim_1, soma_data)`` as numpy of the cells ``jids`` (sorted, unique) of X.

    Consecutive joinids are one range read; any other set a point read of just those cells (cells
    outside it are never decoded)."""
    lo, hi = int(jids[0]), int(jids[-1])
    t = x.read(coords=(slice(lo, hi) if hi - lo + 1 == len(jids) else jids,)).tables().concat()
    return t.column("soma_dim_0").to_numpy(), t.column("soma_dim_1").to_numpy(), t.column("soma_data").to_numpy()


def obs_table(obs: pd.DataFrame | dict[str, np.ndarray], first: int) -> pa.Table:
    """The OBS_COLUMNS of ``obs`` (a DataFrame, or object arrays of str by column) as the obs rows
    of joinids [first, first + n)."""
    cols = {c: obs[c].astype(str).to_numpy(dtype=object) if isinstance(obs[c], pd.Series) else obs[c] for c in OBS_COLUMNS}
    n = len(cols[OBS_COLUMNS[0]])
    table: dict[str, Any] = {"soma_joinid": np.arange(first, first + n, dtype=np.int64)}
    for c in OBS_COLUMNS:
        table[c] = pa.array(cols[c], pa.large_string())
    return pa.table(table)


def extra_obs_table(extra: pd.DataFrame, first: int | np.ndarray) -> pa.Table:
    """Other obs columns as extra_obs rows of joinids [first, first + len(extra)) (or the joinids
    ``first``). Categoricals become plain strings: SOMA enumerations would need extending per chunk.
    Built column by column: ``pa.Table.from_pandas`` cost 5x more per small file."""
    joinids = np.arange(first, first + len(extra), dtype=np.int64) if np.isscalar(first) else np.asarray(first, dtype=np.int64)
    cols: dict[str, pa.Array] = {"soma_joinid": pa.array(joinids)}
    for name in extra.columns:
        arr = pa.array(extra[name], from_pandas=True)
        if pa.types.is_dictionary(arr.type) or pa.types.is_string(arr.type):
            arr = arr.cast(pa.large_string())
        cols[str(name)] = arr
    return pa.table(cols)


def schema_key(schema: pa.Schema) -> str:
    """Names and types of a table's columns: datasets whose other obs columns agree share a DataFrame."""
    return ";".join(f"{f.name}:{f.type}" for f in schema)


def _exists(uri: str, ctx: soma.SOMATileDBContext | None) -> bool:
    try:
        return soma.DataFrame.exists(uri, context=ctx)
    except Exception:
        return False


def _sorted_counts(d: dict[str, int]) -> dict[str, int]:
    return dict(sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))


def _in_ranges(joinids: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Whether each joinid lies in one of the sorted, disjoint [start, stop) ``ranges``."""
    if not ranges:
        return np.zeros(len(joinids), dtype=bool)
    starts = np.array([a for a, _ in ranges], dtype=np.int64)
    stops = np.array([b for _, b in ranges], dtype=np.int64)
    # One binary search per joinid instead of one pass per range: thousands of datasets leave
    # thousands of ranges when some are incomplete.
    k = np.searchsorted(starts, joinids, side="right") - 1
    return (k >= 0) & (joinids < stops[np.maximum(k, 0)])


def _create_experiment(uri: str, ctx: soma.SOMATileDBContext | None) -> None:
    exp = soma.Experiment.create(uri, context=ctx)
    try:
        schema = pa.schema([("soma_joinid", pa.int64())] + [(c, pa.large_string()) for c in OBS_COLUMNS])
        exp.add_new_dataframe("obs", schema=schema, domain=[(0, 0)])
        exp.add_new_collection("extra_obs")
        ms = exp.add_new_collection("ms")
        rna = ms.add_new_collection("RNA", soma.Measurement)
        rna.add_new_dataframe(
            "var", schema=pa.schema([("soma_joinid", pa.int64()), ("gene", pa.large_string())]), domain=[(0, 0)]
        )
        xs = rna.add_new_collection("X")
        xs.add_new_sparse_ndarray(LAYER, type=pa.float32(), shape=(1, 1), platform_config=_X_PLATFORM)
        create_registry(exp)
        exp.metadata[META_KEY] = store_meta()
    finally:
        exp.close()
