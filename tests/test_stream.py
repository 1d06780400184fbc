"""CellStream: sharding, shuffling, exact resume, content, bad input, S3."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from data_store.batching import PackedBatch, PaddedBatch
from data_store.store import CorpusStore, DatasetRecord
from data_store.stream import CellStream
from data_store.tokenize import N_SPECIAL, Tokenizer
from hiceller.errors import HicellerError, InputError

N_GENES = 60


def cell_genes(j: int) -> np.ndarray:
    """Genes of cell j: a window of 5 + j % 11 genes starting at j % 40; encodes the cell."""
    start = j % 40
    return np.arange(start, start + 5 + j % 11)


def build_store(path: Path, sizes=(300, 200, 101), tissues=("lung", "liver", "lung"), labeled=(True, True, False)) -> str:
    """A store whose cell j has genes cell_genes(j) with values 1..k (distinct), so every token
    tells which cell it came from."""
    store = CorpusStore.create(str(path))
    ids, _ = store.extend_vocabulary([f"G{i}" for i in range(N_GENES)])
    j0 = 0
    for d, (n, tissue, lab) in enumerate(zip(sizes, tissues, labeled)):
        rec = store.reserve_dataset(
            DatasetRecord(dataset_id=f"ds{d}", start=0, stop=n, status="writing", tissue=tissue, labeled=lab, fingerprint=f"f{d}")
        )
        indptr, indices, data = [0], [], []
        for j in range(rec.start, rec.stop):
            g = cell_genes(j)
            indices.append(ids[g])
            data.append(np.arange(1, len(g) + 1, dtype=np.float32))
            indptr.append(indptr[-1] + len(g))
        obs = pd.DataFrame(
            {
                "obs_id": [f"c{j}" for j in range(rec.start, rec.stop)],
                "cell_type": [f"type{j % 3}" if lab else "unknown" for j in range(rec.start, rec.stop)],
                "tissue": tissue,
                "disease": "normal",
                "donor_id": [f"donor{j % 4}" for j in range(rec.start, rec.stop)],
                "dataset_id": f"ds{d}",
            }
        )
        store.write_chunk(rec, 0, np.array(indptr), np.concatenate(indices), np.concatenate(data), obs)
        rec.counts = {"cell_type": obs["cell_type"].value_counts().to_dict()}
        store.finish_dataset(rec)
        j0 += n
    return str(path)


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    return build_store(tmp_path_factory.mktemp("stream") / "store")


def make(store_uri: str, **kw) -> CellStream:
    args = dict(batch_cells=8, tokenizer=Tokenizer(n_bins=51, max_genes=100, seed=0), seed=3, block_size=16, buffer_blocks=4)
    args.update(kw)
    return CellStream(store_uri, **args)


def joinids_of(batches) -> list[int]:
    return [int(j) for b in batches for j in b.joinids]


def test_tokens_encode_their_cell(store_uri):
    s = make(store_uri, world_size=1, rank=0)
    for b in list(s)[:10]:
        assert isinstance(b, PackedBatch)
        cu = b.cu_seqlens.numpy()
        assert b.cu_seqlens.dtype == torch.int32
        assert b.max_seqlen == int(np.diff(cu).max())
        for i, j in enumerate(b.joinids.tolist()):
            toks = b.gene_ids[cu[i] : cu[i + 1]].numpy()
            assert toks[0] == 1  # <cls>
            assert sorted(toks[1:] - N_SPECIAL) == list(cell_genes(j))
            vals = b.values[cu[i] : cu[i + 1]].numpy()
            # values 1..k are all distinct: bins strictly follow the value order
            order = np.argsort(toks[1:])
            assert np.all(np.diff(vals[1:][order]) > 0)


@pytest.mark.parametrize("remainder", ["drop", "wrap"])
def test_every_cell_once_per_epoch_across_ranks(store_uri, remainder):
    world = 2
    seen, counts = [], []
    for r in range(world):
        b = list(make(store_uri, world_size=world, rank=r, remainder=remainder))
        counts.append(len(b))
        seen += joinids_of(b)
    assert counts[0] == counts[1] == len(make(store_uri, world_size=world, rank=0, remainder=remainder))
    c = Counter(seen)
    if remainder == "drop":
        assert max(c.values()) == 1
        assert 601 - len(c) < world * 8 + world
    else:
        assert set(c) == set(range(601))  # every cell seen; a few twice to fill the last batches
        assert len(seen) - 601 < world * 8


@pytest.mark.slow
def test_two_ranks_two_workers_exactly_once(store_uri):
    seen, counts = [], []
    for r in range(2):
        loader = make(store_uri, world_size=2, rank=r, batch_cells=5).dataloader(num_workers=2)
        b = list(loader)
        counts.append(len(b))
        seen += joinids_of(b)
    assert counts[0] == counts[1]
    c = Counter(seen)
    assert max(c.values()) == 1 and len(c) == counts[0] * 2 * 5


def test_order_changes_per_epoch_and_repeats_per_seed(store_uri):
    a = make(store_uri, world_size=1, rank=0)
    e0 = joinids_of(a)
    a.set_epoch(1)
    e1 = joinids_of(a)
    b = make(store_uri, world_size=1, rank=0)
    assert joinids_of(b) == e0
    assert e0 != e1 and sorted(e0) != e0
    c = make(store_uri, world_size=1, rank=0, seed=4)
    assert joinids_of(c) != e0


def test_no_shuffle_is_store_order(store_uri):
    s = make(store_uri, world_size=1, rank=0, shuffle=False, seed=None)
    assert joinids_of(s) == list(range(len(s) * 8))


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_yields_exactly_the_next_batches(store_uri, workers):
    full = make(store_uri, world_size=2, rank=1)
    full.set_epoch(2)
    ref = list(full.dataloader(num_workers=workers))
    s = make(store_uri, world_size=2, rank=1)
    s.set_epoch(2)
    loader = s.dataloader(num_workers=workers)
    it = iter(loader)
    first = [next(it) for _ in range(7)]
    state = loader.state_dict()
    assert state["position"] == 7 and state["epoch"] == 2
    del it
    fresh = make(store_uri, world_size=2, rank=1)
    fresh_loader = fresh.dataloader(num_workers=workers)
    fresh_loader.load_state_dict(state)
    rest = list(fresh_loader)
    assert joinids_of(first) == joinids_of(ref[:7])
    assert joinids_of(rest) == joinids_of(ref[7:])
    for x, y in zip(rest, ref[7:]):
        assert torch.equal(x.gene_ids, y.gene_ids) and torch.equal(x.values, y.values)


def test_state_from_other_world_size_or_store_refused(store_uri, tmp_path):
    s = make(store_uri, world_size=2, rank=0)
    state = s.state_dict()
    with pytest.raises(HicellerError, match="world size"):
        make(store_uri, world_size=1, rank=0).load_state_dict(state)
    other = build_store(tmp_path / "other", sizes=(300, 200, 102))
    with pytest.raises(HicellerError, match="store selection"):
        make(other, world_size=2, rank=0).load_state_dict(state)


def test_filters_and_labels(store_uri):
    s = make(store_uri, world_size=1, rank=0, obs_filter='tissue == "liver"', labels=True)
    assert s.n_cells == 200 and s.label_names == ["type0", "type1", "type2"]
    for b in s:
        assert all(300 <= j < 500 for j in b.joinids.tolist())
        assert all(int(l) == j % 3 for l, j in zip(b.labels, b.joinids))
    s = make(store_uri, world_size=1, rank=0, datasets=["ds0"], exclude_donors=["donor0"])
    assert s.n_cells == 225
    s = make(store_uri, world_size=1, rank=0, labels=True, shuffle=False, seed=None)
    assert all(int(l) == -100 for b in s for l, j in zip(b.labels, b.joinids) if j >= 500)  # unlabeled dataset
    with pytest.raises(InputError, match="no selected dataset is labeled"):
        make(store_uri, world_size=1, rank=0, labels=True, datasets=["ds2"])


def test_bad_input(store_uri):
    with pytest.raises(InputError, match="tissue == \"brain\""):
        make(store_uri, obs_filter='tissue == "brain"', world_size=1, rank=0)
    with pytest.raises(InputError, match="seed"):
        make(store_uri, seed=None, world_size=1, rank=0)
    with pytest.raises(ValueError, match="max_genes"):
        Tokenizer(max_genes=0)
    with pytest.raises(InputError, match="cannot be used"):
        make(store_uri, obs_filter="tissue === lung", world_size=1, rank=0)


def test_padded_layout_matches_packed(store_uri):
    from data_store.batching import from_padded

    packed = list(make(store_uri, world_size=1, rank=0))
    padded = list(make(store_uri, world_size=1, rank=0, layout="padded"))
    assert isinstance(padded[0], PaddedBatch)
    for p, q in zip(packed, padded):
        back = from_padded(q)
        assert torch.equal(back.gene_ids, p.gene_ids) and torch.equal(back.cu_seqlens, p.cu_seqlens)


def test_memory_formula_window_size(store_uri):
    s = make(store_uri, world_size=1, rank=0, block_size=16, buffer_blocks=4)
    lay = s.layout_for(num_workers=1)
    assert lay.window_batches * 8 <= 64
    lay2 = s.layout_for(num_workers=2)
    assert lay2.window_batches * 8 <= 32  # the buffer is shared by the workers, not multiplied


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_s3_store_streams_same_cells(store_uri, tmp_path, monkeypatch):
    pytest.importorskip("moto")

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "HICELLER_S3_ENDPOINT": f"http://127.0.0.1:{port}",
        }
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        import boto3

        boto3.client("s3", endpoint_url=env["HICELLER_S3_ENDPOINT"], region_name="us-east-1").create_bucket(Bucket="cells")
        uri = build_store("s3://cells/store")
        local = build_store(tmp_path / "local")
        a = [(b.joinids.tolist(), b.gene_ids.tolist()) for b in make(uri, world_size=1, rank=0)]
        b = [(b.joinids.tolist(), b.gene_ids.tolist()) for b in make(local, world_size=1, rank=0)]
        assert a == b and len(a) > 10
    finally:
        proc.terminate()
        proc.wait(10)


def test_gene_map_translates_store_genes_to_the_model_vocabulary(store_uri):
    """A model with another vocabulary sees store gene g as gene_map[g]; -1 drops the gene."""
    gene_map = np.full(N_GENES, -1, dtype=np.int64)
    gene_map[::2] = np.arange(0, N_GENES, 2)[::-1]  # even genes kept, in reversed ids
    plain = list(make(store_uri, world_size=1, rank=0))
    mapped = list(make(store_uri, world_size=1, rank=0, gene_map=gene_map))
    for p, m in zip(plain, mapped):
        assert p.joinids.tolist() == m.joinids.tolist()
        cu = m.cu_seqlens.numpy()
        for i, j in enumerate(m.joinids.tolist()):
            got = sorted(m.gene_ids[cu[i] + 1 : cu[i + 1]].numpy() - N_SPECIAL)
            want = sorted(gene_map[g] for g in cell_genes(j) if gene_map[g] >= 0)
            assert got == want


def test_whole_store_fingerprint_is_its_ranges_and_old_states_still_resume(store_uri):
    """A whole-store selection is fingerprinted by its ranges (no hash of every joinid at start-up);
    a loader state saved when the fingerprint hashed every joinid still loads."""
    from data_store.stream import _legacy_fingerprint

    s = make(store_uri, world_size=2, rank=1)
    assert s._selection.is_ranges
    state = {**s.state_dict(), "position": 3, "fingerprint": _legacy_fingerprint(CorpusStore.open(store_uri), s._selection)}
    assert state["fingerprint"] != s.fingerprint
    fresh = make(store_uri, world_size=2, rank=1)
    fresh.load_state_dict(state)
    assert joinids_of(fresh) == joinids_of(list(make(store_uri, world_size=2, rank=1))[3:])
    filtered = make(store_uri, world_size=2, rank=1, datasets=["ds0", "ds1", "ds2"])  # the same cells, as an array
    assert not filtered._selection.is_ranges and filtered.fingerprint == state["fingerprint"]
    with pytest.raises(HicellerError, match="store selection"):
        make(store_uri, world_size=2, rank=1).load_state_dict({**state, "fingerprint": "0" * 16})


def test_expression_batches_carry_log1p_per_10k_over_every_stored_gene(store_uri):
    """``expression=True``: each token also carries log1p(value / cell total * 1e4), the total taken
    over all the cell's stored genes, also those gene_map drops; tokens and bins are unchanged."""
    gene_map = np.full(N_GENES, -1, dtype=np.int64)
    gene_map[::2] = np.arange(0, N_GENES, 2)
    plain = list(make(store_uri, world_size=1, rank=0, gene_map=gene_map))
    expr = list(make(store_uri, world_size=1, rank=0, gene_map=gene_map, expression=True))
    assert plain and all(p.expr is None for p in plain)
    for p, e in zip(plain, expr):
        assert torch.equal(p.gene_ids, e.gene_ids) and torch.equal(p.values, e.values)
        cu = e.cu_seqlens.numpy()
        for i, j in enumerate(e.joinids.tolist()):
            genes = cell_genes(j)
            raw = np.arange(1, len(genes) + 1, dtype=np.float64)  # build_store's values
            want = dict(zip(genes.tolist(), np.log1p(raw / raw.sum() * 1e4)))
            toks = e.gene_ids[cu[i] + 1 : cu[i + 1]].numpy() - N_SPECIAL
            assert e.expr[cu[i]] == 0  # <cls>
            np.testing.assert_allclose(e.expr[cu[i] + 1 : cu[i + 1]].numpy(), [want[g] for g in toks], rtol=1e-6)


