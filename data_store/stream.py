"""CellStream: tokenized cells from the store to every training process, shuffled and resumable.

How one epoch is laid out (all of it a pure function of seed, epoch, world size, workers, computed
per rank without reading data or building the whole epoch's order: data_store/layout.py):

1. Selection: the soma_joinids of complete datasets that pass the obs filter, sorted: ``J``
   (kept as the datasets' joinid ranges when nothing filters them: obs is not read).
2. Global shuffle: ``J`` is cut into blocks of ``block_size`` consecutive cells (contiguous on
   disk, so one range read each) and the blocks are permuted with ``rng(seed, epoch)``.
3. Sharding: the permuted cell order is cut into ``world_size`` equal contiguous segments, one per
   rank. Every rank gets the same number of batches, ``floor(len(J) / world_size / batch_cells)``
   with ``remainder="drop"`` (at most ``world_size * batch_cells`` cells left out, a different set
   every epoch), or ``ceil(...)`` with ``remainder="wrap"`` (the last batches are completed with cells
   from the start of the epoch's order, so every cell is seen). Equal counts keep collectives from
   hanging at the end of an epoch.
4. Windows: a rank's batches are grouped into shuffle windows of about ``buffer_blocks *
   block_size / num_workers`` cells (fewer when that would leave a worker without a window);
   DataLoader worker ``w`` owns windows ``w, w + W, ...``. A
   window's cells are read in chunks of whole blocks (the next chunk read while this one is
   tokenized, a few hundred cells per vectorised call), shuffled with ``rng(seed, epoch, rank,
   window)`` and cut into batches.

Memory: one window per worker, so all workers together hold about
``buffer_blocks x block_size`` cells of tokens (~6 B per token: int32 id + int16 bin), plus per
worker two read chunks of Arrow COO (~20 B per non-zero, ``_READ_CHUNK_CELLS`` cells each) and the
tokenizer's temporaries for ``_TOKENIZE_CELLS`` cells; independent of corpus size and of the number
of workers.

Shuffle quality: a batch mixes the blocks of one window, about ``buffer_blocks / num_workers`` of
them. On a corpus ingested dataset by dataset, batches reach ~0.9 of a full permutation's diversity
(distinct datasets per batch) from ~300 blocks per window and ~0.95 from ~500 (bench/loader.py).

Resume: ``state_dict()`` records epoch and the number of batches the consumer has taken. Since the
whole layout is a function of the seed, ``load_state_dict`` just skips that many batches (whole
windows without reading them), so the stream yields exactly the batches an uninterrupted run would
have yielded next. The world size, worker count and store must match; they are checked.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_store.batching import pack, to_padded
from data_store.layout import StreamLayout, batches_per_rank, rank_layout
from data_store.store import CorpusStore, XReader
from data_store.tokenize import TokenizedCells, Tokenizer
from hiceller.config import RunConfig
from hiceller.errors import HicellerError, InputError

__all__ = ["CellStream", "CellLoader", "CellSelection", "StreamLayout", "distributed_rank_world", "stream_from_config",
           "tokenizer_from_config"]

_READ_CHUNK_CELLS = 2048
"""Cells per X query (see ``CellStream._read_tokens``)."""
_TOKENIZE_CELLS = 256
"""Cells per tokenizer call (see ``CellStream._read_tokens``)."""


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else from the launcher's env."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    import os

    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def tokenizer_from_config(cfg: RunConfig) -> Tokenizer:
    """The tokenizer a run's config describes (bins, genes per cell, the seed of the gene draw)."""
    return Tokenizer(n_bins=cfg.data.n_bins, max_genes=cfg.data.max_genes, seed=cfg.train.seed)


def stream_from_config(cfg: RunConfig, store: str, *, rank: int, world_size: int, **selection: Any) -> "CellStream":
    """The one place a run's config becomes a CellStream (pretraining shards, fine-tuning splits).

    Batch size, tokenizer, seed, obs filter, block and window sizes come from ``cfg``; what to select
    and how (``joinids``, ``labels``, ``gene_map``, ``shuffle``, ``remainder``, ...) from the caller,
    whose keywords win.
    """
    kw: dict[str, Any] = dict(shuffle=True, seed=cfg.train.seed, obs_filter=cfg.data.obs_filter or None,
                              block_size=cfg.data.block_size, buffer_blocks=cfg.data.buffer_blocks)
    kw.update(selection)
    if not kw["shuffle"]:
        kw["seed"] = None
    return CellStream(store, batch_cells=cfg.train.micro_batch_cells, tokenizer=tokenizer_from_config(cfg),
                      rank=rank, world_size=world_size, **kw)


