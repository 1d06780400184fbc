"""Packing, token-budget batching and the padded layout against per-cell references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_store.batching import (
    IGNORE_LABEL,
    UNKNOWN_JOINID,
    PackedBatch,
    PaddedBatch,
    collate_packed,
    from_padded,
    iter_token_budget_batches,
    pack,
    to_padded,
)
from data_store.tokenize import CLS_ID, PAD_ID, PAD_VALUE, TokenizedCells, Tokenizer


def encoded_cells(n_cells: int, seed: int = 0, max_len: int = 40) -> TokenizedCells:
    """Cells whose token ``j`` of cell ``i`` is ``1000 * i + j + 2`` (``<cls>`` at j = 0).

    Every token names its (cell, position), so a misplaced token cannot go unnoticed. Some
    cells are ``<cls>`` only, one is much longer than the rest.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len, n_cells)
    lengths[::7] = 1
    if n_cells > 3:
        lengths[3] = 3 * max_len
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    cell = np.repeat(np.arange(n_cells), lengths)
    pos = np.arange(offsets[-1]) - offsets[cell]
    gene_ids = np.where(pos == 0, CLS_ID, 1000 * cell + pos + 2).astype(np.int32)
    values = np.where(pos == 0, 0, (cell + pos) % 50 + 1).astype(np.int16)
    return TokenizedCells(gene_ids, values, offsets, n_cells)


