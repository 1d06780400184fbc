"""Celler/scGPT tokenization of a block of cells: one integer sort, then one compiled pass per cell.

A block arrives from TileDB-SOMA as COO triples (local row, gene vocabulary id, value) in no
particular order. Each cell becomes ``<cls>`` followed by its non-zero genes, every gene carrying
the cell-local quantile bin of its expression. Cells with more than ``max_genes`` non-zeros keep a
uniformly random subset whose choice depends only on ``(seed, epoch, cell key, gene)``, so a
resumed or re-sharded stream reproduces exactly the same tokens.

Why the implementation looks the way it does: the whole block is ordered with ONE ``np.sort`` of
packed ``uint64`` keys ``row | float32 bits of the value | token id``. For non-negative IEEE
floats the bit pattern read as an unsigned integer is ordered exactly like the value, so this key
groups by cell, orders by expression, breaks ties by gene id, and is exact (no float rounding can
merge or swap two values). Sorting plain integers without an index is several times faster than
any ``argsort`` or ``lexsort`` (the sorted key *is* the data: row, value and token are unpacked
from it). Everything after the sort (bins per run of tied values, the sampling of over-long
cells, ``<cls>`` insertion) is one numba-compiled loop over cells, :func:`_emit_cells`, where each
cell's entries stay in L1 cache; the numba kernel is compiled once and cached on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numba
import numpy as np
import numpy.typing as npt

__all__ = [
    "TARGET_SUM",
    "log1p_normalize",
    "PAD_ID",
    "CLS_ID",
    "N_SPECIAL",
    "MASK_VALUE",
    "PAD_VALUE",
    "CLS_VALUE",
    "PRIORITY_BITS",
    "TokenizedCells",
    "Tokenizer",
    "sampling_priority",
]

PAD_ID = 0
"""Token id of padding (only the padded layout uses it)."""
CLS_ID = 1
"""Token id of the ``<cls>`` token that starts every cell."""
N_SPECIAL = 2
"""Gene with vocabulary id ``g`` has token id ``g + N_SPECIAL``."""
MASK_VALUE = -1
"""Value reserved for the model's masking; the tokenizer never emits it."""
PAD_VALUE = 0
"""Value bin of padding positions."""
CLS_VALUE = 0
"""Value bin carried by ``<cls>``."""
PRIORITY_BITS = 32
"""Width of the per-(cell, gene) sampling priority; fixed so that ties never depend on the block."""

_U64 = np.uint64
_VALUE_BITS = 31  # a non-negative finite float32 has its sign bit clear: 31 bits order it exactly
_KEY_BITS = 64
_FLOAT32_INF_BITS = 0x7F800000
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_SEED_SALT = _U64(0x243F6A8885A308D3)
_MAX_TOKEN_ID = np.iinfo(np.int32).max
_CHUNK = 1 << 15  # elements per cache-sized piece (256 KiB per uint64 temporary)