def _check_stream_args(batch_cells: int, block_size: int, buffer_blocks: int, shuffle: bool, seed: int | None,
                       remainder: str, layout: str) -> None:
    if batch_cells < 1:
        raise InputError(f"batch_cells must be >= 1, got {batch_cells}")
    if block_size < 1 or buffer_blocks < 1:
        raise InputError(f"block_size and buffer_blocks must be >= 1, got {block_size}, {buffer_blocks}")
    if shuffle and seed is None:
        raise InputError("shuffle=True needs a seed: every rank must draw the same permutation")
    if remainder not in ("drop", "wrap"):
        raise InputError(f"remainder must be 'drop' or 'wrap', got {remainder!r}")
    if layout not in ("packed", "padded"):
        raise InputError(f"layout must be 'packed' or 'padded', got {layout!r}")


class CellStream(IterableDataset):
    """A torch IterableDataset of packed (or padded) token batches from a HiCeller store.

    Yields ``PackedBatch`` (flat gene_ids / values with int32 ``cu_seqlens``, as flash-attention's
    varlen kernel takes them) or, with ``layout="padded"``, ``PaddedBatch``. Use
    ``stream.dataloader(num_workers)`` to read with worker processes and keep resumable state.
    """

    def __init__(
        self,
        store: str,
        *,
        batch_cells: int,
        tokenizer: Tokenizer,
        shuffle: bool = True,
        seed: int | None = None,
        obs_filter: str | None = None,
        datasets: list[str] | None = None,
        donors: list[str] | None = None,
        exclude_donors: list[str] | None = None,
        joinids: np.ndarray | None = None,
        ranges: list[tuple[int, int]] | None = None,
        labels: bool = False,
        label_column: str = "cell_type",
        label_names: list[str] | None = None,
        block_size: int = 256,
        buffer_blocks: int = 512,
        remainder: str = "drop",
        layout: str = "packed",
        rank: int | None = None,
        world_size: int | None = None,
        gene_map: np.ndarray | None = None,
    ):
        super().__init__()
        _check_stream_args(batch_cells, block_size, buffer_blocks, shuffle, seed, remainder, layout)
        self.store_uri = str(store)
        self.batch_cells = batch_cells
        self.tokenizer = tokenizer
        self.shuffle = shuffle
        self.seed = 0 if seed is None else int(seed)
        self.block_size = block_size
        self.buffer_blocks = buffer_blocks
        self.remainder = remainder
        self.layout = layout
        # A model knows the genes of the vocabulary it was built with: it sees store gene g as
        # gene_map[g], and -1 drops the gene (a store that gained genes after pretraining, or a
        # fine-tuning store with another vocabulary).
        self.gene_map = None if gene_map is None else np.asarray(gene_map, dtype=np.int64)
        env_rank, env_world = distributed_rank_world()
        self.rank = env_rank if rank is None else rank
        self.world_size = env_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise InputError(f"rank {self.rank} outside world size {self.world_size}")
        self.epoch = 0
        self._start_batch = 0
        self._position = 0
        self.num_workers = 0

        store_obj = CorpusStore.open(self.store_uri)
        self.filter_desc = _describe_filter(obs_filter, datasets, donors, exclude_donors, joinids)
        self.n_genes = store_obj.n_genes
        self.labels: np.ndarray | None = None
        self.label_names: list[str] = []
        lists = [datasets, donors, exclude_donors, joinids]
        if ranges is not None:
            # Given [start, stop) joinid ranges (held-out validation blocks and the rest): no obs read.
            if obs_filter or labels or any(x is not None and len(x) for x in lists):
                raise InputError("ranges select cells on their own: no obs filter, lists or labels with them")
            self.filter_desc = f"{len(ranges)} joinid range(s)"
            self._selection = CellSelection(ranges=[(int(a), int(b)) for a, b in ranges if b > a])
            if len(self._selection) == 0:
                raise InputError(f"store {self.store_uri}: no cell matches the selection ({self.filter_desc})")
        else:
            self._selection = self._select(store_obj, obs_filter, lists, label_column if labels else None, label_names)
        self.fingerprint = _store_fingerprint(store_obj, self._selection)

    def _select(self, store_obj: CorpusStore, obs_filter: str | None, lists: list, label_column: str | None,
                label_names: list[str] | None) -> "CellSelection":
        """The selected cells (and their labels when ``label_column`` is given)."""
        datasets, donors, exclude_donors, joinids = lists
        if not (obs_filter or label_column or datasets or donors or exclude_donors or joinids is not None):
            # The whole store: its complete datasets' joinid ranges, without reading obs (40M
            # cells of obs would cost every rank minutes and gigabytes).
            selection = CellSelection(ranges=store_obj.complete_ranges())
            if len(selection) == 0:
                raise InputError(f"store {self.store_uri}: no cell matches the selection ({self.filter_desc})")
            return selection
        obs = self._selected_obs(store_obj, obs_filter, lists, label_column)
        if label_column:
            self._set_labels(store_obj, obs, label_column, label_names)
        return CellSelection(joinids=obs["soma_joinid"].to_numpy(dtype=np.int64))

    def _selected_obs(self, store_obj: CorpusStore, obs_filter: str | None, lists: list, label_column: str | None) -> pd.DataFrame:
        """obs rows (joinid order) of the cells the filter and lists select."""
        cols = ["dataset_id", "donor_id"] + ([label_column] if label_column else [])
        try:
            obs = store_obj.obs(column_names=cols, value_filter=obs_filter)
        except HicellerError:
            raise
        except Exception as e:  # SOMA's query-condition parser raises several types
            raise InputError(f"obs filter {obs_filter!r} cannot be used: {str(e).splitlines()[0]}") from None
        obs = _apply_lists(obs, *lists)
        if obs.empty:
            raise InputError(f"store {self.store_uri}: no cell matches the selection ({self.filter_desc})")
        return obs.sort_values("soma_joinid")

    def _set_labels(self, store_obj: CorpusStore, obs: pd.DataFrame, label_column: str, label_names: list[str] | None) -> None:
        labeled = {d.dataset_id for d in store_obj.complete_datasets() if d.labeled}
        has = obs["dataset_id"].isin(labeled).to_numpy()
        if not has.any():
            raise InputError(f"store {self.store_uri}: labels asked for, but no selected dataset is labeled ({self.filter_desc})")
        names = obs[label_column].astype(str).to_numpy()
        self.label_names = sorted(set(names[has])) if label_names is None else list(label_names)
        index = {n: i for i, n in enumerate(self.label_names)}
        self.labels = np.array([index.get(n, -100) for n in names], dtype=np.int64)
        self.labels[~has] = -100

    # ------------------------------------------------------------------ sizes and state
    @property
    def n_cells(self) -> int:
        return len(self._selection)

    @property
    def joinids(self) -> np.ndarray:
        """The selected soma_joinids, sorted (materialised: 8 bytes per cell)."""
        return self._selection.joinids()

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        n = batches_per_rank(self.n_cells, self.world_size, self.batch_cells, self.remainder)
        if n == 0:
            raise InputError(
                f"selection of {self.n_cells} cells is too small for {self.world_size} rank(s) x {self.batch_cells} cells per batch"
            )
        return n

    def set_epoch(self, epoch: int) -> None:
        """A new permutation each epoch (same for every rank); resets the position."""
        self.epoch = int(epoch)
        self._start_batch = 0
        self._position = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self._position,
            "world_size": self.world_size,
            "rank": self.rank,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "batch_cells": self.batch_cells,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        checks = (
            ("world_size", self.world_size, "world size"),
            ("fingerprint", self.fingerprint, "store selection"),
            ("seed", self.seed, "seed"),
            ("batch_cells", self.batch_cells, "batch size"),
        )
        if state.get("fingerprint") != self.fingerprint and self._selection.is_ranges:
            # A state saved before whole-store selections were fingerprinted by their ranges.
            if state.get("fingerprint") == _legacy_fingerprint(CorpusStore.open(self.store_uri), self._selection):
                state = {**state, "fingerprint": self.fingerprint}
        for key, mine, what in checks:
            if state.get(key) != mine:
                raise HicellerError(
                    f"loader state was saved with another {what} ({state.get(key)!r}, this run has {mine!r}); "
                    "resume needs the same store, world size, seed and batch size"
                )
        self.epoch = int(state["epoch"])
        self._start_batch = int(state["position"])
        self._position = self._start_batch
        self._saved_workers = state.get("num_workers", 0)

    # ------------------------------------------------------------------ layout
    def layout_for(self, rank: int | None = None, num_workers: int | None = None) -> StreamLayout:
        """This epoch's layout of ``rank`` (data_store/layout.py); no data is read."""
        len(self)  # refuses a selection too small for the world
        return rank_layout(
            self.n_cells,
            rank=self.rank if rank is None else rank,
            world_size=self.world_size,
            batch_cells=self.batch_cells,
            block_size=self.block_size,
            buffer_blocks=self.buffer_blocks,
            num_workers=max(1, self.num_workers if num_workers is None else num_workers),
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            remainder=self.remainder,
        )

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, nw = (0, 1) if info is None else (info.id, info.num_workers)
        layout = self.layout_for(num_workers=nw)
        skips, turn = _per_worker_skip(layout, nw, self._start_batch)
        # The DataLoader always asks worker 0 first; after a resume the next batch belongs to the
        # logical worker whose turn it was, so physical worker p plays logical worker p + turn.
        worker = (worker + turn) % nw
        skip = skips[worker]
        reader = _BlockReader(self.store_uri)
        try:
            for k in list(layout.windows())[worker::nw]:
                sl = layout.window_slice(k)
                n_in_window = sl.stop - sl.start
                if skip >= n_in_window:
                    skip -= n_in_window
                    continue
                for b, batch in enumerate(self._window_batches(reader, layout, k)):
                    if skip:
                        skip -= 1
                        continue
                    if info is None:
                        self._position += 1
                    yield batch
        finally:
            reader.close()
        if info is None:
            self._start_batch = 0

    def _window_batches(self, reader: "_BlockReader", layout: StreamLayout, k: int) -> Iterator[Any]:
        sl = layout.window_slice(k)
        pos = layout.order[sl.start * self.batch_cells : sl.stop * self.batch_cells]
        # Tokens stay in sorted-unique order; each batch gathers straight from them (one copy per
        # batch instead of reordering the whole window first). Wrap mode may repeat a cell.
        uniq, where = np.unique(pos, return_inverse=True)
        cells = self._read_tokens(reader, uniq)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, k, 7])
            perm = rng.permutation(len(pos))
        else:
            perm = np.arange(len(pos))
        for b in range(sl.stop - sl.start):
            idx = perm[b * self.batch_cells : (b + 1) * self.batch_cells]
            p = pos[idx]
            labels = None if self.labels is None else torch.from_numpy(self.labels[p])
            batch = pack(cells.select(where[idx]), labels=labels, joinids=torch.from_numpy(self._selection.take(p)))
            yield to_padded(batch) if self.layout == "padded" else batch

    def _read_tokens(self, reader: "_BlockReader", uniq: np.ndarray) -> TokenizedCells:
        """Tokenize the cells at the sorted, unique positions ``uniq`` (into J), in that order.

        One X query per ``_READ_CHUNK_CELLS`` cells (a range when they are contiguous on disk,
        else their joinids as points, so cells outside the selection are never read), run in the
        reader's thread one chunk ahead, and tokenized in pieces while the next chunk is read.
        Why pieces: one tokenizer call over a whole window (tens of millions of non-zeros) ran
        ~2.5x slower per cell than calls of a few hundred cells, and the window's Arrow COO
        (~20 B per non-zero) never exists at once, only its tokens (~6 B per token). Tokens of a
        cell do not depend on the piece it is tokenized in (the tokenizer seeds by joinid).
        """
        jids = self._selection.take(uniq)
        step = _READ_CHUNK_CELLS
        # Room for the longest possible cells; the OS backs only the pages written, so this costs
        # the tokens actually produced and spares concatenating the chunks (a second window copy).
        bound = len(jids) * (self.tokenizer.max_genes + 1)
        gene_ids = np.empty(bound, dtype=np.int32)
        values = np.empty(bound, dtype=self.tokenizer.value_dtype)
        offsets = np.zeros(len(jids) + 1, dtype=np.int64)
        pending = reader.submit(jids[:step])
        for lo in range(0, len(jids), step):
            chunk = jids[lo : lo + step]
            d0, genes, vals = pending.result()
            if lo + step < len(jids):
                pending = reader.submit(jids[lo + step : lo + 2 * step])
            if self.gene_map is not None:
                mapped = self.gene_map[np.minimum(genes, len(self.gene_map) - 1)]
                keep = (genes < len(self.gene_map)) & (mapped >= 0)
                d0, genes, vals = d0[keep], mapped[keep], vals[keep]
            rows, by_cell = _cell_rows(d0, chunk)
            # Pieces of _TOKENIZE_CELLS when entries come grouped by cell (TileDB returns them so):
            # the tokenizer's sort ran ~1.7x faster per cell on 256 cells (keys stay in cache)
            # than on 2048. Otherwise the chunk is one piece.
            cuts = np.append(np.arange(0, len(chunk), _TOKENIZE_CELLS if by_cell else len(chunk)), len(chunk))
            ends = np.searchsorted(rows, cuts) if by_cell else np.array([0, len(rows)])
            for a, b, ea, eb in zip(cuts[:-1], cuts[1:], ends[:-1], ends[1:]):
                part = self.tokenizer.tokenize(
                    rows[ea:eb] - a, genes[ea:eb], vals[ea:eb], b - a, cell_keys=chunk[a:b].astype(np.uint64), epoch=self.epoch
                )
                t0 = offsets[lo + a]
                gene_ids[t0 : t0 + part.n_tokens] = part.gene_ids
                values[t0 : t0 + part.n_tokens] = part.values
                offsets[lo + a + 1 : lo + b + 1] = part.offsets[1:] + t0
        n_tokens = int(offsets[-1])
        return TokenizedCells(gene_ids[:n_tokens], values[:n_tokens], offsets, len(jids))

    # ------------------------------------------------------------------ loader
    def dataloader(self, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 2) -> "CellLoader":
        return CellLoader(self, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor)


