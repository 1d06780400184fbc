"""CellStream's epoch layout: which cells one rank reads, in which batches and shuffle windows.

A pure function of the selection's size, the seeds and the world: no data is read, so the layout
of 40M cells on 512 ranks x 8 workers can be computed (and checked cell by cell) on a laptop.

The epoch's cell order is the selection cut into blocks of ``block_size`` consecutive cells, the
blocks permuted by ``rng(seed, epoch)``. A rank's cells are one contiguous stretch of that order.
Only the blocks overlapping that stretch are expanded, so a rank's memory is its own cells (8 bytes
each) plus one int64 per block, never the whole epoch's order: for 40M cells and 512 ranks, about
0.6 MB + 1.2 MB instead of the 320 MB order and its temporaries (measured: bench/scale.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["StreamLayout", "EpochStage", "batches_per_rank", "epoch_order_slice", "rank_layout", "window_perm",
           "per_worker_skip", "remaining_order"]


@dataclass(frozen=True)
class StreamLayout:
    """Positions (indices into the selection J) of one rank's cells for one epoch, in batch order
    before the within-window shuffle, and how they group into windows."""

    order: np.ndarray
    """Indices into J: n_batches x batch_cells of them."""
    n_batches: int
    window_batches: int
    """Batches per shuffle window."""

    def windows(self) -> range:
        return range(math.ceil(self.n_batches / self.window_batches))

    def window_slice(self, k: int) -> slice:
        a = k * self.window_batches
        return slice(a, min(a + self.window_batches, self.n_batches))

    def worker_windows(self, worker: int, num_workers: int) -> range:
        """Windows of DataLoader worker ``worker``: ``worker, worker + W, ...``."""
        return self.windows()[worker :: max(1, num_workers)]


def batches_per_rank(n_cells: int, world_size: int, batch_cells: int, remainder: str) -> int:
    """Batches every rank yields per epoch (the same on every rank, so collectives never hang)."""
    per_rank = n_cells / world_size
    return math.floor(per_rank / batch_cells) if remainder == "drop" else math.ceil(per_rank / batch_cells)


def _block_perm(n_cells: int, block_size: int, seed: int, epoch: int) -> np.ndarray:
    n_blocks = math.ceil(n_cells / block_size)
    return np.random.default_rng([seed, epoch]).permutation(n_blocks)


def epoch_order_slice(n_cells: int, lo: int, hi: int, perm: np.ndarray | None, block_size: int) -> np.ndarray:
    """``order[i % n_cells] for i in range(lo, hi)`` of the epoch order (blocks of ``block_size``
    cells in ``perm`` order; identity when ``perm`` is None), expanding only the blocks it needs."""
    pieces = []
    i = lo
    while i < hi:  # wraps around the order when the last batches are completed from its start
        a = i % n_cells
        take = min(hi - i, n_cells - a)
        pieces.append(_order_range(n_cells, a, a + take, perm, block_size))
        i += take
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def _order_range(n_cells: int, lo: int, hi: int, perm: np.ndarray | None, block_size: int) -> np.ndarray:
    """order[lo:hi] for 0 <= lo <= hi <= n_cells."""
    if perm is None:
        return np.arange(lo, hi, dtype=np.int64)
    lens = np.minimum(block_size, n_cells - perm * block_size)
    offsets = np.concatenate([[0], np.cumsum(lens)])  # where each permuted block starts in the order
    k_lo = int(np.searchsorted(offsets, lo, side="right")) - 1
    k_hi = int(np.searchsorted(offsets, hi, side="left"))
    starts = perm[k_lo:k_hi] * block_size
    cells = _ranges_to_positions(starts, lens[k_lo:k_hi])
    skip = lo - int(offsets[k_lo])
    return cells[skip : skip + hi - lo]


def _ranges_to_positions(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenate arange(s, s+l) for each (s, l), vectorised."""
    total = int(lens.sum())
    offs = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return np.arange(total, dtype=np.int64) + offs