@dataclass(frozen=True, eq=False)  # elementwise array equality has no single truth value
class TokenizedCells:
    """Variable-length token sequences of ``n_cells`` cells, stored flat (CSR-like).

    Cell ``i`` owns ``gene_ids[offsets[i]:offsets[i+1]]`` and the same slice of ``values``; its
    first token is ``<cls>`` (value 0), then its kept genes in ascending expression order (ties
    by ascending gene id).
    """

    gene_ids: npt.NDArray[np.int32]
    """Token ids, flat over all cells."""
    values: npt.NDArray[np.integer]
    """Expression bins (int16 when ``n_bins`` fits, else int32), aligned with ``gene_ids``."""
    offsets: npt.NDArray[np.int64]
    """Length ``n_cells + 1``; cell ``i`` is ``[offsets[i], offsets[i+1])``."""
    n_cells: int
    """Number of cells."""
    expr: npt.NDArray[np.float32] | None = None
    """The input value of each token (0 for ``<cls>``), aligned with ``gene_ids``, when the tokenizer
    was asked for it (``keep_values=True``): what a reader of expression, not of bins, needs."""

    def __post_init__(self) -> None:
        # O(1) checks only: this object is built in the loader's hot path.
        if self.offsets.shape != (self.n_cells + 1,):
            raise ValueError(f"offsets must have length n_cells + 1 = {self.n_cells + 1}, got {self.offsets.shape}")
        n_tokens = int(self.offsets[-1])
        if int(self.offsets[0]) != 0 or self.gene_ids.shape != (n_tokens,) or self.values.shape != (n_tokens,):
            raise ValueError("offsets must start at 0 and end at len(gene_ids) == len(values)")
        if self.expr is not None and self.expr.shape != (n_tokens,):
            raise ValueError("expr must be aligned with gene_ids")

    @property
    def lengths(self) -> npt.NDArray[np.int64]:
        """Tokens per cell, ``<cls>`` included."""
        return np.diff(self.offsets)

    @property
    def n_tokens(self) -> int:
        """Total number of tokens."""
        return int(self.offsets[-1])

    def cell(self, i: int) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.integer]]:
        """Tokens and bins of one cell (views); for inspection and tests, not for hot paths."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.gene_ids[lo:hi], self.values[lo:hi]

    def select(self, idx: npt.ArrayLike | slice) -> TokenizedCells:
        """Cells ``idx`` (ints, negative ok, bool mask or slice) in that order, as a new block.

        A unit-step slice is a cheap view; anything else is one vectorised gather, so shuffling
        cells between blocks never loops in Python.
        """
        if isinstance(idx, slice) and idx.step in (None, 1):
            start, stop, _ = idx.indices(self.n_cells)
            stop = max(start, stop)
            lo, hi = self.offsets[start], self.offsets[stop]
            return TokenizedCells(
                self.gene_ids[lo:hi], self.values[lo:hi], self.offsets[start : stop + 1] - lo, stop - start,
                None if self.expr is None else self.expr[lo:hi],
            )
        cells = np.arange(self.n_cells)[idx]  # numpy does negative/bool/bounds semantics for us
        lengths = self.lengths[cells]
        offsets = _offsets_from_lengths(lengths)
        # Token t of the new block comes from old position t + (old start - new start) of its cell.
        src = np.repeat(self.offsets[cells] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return TokenizedCells(self.gene_ids[src], self.values[src], offsets, len(cells), None if self.expr is None else self.expr[src])

    @classmethod
    def concat(cls, parts: Sequence[TokenizedCells]) -> TokenizedCells:
        """All cells of ``parts`` in order, as one block."""
        if not parts:
            return cls(
                np.empty(0, np.int32), np.empty(0, np.int16), np.zeros(1, np.int64), 0
            )
        lengths = np.concatenate([p.lengths for p in parts])
        return cls(
            np.concatenate([p.gene_ids for p in parts]),
            np.concatenate([p.values for p in parts]),
            _offsets_from_lengths(lengths),
            sum(p.n_cells for p in parts),
            np.concatenate([p.expr for p in parts]) if all(p.expr is not None for p in parts) else None,
        )


@dataclass(frozen=True)
class Tokenizer:
    """Rank-bin and sample the non-zero genes of each cell (Celler/scGPT input format).

    Bins: over ALL non-zero values of a cell (before sampling),
    ``bin = 1 + floor(min_rank * (n_bins - 1) / nnz)`` where ``min_rank`` is the 0-based rank of
    the value among the cell's non-zeros and tied values share their minimum rank. Ranks only
    see the order of values, so raw counts and any increasing per-cell transform of them
    (``log1p(counts / libsize * 1e4)``) give identical bins. Values are ranked at float32
    precision, the precision of the store's ``soma_data``.

    Sampling: a cell with more than ``max_genes`` non-zeros keeps the ``max_genes`` genes with the
    smallest :func:`sampling_priority` (ties, about 2**-32 per pair, go to the lower expression).

    Output order within a cell: ``<cls>``, then kept genes by ascending expression, ties by gene
    id -- a canonical order, so equal inputs give byte-identical outputs.
    """

    n_bins: int = 51
    """Number of value bins including bin 0 (zero expression)."""
    max_genes: int = 1200
    """Most genes kept per cell (``<cls>`` not counted)."""
    seed: int = 0
    """Seed of the gene sampling hash."""

    def __post_init__(self) -> None:
        if self.n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {self.n_bins}")
        if self.max_genes < 1:
            raise ValueError(f"max_genes must be >= 1, got {self.max_genes}")

    @property
    def value_dtype(self) -> np.dtype:
        """int16 when every bin fits, halving the loader's memory traffic; int32 otherwise."""
        return np.dtype(np.int16 if self.n_bins <= np.iinfo(np.int16).max + 1 else np.int32)

    def tokenize(
        self,
        rows: npt.ArrayLike,
        genes: npt.ArrayLike,
        values: npt.ArrayLike,
        n_cells: int,
        *,
        cell_keys: npt.ArrayLike,
        epoch: int = 0,
        keep_values: bool = False,
    ) -> TokenizedCells:
        """Tokenize one block given as COO entries in any order.

        ``rows`` are local cell indices in ``[0, n_cells)``, ``genes`` vocabulary ids, ``values``
        non-negative expression (explicit zeros are dropped); each ``(row, gene)`` appears at most
        once, as in a SOMA sparse array. ``cell_keys[i]`` (the soma_joinid of row ``i``) seeds the
        sampling of cell ``i``, so a cell's tokens do not depend on which block it was read in;
        ``epoch`` re-draws every sample (pass the stream's epoch). ``keep_values``: also return each
        kept token's input value (``expr``, float32), read back from the sort key (no second pass).
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        r, g, vbits, keys, max_gene = _validated_block(rows, genes, values, n_cells, cell_keys)
        token_bits = _bit_length(max_gene + N_SPECIAL)
        # The packed sort key holds row | value | token; a block whose rows do not fit beside the
        # token ids is split into row ranges that do (cells are independent, results concatenate).
        row_bits = _KEY_BITS - _VALUE_BITS - token_bits
        rows_per_part = 1 << row_bits
        if n_cells <= rows_per_part:
            return self._tokenize_part(r, g, vbits, n_cells, keys, epoch, token_bits, keep_values)
        parts = []
        part_of_entry = r >> row_bits
        for lo in range(0, n_cells, rows_per_part):
            sel = part_of_entry == (lo >> row_bits)
            hi = min(lo + rows_per_part, n_cells)
            parts.append(self._tokenize_part(r[sel] - lo, g[sel], vbits[sel], hi - lo, keys[lo:hi], epoch, token_bits, keep_values))
        return TokenizedCells.concat(parts)

    def _tokenize_part(
        self,
        rows: npt.NDArray[np.int64],
        genes: npt.NDArray[np.int64],
        vbits: npt.NDArray[np.uint32],
        n_cells: int,
        cell_keys: npt.NDArray[np.uint64],
        epoch: int,
        token_bits: int,
        keep_values: bool = False,
    ) -> TokenizedCells:
        """Tokenize a block whose ``row | value | token`` key fits in 64 bits."""
        key = _sorted_entry_keys(rows, genes, vbits, token_bits)
        # Cell boundaries by binary search of each row's smallest key: n_cells log(N) steps instead
        # of a pass over all entries. (Row n_cells may not fit the row field: append the end.)
        cell_first_key = np.arange(n_cells, dtype=_U64) << _U64(_VALUE_BITS + token_bits)
        starts = np.searchsorted(key, cell_first_key).astype(np.int64)
        nnz = np.diff(starts, append=key.size)
        offsets = _offsets_from_lengths(np.minimum(nnz, self.max_genes) + 1)
        gene_ids = np.empty(int(offsets[-1]), dtype=np.int32)
        values = np.empty(int(offsets[-1]), dtype=self.value_dtype)
        bases = _cell_bases(self.seed, epoch, cell_keys)
        value_bits = np.empty(int(offsets[-1]) if keep_values else 0, dtype=np.uint32)
        _emit_cells(key, starts, nnz, offsets, bases, token_bits, self.n_bins, self.max_genes, gene_ids, values, value_bits)
        return TokenizedCells(gene_ids, values, offsets, n_cells, value_bits.view(np.float32) if keep_values else None)


@numba.njit(cache=True, nogil=True)
def _emit_cells(key, starts, nnz, offsets, bases, token_bits, n_bins, max_genes, gene_ids, values, value_bits):  # pragma: no cover
    """Write ``<cls>`` + kept tokens + bins of every cell of a sorted block (compiled: one pass per cell).

    Per cell ``i`` (entries ``key[starts[i]:starts[i] + nnz[i]]``, ordered by value then token):
    the bin of a run of equal values is ``1 + min_rank * (n_bins - 1) // nnz`` with ``min_rank`` the
    run's first position; a cell over ``max_genes`` keeps the entries whose ``priority << 32 |
    position`` key is among the ``max_genes`` smallest (the k-th smallest found by :func:`_kth_smallest`, not a
    sort), i.e. the smallest priorities, ties to the lower position. Kept entries stay in key order.
    ``value_bits``, unless empty, gets each written token's float32 value bits (0 for ``<cls>``).
    Why compiled: in numpy these steps were ~6 full-block passes plus a second sort; per cell in
    one loop the cell's entries stay in L1. On 1.3k-gene cells with max_genes 1200 the tokenizer went
    from 47 to 13 us per cell (bench/RESULTS.md, "Tokenizer").
    """
    token_mask = np.uint64((1 << token_bits) - 1)
    value_shift = np.uint64(token_bits)
    value_mask = np.uint64((1 << _VALUE_BITS) - 1)
    keep_values = value_bits.size > 0
    scratch = np.empty(max(nnz.max() if nnz.size else 0, 1), dtype=np.uint64)
    bucket = np.empty_like(scratch)
    bucket_counts = np.empty(256, dtype=np.int64)
    for i in range(nnz.size):
        s, m, o = starts[i], nnz[i], offsets[i]
        gene_ids[o] = CLS_ID
        values[o] = CLS_VALUE
        if keep_values:
            value_bits[o] = 0
        o += 1
        threshold = np.uint64(0xFFFFFFFFFFFFFFFF)
        if m > max_genes:
            base = bases[i]
            for j in range(m):
                gene = (key[s + j] & token_mask) - np.uint64(N_SPECIAL)
                scratch[j] = (_gene_priority(base, gene) << np.uint64(32)) | np.uint64(j)
            threshold = _kth_smallest(scratch[:m], max_genes - 1, bucket_counts, bucket)
        run_value = np.uint64(0xFFFFFFFFFFFFFFFF)
        run_bin = 0
        for j in range(m):
            k = key[s + j]
            cell_value = k >> value_shift  # row | value: equal exactly on ties
            if cell_value != run_value:
                run_value = cell_value
                run_bin = 1 + (j * (n_bins - 1)) // m
            if m > max_genes and scratch[j] > threshold:
                continue
            gene_ids[o] = np.int32(k & token_mask)
            values[o] = run_bin
            if keep_values:
                value_bits[o] = np.uint32(cell_value & value_mask)
            o += 1


@numba.njit(cache=True, nogil=True)
def _kth_smallest(x, k, counts, bucket):  # pragma: no cover
    """The ``k``-th smallest (0-based) of distinct uint64 ``x`` whose top byte is uniform (hashes).

    One counting pass over the top byte finds the bucket holding rank ``k``; only that bucket
    (about ``len(x) / 256`` values) is sorted. ``counts`` (256) and ``bucket`` (``len(x)``) are scratch.
    """
    counts[:] = 0
    for v in x:
        counts[v >> np.uint64(56)] += 1
    below, b = 0, 0
    while below + counts[b] <= k:
        below += counts[b]
        b += 1
    n = 0
    for v in x:
        if v >> np.uint64(56) == b:
            bucket[n] = v
            n += 1
    head = bucket[:n]
    head.sort()
    return head[k - below]


TARGET_SUM = 1e4
"""Counts per cell after normalisation (scanpy's ``normalize_total`` default, Seurat's scale factor)."""


def log1p_normalize(
    rows: npt.ArrayLike, values: npt.ArrayLike, n_cells: int, log_rows: npt.ArrayLike | bool = False
) -> npt.NDArray[np.float32]:
    """``log1p(x / total * 1e4)`` per COO entry, ``total`` the sum of the cell's entries.

    Entries of log-expression cells (``log_rows``: per cell, or one bool for all) are exponentiated
    back first (``expm1``), so counts and log1p-normalised inputs of the same cells agree. Pass every
    entry of a cell, not only the genes a model reads: the total is the cell's library size. The
    transform is increasing within a cell, so the tokenizer's bins of the result are those of the input.
    """
    r = np.asarray(rows, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    log = np.broadcast_to(np.asarray(log_rows, dtype=bool), (n_cells,))
    lin = np.where(log[r], np.expm1(v), v) if log.any() else v.copy()
    total = np.bincount(r, weights=lin, minlength=n_cells)
    lin *= TARGET_SUM / np.maximum(total, 1e-12)[r]
    return np.log1p(lin).astype(np.float32)


def sampling_priority(
    seed: int, epoch: int, cell_keys: npt.ArrayLike, genes: npt.ArrayLike
) -> npt.NDArray[np.uint64]:
    """Sampling priority of each (cell key, gene) pair, a ``PRIORITY_BITS``-bit integer.

    A counter-based hash (splitmix64 finaliser chained over seed, epoch, cell key, gene): it
    needs no state, so any worker can recompute the sample of any cell in any order. A cell
    keeps the genes with the smallest priorities, i.e. a uniform random subset.
    """
    keys, g = np.broadcast_arrays(np.asarray(cell_keys).astype(_U64), np.asarray(genes).astype(_U64))
    return _priorities(_cell_bases(seed, epoch, np.ascontiguousarray(keys.ravel())), np.ascontiguousarray(g.ravel())).reshape(g.shape)


def _validated_block(
    rows: npt.ArrayLike,
    genes: npt.ArrayLike,
    values: npt.ArrayLike,
    n_cells: int,
    cell_keys: npt.ArrayLike,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.uint32], npt.NDArray[np.uint64], int]:
    """Check a block; return rows, genes, value bits, cell keys in key dtypes, and the max gene."""
    r_in, g_in = np.asarray(rows), np.asarray(genes)
    for name, a in (("rows", r_in), ("genes", g_in)):
        if a.size and a.dtype.kind not in "iu":
            raise ValueError(f"{name} must be integers, got dtype {a.dtype}")
    r = r_in.astype(np.int64, copy=False).ravel()
    g = g_in.astype(np.int64, copy=False).ravel()
    v = np.ascontiguousarray(np.asarray(values).astype(np.float32, copy=False).ravel())
    keys = np.asarray(cell_keys).ravel()
    if not (r.shape == g.shape == v.shape):
        raise ValueError(f"rows, genes and values must have the same length, got {r.shape}, {g.shape}, {v.shape}")
    if n_cells < 0:
        raise ValueError(f"n_cells must be >= 0, got {n_cells}")
    if keys.shape != (n_cells,):
        raise ValueError(f"cell_keys must have length n_cells = {n_cells}, got {keys.shape}")
    if r.size and (int(r.min()) < 0 or int(r.max()) >= n_cells):
        raise ValueError(f"rows must lie in [0, n_cells = {n_cells})")
    max_gene = int(g.max()) if g.size else 0
    if g.size and (int(g.min()) < 0 or max_gene > _MAX_TOKEN_ID - N_SPECIAL):
        raise ValueError(f"genes must lie in [0, {_MAX_TOKEN_ID - N_SPECIAL}] so token ids fit int32")
    return r, g, _value_bits(v), keys.astype(_U64), max_gene


def _value_bits(v: npt.NDArray[np.float32]) -> npt.NDArray[np.uint32]:
    """float32 values as order-preserving uint32 bit patterns; rejects negative and non-finite."""
    bits = v.view(np.uint32)
    # One reduction covers the common case: every pattern below +inf's is a finite value >= +0.
    if bits.size == 0 or int(bits.max()) < _FLOAT32_INF_BITS:
        return bits
    if not (np.isfinite(v) & (v >= 0)).all():
        raise ValueError("values must be finite and >= 0 (expression counts or normalised expression)")
    return bits & np.uint32(0x7FFFFFFF)  # only -0.0 got here; it is a zero like +0.0


def _sorted_entry_keys(
    rows: npt.NDArray[np.int64], genes: npt.NDArray[np.int64], vbits: npt.NDArray[np.uint32], token_bits: int
) -> npt.NDArray[np.uint64]:
    """Non-zero entries as sorted ``row | value bits | token id`` keys (unique, hence canonical).

    Why not the float64 key ``row + value / (max + 1)``: its 52-bit mantissa is shared with the
    row. Near row 4096 keys are spaced 2**-40, while two neighbouring float32 values ``v`` differ
    by about ``v * 2**-24 / (max + 1)`` in the fraction; once ``v / (max + 1)`` nears ``2**-16``
    they start rounding to one key, a false tie (measured: 26% of float32 neighbours at
    ``v = 1e-4``, ``max = 10``).
    Integer counts are safe there (they differ by >= 1), float32 input is not in general; and
    ``argsort`` of that key measured 4x slower than this ``sort``.
    """
    if np.count_nonzero(vbits) != vbits.size:  # explicit zeros: drop before paying for the sort
        nz = vbits != 0
        rows, genes, vbits = rows[nz], genes[nz], vbits[nz]
    row_shift, value_shift = _U64(_VALUE_BITS + token_bits), _U64(token_bits)
    rows_u, genes_u = rows.view(_U64), genes.view(_U64)  # validated >= 0: the views are exact
    key = np.empty(rows.size, dtype=_U64)
    for lo, hi in _chunks(0, rows.size):
        k = key[lo:hi]
        np.left_shift(rows_u[lo:hi], row_shift, out=k)
        v = vbits[lo:hi].astype(_U64)
        v <<= value_shift
        k |= v
        k |= genes_u[lo:hi]
        k += _U64(N_SPECIAL)  # gene -> token id in the low field; token_bits leaves room for it
    key.sort()  # in place; the whole tokenizer's ordering work is this one integer sort
    return key


def _cell_bases(seed: int, epoch: int, cell_keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Per-cell hash state from (seed, epoch, cell key); cheap, computed once per cell."""
    return _bases(_U64(seed & 0xFFFFFFFFFFFFFFFF), _U64(epoch & 0xFFFFFFFFFFFFFFFF), cell_keys)


