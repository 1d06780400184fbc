"""Token-budget micro batches: cells packed up to a number of tokens, the same batch count on every rank.

With a fixed number of cells per batch, a batch's tokens (and with them memory and step time) swing
with cell lengths: real cells have 98 to 4,807 non-zero genes. Here a batch takes cells, in the
order the stream would yield them, while their tokens stay within ``batch_tokens`` (as LLM
pretraining stacks varlen sequences up to a token count).

How the batches are cut, as a pure function of the cells' token counts (``min(nnz, max_genes) + 1``)
and of seed, epoch, world size and workers, so every rank computes every rank's batches alone:

1. A rank's cells are its stretch of the epoch order (data_store/layout.py with one cell per unit),
   grouped into shuffle windows; each window's cells are shuffled with the same draw the stream uses.
2. Each window's shuffled cells are cut greedily: a batch closes when the next cell would pass the
   budget (a window's last batch may be lighter).
3. Ranks get different batch counts; every rank keeps the smallest count over all ranks, so
   collectives never wait for a batch another rank lacks. The cells of a rank's surplus batches
   (those at the end of its last windows) sit this epoch out, a different set every epoch.

An epoch resumed on another world (:func:`remaining_cells`): every saved rank's batches are cut again
from the same lengths, the cells of the batches each had handed out are removed, and the new world
cuts its batches, as above, over the cells left (the surplus cells of the saved world included).

The token counts come from X itself (:func:`cell_token_lengths`): the store has no per-cell count
of non-zeros, and one recorded elsewhere (an ``n_genes`` obs column of the source file) counts genes
before they were mapped to the vocabulary, so it could break the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from data_store.layout import EpochStage, per_worker_skip, rank_layout, window_perm
from data_store.store import XReader

__all__ = ["TokenBudgetLayout", "cell_token_lengths", "greedy_cuts", "remaining_cells", "token_budget_layout"]

_SCAN_CELLS = 8192
"""Cells per X read while counting non-zeros (one range read each where joinids are contiguous)."""


def cell_token_lengths(store_uri: str, joinids: np.ndarray, max_genes: int, gene_map: np.ndarray | None = None) -> np.ndarray:
    """Tokens each cell of ``joinids`` (sorted, unique) becomes: ``min(nnz, max_genes) + 1``.

    ``nnz`` counts the cell's non-zero values of genes the model reads (``gene_map >= 0``), as the
    tokenizer does. One sequential pass over the cells' X, read in ranges of ``_SCAN_CELLS`` cells
    (never one read per cell); int32, 4 bytes per cell.
    """
    joinids = np.asarray(joinids, dtype=np.int64)
    nnz = np.zeros(len(joinids), dtype=np.int64)
    reader = XReader(store_uri)
    try:
        for a in range(0, len(joinids), _SCAN_CELLS):
            chunk = joinids[a : a + _SCAN_CELLS]
            d0, genes, vals = reader.read(chunk)
            keep = vals > 0
            if gene_map is not None:
                keep &= (genes < len(gene_map)) & (gene_map[np.minimum(genes, len(gene_map) - 1)] >= 0)
            nnz[a : a + len(chunk)] = np.bincount(np.searchsorted(chunk, d0[keep]), minlength=len(chunk))
    finally:
        reader.close()
    return (np.minimum(nnz, max_genes) + 1).astype(np.int32)


@numba.njit(cache=True, nogil=True)
def greedy_cuts(lengths: np.ndarray, budget: int) -> np.ndarray:  # pragma: no cover - compiled
    """End index of each batch when ``lengths`` (in order) are packed greedily into ``budget`` tokens.

    A cell longer than the budget forms a batch of its own (the stream refuses such budgets)."""
    ends = np.empty(len(lengths), dtype=np.int64)
    n_batches = 0
    total = 0
    for i in range(len(lengths)):
        if total and total + lengths[i] > budget:
            ends[n_batches] = i
            n_batches += 1
            total = 0
        total += lengths[i]
    if total:
        ends[n_batches] = len(lengths)
        n_batches += 1
    return ends[:n_batches]


@dataclass(frozen=True)
class TokenBudgetLayout:
    """One rank's token-budget batches for one epoch.

    Same window interface as :class:`data_store.layout.StreamLayout` (``windows``, ``window_slice``
    in batches), so worker assignment and resume skipping work unchanged."""

    order: np.ndarray
    """Indices into J of the rank's cells, window after window, before the within-window shuffle."""
    window_cells: int
    """Cells per shuffle window (the last one may have fewer)."""
    batch_ends: tuple[np.ndarray, ...]
    """Per window: end of each batch within the window's shuffled cells (only batches this rank keeps)."""
    perms: tuple[np.ndarray, ...]
    """Per window: the within-window shuffle (:func:`window_perm`)."""
    n_batches: int
    """Batches this rank yields: the smallest count over all ranks."""

    def windows(self) -> range:
        return range(len(self.batch_ends))

    def window_slice(self, k: int) -> slice:
        """Batch indices of window ``k``."""
        a = sum(len(e) for e in self.batch_ends[:k])
        return slice(a, a + len(self.batch_ends[k]))

    def window_batches(self, k: int) -> list[np.ndarray]:
        """Each batch of window ``k`` as indices into J, in stream order."""
        lo = k * self.window_cells
        pos = self.order[lo : lo + self.window_cells][self.perms[k]]
        ends = self.batch_ends[k]
        starts = np.concatenate([[0], ends[:-1]])
        return [pos[a:b] for a, b in zip(starts, ends)]


