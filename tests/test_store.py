"""CorpusStore: open/create refusals, the append-only vocabulary, reserved joinid ranges, and the
rewrite-replaces-never-duplicates property that makes a killed ingest safe to re-run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tiledbsoma as soma

from _fixtures import store_matrix
from data_store.store import OBS_COLUMNS, CorpusStore, DatasetRecord, is_store, soma_context
from hiceller.errors import StoreError


def _obs(n: int, dataset: str, cell_type: str = "T") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "obs_id": [f"{dataset}-{i}" for i in range(n)],
            "cell_type": cell_type,
            "tissue": "lung",
            "disease": "normal",
            "donor_id": "d1",
            "dataset_id": dataset,
        }
    )


def _record(dataset: str, n: int, fingerprint: str = "fp") -> DatasetRecord:
    return DatasetRecord(dataset_id=dataset, start=0, stop=n, status="writing", fingerprint=fingerprint)


def _rows(n: int, genes_per_row: int, base: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR of n rows, genes 0..genes_per_row-1 each, value = base + 10*row + gene."""
    indptr = np.arange(0, (n + 1) * genes_per_row, genes_per_row)
    indices = np.tile(np.arange(genes_per_row), n)
    data = (base + 10 * np.repeat(np.arange(n), genes_per_row) + indices).astype(np.float32)
    return indptr, indices, data


def test_create_then_open_an_empty_store(tmp_path: Path) -> None:
    uri = tmp_path / "store"
    store = CorpusStore.create(uri)
    assert is_store(str(uri))
    again = CorpusStore.open(uri)
    assert again.datasets == {} and again.n_cells == 0 and again.next_joinid == 0
    assert list(again.vocabulary()) == []
    s = again.summary()
    assert (s["cells"], s["genes"], s["datasets"], s["incomplete_datasets"]) == (0, 0, 0, [])
    # Nothing is left of the temporary sibling the store was built in.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert store.uri == str(uri)


def test_open_or_create_uses_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    CorpusStore.open_or_create(tmp_path / "empty")
    assert is_store(str(tmp_path / "empty"))


def test_open_refuses_what_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        CorpusStore.open(tmp_path / "nope")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    with pytest.raises(StoreError, match="not a TileDB-SOMA experiment"):
        CorpusStore.open(plain)
    with pytest.raises(StoreError, match="not a TileDB-SOMA experiment"):
        CorpusStore.open_or_create(plain)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(StoreError, match="not a TileDB-SOMA experiment"):
        CorpusStore.open(a_file)
    foreign = tmp_path / "foreign"
    soma.Experiment.create(str(foreign)).close()
    with pytest.raises(StoreError, match="not a HiCeller store"):
        CorpusStore.open(foreign)
    assert not is_store(str(foreign)) and not is_store(str(plain))
    # Plain files are left alone.
    assert (plain / "notes.txt").read_text() == "hello" and a_file.read_text() == "x"


def test_future_format_is_refused(tmp_path: Path) -> None:
    uri = tmp_path / "store"
    CorpusStore.create(uri)
    with soma.Experiment.open(str(uri), "w") as exp:
        exp.metadata["hiceller"] = json.dumps({"format": 99, "datasets": {}, "next_joinid": 0})
    with pytest.raises(StoreError, match="format 99"):
        CorpusStore.open(uri)


def test_local_paths_need_no_s3_context() -> None:
    assert soma_context("/some/local/dir") is None
    assert soma_context("relative/dir") is None


def test_vocabulary_is_append_only(tmp_path: Path) -> None:
    store = CorpusStore.create(tmp_path / "store")
    ids, n_new = store.extend_vocabulary(["A", "B", "C"])
    assert ids.tolist() == [0, 1, 2] and n_new == 3
    # Known genes keep their ids in any order; new ones get the next ids in order of appearance.
    ids, n_new = store.extend_vocabulary(["C", "E", "A", "D"])
    assert ids.tolist() == [2, 3, 0, 4] and n_new == 2
    assert list(store.vocabulary()) == ["A", "B", "C", "E", "D"]
    # Repeated names (genes merged by upper-casing) map to one id, added once.
    ids, n_new = store.extend_vocabulary(["F", "F", "B"])
    assert ids.tolist() == [5, 5, 1] and n_new == 1
    reopened = CorpusStore.open(tmp_path / "store")
    assert list(reopened.vocabulary()) == ["A", "B", "C", "E", "D", "F"]
    with soma.Experiment.open(str(tmp_path / "store")) as exp:
        assert exp.ms["RNA"].X["data"].shape[1] >= 6


def test_reserve_gives_consecutive_ranges_and_resumes_the_same_source(tmp_path: Path) -> None:
    store = CorpusStore.create(tmp_path / "store")
    a = store.reserve_dataset(_record("a", 5))
    b = store.reserve_dataset(_record("b", 3))
    assert (a.start, a.stop, b.start, b.stop) == (0, 5, 5, 8)
    assert a.status == b.status == "writing"
    reopened = CorpusStore.open(tmp_path / "store")
    assert reopened.next_joinid == 8 and set(reopened.datasets) == {"a", "b"}
    # The same source again (an interrupted ingest re-run) gets its old range back.
    again = reopened.reserve_dataset(_record("a", 5))
    assert (again.start, again.stop) == (0, 5) and reopened.next_joinid == 8
    with pytest.raises(StoreError, match="another source"):
        reopened.reserve_dataset(_record("a", 5, fingerprint="other"))
    with pytest.raises(StoreError, match="another source"):
        reopened.reserve_dataset(_record("a", 6))
    reopened.finish_dataset(again)
    with pytest.raises(StoreError, match="already in store"):
        reopened.reserve_dataset(_record("a", 5))


