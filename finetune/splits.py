"""Train / validation / test split of a fine-tuning cell set, by donor and by disease when known.

Rules, and why:

* Held-out donors (``holdout_donors``) form the test set and nothing else: none of their cells is
  seen in training or used for early stopping, so test numbers measure transfer to new donors, which
  is what annotating a user's query data means. Donors named for hold-out but absent from
  ``donors`` are an error, not silently ignored. Without held-out donors the test set is empty.
* Held-out diseases (``holdout_diseases``) do the same for conditions: train on some diseases, test
  on one the model never saw (Celler's long tail is one of diseases). With both, the test set is
  every cell of a held-out donor or of a held-out disease.
* Validation is a class-stratified sample of the remaining (training donors') cells, not a whole
  donor. Validation picks the best epoch / mining round by macro F1, and with the handful of donors a
  tissue subset usually has, a whole validation donor often lacks the rare classes altogether, which
  makes the stopping signal blind exactly where GInf and mining are meant to help. Donor transfer is
  measured once, on the held-out donors.
* Per class with ``n >= 2`` training-pool cells, ``round(val_fraction * n)`` cells go to validation,
  clamped to ``[1, n - 1]``: every such class is represented in validation and still trained on, so
  small classes are slightly over-represented in validation. A class with one cell stays in training
  (a model cannot learn a class it never sees) and a note says so.
* Draws come from ``numpy.random.default_rng(seed)`` over classes in sorted order: the same inputs and
  seed give the same split.
* Positions index the label array; ``to_frame``/``save`` turn them into SOMA ``soma_joinid`` values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["Split", "make_split", "SPLIT_NAMES"]

SPLIT_NAMES = ("train", "val", "test")
_META_STRATEGY = b"hiceller.split.strategy"
_META_NOTES = b"hiceller.split.notes"


@dataclass
class Split:
    """Positions of the train, validation and test cells, how they were chosen, and any warnings."""

    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    strategy: str
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("train_idx", "val_idx", "test_idx"):
            setattr(self, name, np.sort(np.asarray(getattr(self, name), dtype=np.int64)))
        parts = np.concatenate([self.train_idx, self.val_idx, self.test_idx])
        if np.unique(parts).size != parts.size:
            raise ValueError("a cell is assigned to more than one split")

    def to_frame(self, joinids: Sequence[int] | np.ndarray | None = None) -> pd.DataFrame:
        """Columns ``joinid`` (int64) and ``split``, one row per assigned cell in position order.

        ``joinids[i]`` is the ``soma_joinid`` of position ``i``; without it positions are written as
        they are (for cell sets whose positions already are their joinids).
        """
        positions = np.concatenate([self.train_idx, self.val_idx, self.test_idx])
        names = np.repeat(SPLIT_NAMES, [self.train_idx.size, self.val_idx.size, self.test_idx.size])
        order = np.argsort(positions, kind="stable")
        positions, names = positions[order], names[order]
        if joinids is not None:
            ids = np.asarray(joinids, dtype=np.int64)
            if positions.size and positions.max() >= ids.size:
                raise ValueError(f"split has position {positions.max()} but only {ids.size} joinids were given")
            positions = ids[positions]
        return pd.DataFrame({"joinid": positions.astype(np.int64), "split": names.astype(str)})

    def save(self, path: str | Path, joinids: Sequence[int] | np.ndarray | None = None) -> Path:
        """Parquet with columns ``joinid``, ``split``; strategy and notes ride in the schema metadata."""
        table = pa.Table.from_pandas(self.to_frame(joinids), preserve_index=False)
        meta = dict(table.schema.metadata or {})
        meta[_META_STRATEGY] = self.strategy.encode()
        meta[_META_NOTES] = "\n".join(self.notes).encode()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.replace_schema_metadata(meta), out)
        return out

    @classmethod
    def load(cls, path: str | Path, joinids: Sequence[int] | np.ndarray | None = None) -> Split:
        """Read a saved split; with ``joinids``, stored joinids are mapped back to their positions."""
        table = pq.read_table(path)
        meta = table.schema.metadata or {}
        frame = table.to_pandas()
        stored = frame["joinid"].to_numpy(dtype=np.int64)
        positions = stored if joinids is None else _positions_of(stored, np.asarray(joinids, dtype=np.int64))
        split = frame["split"].to_numpy()
        notes_text = meta.get(_META_NOTES, b"").decode()
        return cls(
            train_idx=positions[split == "train"],
            val_idx=positions[split == "val"],
            test_idx=positions[split == "test"],
            strategy=meta.get(_META_STRATEGY, b"unknown").decode(),
            notes=notes_text.split("\n") if notes_text else [],
        )


def _positions_of(stored: np.ndarray, joinids: np.ndarray) -> np.ndarray:
    """Position of each stored joinid in ``joinids``; a joinid that is not there is an error."""
    order = np.argsort(joinids, kind="stable")
    found = np.searchsorted(joinids, stored, sorter=order)
    found = np.minimum(found, joinids.size - 1) if joinids.size else found
    ok = joinids.size > 0 and np.array_equal(joinids[order[found]], stored)
    if not ok:
        raise ValueError("the saved split names joinids that are not in the given joinids")
    return order[found]


def _stratified_val(
    labels: np.ndarray, pool: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, list[str]]:
    """Validation positions drawn per class from ``pool``; notes for classes kept out of validation."""
    val: list[np.ndarray] = []
    notes: list[str] = []
    pool_labels = labels[pool]
    for cls in np.unique(pool_labels):
        members = pool[pool_labels == cls]
        if members.size == 1:
            notes.append(f"class {cls!r} has a single training cell; kept in training, absent from validation")
            continue
        n_val = int(np.clip(round(val_fraction * members.size), 1, members.size - 1))
        val.append(rng.permutation(members)[:n_val])
    return (np.concatenate(val) if val else np.empty(0, dtype=np.int64)), notes


def _holdout_mask(values: np.ndarray, holdout: Sequence[str], what: str = "donor") -> np.ndarray:
    """Cells of the held-out donors (or diseases), refusing names that do not exist or leave nothing
    to train on."""
    wanted = np.asarray(list(holdout)).astype(str)
    there = sorted(str(v) for v in set(values))
    missing = sorted(set(wanted.tolist()) - set(there))
    if missing:
        raise ValueError(f"held-out {what}s not found among the cells' {what}s: {missing} (there: {there[:20]})")
    mask = np.isin(values, wanted)
    if mask.all():
        raise ValueError(f"every {what} is held out; no cells are left for training")
    return mask


def _per_cell(values, n: int, what: str) -> np.ndarray:
    if values is None:
        raise ValueError(f"holdout_{what}s needs the per-cell {what}s")
    out = np.asarray(values, dtype=object).astype(str)
    if out.size != n:
        raise ValueError(f"{what}s has {out.size} entries for {n} cells")
    return out


def _unseen_class_notes(labels: np.ndarray, test: np.ndarray, train_pool: np.ndarray, held: str) -> list[str]:
    """Classes only the held-out cells have: the model cannot predict them, so say so up front."""
    unseen = np.setdiff1d(np.unique(labels[test]), np.unique(labels[train_pool]))
    return [
        f"class {cls!r} occurs only in held-out {held} ({int((labels[test] == cls).sum())} test cells);"
        " never seen in training"
        for cls in unseen
    ]


def make_split(
    labels: Sequence[object] | np.ndarray | pd.Series,
    donors: Sequence[object] | np.ndarray | pd.Series | None = None,
    holdout_donors: Sequence[object] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    diseases: Sequence[object] | np.ndarray | pd.Series | None = None,
    holdout_diseases: Sequence[object] | None = None,
) -> Split:
    """Split cells by held-out donor and disease (test) and by class-stratified sampling (validation).

    ``labels``, ``donors`` and ``diseases`` are per-cell arrays (any hashable values; compared as
    strings); missing labels are an error because an unlabelled cell cannot be trained or scored.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    label_series = pd.Series(np.asarray(labels, dtype=object))
    if label_series.isna().any():
        raise ValueError(f"{int(label_series.isna().sum())} cells have a missing label; drop them before splitting")
    lab = label_series.astype(str).to_numpy()
    n = lab.size
    if n == 0:
        raise ValueError("no cells to split")
    held = np.zeros(n, dtype=bool)
    notes: list[str] = []
    kinds = []
    if holdout_donors:
        held |= _holdout_mask(_per_cell(donors, n, "donor"), [str(d) for d in holdout_donors])
        kinds.append("donor")
    elif donors is not None and not holdout_diseases:
        notes.append("donors given but none held out: test set is empty")
    if holdout_diseases:
        held |= _holdout_mask(_per_cell(diseases, n, "disease"), [str(d) for d in holdout_diseases], "disease")
        kinds.append("disease")
    if held.all():
        raise ValueError("the held-out donors and diseases cover every cell; no cells are left for training")
    strategy = "+".join(kinds) + "_holdout" if kinds else "stratified"
    test = np.flatnonzero(held)
    pool = np.setdiff1d(np.arange(n), test)
    val, val_notes = _stratified_val(lab, pool, val_fraction, np.random.default_rng(seed))
    notes += val_notes + _unseen_class_notes(lab, test, pool, " and ".join(f"{k}s" for k in kinds) or "cells")
    return Split(train_idx=np.setdiff1d(pool, val), val_idx=val, test_idx=test, strategy=strategy, notes=notes)
