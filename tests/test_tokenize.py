"""Tokenizer against a slow per-cell reference, plus the properties the stream relies on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from data_store.tokenize import (
    CLS_ID,
    MASK_VALUE,
    N_SPECIAL,
    TokenizedCells,
    Tokenizer,
    log1p_normalize,
    sampling_priority,
)


@dataclass
class Block:
    """A COO block plus the dense matrix it came from (for the per-cell reference)."""

    rows: npt.NDArray[np.int64]
    genes: npt.NDArray[np.int64]
    values: npt.NDArray[np.float32]
    dense: npt.NDArray[np.float32]
    keys: npt.NDArray[np.int64]

    @property
    def n_cells(self) -> int:
        return self.dense.shape[0]


def coo_block(dense: npt.NDArray[np.floating], keys: npt.NDArray[np.int64], rng: np.random.Generator) -> Block:
    """COO of ``dense``'s non-zeros in a random order, as the SOMA reader may deliver it."""
    rows, genes = np.nonzero(dense)
    perm = rng.permutation(rows.size)
    rows, genes = rows[perm].astype(np.int64), genes[perm].astype(np.int64)
    return Block(rows, genes, dense[rows, genes].astype(np.float32), dense.astype(np.float32), keys)


def random_counts(rng: np.random.Generator, n_cells: int, n_genes: int) -> npt.NDArray[np.float32]:
    """NB-like integer counts with per-cell depth, so cells have many ties and very different nnz.

    Includes an all-zero cell, a single-non-zero cell and a cell where every non-zero is 1.
    """
    depth = rng.lognormal(mean=0.0, sigma=1.0, size=(n_cells, 1))
    gene_rate = rng.gamma(0.3, 1.0, size=(1, n_genes))
    counts = rng.poisson(rng.gamma(2.0, depth * gene_rate / 2.0)).astype(np.float32)
    counts[0] = 0
    counts[1] = 0
    counts[1, rng.integers(n_genes)] = 7
    counts[2] = (counts[2] > 0) | (np.arange(n_genes) % 3 == 0)
    return counts