def _take(stream: CellStream, n: int, workers: int = 0) -> list[int]:
    it = iter(stream.dataloader(num_workers=workers))
    return joinids_of(next(it) for _ in range(n))


@pytest.mark.parametrize("old, new, taken, workers", [
    (2, 3, 5, 0), (3, 2, 4, 0), (2, 1, 0, 0), (3, 2, 7, 0), pytest.param(1, 2, 9, 2, marks=pytest.mark.slow),
])
def test_epoch_continues_on_another_world(store_uri, old, new, taken, workers):
    """A run on ``old`` streams takes ``taken`` batches each; ``new`` streams finish the epoch with the
    cells they left: across the epoch no cell twice, and none left out but the drop remainder (fewer
    than ``new`` batches' worth)."""
    seen = []
    states = []
    for r in range(old):
        s = make(store_uri, rank=r, world_size=old)
        seen += _take(s, taken, workers)
        states.append(s.state_dict())
    rest = []
    for r in range(new):
        s = make(store_uri, rank=r, world_size=new)
        s.load_epoch_state(states)
        got = joinids_of(s.dataloader())
        assert len(got) == len(s) * 8
        rest.append(got)
        assert s.state_dict()["history"][-1]["positions"] == [taken] * old
    assert max(map(len, rest)) == min(map(len, rest))  # every new rank the same number of batches
    both = seen + [j for part in rest for j in part]
    assert len(both) == len(set(both))  # no cell twice
    left_out = 601 - len(both)
    assert 0 <= left_out < new * 8, left_out