def test_chunk_beyond_its_range_is_refused(tmp_path: Path) -> None:
    store = CorpusStore.create(tmp_path / "store")
    store.extend_vocabulary(["A", "B"])
    rec = store.reserve_dataset(_record("a", 2))
    indptr, indices, data = _rows(2, 2, 1.0)
    with pytest.raises(StoreError, match="beyond its reserved range"):
        store.write_chunk(rec, 1, indptr, indices, data, _obs(2, "a"))


def test_only_complete_datasets_are_read(tmp_path: Path) -> None:
    uri = tmp_path / "store"
    store = CorpusStore.create(uri)
    store.extend_vocabulary(["A", "B", "C"])
    recs = {}
    for name, n in (("a", 4), ("b", 3), ("c", 2)):
        recs[name] = store.reserve_dataset(_record(name, n))
        indptr, indices, data = _rows(n, 3, 100.0 * (recs[name].start + 1))
        store.write_chunk(recs[name], 0, indptr, indices, data, _obs(n, name))
    store.finish_dataset(recs["a"])
    store.finish_dataset(recs["c"])
    reopened = CorpusStore.open(uri)
    assert reopened.n_cells == 6
    assert reopened.complete_ranges() == [(0, 4), (7, 9)]
    obs = reopened.obs()
    assert obs["dataset_id"].tolist() == ["a"] * 4 + ["c"] * 2
    assert obs["soma_joinid"].tolist() == [0, 1, 2, 3, 7, 8]
    assert list(obs.columns) == ["soma_joinid", *OBS_COLUMNS]
    assert reopened.obs(["cell_type"], value_filter="dataset_id == 'c'")["soma_joinid"].tolist() == [7, 8]
    summary = reopened.summary()
    assert summary["incomplete_datasets"] == ["b"] and summary["cells"] == 6
    store.finish_dataset(recs["b"])
    assert CorpusStore.open(uri).complete_ranges() == [(0, 9)]


def test_rewriting_a_chunk_replaces_it(tmp_path: Path) -> None:
    """What a re-run after a kill does: the same cells written again, never duplicated."""
    uri = tmp_path / "store"
    store = CorpusStore.create(uri)
    store.extend_vocabulary(["A", "B", "C", "D"])
    rec = store.reserve_dataset(_record("a", 3))
    indptr, indices, data = _rows(3, 4, 1.0)
    store.write_chunk(rec, 0, indptr, indices, data, _obs(3, "a", "old"))
    store.write_chunk(rec, 0, indptr, indices, data + 1000, _obs(3, "a", "new"))
    content = store_matrix(uri)
    assert content.x_entries == 12
    assert np.array_equal(content.X.toarray(), (data + 1000).reshape(3, 4))
    assert len(content.obs) == 3 and set(content.obs["cell_type"]) == {"new"}


def test_iter_x_blocks(tmp_path: Path) -> None:
    store = CorpusStore.create(tmp_path / "store")
    store.extend_vocabulary(["A", "B"])
    rec = store.reserve_dataset(_record("a", 7))
    indptr, indices, data = _rows(7, 2, 1.0)
    store.write_chunk(rec, 0, indptr, indices, data, _obs(7, "a"))
    blocks = list(store.iter_x_blocks(2, 7, 3))
    assert [sorted(set(b["soma_dim_0"].to_pylist())) for b in blocks] == [[2, 3, 4], [5, 6]]
    got = {(r, c): v for b in blocks for r, c, v in zip(*(b[k].to_pylist() for k in ("soma_dim_0", "soma_dim_1", "soma_data")))}
    assert got == {(r, c): 1.0 + 10 * r + c for r in range(2, 7) for c in range(2)}


def test_vocabulary_written_but_x_not_grown_is_repaired(tmp_path: Path) -> None:
    """A run killed between writing new genes into var and growing X (and saving the registry)."""
    import pyarrow as pa

    uri = tmp_path / "store"
    CorpusStore.create(uri).extend_vocabulary(["A", "B"])
    with soma.Experiment.open(str(uri), "w") as exp:
        if exp.ms["RNA"].var.domain[0][1] < 2:  # the vocabulary's domain grows with headroom
            exp.ms["RNA"].var.change_domain([(0, 2)])
    with soma.Experiment.open(str(uri), "w") as exp:
        exp.ms["RNA"].var.write(pa.table({"soma_joinid": np.array([2]), "gene": pa.array(["C"], pa.large_string())}))
    store = CorpusStore.open(uri)
    ids, n_new = store.extend_vocabulary(["C", "A"])
    assert ids.tolist() == [2, 0] and n_new == 0
    rec = store.reserve_dataset(_record("a", 1))
    store.write_chunk(rec, 0, np.array([0, 2]), np.array([0, 2]), np.array([1.0, 3.0], np.float32), _obs(1, "a"))
    store.finish_dataset(rec)
    assert CorpusStore.open(uri).summary()["genes"] == 3
    assert store_matrix(uri).X.toarray().tolist() == [[1.0, 0.0, 3.0]]
