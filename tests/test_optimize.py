"""`hiceller store optimize`: fragments merged with every cell kept, a CellStream that has the store
open reads on through it, a killed optimize is finished by running it again, and an ingest that
wrote many fragments optimizes what it wrote."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tiledbsoma as soma
import torch

from _fixtures import REPO_ROOT, count_value, gene_names, make_h5ad, run_hiceller, store_matrix
from data_store.ingest import IngestOptions, ingest_files
from data_store.optimize import count_files, optimize_store, store_arrays
from data_store.store import CorpusStore
from data_store.stream import CellStream
from data_store.tokenize import Tokenizer


def _fragmented_store(tmp: Path, n_ingests: int = 12, cells: int = 40) -> Path:
    """A store written by ``n_ingests`` separate ingests: several fragments in every array."""
    uri = tmp / "store"
    for i in range(n_ingests):
        p = tmp / f"part{i}.h5ad"
        make_h5ad(p, cells, gene_names(30, start=i), count_value, density=0.4, seed=i, cell_prefix=f"p{i}-", extra_obs={"depth": np.arange(cells)})
        ingest_files(str(uri), [p], IngestOptions(chunk_nnz=150))
    return uri


def _fragments(uri: Path) -> dict[str, int]:
    """Fragments per array, by its path inside the store."""
    return {a.removeprefix("file://").removeprefix(str(uri)): count_files(a)["fragments"] for a in store_arrays(str(uri))}  # type: ignore[index]


def _content(uri: Path) -> tuple:
    c = store_matrix(uri)
    return c.obs.to_dict("list"), c.vocab, c.X.toarray().tolist(), c.x_entries


@pytest.fixture(scope="module")
def fragmented(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fragmented_store(tmp_path_factory.mktemp("frag"))


def test_optimize_merges_fragments_and_keeps_every_cell(fragmented: Path, tmp_path: Path) -> None:
    uri = tmp_path / "store"
    import shutil

    shutil.copytree(fragmented, uri)
    before, content = _fragments(uri), _content(uri)
    assert before["/ms/RNA/X/data"] > 12 and before["/obs"] > 12 and before["/datasets"] >= 24
    r = run_hiceller("store", "optimize", "--store", uri, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    after = _fragments(uri)
    assert set(after.values()) == {1}, after
    assert report["fragments_before"] == sum(before.values()) and report["fragments_after"] == len(after)
    assert _content(uri) == content
    s = CorpusStore.open(uri)
    assert s.summary()["cells"] == 12 * 40 and s.extra_obs("part3")["depth"].tolist() == list(range(40))
    again = run_hiceller("store", "optimize", "--store", uri)  # nothing left to do: still fine
    assert again.returncode == 0 and f"fragments {len(after)} -> {len(after)}" in again.stdout, again.stdout


def _batches(stream: CellStream) -> list[tuple[list[int], list[int]]]:
    return [(b.joinids.tolist(), b.gene_ids.tolist()) for b in stream]


def test_a_reader_with_the_store_open_reads_through_optimize(fragmented: Path, tmp_path: Path) -> None:
    import shutil

    uri = tmp_path / "store"
    shutil.copytree(fragmented, uri)

    def stream() -> CellStream:
        # 2 cells per window read: the stream keeps reading X after optimize vacuumed its fragments.
        return CellStream(str(uri), batch_cells=8, tokenizer=Tokenizer(max_genes=50, seed=0), seed=1, block_size=4, buffer_blocks=4, world_size=1, rank=0)

    reference = _batches(stream())
    plain = soma.SparseNDArray.open(str(uri / "ms" / "RNA" / "X" / "data"))  # any SOMA reader opened before
    it = iter(stream())
    first = [next(it) for _ in range(5)]
    optimize_store(str(uri))
    rest = list(it)
    got = [(b.joinids.tolist(), b.gene_ids.tolist()) for b in first + rest]
    assert got == reference
    with pytest.raises(soma.SOMAError, match="No such file|Cannot get file size"):
        plain.read().tables().concat()  # what a reader that does not reopen meets: the hazard is real
    plain.close()
    assert set(_fragments(uri).values()) == {1}


def _kill_when(uri: Path, proc: subprocess.Popen, done: str) -> None:
    """SIGKILL ``proc`` once the array ``done`` is down to one fragment and the optimize runs on."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if _fragments(uri)[done] == 1:
                break
        except (FileNotFoundError, KeyError):
            pass
        time.sleep(0.002)
    assert proc.poll() is None, "optimize finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.parametrize("done", ["/datasets", "/ms/RNA/X/data"])
def test_killed_optimize_is_finished_by_running_it_again(fragmented: Path, tmp_path: Path, done: str) -> None:
    import shutil

    uri = tmp_path / "store"
    shutil.copytree(fragmented, uri)
    content = _content(uri)
    proc = subprocess.Popen([sys.executable, "-m", "hiceller", "store", "optimize", "--store", str(uri)], cwd=REPO_ROOT)
    _kill_when(uri, proc, done)
    assert _content(uri) == content, "a killed optimize changed what the store holds"
    assert max(_fragments(uri).values()) > 1, "nothing was left to do"
    r = run_hiceller("store", "optimize", "--store", uri, "--orphans-older-than", "0")
    assert r.returncode == 0, r.stderr
    assert _content(uri) == content
    assert set(_fragments(uri).values()) == {1}, _fragments(uri)  # uncommitted leftovers removed too


def test_an_ingest_of_many_fragments_optimizes_what_it_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import data_store.ingest as ingest

    monkeypatch.setattr(ingest, "AUTO_OPTIMIZE_FRAGMENTS", 8)
    files = []
    for i in range(10):
        p = tmp_path / f"f{i}.h5ad"
        make_h5ad(p, 20, gene_names(30), count_value, density=0.5, seed=i, cell_prefix=f"f{i}-")
        files.append(p)
    uri, raw = tmp_path / "store", tmp_path / "raw"
    result = ingest.ingest_sources(str(uri), [(f, IngestOptions(chunk_nnz=200)) for f in files])  # a fragment per file
    assert result.optimized is not None and result.optimized["fragments_after"] < result.optimized["fragments_before"]
    assert _fragments(uri)["/ms/RNA/X/data"] == 1 and _fragments(uri)["/obs"] == 1
    assert CorpusStore.open(uri).summary()["cells"] == 200
    result = ingest.ingest_sources(str(raw), [(f, IngestOptions(chunk_nnz=200, optimize=False)) for f in files])
    assert result.optimized is None and _fragments(raw)["/ms/RNA/X/data"] == 10
    assert _content(raw)[1:] == _content(uri)[1:]
    # Optimizing what was written since a time (what the automatic optimize does) merges only that.
    since = int(time.time() * 1000) - 1
    for name in ("g", "h"):
        make_h5ad(tmp_path / f"{name}.h5ad", 20, gene_names(30), count_value, seed=ord(name))
        ingest.ingest_sources(str(raw), [(tmp_path / f"{name}.h5ad", IngestOptions(chunk_nnz=200, optimize=False))])
    assert _fragments(raw)["/ms/RNA/X/data"] == 12
    optimize_store(str(raw), since_ms=since)
    assert _fragments(raw)["/ms/RNA/X/data"] == 11
