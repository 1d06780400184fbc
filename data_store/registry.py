"""The dataset registry: one row per dataset in a SOMA DataFrame, so adding a dataset costs O(1).

Format 2 (this module writes it)::

    STORE/                      metadata["hiceller"] = {"format": 2, "registry": "datasets"}
      datasets                  SOMADataFrame, one row per dataset (soma_joinid = the dataset's slot)

A row is written when a dataset is reserved (status ``writing``) and rewritten when it is complete;
TileDB keeps the newest value of a soma_joinid, so a rewrite replaces the row. A bulk ingest writes
the rows of many datasets in one fragment. Any SOMA client reads the registry as a table
(``exp["datasets"].read().concat()``); ``counts`` and ``notes`` are JSON strings.

Format 1 (stores written before) kept the whole registry as one JSON value in the experiment's
metadata, rewritten twice per dataset: a new metadata fragment of the whole registry each time,
quadratic in the number of datasets. Such a store is still read as it is, and migrated to format 2
by its first write (see :func:`migrate_legacy`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pyarrow as pa
import tiledbsoma as soma

from hiceller.errors import StoreError

__all__ = [
    "DatasetRecord",
    "FORMAT_VERSION",
    "LEGACY_FORMAT",
    "META_KEY",
    "REGISTRY_KEY",
    "UNKNOWN",
    "create_registry",
    "parse_store_meta",
    "read_registry",
    "records_from_legacy",
    "records_from_table",
    "write_records",
]

META_KEY = "hiceller"
FORMAT_VERSION = 2
LEGACY_FORMAT = 1
REGISTRY_KEY = "datasets"
UNKNOWN = "unknown"

# A registry row's slot is its soma_joinid; the domain is fixed at creation so that adding a dataset
# never evolves the schema (TileDB loads every schema version at each open).
_MAX_DATASETS = 1 << 32


@dataclass
class DatasetRecord:
    """One ingested dataset, as kept in the registry."""

    dataset_id: str
    start: int
    """First soma_joinid of the dataset; its cells are [start, stop)."""
    stop: int
    status: str
    """``writing`` while being ingested, ``complete`` once every cell is in."""
    kind: str = "counts"
    """``counts`` (non-negative integers) or ``logexpr``."""
    source: str = ""
    labeled: bool = True
    tissue: str = UNKNOWN
    disease: str = UNKNOWN
    n_genes: int = 0
    """Genes of the source file (columns of its X)."""
    new_genes: int = 0
    """Genes this dataset added to the vocabulary."""
    fingerprint: str = ""
    """Identifies the source (size, mtime, shape) so a re-run can finish a reserved dataset."""
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """Cells per value of cell_type / tissue / disease / donor_id (for `info` without a scan)."""
    notes: list[str] = field(default_factory=list)
    created: float = 0.0
    slot: int = -1
    """Row of the registry (its soma_joinid); -1 until reserved."""
    extra_obs: str = ""
    """Member of ``extra_obs`` holding this dataset's other obs columns ("" when it has none)."""
    finished: float = 0.0
    """When the dataset was marked complete (seconds since the epoch)."""

    @property
    def n_cells(self) -> int:
        return self.stop - self.start


_JSON_FIELDS = ("counts", "notes")
_INT_FIELDS = ("start", "stop", "n_genes", "new_genes")
_FLOAT_FIELDS = ("created", "finished")


def _arrow_type(name: str) -> pa.DataType:
    if name in _INT_FIELDS:
        return pa.int64()
    if name in _FLOAT_FIELDS:
        return pa.float64()
    if name == "labeled":
        return pa.bool_()
    return pa.large_string()


REGISTRY_SCHEMA = pa.schema(
    [("soma_joinid", pa.int64())] + [(f.name, _arrow_type(f.name)) for f in fields(DatasetRecord) if f.name != "slot"]
)


def parse_store_meta(uri: str, raw: Any) -> dict[str, Any]:
    """The experiment's ``hiceller`` metadata as a dict, refused when this code cannot read it."""
    if raw is None:
        raise StoreError(f"store {uri} is a SOMA experiment but not a HiCeller store (no '{META_KEY}' metadata)")
    meta = json.loads(raw)
    if meta.get("format") not in (LEGACY_FORMAT, FORMAT_VERSION):
        raise StoreError(f"store {uri} has format {meta.get('format')}, this HiCeller reads {LEGACY_FORMAT} and {FORMAT_VERSION}")
    return meta


def store_meta() -> str:
    return json.dumps({"format": FORMAT_VERSION, "registry": REGISTRY_KEY})


def create_registry(exp: soma.Experiment) -> None:
    """Add the empty registry DataFrame to an experiment opened for writing (idempotent)."""
    if REGISTRY_KEY not in exp:
        exp.add_new_dataframe(REGISTRY_KEY, schema=REGISTRY_SCHEMA, domain=[(0, _MAX_DATASETS - 1)])


def records_to_table(records: list[DatasetRecord]) -> pa.Table:
    cols: dict[str, list[Any]] = {"soma_joinid": [r.slot for r in records]}
    for f in REGISTRY_SCHEMA.names[1:]:
        values = [getattr(r, f) for r in records]
        cols[f] = [json.dumps(v) for v in values] if f in _JSON_FIELDS else values
    return pa.table(cols, schema=REGISTRY_SCHEMA)


def write_records(exp: soma.Experiment, records: list[DatasetRecord]) -> None:
    """Write (or rewrite) the rows of ``records`` in one fragment: O(len(records)), not O(store)."""
    if any(r.slot < 0 for r in records):
        raise StoreError("a dataset record without a registry slot cannot be written")
    if records:
        exp[REGISTRY_KEY].write(records_to_table(records))


def read_registry(exp: soma.Experiment) -> dict[str, DatasetRecord]:
    """Every row of the registry of an open format-2 experiment, by dataset id."""
    return records_from_table(exp[REGISTRY_KEY].read().concat())


def records_from_table(table: pa.Table) -> dict[str, DatasetRecord]:
    out: dict[str, DatasetRecord] = {}
    for row in table.to_pylist():
        slot = row.pop("soma_joinid")
        for f in _JSON_FIELDS:
            row[f] = json.loads(row[f]) if row[f] else ([] if f == "notes" else {})
        rec = DatasetRecord(slot=slot, **row)
        out[rec.dataset_id] = rec
    return out


SPAN_COLUMNS = ["dataset_id", "start", "stop", "status"]
"""What readers of cells need from the registry (not the JSON counts, most of its bytes)."""


def records_from_legacy(meta: dict[str, Any]) -> dict[str, DatasetRecord]:
    """Format-1 registry JSON as records, slots given in joinid order (the order they were added)."""
    recs = [DatasetRecord(**v) for v in meta["datasets"].values()]
    for slot, rec in enumerate(sorted(recs, key=lambda r: (r.start, r.dataset_id))):
        rec.slot = slot
    return {r.dataset_id: r for r in recs}


def as_dict(record: DatasetRecord) -> dict[str, Any]:
    return asdict(record)