class CellLoader:
    """A DataLoader over a CellStream that keeps count of the batches handed out, so the stream's
    ``state_dict()`` is exact even with worker processes that prefetch ahead."""

    def __init__(self, stream: CellStream, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 2):
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[Any]:
        s = self.stream
        saved = getattr(s, "_saved_workers", None)
        if saved is not None and s._start_batch and saved != self.num_workers:
            raise HicellerError(
                f"loader state was saved with {saved} worker(s), this loader has {self.num_workers}; resume needs the same"
            )
        s.num_workers = self.num_workers
        if self.num_workers == 0:
            yield from s
            return
        dl = DataLoader(
            s,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=False,
            # TileDB contexts are not fork-safe (tiledbsoma-ml forces spawn too): scripts that use
            # workers need an `if __name__ == "__main__":` guard.
            multiprocessing_context="spawn",
        )
        for batch in dl:
            s._position += 1
            yield batch
        s._start_batch = 0

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


class _BlockReader:
    """X reads as numpy COO, run in one background thread so the next read overlaps tokenizing.

    The thread is the only one touching the TileDB handles; the caller only waits on futures. The
    handle reopens when `hiceller store optimize` vacuumed the fragments it was opened with.
    """

    def __init__(self, uri: str):
        self._reader = XReader(uri)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellstream-read")

    def submit(self, jids: np.ndarray) -> "Future[tuple[np.ndarray, np.ndarray, np.ndarray]]":
        """Future (soma_dim_0, soma_dim_1, soma_data) of the cells ``jids`` (sorted, unique)."""
        return self._pool.submit(self._reader.read, jids)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._reader.close()