@numba.njit(cache=True, nogil=True)
def _splitmix(z):  # pragma: no cover
    """splitmix64 finaliser (Steele et al. 2014) of one uint64; wraps mod 2**64."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


@numba.njit(cache=True, nogil=True)
def _gene_priority(base, gene):  # pragma: no cover
    """Priority of vocabulary id ``gene`` (uint64) in the cell whose hash state is ``base``.

    splitmix64 output for counter ``gene + 1`` of the cell's stream, top ``PRIORITY_BITS`` kept:
    the one definition that both :func:`sampling_priority` and the tokenizer's kernel use.
    """
    return _splitmix((gene + np.uint64(1)) * _GOLDEN + base) >> np.uint64(_KEY_BITS - PRIORITY_BITS)


@numba.njit(cache=True, nogil=True)
def _bases(seed, epoch, cell_keys):  # pragma: no cover
    s = _splitmix(_splitmix(seed ^ _SEED_SALT) + epoch)
    out = np.empty(cell_keys.size, dtype=np.uint64)
    for i in range(cell_keys.size):
        out[i] = _splitmix(s + cell_keys[i])
    return out


@numba.njit(cache=True, nogil=True)
def _priorities(bases, genes):  # pragma: no cover
    out = np.empty(bases.size, dtype=np.uint64)
    for i in range(bases.size):
        out[i] = _gene_priority(bases[i], genes[i])
    return out


def _chunks(start: int, stop: int) -> Iterator[tuple[int, int]]:
    """``[lo, hi)`` pieces of ``_CHUNK`` elements.

    Why: a chain of elementwise numpy passes over millions of entries streams every temporary
    through main memory; on pieces whose temporaries fit in L2 the chain runs about 2x faster.
    """
    for lo in range(start, stop, _CHUNK):
        yield lo, min(lo + _CHUNK, stop)


def _offsets_from_lengths(lengths: npt.NDArray[np.integer]) -> npt.NDArray[np.int64]:
    """``[0, cumsum(lengths)...]`` as int64."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _bit_length(x: int) -> int:
    """Bits needed to hold ``x`` (at least 1, so that a shift by it is meaningful)."""
    return max(1, int(x).bit_length())
