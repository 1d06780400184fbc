"""CellStream's epoch layout without data: identical to the materialised epoch order, and at
Celler-75 scale (40M cells, 512 ranks x 8 workers) every cell counted, not sampled."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from data_store.layout import batches_per_rank, rank_layout

N_CELLS = 40_000_000
WORLD = 512
WORKERS = 8
BLOCK, BUFFER = 256, 512  # the base preset's data.block_size and data.buffer_blocks


def _materialised(n: int, rank: int, world: int, batch: int, block: int, shuffle: bool, seed: int, epoch: int, remainder: str) -> np.ndarray:
    """What the stream did before layouts were computed per rank: build the whole epoch order."""
    if shuffle:
        perm = np.random.default_rng([seed, epoch]).permutation(math.ceil(n / block))
        order = np.concatenate([np.arange(b * block, min((b + 1) * block, n)) for b in perm])
    else:
        order = np.arange(n)
    need = batches_per_rank(n, world, batch, remainder) * batch
    if remainder == "drop":
        return order[rank * (n // world) : rank * (n // world) + need]
    return np.resize(order, world * need)[rank * need : (rank + 1) * need]


def _layout(n: int, rank: int, batch: int, remainder: str, world: int = WORLD, workers: int = WORKERS, epoch: int = 3):
    return rank_layout(
        n,
        rank=rank,
        world_size=world,
        batch_cells=batch,
        block_size=BLOCK,
        buffer_blocks=BUFFER,
        num_workers=workers,
        shuffle=True,
        seed=0,
        epoch=epoch,
        remainder=remainder,
    )


def test_layout_equals_the_materialised_order() -> None:
    rng = np.random.default_rng(0)
    for t in range(300):
        n, world, batch, block = (int(rng.integers(1, 2000)), int(rng.integers(1, 7)), int(rng.integers(1, 40)), int(rng.integers(1, 60)))
        remainder, shuffle = ("drop", "wrap")[t % 2], bool(t % 3)
        if batches_per_rank(n, world, batch, remainder) == 0:
            continue
        for r in range(world):
            got = rank_layout(
                n, rank=r, world_size=world, batch_cells=batch, block_size=block, buffer_blocks=4, num_workers=2,
                shuffle=shuffle, seed=7, epoch=t, remainder=remainder,
            ).order
            assert np.array_equal(got, _materialised(n, r, world, batch, block, shuffle, 7, t, remainder)), (n, world, batch, block, remainder, r)


def _count(n: int, batch: int, remainder: str, world: int = WORLD) -> np.ndarray:
    """How often each cell appears in one epoch over every rank and worker, checking per rank that
    batches are equal in number and that the 8 workers' windows split them, each worker busy."""
    counts = np.zeros(n, dtype=np.uint8)
    expected = batches_per_rank(n, world, batch, remainder)
    for rank in range(world):
        lay = _layout(n, rank, batch, remainder, world)
        assert lay.n_batches == expected and len(lay.order) == expected * batch
        per_worker = [sum(lay.window_slice(k).stop - lay.window_slice(k).start for k in lay.worker_windows(w, WORKERS)) for w in range(WORKERS)]
        assert sum(per_worker) == expected and min(per_worker) > 0, per_worker
        if remainder == "drop":  # no cell twice within a rank: counting by fancy indexing is exact
            counts[lay.order] += 1
        else:
            np.add.at(counts, lay.order, 1)
    return counts


def test_40m_cells_512_ranks_8_workers_every_cell_exactly_once() -> None:
    # 40M / 512 = 78,125 cells per rank = 625 batches of 125: the epoch covers every cell once.
    counts = _count(N_CELLS, 125, "drop")
    assert int(counts.min()) == 1 and int(counts.max()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("remainder", ["drop", "wrap"])
def test_40m_cells_512_ranks_uneven_batches(remainder: str) -> None:
    """Batches of 32 do not divide a rank's 78,125 cells: drop leaves out exactly the cells past
    each rank's last batch, wrap sees every cell and repeats exactly the cells it needs."""
    counts = _count(N_CELLS, 32, remainder)
    used = WORLD * batches_per_rank(N_CELLS, WORLD, 32, remainder) * 32
    hist = np.bincount(counts, minlength=3)
    if remainder == "drop":
        assert hist[2:].sum() == 0 and hist[0] == N_CELLS - used
    else:
        assert hist[0] == 0 and hist[3:].sum() == 0 and hist[2] == used - N_CELLS


@pytest.mark.parametrize("remainder", ["drop", "wrap"])
def test_uneven_batches_counted_at_a_million_cells(remainder: str) -> None:
    n, world, batch = 1_000_003, 64, 30
    counts = _count(n, batch, remainder, world)
    used = world * batches_per_rank(n, world, batch, remainder) * batch
    hist = np.bincount(counts, minlength=3)
    if remainder == "drop":
        assert hist[2:].sum() == 0 and hist[0] == n - used
    else:
        assert hist[0] == 0 and hist[3:].sum() == 0 and hist[2] == used - n


def test_one_rank_layout_memory_is_its_own_cells() -> None:
    """The whole epoch order of 40M cells is 320 MB; a rank's layout needs its 78k cells and one
    number per block (1.2 MB). Allocation counted with tracemalloc (numpy reports to it)."""
    tracemalloc.start()
    try:
        lay = _layout(N_CELLS, WORLD - 1, 125, "drop")
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(lay.order) == 78_125
    assert peak < 16 * 1024**2, f"{peak / 1024**2:.1f} MB"


def test_windows_keep_every_worker_busy_and_the_buffer_bound() -> None:
    lay = _layout(N_CELLS, 0, 32, "drop")
    # 2,441 batches: the buffer would allow 512 per window (5 windows for 8 workers), so windows shrink.
    assert len(lay.windows()) >= WORKERS
    assert lay.window_batches * 32 * WORKERS <= BLOCK * BUFFER