class CellSelection:
    """The selected joinids J (sorted): [start, stop) ranges for whole datasets (a few numbers
    however many cells, so pickling the stream to 8 DataLoader workers copies nothing large), or an
    array for a filtered selection."""

    def __init__(self, ranges: list[tuple[int, int]] | None = None, joinids: np.ndarray | None = None):
        self._joinids = joinids
        ranges = ranges or []
        self._starts = np.array([a for a, _ in ranges], dtype=np.int64)
        lens = np.array([b - a for a, b in ranges], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)

    def __len__(self) -> int:
        return len(self._joinids) if self._joinids is not None else int(self._offsets[-1])

    @property
    def is_ranges(self) -> bool:
        return self._joinids is None

    def ranges_bytes(self) -> bytes:
        return self._starts.tobytes() + self._offsets.tobytes()

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Joinids at ``positions`` (indices into J)."""
        if self._joinids is not None:
            return self._joinids[positions]
        k = np.searchsorted(self._offsets, positions, side="right") - 1
        return self._starts[k] + (positions - self._offsets[k])

    def joinids(self) -> np.ndarray:
        if self._joinids is not None:
            return self._joinids
        return self.take(np.arange(len(self), dtype=np.int64))

    def chunks(self, size: int = 1 << 20) -> Iterator[np.ndarray]:
        """J in order, ``size`` joinids at a time."""
        for a in range(0, len(self), size):
            yield self.take(np.arange(a, min(a + size, len(self)), dtype=np.int64))


def _cell_rows(d0: np.ndarray, jids: np.ndarray) -> tuple[np.ndarray, bool]:
    """Index into sorted ``jids`` of each entry's soma_dim_0, and whether the entries come sorted
    by cell (each cell's entries together, cells in order).

    A read returns each cell's entries together, so this binary-searches once per run of equal
    values rather than once per non-zero."""
    if d0.size == 0:
        return np.zeros(0, dtype=np.int64), True
    starts = np.flatnonzero(d0[1:] != d0[:-1]) + 1
    starts = np.concatenate([[0], starts])
    run_jid = d0[starts]
    local = np.searchsorted(jids, run_jid)
    if local.max() >= len(jids) or not np.array_equal(jids[local], run_jid):
        raise HicellerError("store returned X rows that were not asked for; the store may be damaged")
    by_cell = bool(np.all(local[1:] > local[:-1]))
    return np.repeat(local, np.diff(starts, append=d0.size)), by_cell


def _per_worker_skip(layout: StreamLayout, nw: int, consumed: int) -> tuple[list[int], int]:
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
    for _ in range(consumed):
        while left[w] == 0:
            w = (w + 1) % nw
        skip[w] += 1
        left[w] -= 1
        w = (w + 1) % nw
    return skip, w


def _apply_lists(obs: pd.DataFrame, datasets, donors, exclude_donors, joinids) -> pd.DataFrame:
    if datasets:
        obs = obs[obs["dataset_id"].isin(datasets)]
    if donors:
        obs = obs[obs["donor_id"].isin(donors)]
    if exclude_donors:
        obs = obs[~obs["donor_id"].isin(exclude_donors)]
    if joinids is not None:
        obs = obs[obs["soma_joinid"].isin(np.asarray(joinids))]
    return obs


def _describe_filter(obs_filter, datasets, donors, exclude_donors, joinids) -> str:
    parts = []
    if obs_filter:
        parts.append(f"filter {obs_filter!r}")
    if datasets:
        parts.append(f"datasets {list(datasets)}")
    if donors:
        parts.append(f"donors {list(donors)}")
    if exclude_donors:
        parts.append(f"excluding donors {list(exclude_donors)}")
    if joinids is not None:
        parts.append(f"{len(joinids)} given joinids")
    return ", ".join(parts) or "whole store"


def _datasets_digest(store: CorpusStore) -> "hashlib._Hash":
    h = hashlib.sha1()
    ids, starts, stops = store.complete_spans()
    h.update("".join(f"{i}:{a}:{b}|" for i, a, b in zip(ids.tolist(), starts.tolist(), stops.tolist())).encode())
    return h


def _store_fingerprint(store: CorpusStore, selection: CellSelection) -> str:
    """Identifies the store's datasets and the selection (saved with the loader state). A
    whole-store selection is its ranges (a few bytes per dataset: hashing 40M joinids cost each
    rank seconds at start-up); a filtered one its joinids."""
    if not selection.is_ranges:
        return _legacy_fingerprint(store, selection)
    h = _datasets_digest(store)
    h.update(b"ranges|" + selection.ranges_bytes())
    return h.hexdigest()[:16]


def _legacy_fingerprint(store: CorpusStore, selection: CellSelection) -> str:
    """The fingerprint over every selected joinid, as loader states saved before ranges have it
    (hashed in chunks: the same digest, without materialising the joinids)."""
    h = _datasets_digest(store)
    for chunk in selection.chunks():
        h.update(chunk.tobytes())
    return h.hexdigest()[:16]