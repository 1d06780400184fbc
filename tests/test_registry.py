"""The dataset registry: a write costs the same at 2,000 datasets as at 1, a bulk ingest killed
half way is finished by running it again (every cell once), format-1 stores open, read and migrate,
and any SOMA client reads the registry."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tiledbsoma as soma

from _fixtures import REPO_ROOT, count_value, gene_names, make_h5ad, run_hiceller, source_matrix, store_matrix
from _legacy import LEGACY_STORE, legacy_sources
from data_store.ingest import IngestOptions, ingest_files
from data_store.registry import FORMAT_VERSION, LEGACY_FORMAT
from data_store.store import CorpusStore, DatasetRecord


def _bytes_under(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}


def _written(before: dict[str, int], after: dict[str, int]) -> int:
    """Bytes of files that are new or changed."""
    return sum(size for name, size in after.items() if before.get(name) != size)


def _add_one(store: CorpusStore, name: str) -> None:
    rec = store.reserve_dataset(DatasetRecord(dataset_id=name, start=0, stop=10, status="writing", fingerprint=name))
    store.finish_dataset(rec)


def test_a_registry_write_costs_the_same_at_2000_datasets(tmp_path: Path) -> None:
    uri = tmp_path / "store"
    store = CorpusStore.create(uri)
    _add_one(store, "first")
    registry, meta = uri / "datasets", uri / "__meta"
    before, meta_files = _bytes_under(registry), len(os.listdir(meta))
    _add_one(store, "second")
    at_two = _written(before, _bytes_under(registry))
    # 2,000 datasets more, reserved and completed in bulk (two registry writes).
    recs = store.reserve_datasets([DatasetRecord(dataset_id=f"d{i}", start=0, stop=10, status="writing", fingerprint="f") for i in range(2000)])
    store.finish_datasets(recs)
    before = _bytes_under(registry)
    _add_one(store, "last")
    at_2002 = _written(before, _bytes_under(registry))
    assert at_2002 <= 1.2 * at_two + 512, (at_two, at_2002)  # O(1): the row, not the registry
    assert len(os.listdir(meta)) == meta_files, "a dataset rewrote the experiment metadata"
    reopened = CorpusStore.open(uri)
    assert len(reopened.datasets) == 2003 and reopened.n_cells == 2003 * 10 and reopened.next_joinid == 20030
    assert reopened.record("last").start == 20020 and reopened.record("last").status == "complete"


def test_any_soma_client_reads_the_registry(tmp_path: Path) -> None:
    make_h5ad(tmp_path / "a.h5ad", 12, gene_names(5), count_value)
    ingest_files(str(tmp_path / "s"), [tmp_path / "a.h5ad"], IngestOptions(tissue="lung"))
    with soma.Experiment.open(str(tmp_path / "s")) as exp:
        rows = exp["datasets"].read().concat().to_pandas()
        assert json.loads(exp.metadata["hiceller"]) == {"format": FORMAT_VERSION, "registry": "datasets"}
    assert rows[["dataset_id", "start", "stop", "status", "tissue"]].values.tolist() == [["a", 0, 12, "complete", "lung"]]
    assert json.loads(rows["counts"][0])["cell_type"] == {"T": 4, "B": 4, "NK": 4}


# ----------------------------------------------------------------------------- killed bulk ingest
def _many_files(tmp: Path, n_files: int, cells: int) -> tuple[list[Path], Path]:
    files = []
    for i in range(n_files):
        p = tmp / f"f{i:03d}.h5ad"
        make_h5ad(p, cells, gene_names(40, start=i % 7), count_value, density=0.3, seed=i, cell_prefix=f"f{i}-")
        files.append(p)
    manifest = tmp / "files.tsv"
    manifest.write_text("path\ttissue\n" + "".join(f"{p.name}\ttissue{i % 3}\n" for i, p in enumerate(files)))
    return files, manifest


def test_bulk_ingest_killed_half_way_is_finished_by_rerunning(tmp_path: Path) -> None:
    files, manifest = _many_files(tmp_path, 140, 30)  # 64 files per batch: 3 batches
    uri = tmp_path / "store"
    cmd = [sys.executable, "-m", "hiceller", "ingest", "--no-progress", "--no-optimize", "--chunk-nnz", "2000", "--store", str(uri), "--manifest", str(manifest)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed, deadline = False, time.monotonic() + 180
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                status = {r.status for r in CorpusStore.open(uri).datasets.values()}
            except Exception:  # not created yet
                status = set()
            if status == {"complete", "writing"}:  # some batches done, one half written
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and not killed:
            proc.kill()
        proc.wait(timeout=30)
    assert killed and proc.returncode == -signal.SIGKILL, "the ingest finished before it could be killed"

    half = CorpusStore.open(uri).summary()
    assert 0 < half["cells"] < 140 * 30 and half["incomplete_datasets"]
    assert len(CorpusStore.open(uri).obs()) == half["cells"], "cells of unfinished datasets are visible"

    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"skipped {half['datasets']} dataset(s) already in the store" in r.stdout
    store = CorpusStore.open(uri)
    assert store.summary()["cells"] == 140 * 30 and store.summary()["incomplete_datasets"] == []
    assert store.next_joinid == 140 * 30, "the re-run reserved a second range"
    content = store_matrix(uri)
    assert content.obs["soma_joinid"].tolist() == list(range(140 * 30)) and content.obs["obs_id"].is_unique
    for f in files[::37]:
        rec = store.record(f.stem)
        names, expected = source_matrix(f, content.vocab)
        assert content.obs["obs_id"][rec.start : rec.stop].tolist() == names
        assert (content.X[rec.start : rec.stop] != expected).nnz == 0, f.name
    assert content.x_entries == sum(source_matrix(f, content.vocab)[1].nnz for f in files)


# ----------------------------------------------------------------------------- format 1
def test_format1_store_opens_reads_and_streams(tmp_path: Path) -> None:
    uri = tmp_path / "old"
    shutil.copytree(LEGACY_STORE, uri)
    a, b, _c = legacy_sources(tmp_path)
    store = CorpusStore.open(uri)
    assert store.format == LEGACY_FORMAT
    summary = store.summary()
    assert (summary["cells"], summary["datasets"], summary["incomplete_datasets"], summary["genes"]) == (50, 2, ["c"], 18)
    content = store_matrix(uri)
    for f in (a, b):
        rec = store.record(f.stem)
        names, expected = source_matrix(f, content.vocab)
        assert store.obs()["obs_id"][rec.start : rec.stop].tolist() == names
        assert (content.X[rec.start : rec.stop] != expected).nnz == 0
    assert store.extra_obs("a")["n_counts"].tolist() == list(range(30))
    from data_store.stream import CellStream
    from data_store.tokenize import Tokenizer

    stream = CellStream(str(uri), batch_cells=10, tokenizer=Tokenizer(max_genes=20, seed=0), seed=0, world_size=1, rank=0)
    assert sorted(int(j) for batch in stream for j in batch.joinids) == list(range(50))
    assert CorpusStore.open(uri).format == LEGACY_FORMAT, "reading wrote to the store"


def test_format1_store_migrates_on_its_next_ingest(tmp_path: Path) -> None:
    uri = tmp_path / "old"
    shutil.copytree(LEGACY_STORE, uri)
    assert len(os.listdir(uri / "__meta")) > 1  # one copy of the JSON registry per write
    make_h5ad(tmp_path / "d.h5ad", 7, gene_names(9, start=10), count_value, seed=4)
    r = run_hiceller("ingest", "--no-progress", "--store", uri, tmp_path / "d.h5ad")
    assert r.returncode == 0, r.stderr
    store = CorpusStore.open(uri)
    assert store.format == FORMAT_VERSION
    d, c = store.record("d"), store.record("c")
    assert (c.status, c.start, c.stop) == ("writing", 50, 60), "the unfinished dataset lost its range"
    assert (d.start, d.stop) == (60, 67) and store.summary()["cells"] == 57
    assert store.extra_obs("a")["n_counts"].tolist() == list(range(30))
    with soma.Experiment.open(str(uri)) as exp:
        assert sorted(exp["datasets"].read().concat()["dataset_id"].to_pylist()) == ["a", "b", "c", "d"]
    assert len(os.listdir(uri / "__meta")) == 1, "the old registry copies were not consolidated"
    names, expected = source_matrix(tmp_path / "d.h5ad", store_matrix(uri).vocab)
    assert (store_matrix(uri).X[60:67] != expected).nnz == 0


def test_datasets_with_the_same_other_columns_share_one_extra_obs_dataframe(tmp_path: Path) -> None:
    """A DataFrame per dataset would grow the extra_obs group (read at every addition) per dataset."""
    uri = tmp_path / "s"
    for i in range(3):  # three separate ingests, same columns
        make_h5ad(tmp_path / f"a{i}.h5ad", 5, gene_names(4), count_value, seed=i, cell_prefix=f"a{i}-", extra_obs={"depth": np.arange(5) + 10 * i})
        ingest_files(str(uri), [tmp_path / f"a{i}.h5ad"], IngestOptions())
    make_h5ad(tmp_path / "b.h5ad", 4, gene_names(4), count_value, extra_obs={"site": list("xyzw")})
    make_h5ad(tmp_path / "c.h5ad", 3, gene_names(4), count_value)  # no other columns
    ingest_files(str(uri), [tmp_path / "b.h5ad", tmp_path / "c.h5ad"], IngestOptions())
    with soma.Experiment.open(str(uri)) as exp:
        assert sorted(exp["extra_obs"].keys()) == ["a0", "b"]
    store = CorpusStore.open(uri)
    assert [store.record(f"a{i}").extra_obs for i in range(3)] == ["a0"] * 3
    for i in range(3):
        got = store.extra_obs(f"a{i}")
        assert got["depth"].tolist() == list(range(10 * i, 10 * i + 5))
        assert got["soma_joinid"].tolist() == list(range(store.record(f"a{i}").start, store.record(f"a{i}").stop))
    assert store.extra_obs("b")["site"].tolist() == list("xyzw")
    assert list(store.extra_obs("c").columns) == ["soma_joinid"]