def window_batches(n_batches: int, batch_cells: int, block_size: int, buffer_blocks: int, num_workers: int) -> int:
    """Batches per shuffle window: the shared buffer (``buffer_blocks`` blocks) split among the
    workers, but never so large that a worker is left without a window: at 512 ranks a rank's
    share of 40M cells (78k) fills only 5 buffer-sized windows, which left 3 of 8 workers idle."""
    nw = max(1, num_workers)
    window_cells = max(batch_cells, buffer_blocks * block_size // nw)
    by_buffer = max(1, window_cells // batch_cells)
    return max(1, min(by_buffer, math.ceil(n_batches / nw)))


def _stretch(n_cells: int, rank: int, world_size: int, batch_cells: int, remainder: str) -> tuple[int, int]:
    """(first position, batches) of ``rank``'s stretch of an order of ``n_cells`` cells."""
    n_batches = batches_per_rank(n_cells, world_size, batch_cells, remainder)
    lo = rank * (n_cells // world_size) if remainder == "drop" else rank * n_batches * batch_cells
    return lo, n_batches


def rank_layout(
    n_cells: int,
    *,
    rank: int,
    world_size: int,
    batch_cells: int,
    block_size: int,
    buffer_blocks: int,
    num_workers: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    remainder: str,
    base: np.ndarray | None = None,
) -> StreamLayout:
    """The layout of ``rank`` for one epoch over a selection of ``n_cells`` cells.

    Ranks get consecutive equal stretches of the epoch order: ``n_batches x batch_cells`` cells
    from ``rank x (n_cells // world_size)`` with ``remainder="drop"`` (the few cells past the last
    full batch of every rank are left out, a different set each epoch), from
    ``rank x n_batches x batch_cells`` with ``"wrap"`` (the order continues from its start to fill
    the last batches, so every cell is seen). ``base``: the order to cut instead of the epoch's
    block permutation (what is left of an epoch resumed on another world, :func:`remaining_order`)."""
    n = n_cells if base is None else len(base)
    lo, n_batches = _stretch(n, rank, world_size, batch_cells, remainder)
    need = n_batches * batch_cells
    if base is None:
        perm = _block_perm(n_cells, block_size, seed, epoch) if shuffle else None
        order = epoch_order_slice(n_cells, lo, lo + need, perm, block_size)
    else:
        order = base[np.arange(lo, lo + need) % max(n, 1)] if need else np.zeros(0, dtype=np.int64)
    return StreamLayout(order=order, n_batches=n_batches, window_batches=window_batches(n_batches, batch_cells, block_size, buffer_blocks, num_workers))


def window_perm(n: int, *, shuffle: bool, seed: int, epoch: int, rank: int, window: int, stage: int = 0) -> np.ndarray:
    """The order in which window ``window`` of ``rank`` hands out its ``n`` cells. ``stage`` counts the
    world sizes this epoch already ran on (0: the epoch started on this world)."""
    if not shuffle:
        return np.arange(n)
    key = [seed, epoch, rank, window, 7] + ([stage] if stage else [])
    return np.random.default_rng(key).permutation(n)


def per_worker_skip(layout: StreamLayout, nw: int, consumed: int) -> tuple[list[int], int]:
    """How many batches each worker already delivered when the consumer took ``consumed`` of them,
    and the worker whose turn is next.

    The DataLoader takes batches from workers round-robin (worker 0, 1, ..., skipping workers that
    are done); replaying that order tells each worker where to restart."""
    counts = [0] * nw
    for k in layout.windows():
        sl = layout.window_slice(k)
        counts[k % nw] += sl.stop - sl.start
    skip = [0] * nw
    left = list(counts)
    w = 0
    for _ in range(min(consumed, sum(counts))):
        while left[w] == 0:
            w = (w + 1) % nw
        skip[w] += 1
        left[w] -= 1
        w = (w + 1) % nw
    return skip, w


@dataclass(frozen=True)
class EpochStage:
    """A part of an epoch run on one world: its streams' world size, loader workers, and the batches
    each stream (by rank) had taken when the run stopped."""

    world_size: int
    num_workers: int
    positions: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "num_workers": self.num_workers, "positions": list(self.positions)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EpochStage":
        return cls(int(d["world_size"]), int(d["num_workers"]), tuple(int(p) for p in d["positions"]))


def _taken(layout: StreamLayout, consumed: int, num_workers: int, batch_cells: int, perm_of) -> np.ndarray:
    """Indices into ``layout.order`` of the cells in the first ``consumed`` batches handed out."""
    nw = max(1, num_workers)
    skips, _ = per_worker_skip(layout, nw, consumed)
    out = []
    for w in range(nw):
        left = skips[w]
        for k in layout.worker_windows(w, nw):
            if left == 0:
                break
            sl = layout.window_slice(k)
            n_b = min(left, sl.stop - sl.start)
            a = sl.start * batch_cells
            out.append(a + perm_of(k, (sl.stop - sl.start) * batch_cells)[: n_b * batch_cells])
            left -= n_b
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def remaining_order(
    n_cells: int,
    stages: list[EpochStage],
    *,
    batch_cells: int,
    block_size: int,
    buffer_blocks: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    remainder: str,
) -> np.ndarray:
    """Positions (into the selection) of the epoch's cells that no batch of ``stages`` took, in epoch
    order: what a run resumed on another world reads for the rest of the epoch.

    Each stage cut the previous stage's remaining order into its world's stretches (the first stage
    the whole epoch order) and each stream took its first ``positions[rank]`` batches; replaying
    that (the same windows, worker turns and window shuffles the streams used) gives the cells
    taken. Cells a stage's ``drop`` left out of every stretch stay in the order. Costs 9 bytes per
    cell of the selection while it runs (40M cells: ~360 MB, once per resume on another world)."""
    perm = _block_perm(n_cells, block_size, seed, epoch) if shuffle else None
    order = epoch_order_slice(n_cells, 0, n_cells, perm, block_size)
    for i, st in enumerate(stages):
        n = len(order)
        taken = np.zeros(n, dtype=bool)
        for rank, consumed in enumerate(st.positions):
            lo, n_batches = _stretch(n, rank, st.world_size, batch_cells, remainder)
            lay = StreamLayout(order=np.zeros(0, dtype=np.int64), n_batches=n_batches,
                               window_batches=window_batches(n_batches, batch_cells, block_size, buffer_blocks, max(1, st.num_workers)))

            def perm_of(k: int, m: int, rank: int = rank) -> np.ndarray:
                return window_perm(m, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, window=k, stage=i)

            idx = _taken(lay, consumed, st.num_workers, batch_cells, perm_of)
            taken[(lo + idx) % max(n, 1)] = True
        order = order[~taken]
    return order