def assert_same_batch(a: PackedBatch, b: PackedBatch) -> None:
    for name in ("gene_ids", "values", "cu_seqlens", "labels", "joinids"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert torch.equal(x, y), name
    assert a.max_seqlen == b.max_seqlen


@pytest.fixture
def cells() -> TokenizedCells:
    return encoded_cells(50)


def test_pack_layout_and_dtypes(cells: TokenizedCells) -> None:
    labels, joinids = np.arange(50) % 4, np.arange(50) * 10 + 7
    p = pack(cells, labels, joinids)
    assert p.gene_ids.dtype == torch.long and p.values.dtype == torch.long
    assert p.cu_seqlens.dtype == torch.int32 and p.labels.dtype == torch.long and p.joinids.dtype == torch.long
    np.testing.assert_array_equal(p.cu_seqlens.numpy(), cells.offsets)
    np.testing.assert_array_equal(p.gene_ids.numpy(), cells.gene_ids)
    np.testing.assert_array_equal(p.values.numpy(), cells.values)
    assert p.max_seqlen == int(cells.lengths.max()) == 120
    assert p.n_cells == 50 and p.n_tokens == cells.n_tokens
    np.testing.assert_array_equal(p.labels.numpy(), labels)
    np.testing.assert_array_equal(p.joinids.numpy(), joinids)
    bare = pack(cells)
    assert (bare.labels == IGNORE_LABEL).all() and (bare.joinids == UNKNOWN_JOINID).all()
    with pytest.raises(ValueError, match="labels"):
        pack(cells, labels[:-1])


def reference_padded(cells: TokenizedCells, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    genes = np.full((cells.n_cells, width), PAD_ID)
    values = np.full((cells.n_cells, width), PAD_VALUE)
    mask = np.ones((cells.n_cells, width), bool)
    for i in range(cells.n_cells):
        g, v = cells.cell(i)
        genes[i, : g.size], values[i, : g.size], mask[i, : g.size] = g, v, False
    return genes, values, mask


@pytest.mark.parametrize("multiple", [1, 8, 7])
def test_to_padded_matches_per_cell_reference_and_round_trips(cells: TokenizedCells, multiple: int) -> None:
    p = pack(cells, np.arange(50), np.arange(50) + 100)
    padded = to_padded(p, pad_to_multiple_of=multiple)
    width = padded.gene_ids.shape[1]
    assert width % multiple == 0 and p.max_seqlen <= width < p.max_seqlen + multiple
    genes, values, mask = reference_padded(cells, width)
    np.testing.assert_array_equal(padded.gene_ids.numpy(), genes)
    np.testing.assert_array_equal(padded.values.numpy(), values)
    np.testing.assert_array_equal(padded.padding_mask.numpy(), mask)
    assert padded.padding_mask.dtype == torch.bool and padded.gene_ids.dtype == torch.long
    assert torch.equal(padded.labels, p.labels) and torch.equal(padded.joinids, p.joinids)
    assert_same_batch(from_padded(padded), p)


def test_round_trip_of_real_tokens() -> None:
    rng = np.random.default_rng(1)
    dense = rng.poisson(0.3, (30, 200)) * (rng.random((30, 1)) < 0.9)
    rows, genes = np.nonzero(dense)
    tk = Tokenizer(max_genes=64)
    cells = tk.tokenize(rows, genes, dense[rows, genes], 30, cell_keys=np.arange(30))
    p = pack(cells)
    assert_same_batch(from_padded(to_padded(p, 16)), p)


def test_from_padded_rejects_tokens_after_padding(cells: TokenizedCells) -> None:
    padded = to_padded(pack(cells))
    holes = padded.padding_mask.clone()
    holes[3, 1] = True  # cell 3 is the long one: a pad inside its tokens
    with pytest.raises(ValueError, match="left-aligned"):
        from_padded(PaddedBatch(padded.gene_ids, padded.values, holes, padded.labels, padded.joinids))


@pytest.mark.parametrize("budget", [1, 45, 120, 200, 10**6])
def test_token_budget_batches(cells: TokenizedCells, budget: int) -> None:
    labels, joinids = np.arange(50) % 3, np.arange(50) + 500
    batches = list(iter_token_budget_batches(cells, budget, labels, joinids))
    lengths = cells.lengths
    start = 0
    for b in batches:
        seq = b.seqlens.numpy()
        np.testing.assert_array_equal(seq, lengths[start : start + b.n_cells])  # in order, none lost
        assert b.n_tokens <= budget or b.n_cells == 1
        assert b.max_seqlen == int(seq.max())
        if start + b.n_cells < cells.n_cells:  # greedy: the next cell would have overflowed
            assert b.n_tokens + lengths[start + b.n_cells] > budget
        np.testing.assert_array_equal(b.labels.numpy(), labels[start : start + b.n_cells])
        np.testing.assert_array_equal(b.joinids.numpy(), joinids[start : start + b.n_cells])
        start += b.n_cells
    assert start == cells.n_cells
    assert_same_batch(collate_packed(batches), pack(cells, labels, joinids))
    if budget == 1:
        assert len(batches) == cells.n_cells
    with pytest.raises(ValueError, match="token_budget"):
        next(iter_token_budget_batches(cells, 0))


def test_collate_packed_fixes_offsets(cells: TokenizedCells) -> None:
    whole = pack(cells, np.arange(50), np.arange(50))
    parts = [pack(cells.select(slice(a, b)), np.arange(a, b), np.arange(a, b)) for a, b in [(0, 5), (5, 5), (5, 50)]]
    merged = collate_packed(parts)
    assert_same_batch(merged, whole)
    assert merged.cu_seqlens.dtype == torch.int32
    with pytest.raises(ValueError):
        collate_packed([])


def test_empty_batch() -> None:
    empty = TokenizedCells.concat([])
    p = pack(empty)
    assert p.n_cells == 0 and p.n_tokens == 0 and p.max_seqlen == 0
    padded = to_padded(p, 8)
    assert padded.gene_ids.shape == (0, 0)
    assert_same_batch(from_padded(padded), p)


def test_to_device_keeps_content(cells: TokenizedCells) -> None:
    p = pack(cells, np.arange(50))
    moved = p.to("cpu")
    assert isinstance(moved, PackedBatch)
    assert_same_batch(moved, p)
    padded = to_padded(p).to(torch.device("cpu"))
    assert isinstance(padded, PaddedBatch) and torch.equal(padded.gene_ids, to_padded(p).gene_ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and CUDA copies need a GPU")
def test_pin_memory_and_cuda_round_trip(cells: TokenizedCells) -> None:
    p = pack(cells, np.arange(50))
    pinned = p.pin_memory()
    assert all(t.is_pinned() for t in (pinned.gene_ids, pinned.values, pinned.cu_seqlens, pinned.labels))
    on_gpu = pinned.to("cuda", non_blocking=True)
    assert on_gpu.gene_ids.is_cuda and on_gpu.cu_seqlens.dtype == torch.int32
    padded = to_padded(on_gpu, 8)
    assert padded.gene_ids.is_cuda
    assert_same_batch(from_padded(padded).to("cpu"), p)
