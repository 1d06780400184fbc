"""Donor hold-out and stratified validation splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from finetune.splits import Split, make_split


def _cells(seed: int = 0, n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Long-tail labels over 5 donors, plus a singleton class and a class only donor d4 has."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(["T", "B", "NK", "mono", "DC"], p=[0.5, 0.25, 0.15, 0.08, 0.02], size=n).astype(object)
    donors = rng.choice(["d0", "d1", "d2", "d3", "d4"], size=n).astype(object)
    labels[0], donors[0] = "pDC", "d1"  # a single cell, in a training donor
    labels[1:4], donors[1:4] = "plasma", "d4"  # only in the held-out donor
    labels[4:6], donors[4:6] = "ILC", "d2"  # two cells: one to validation, one to training
    return labels, donors


def _partition_ok(split: Split, n: int) -> None:
    every = np.concatenate([split.train_idx, split.val_idx, split.test_idx])
    assert np.array_equal(np.sort(every), np.arange(n))


def test_held_out_donors_only_in_test() -> None:
    labels, donors = _cells()
    split = make_split(labels, donors, holdout_donors=["d4", "d3"], val_fraction=0.2, seed=1)
    _partition_ok(split, labels.size)
    assert split.strategy == "donor_holdout"
    assert set(donors[split.test_idx]) == {"d3", "d4"}
    assert not {"d3", "d4"} & set(donors[split.train_idx]) and not {"d3", "d4"} & set(donors[split.val_idx])
    assert np.array_equal(split.test_idx, np.flatnonzero(np.isin(donors, ["d3", "d4"])))
    assert any("'plasma'" in note and "held-out" in note for note in split.notes)


def test_singletons_stay_in_training_with_a_note() -> None:
    labels, donors = _cells()
    split = make_split(labels, donors, holdout_donors=["d4"], seed=0)
    assert 0 in split.train_idx and "pDC" not in set(labels[split.val_idx])
    assert any("'pDC'" in note and "single" in note for note in split.notes)


def test_stratification_represents_every_class_with_two_cells() -> None:
    labels, donors = _cells()
    split = make_split(labels, donors, holdout_donors=["d4"], val_fraction=0.1, seed=3)
    pool = np.concatenate([split.train_idx, split.val_idx])
    for cls in set(labels[pool]):
        n_pool = int((labels[pool] == cls).sum())
        n_val = int((labels[split.val_idx] == cls).sum())
        if n_pool >= 2:
            assert 1 <= n_val <= n_pool - 1, cls  # in validation and still trained on
            assert n_val == max(1, min(n_pool - 1, round(0.1 * n_pool))), cls
        else:
            assert n_val == 0


def test_stratified_without_donors() -> None:
    labels, _ = _cells()
    split = make_split(labels, val_fraction=0.25, seed=0)
    _partition_ok(split, labels.size)
    assert split.strategy == "stratified" and split.test_idx.size == 0
    assert abs(split.val_idx.size / labels.size - 0.25) < 0.02


def test_deterministic_per_seed() -> None:
    labels, donors = _cells()
    a = make_split(labels, donors, holdout_donors=["d4"], seed=7)
    b = make_split(labels, donors, holdout_donors=["d4"], seed=7)
    c = make_split(labels, donors, holdout_donors=["d4"], seed=8)
    assert np.array_equal(a.val_idx, b.val_idx) and np.array_equal(a.train_idx, b.train_idx)
    assert not np.array_equal(a.val_idx, c.val_idx)


def test_bad_inputs_are_refused() -> None:
    labels, donors = _cells()
    with pytest.raises(ValueError, match="not found"):
        make_split(labels, donors, holdout_donors=["d9"])
    with pytest.raises(ValueError, match="every donor"):
        make_split(labels, donors, holdout_donors=["d0", "d1", "d2", "d3", "d4"])
    with pytest.raises(ValueError, match="donors"):
        make_split(labels, holdout_donors=["d0"])
    missing = labels.copy()
    missing[10] = None
    with pytest.raises(ValueError, match="missing label"):
        make_split(missing)


def test_parquet_round_trip(tmp_path: Path) -> None:
    labels, donors = _cells()
    split = make_split(labels, donors, holdout_donors=["d4"], seed=2)
    joinids = np.arange(labels.size, dtype=np.int64) * 10 + 1000
    frame = split.to_frame(joinids)
    assert list(frame.columns) == ["joinid", "split"] and len(frame) == labels.size
    assert set(frame.loc[frame["split"] == "test", "joinid"]) == set(joinids[split.test_idx])
    path = split.save(tmp_path / "split.parquet", joinids)
    back = Split.load(path, joinids)
    for name in ("train_idx", "val_idx", "test_idx"):
        assert np.array_equal(getattr(back, name), getattr(split, name))
    assert back.strategy == split.strategy and back.notes == split.notes
    raw = Split.load(path)  # without joinids the stored joinids come back as they are
    assert np.array_equal(raw.test_idx, joinids[split.test_idx])
    with pytest.raises(ValueError, match="joinids"):
        Split.load(path, joinids[:-5])
