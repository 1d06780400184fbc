"""A manifest of many files to ingest: one TSV row per file, with that file's metadata.

Celler-75's metadata comes per study, so a manifest gives it per file::

    path                     dataset_id   tissue     disease   label        batch    gene_list
    studies/lung_a.h5ad      lung-a       lung       normal    cell_type    donor    10x-v3
    studies/liver_b.h5ad                  liver      fibrosis  celltype     sample   10x-v3
    unlabeled/c.h5ad                      blood                none

``path`` is required (relative paths are relative to the manifest's folder); every other column is
optional, and an empty cell takes the command line's value (``--tissue``, ``--label-column``, ...).
``label`` and ``batch`` name obs columns of that file (``none``: the file has no labels / no batch).
``gene_list`` names a gene list that files share (same var names, same order): the first file of a
list is read in full, the others are checked by their gene count and a sample of names, which spares
each small file the reading of its whole gene list (data_store/ingest.py ``IngestOptions.gene_list``).
Lines that start with ``#`` and empty lines are skipped. Every row is checked before any file is
opened, and every bad row is named in one error.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

from data_store.ingest import IngestOptions, validate_dataset_id
from hiceller.errors import InputError

__all__ = ["COLUMNS", "ManifestRow", "read_manifest", "manifest_sources"]

COLUMNS = ("path", "dataset_id", "tissue", "disease", "label", "batch", "gene_list")


@dataclass(frozen=True)
class ManifestRow:
    line: int
    """Line of the manifest (1 = the header)."""
    path: Path
    values: dict[str, str]
    """Non-empty cells of the optional columns."""

    @property
    def dataset_id(self) -> str:
        return self.values.get("dataset_id") or self.path.stem


def _header(manifest: Path, lines: list[tuple[int, list[str]]]) -> list[str]:
    if not lines:
        raise InputError(f"{manifest}: manifest has no header line (expected columns: {', '.join(COLUMNS)})")
    header = [h.strip() for h in lines[0][1]]
    unknown = [h for h in header if h not in COLUMNS]
    dup = sorted({h for h in header if header.count(h) > 1})
    if "path" not in header or unknown or dup:
        problems = (["no 'path' column"] if "path" not in header else []) + [f"unknown column {u!r}" for u in unknown] + [f"column {d!r} twice" for d in dup]
        raise InputError(f"{manifest}: bad header ({'; '.join(problems)}); columns are {', '.join(COLUMNS)}")
    return header


def _row(manifest: Path, header: list[str], line: int, cells: list[str]) -> tuple[ManifestRow | None, str | None]:
    if len(cells) != len(header):
        return None, f"row {line}: {len(cells)} fields, the header has {len(header)}"
    values = {h: c.strip() for h, c in zip(header, cells) if c.strip()}
    raw = values.pop("path", "")
    if not raw:
        return None, f"row {line}: empty path"
    path = Path(raw) if Path(raw).is_absolute() else manifest.parent / raw
    if not path.is_file():
        return None, f"row {line}: {path} does not exist"
    row = ManifestRow(line, path, values)
    why = validate_dataset_id(row.dataset_id)
    return (None, f"row {line}: {why}") if why else (row, None)


def read_manifest(manifest: Path) -> list[ManifestRow]:
    """The manifest's rows; an InputError naming every bad row (and why) when any is bad."""
    if not manifest.is_file():
        raise InputError(f"{manifest}: manifest does not exist")
    try:
        with manifest.open(newline="", encoding="utf-8") as fh:
            lines = [(i, cells) for i, cells in enumerate(csv.reader(fh, delimiter="\t"), start=1) if cells and any(c.strip() for c in cells) and not cells[0].lstrip().startswith("#")]
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{manifest}: not a readable TSV manifest ({type(e).__name__}: {e})") from None
    header = _header(manifest, lines)
    rows, errors = [], []
    first_line: dict[str, int] = {}
    for line, cells in lines[1:]:
        row, error = _row(manifest, header, line, cells)
        if row is not None and row.dataset_id in first_line:
            row, error = None, f"row {line}: dataset id {row.dataset_id!r} is also on row {first_line[row.dataset_id]}"
        if row is None:
            errors.append(error)
            continue
        first_line[row.dataset_id] = line
        rows.append(row)
    if errors:
        raise InputError(f"{manifest}: {len(errors)} bad row{'s' if len(errors) > 1 else ''}: " + "; ".join(e for e in errors if e))
    if not rows:
        raise InputError(f"{manifest}: manifest lists no file")
    return rows


def _none_or(value: str) -> str | None:
    return None if value.lower() == "none" else value


def manifest_sources(rows: list[ManifestRow], defaults: IngestOptions, manifest: Path) -> tuple[list[tuple[Path, IngestOptions]], list[str]]:
    """(file, options) per row, the row's cells over the command line's defaults, and the label
    that prefixes each row's errors."""
    if defaults.gene_column:
        bad = [str(r.line) for r in rows if "gene_list" in r.values]
        if bad:
            raise InputError(f"{manifest}: row{'s' if len(bad) > 1 else ''} {', '.join(bad)}: a gene_list declares shared var names; "
                             "it cannot be combined with --gene-column")
    sources = []
    for r in rows:
        v = r.values
        opts = replace(
            defaults,
            dataset_id=r.dataset_id,
            tissue=v.get("tissue", defaults.tissue),
            disease=v.get("disease", defaults.disease),
            label_column=_none_or(v["label"]) if "label" in v else defaults.label_column,
            batch_column=_none_or(v["batch"]) if "batch" in v else defaults.batch_column,
            gene_list=v.get("gene_list", defaults.gene_list),
        )
        sources.append((r.path, opts))
    return sources, [f"row {r.line}: " for r in rows]