def _rank_windows(lengths, n_cells, rank, world_size, batch_tokens, **kw):
    """(order, window_cells, per-window batch ends, per-window perms) of one rank, before equalising."""
    lay = rank_layout(n_cells, rank=rank, world_size=world_size, batch_cells=1, remainder="drop", **kw)
    w = lay.window_batches
    perms, ends = [], []
    for k in lay.windows():
        pos = lay.order[k * w : (k + 1) * w]
        perm = window_perm(len(pos), shuffle=kw["shuffle"], seed=kw["seed"], epoch=kw["epoch"], rank=rank, window=k)
        perms.append(perm)
        ends.append(greedy_cuts(lengths[pos[perm]], batch_tokens))
    return lay.order, w, ends, perms


def token_budget_layout(
    lengths: np.ndarray,
    *,
    rank: int,
    world_size: int,
    batch_tokens: int,
    block_size: int,
    buffer_blocks: int,
    num_workers: int,
    shuffle: bool,
    seed: int,
    epoch: int,
) -> TokenBudgetLayout:
    """``rank``'s batches for one epoch over cells of token counts ``lengths`` (one per cell of J).

    Cuts every rank's windows to learn the smallest batch count (a few seconds for 40M cells, once
    per epoch); then keeps this rank's batches up to it, windows in order."""
    kw = dict(block_size=block_size, buffer_blocks=buffer_blocks, num_workers=num_workers, shuffle=shuffle, seed=seed, epoch=epoch)
    n_cells = len(lengths)
    counts = [sum(len(e) for e in _rank_windows(lengths, n_cells, r, world_size, batch_tokens, **kw)[2])
              for r in range(world_size) if r != rank]
    order, w, ends, perms = _rank_windows(lengths, n_cells, rank, world_size, batch_tokens, **kw)
    return _kept(order, w, ends, perms, min([sum(len(e) for e in ends), *counts]))


def _kept(order, w, ends, perms, n: int) -> TokenBudgetLayout:
    """A rank's layout keeping its first ``n`` batches, windows in order."""
    kept, left = [], n
    for e in ends:
        if left == 0:
            break
        kept.append(e[:left])
        left -= len(kept[-1])
    return TokenBudgetLayout(order=order, window_cells=w, batch_ends=tuple(kept), perms=tuple(perms[: len(kept)]), n_batches=n)


def remaining_cells(
    lengths: np.ndarray,
    stages: list[EpochStage],
    *,
    batch_tokens: int,
    block_size: int,
    buffer_blocks: int,
    shuffle: bool,
    seed: int,
    epoch: int,
) -> np.ndarray:
    """Positions (into J, sorted) of the cells that no batch of ``stages`` handed out.

    Each stage is a world that ran part of the epoch over the cells the stages before it left; its
    ranks' batches are cut again (each rank's windows once) and the first ``positions[r]`` batches of
    rank ``r``, in the order its loader workers handed them out, are taken away."""
    rest = np.arange(len(lengths), dtype=np.int64)
    for st in stages:
        nw = max(1, st.num_workers)
        kw = dict(block_size=block_size, buffer_blocks=buffer_blocks, num_workers=nw, shuffle=shuffle, seed=seed, epoch=epoch)
        sub = lengths[rest]
        per = [_rank_windows(sub, len(sub), r, st.world_size, batch_tokens, **kw) for r in range(st.world_size)]
        n = min(sum(len(e) for e in p[2]) for p in per)
        taken = []
        for r, p in enumerate(per):
            lay = _kept(*p, n)
            skips, _ = per_worker_skip(lay, nw, st.positions[r])
            wins = list(lay.windows())
            for wk in range(nw):
                left = skips[wk]
                for k in wins[wk::nw]:
                    if left == 0:
                        break
                    batches = lay.window_batches(k)[:left]
                    taken.extend(batches)
                    left -= len(batches)
        if taken:
            gone = np.zeros(len(rest), dtype=bool)
            gone[np.concatenate(taken)] = True
            rest = rest[~gone]
    return rest