def reference_cell(
    genes: npt.NDArray[np.int64], values: npt.NDArray[np.float32], tk: Tokenizer, key: int, epoch: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The documented rule, one cell at a time, written for obviousness not speed."""
    nz = values != 0
    genes, values = genes[nz], values[nz].astype(np.float32)
    order = np.lexsort((genes, values))  # ascending value, ties by gene
    genes, values = genes[order], values[order]
    nnz = values.size
    if nnz == 0:
        return np.array([CLS_ID]), np.array([0])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    min_rank = (np.cumsum(counts) - counts)[inverse]  # tied values share the lowest rank
    bins = 1 + (min_rank * (tk.n_bins - 1)) // nnz
    if nnz > tk.max_genes:
        prio = sampling_priority(tk.seed, epoch, np.full(nnz, key), genes)
        kept = np.sort(np.lexsort((np.arange(nnz), prio))[: tk.max_genes])
        genes, bins = genes[kept], bins[kept]
    return np.concatenate([[CLS_ID], genes + N_SPECIAL]), np.concatenate([[0], bins])


def assert_matches_reference(out: TokenizedCells, block: Block, tk: Tokenizer, epoch: int = 0) -> None:
    assert out.n_cells == block.n_cells
    all_genes = np.arange(block.dense.shape[1])
    for i in range(block.n_cells):
        want_g, want_v = reference_cell(all_genes, block.dense[i], tk, int(block.keys[i]), epoch)
        got_g, got_v = out.cell(i)
        np.testing.assert_array_equal(got_g, want_g, err_msg=f"cell {i} genes")
        np.testing.assert_array_equal(got_v, want_v, err_msg=f"cell {i} bins")


def run(tk: Tokenizer, block: Block, epoch: int = 0) -> TokenizedCells:
    return tk.tokenize(block.rows, block.genes, block.values, block.n_cells, cell_keys=block.keys, epoch=epoch)


def cells_equal(a: TokenizedCells, i: int, b: TokenizedCells, j: int) -> bool:
    (ga, va), (gb, vb) = a.cell(i), b.cell(j)
    return np.array_equal(ga, gb) and np.array_equal(va, vb)


@pytest.fixture(scope="module")
def counts_block() -> Block:
    rng = np.random.default_rng(11)
    dense = random_counts(rng, 160, 400)
    return coo_block(dense, rng.permutation(10_000)[:160].astype(np.int64) + 5, rng)


@pytest.mark.parametrize(("n_bins", "max_genes"), [(51, 10_000), (51, 40), (2, 25), (7, 1), (300, 90)])
def test_matches_reference(counts_block: Block, n_bins: int, max_genes: int) -> None:
    tk = Tokenizer(n_bins=n_bins, max_genes=max_genes, seed=3)
    out = run(tk, counts_block, epoch=2)
    assert_matches_reference(out, counts_block, tk, epoch=2)
    if max_genes < 10_000:  # the case must really exercise sampling
        assert (np.count_nonzero(counts_block.dense, axis=1) > max_genes).sum() > 10


def test_output_layout_and_ranges(counts_block: Block) -> None:
    tk = Tokenizer(n_bins=51, max_genes=60)
    out = run(tk, counts_block)
    nnz = np.count_nonzero(counts_block.dense, axis=1)
    np.testing.assert_array_equal(out.lengths, 1 + np.minimum(nnz, 60))
    assert out.gene_ids.dtype == np.int32 and out.values.dtype == np.int16 and out.offsets.dtype == np.int64
    np.testing.assert_array_equal(out.gene_ids[out.offsets[:-1]], CLS_ID)
    np.testing.assert_array_equal(out.values[out.offsets[:-1]], 0)
    is_gene = np.ones(out.n_tokens, bool)
    is_gene[out.offsets[:-1]] = False
    assert out.gene_ids[is_gene].min() >= N_SPECIAL
    assert out.values[is_gene].min() >= 1 and out.values[is_gene].max() <= 50
    assert not (out.values == MASK_VALUE).any()
    assert out.lengths[0] == 1 and out.lengths[1] == 2 and out.values[out.offsets[1] + 1] == 1


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_counts_and_lognorm_give_identical_tokens(counts_block: Block, dtype: type) -> None:
    dense = counts_block.dense.astype(dtype)
    libsize = np.maximum(dense.sum(axis=1, keepdims=True), 1)
    lognorm = np.log1p(dense / libsize * dtype(1e4)).astype(np.float32)  # stored as float32
    log_block = coo_block(lognorm, counts_block.keys, np.random.default_rng(5))
    tk = Tokenizer(n_bins=51, max_genes=50)
    a, b = run(tk, counts_block), run(tk, log_block)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.gene_ids, b.gene_ids)
    np.testing.assert_array_equal(a.values, b.values)
    assert_matches_reference(b, log_block, tk)
    # The fixture has what makes this non-trivial: an all-zero cell (only <cls>), a cell with a
    # single non-zero (bin 1), cells dominated by ties, and cells that get sampled.
    assert a.lengths[0] == 1 and a.gene_ids[a.offsets[0]] == CLS_ID
    assert a.lengths[1] == 2 and a.values[a.offsets[1] + 1] == 1
    assert np.count_nonzero(counts_block.dense == 1, axis=1).max() > 20
    assert (np.count_nonzero(counts_block.dense, axis=1) > 50).sum() > 10


def test_coo_order_and_explicit_zeros_do_not_matter(counts_block: Block) -> None:
    tk = Tokenizer(max_genes=40)
    want = run(tk, counts_block)
    rng = np.random.default_rng(9)
    extra_r = rng.integers(0, counts_block.n_cells, 300)
    extra_g = rng.integers(0, 400, 300)
    free = counts_block.dense[extra_r, extra_g] == 0  # explicit zeros only where the cell has none
    rows = np.concatenate([counts_block.rows, extra_r[free]])
    genes = np.concatenate([counts_block.genes, extra_g[free]])
    zeros = np.where(rng.random(free.sum()) < 0.5, np.float32(0.0), np.float32(-0.0))
    values = np.concatenate([counts_block.values, zeros])
    perm = rng.permutation(rows.size)
    got = tk.tokenize(rows[perm], genes[perm], values[perm], counts_block.n_cells, cell_keys=counts_block.keys)
    np.testing.assert_array_equal(got.offsets, want.offsets)
    np.testing.assert_array_equal(got.gene_ids, want.gene_ids)
    np.testing.assert_array_equal(got.values, want.values)


def encoded_block(rng: np.random.Generator, n_cells: int, n_genes: int) -> Block:
    """Values encode (cell, gene): every non-zero of the whole block is a distinct number."""
    distinct = 1.0 + np.arange(n_cells * n_genes).reshape(n_cells, n_genes)
    dense = np.where(rng.random((n_cells, n_genes)) < 0.4, distinct, 0.0)
    dense = dense[:, rng.permutation(n_genes)]  # value order is not gene order
    return coo_block(dense, np.arange(n_cells, dtype=np.int64) * 13 + 1000, rng)


def test_tokens_do_not_depend_on_block_composition() -> None:
    rng = np.random.default_rng(21)
    block = encoded_block(rng, 90, 120)
    tk = Tokenizer(n_bins=11, max_genes=30, seed=4)
    whole = run(tk, block, epoch=1)
    assert_matches_reference(whole, block, tk, epoch=1)
    # Same cells split into two blocks, each in a different order, with joinids as keys.
    order = rng.permutation(block.n_cells)
    for part in (order[:37], order[37:]):
        sub = coo_block(block.dense[part], block.keys[part], rng)
        got = run(tk, sub, epoch=1)
        for j, i in enumerate(part):
            assert cells_equal(got, j, whole, int(i)), f"cell {i} changed with its block"


def test_epoch_seed_and_key_change_the_sample_reproducibly(counts_block: Block) -> None:
    base = Tokenizer(max_genes=20, seed=1)
    a0, a0_again, a1 = run(base, counts_block, 0), run(base, counts_block, 0), run(base, counts_block, 1)
    b0 = run(Tokenizer(max_genes=20, seed=2), counts_block, 0)
    shifted = dataclasses.replace(counts_block, keys=counts_block.keys + 1)
    k0 = run(base, shifted, 0)
    np.testing.assert_array_equal(a0.gene_ids, a0_again.gene_ids)
    sampled = np.flatnonzero(np.count_nonzero(counts_block.dense, axis=1) > 20)
    assert sampled.size > 20
    for other in (a1, b0, k0):
        n_same = sum(cells_equal(a0, int(i), other, int(i)) for i in sampled)
        assert n_same < sampled.size // 4
    unsampled = np.flatnonzero(np.count_nonzero(counts_block.dense, axis=1) <= 20)
    assert all(cells_equal(a0, int(i), a1, int(i)) for i in unsampled)


def test_removing_unkept_genes_keeps_the_sample() -> None:
    """The choice rests on a per-(cell, gene) priority, not on positions or counts of others."""
    rng = np.random.default_rng(2)
    genes = rng.permutation(5000)[:400]
    values = rng.integers(1, 30, 400).astype(np.float32)
    tk = Tokenizer(max_genes=50)

    def one(g: npt.NDArray[np.int64], v: npt.NDArray[np.float32]) -> TokenizedCells:
        return tk.tokenize(np.zeros(g.size, np.int64), g, v, 1, cell_keys=np.array([77]))

    full = one(genes, values)
    kept = np.isin(genes, full.gene_ids - N_SPECIAL)
    assert kept.sum() == 50
    drop = ~kept & (rng.random(400) < 0.7)
    sub = one(genes[~drop], values[~drop])
    np.testing.assert_array_equal(np.sort(sub.gene_ids), np.sort(full.gene_ids))


def test_sampling_is_uniform_over_genes() -> None:
    n_genes, k, n_epochs = 20, 5, 2000
    genes = np.arange(n_genes, dtype=np.int64)
    values = (genes + 1).astype(np.float32)  # expression must not bias the choice
    tk = Tokenizer(max_genes=k, seed=8)
    hits = np.zeros(n_genes + N_SPECIAL, np.int64)
    for epoch in range(n_epochs):
        out = tk.tokenize(np.zeros(n_genes, np.int64), genes, values, 1, cell_keys=np.array([3]), epoch=epoch)
        hits += np.bincount(out.gene_ids, minlength=hits.size)
    expected = n_epochs * k / n_genes  # 500, binomial sd about 19
    assert np.abs(hits[N_SPECIAL:] - expected).max() < 6 * np.sqrt(n_epochs * 0.25 * 0.75)


def test_wide_gene_ids_split_the_block_and_match_reference() -> None:
    """Gene ids near 2**28 leave few key bits for rows: the block is tokenized in row ranges."""
    rng = np.random.default_rng(4)
    dense = random_counts(rng, 70, 60)
    block = coo_block(dense, np.arange(70, dtype=np.int64), rng)
    offset = 1 << 28
    tk = Tokenizer(n_bins=9, max_genes=12)
    out = tk.tokenize(block.rows, block.genes + offset, block.values, 70, cell_keys=block.keys)
    rows_per_range = 1 << (64 - 31 - (offset + 60 + N_SPECIAL).bit_length())
    assert rows_per_range < 70  # the block really is split
    for i in range(70):
        want_g, want_v = reference_cell(np.arange(60) + offset, dense[i], tk, i, 0)
        got_g, got_v = out.cell(i)
        np.testing.assert_array_equal(got_g, want_g)
        np.testing.assert_array_equal(got_v, want_v)


def test_select_and_concat(counts_block: Block) -> None:
    out = run(Tokenizer(max_genes=30), counts_block)
    idx = np.array([5, 0, 159, 5, 1, 80])
    sel = out.select(idx)
    assert sel.n_cells == idx.size
    for j, i in enumerate(idx):
        assert cells_equal(sel, j, out, int(i))
    sl = out.select(slice(10, 20))
    assert sl.n_cells == 10 and all(cells_equal(sl, j, out, 10 + j) for j in range(10))
    assert out.select(np.zeros(out.n_cells, bool)).n_tokens == 0
    back = TokenizedCells.concat([out.select(slice(0, 70)), out.select(slice(70, 70)), out.select(slice(70, None))])
    np.testing.assert_array_equal(back.offsets, out.offsets)
    np.testing.assert_array_equal(back.gene_ids, out.gene_ids)
    assert TokenizedCells.concat([]).n_cells == 0


def test_empty_inputs() -> None:
    tk = Tokenizer()
    empty = np.empty(0, np.int64)
    out = tk.tokenize(empty, empty, np.empty(0, np.float32), 3, cell_keys=np.arange(3))
    np.testing.assert_array_equal(out.gene_ids, [CLS_ID] * 3)
    np.testing.assert_array_equal(out.offsets, [0, 1, 2, 3])
    assert tk.tokenize(empty, empty, empty, 0, cell_keys=empty).n_cells == 0


@pytest.mark.parametrize(
    ("field", "kwargs"), [("n_bins", {"n_bins": 1}), ("max_genes", {"max_genes": 0})]
)
def test_config_validation_names_the_field(field: str, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=field):
        Tokenizer(**kwargs)


@pytest.mark.parametrize(
    ("rows", "genes", "values", "keys", "match"),
    [
        ([0, 2], [1, 1], [1.0, 1.0], [0, 1], "rows"),
        ([0, -1], [1, 1], [1.0, 1.0], [0, 1], "rows"),
        ([0, 1], [1, -3], [1.0, 1.0], [0, 1], "genes"),
        ([0, 1], [1, 1], [1.0, -2.0], [0, 1], "values"),
        ([0, 1], [1, 1], [1.0, np.nan], [0, 1], "values"),
        ([0, 1], [1, 1], [1.0, np.inf], [0, 1], "values"),
        ([0, 1], [1], [1.0, 1.0], [0, 1], "same length"),
        ([0.0, 1.0], [1, 1], [1.0, 1.0], [0, 1], "rows must be integers"),
        ([0, 1], [1, 1], [1.0, 1.0], [0], "cell_keys"),
    ],
)
def test_bad_blocks_are_rejected(rows: list, genes: list, values: list, keys: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Tokenizer().tokenize(np.array(rows), np.array(genes), np.array(values), 2, cell_keys=np.array(keys))


@pytest.mark.parametrize("top_bytes", [256, 1])
def test_kth_smallest_matches_a_sort(top_bytes: int) -> None:
    """The sampling threshold: uniform top bytes (hashes) and the worst case, all in one bucket."""
    from data_store.tokenize import _kth_smallest

    rng = np.random.default_rng(top_bytes)
    for n in (1, 2, 255, 1342, 5000):
        x = (rng.integers(0, top_bytes, n, dtype=np.uint64) << np.uint64(56)) | rng.permutation(n).astype(np.uint64)
        want = np.sort(x)
        counts, bucket = np.empty(256, np.int64), np.empty(n, np.uint64)
        for k in {0, n // 3, n - 1}:
            assert _kth_smallest(x, k, counts, bucket) == want[k]


def test_keep_values_returns_each_kept_tokens_input_and_changes_nothing_else(counts_block: Block) -> None:
    """``keep_values``: ``expr`` is each kept token's input value (0 at <cls>), read back from the
    sort key; gene ids and bins are those of a call without it, sampled cells included."""
    tk = Tokenizer(n_bins=51, max_genes=50)
    plain = run(tk, counts_block)
    kept = tk.tokenize(counts_block.rows, counts_block.genes, counts_block.values, counts_block.n_cells,
                       cell_keys=counts_block.keys, keep_values=True)
    assert plain.expr is None and kept.expr.dtype == np.float32
    np.testing.assert_array_equal(plain.gene_ids, kept.gene_ids)
    np.testing.assert_array_equal(plain.values, kept.values)
    rows = np.repeat(np.arange(kept.n_cells), kept.lengths)
    is_cls = kept.gene_ids == CLS_ID
    assert (kept.expr[is_cls] == 0).all()
    want = counts_block.dense[rows[~is_cls], kept.gene_ids[~is_cls] - N_SPECIAL]
    np.testing.assert_array_equal(kept.expr[~is_cls], want)
    # expr follows the cells through select and concat
    sel = kept.select([3, 0, 2])
    np.testing.assert_array_equal(sel.expr, np.concatenate([kept.expr[kept.offsets[i]:kept.offsets[i + 1]] for i in (3, 0, 2)]))
    both = TokenizedCells.concat([kept.select(slice(0, 5)), kept.select(slice(5, 9))])
    np.testing.assert_array_equal(both.expr, kept.select(slice(0, 9)).expr)


def test_log1p_normalize_agrees_for_counts_and_their_log_expression(counts_block: Block) -> None:
    """Counts and the same cells stored as log1p(counts per 10k) normalise to the same values (the
    library size is the cell's total over all its entries); the transform keeps every bin."""
    b = counts_block
    from_counts = log1p_normalize(b.rows, b.values, b.n_cells)
    total = np.bincount(b.rows, weights=b.values.astype(np.float64), minlength=b.n_cells)
    np.testing.assert_allclose(from_counts, np.log1p(b.values / total[b.rows] * 1e4), rtol=1e-6)
    logged = np.log1p(b.values.astype(np.float64) / total[b.rows] * 1e4).astype(np.float32)
    from_log = log1p_normalize(b.rows, logged, b.n_cells, np.ones(b.n_cells, dtype=bool))
    np.testing.assert_allclose(from_log, from_counts, rtol=1e-5, atol=1e-5)
    tk = Tokenizer(n_bins=51, max_genes=50)
    np.testing.assert_array_equal(run(tk, b).values, tk.tokenize(b.rows, b.genes, from_counts, b.n_cells, cell_keys=b.keys).values)