def test_resumed_epoch_state_resumes_exactly_and_next_epoch_is_plain(store_uri):
    """A state saved inside an epoch resumed on another world resumes on that world exactly; the
    next epoch is the new world's ordinary layout."""
    states = []
    for r in range(2):
        s = make(store_uri, rank=r, world_size=2)
        _take(s, 3)
        states.append(s.state_dict())
    a = make(store_uri, rank=1, world_size=3)
    a.load_epoch_state(states)
    it = iter(a.dataloader())
    first = [next(it) for _ in range(2)]
    saved = a.state_dict()
    want = joinids_of(it)
    b = make(store_uri, rank=1, world_size=3)
    b.load_state_dict(saved)
    assert joinids_of(b.dataloader()) == want
    assert len(first) == 2
    b.set_epoch(1)
    plain = make(store_uri, rank=1, world_size=3)
    plain.set_epoch(1)
    assert joinids_of(b.dataloader()) == joinids_of(plain.dataloader())
    with pytest.raises(HicellerError, match="one world"):
        make(store_uri, rank=0, world_size=3).load_epoch_state(states[::-1])


def test_epoch_moved_twice_still_sees_every_cell_once(store_uri):
    """2 streams -> 3 -> 1 within one epoch (two resumes on other worlds before it ends)."""
    seen, states = [], []
    for r in range(2):
        s = make(store_uri, rank=r, world_size=2)
        seen += _take(s, 4)
        states.append(s.state_dict())
    mid = []
    for r in range(3):
        s = make(store_uri, rank=r, world_size=3)
        s.load_epoch_state(states)
        seen += _take(s, 5)
        mid.append(s.state_dict())
    assert [len(st["history"]) for st in mid] == [1, 1, 1]
    last = make(store_uri, rank=0, world_size=1)
    last.load_epoch_state(mid)
    seen += joinids_of(last.dataloader())
    assert len(seen) == len(set(seen))
    assert 0 <= 601 - len(seen) < 8
