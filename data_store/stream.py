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

Token budget: with ``batch_tokens`` instead of ``batch_cells``, a window's shuffled cells are cut
into batches of at most that many tokens, every rank keeping the smallest batch count over all ranks
(data_store/token_budget.py: cut from the cells' token counts, which every rank reads from X once).

Resume: ``state_dict()`` records epoch and the number of batches the consumer has taken. Since the
whole layout is a function of the seed, ``load_state_dict`` just skips that many batches (whole
windows without reading them), so the stream yields exactly the batches an uninterrupted run would
have yielded next. The world size, worker count and store must match; they are checked.
A run resumed on another world continues the epoch with :meth:`CellStream.load_epoch_state`: the
states of every stream of the saved world give the cells they had taken (a function of the seed
again), and the new world's ranks share the cells left (``remaining_order`` in data_store/layout.py),
so over the epoch no cell is read twice and none is skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_store.batching import pack, to_padded
from data_store.layout import (EpochStage, StreamLayout, batches_per_rank, per_worker_skip, rank_layout, remaining_order,
                               window_batches, window_perm)
from data_store.token_budget import TokenBudgetLayout, cell_token_lengths, remaining_cells, token_budget_layout
from data_store.store import CorpusStore, XReader
from data_store.tokenize import TokenizedCells, Tokenizer, log1p_normalize
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

    Batch size (``train.micro_batch_tokens`` when set, else ``train.micro_batch_cells``), tokenizer,
    seed, obs filter, block and window sizes come from ``cfg``; what to select and how (``joinids``,
    ``labels``, ``gene_map``, ``shuffle``, ``remainder``, ``batch_tokens=None`` for cell batches, ...)
    from the caller, whose keywords win.
    """
    tokens = cfg.train.micro_batch_tokens or None
    kw: dict[str, Any] = dict(shuffle=True, seed=cfg.train.seed, obs_filter=cfg.data.obs_filter or None,
                              block_size=cfg.data.block_size, buffer_blocks=cfg.data.buffer_blocks, batch_tokens=tokens)
    kw.update(selection)
    if not kw["shuffle"]:
        kw["seed"] = None
    cells = None if kw["batch_tokens"] else cfg.train.micro_batch_cells
    return CellStream(store, batch_cells=cells, tokenizer=tokenizer_from_config(cfg), rank=rank, world_size=world_size, **kw)


def _check_stream_args(batch_cells: int | None, batch_tokens: int | None, max_genes: int, block_size: int,
                       buffer_blocks: int, shuffle: bool, seed: int | None, remainder: str, layout: str) -> None:
    if (batch_cells is None) == (batch_tokens is None):
        raise InputError("give one of batch_cells and batch_tokens")
    if batch_cells is not None and batch_cells < 1:
        raise InputError(f"batch_cells must be >= 1, got {batch_cells}")
    if batch_tokens is not None and batch_tokens < max_genes + 1:
        raise InputError(f"batch_tokens must be >= max_genes + 1 = {max_genes + 1} (the longest cell), got {batch_tokens}")
    if batch_tokens is not None and remainder != "drop":
        raise InputError(f"batch_tokens works with remainder='drop' only, got {remainder!r}")
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
    varlen kernel takes them) or, with ``layout="padded"``, ``PaddedBatch``: ``batch_cells`` cells
    each, or with ``batch_tokens`` as many cells as fit that many tokens. Use
    ``stream.dataloader(num_workers)`` to read with worker processes and keep resumable state.
    """

    def __init__(
        self,
        store: str,
        *,
        batch_cells: int | None = None,
        tokenizer: Tokenizer,
        batch_tokens: int | None = None,
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
        expression: bool = False,
    ):
        super().__init__()
        _check_stream_args(batch_cells, batch_tokens, tokenizer.max_genes, block_size, buffer_blocks, shuffle, seed,
                           remainder, layout)
        self.store_uri = str(store)
        self.batch_cells = batch_cells
        self.batch_tokens = batch_tokens
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
        # expression: batches also carry each token's log1p(counts per 10k), the cell's library
        # size taken over every stored gene (before gene_map drops any), as scanpy normalises.
        self.expression = bool(expression)
        env_rank, env_world = distributed_rank_world()
        self.rank = env_rank if rank is None else rank
        self.world_size = env_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise InputError(f"rank {self.rank} outside world size {self.world_size}")
        self.epoch = 0
        self._start_batch = 0
        self._position = 0
        self.num_workers = 0
        self._history: list[EpochStage] = []
        """Earlier worlds of this epoch (resumed on another world size); empty when it began here."""
        self._resumed: np.ndarray | None = None
        """This rank's stretch of what those worlds left of the epoch (positions into J)."""

        store_obj = CorpusStore.open(self.store_uri)
        logexpr = [(d.start, d.stop) for d in store_obj.complete_datasets() if d.kind == "logexpr"]
        self._log_ranges = np.array(logexpr, dtype=np.int64).reshape(-1, 2)
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
        self._lengths: np.ndarray | None = None
        self._token_layouts: dict[tuple[int, int, int], TokenBudgetLayout] = {}
        self._token_rest: np.ndarray | None = None  # an epoch resumed on another world: the cells left

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
        """Batches this rank yields per epoch, the same on every rank (in an epoch resumed on another
        world: of what is left)."""
        if self._resumed is not None:
            n = len(self._resumed) // self.batch_cells
            what = f"{self.batch_cells} cells per batch"
        elif self.batch_tokens is not None:
            n = self.layout_for().n_batches
            what = f"{self.batch_tokens} tokens per batch"
        else:
            n = batches_per_rank(self.n_cells, self.world_size, self.batch_cells, self.remainder)
            what = f"{self.batch_cells} cells per batch"
        if n == 0:
            raise InputError(f"selection of {self.n_cells} cells is too small for {self.world_size} rank(s) x {what}")
        return n

    def cell_lengths(self, part: slice | None = None) -> np.ndarray:
        """Tokens of each selected cell (J order), read from X once per stream (token budget only);
        ``part``: only those cells' counts, read now and not kept (for :meth:`set_cell_lengths`)."""
        if part is not None:
            return cell_token_lengths(self.store_uri, self.joinids[part], self.tokenizer.max_genes, self.gene_map)
        if self._lengths is None:
            self._lengths = cell_token_lengths(self.store_uri, self.joinids, self.tokenizer.max_genes, self.gene_map)
        return self._lengths

    def set_cell_lengths(self, lengths: np.ndarray) -> None:
        """Counts read elsewhere (each rank a part, gathered: pretrain/run.py), so that no rank reads
        the X of every cell; one per selected cell."""
        lengths = np.asarray(lengths, dtype=np.int32)
        if lengths.shape != (self.n_cells,):
            raise ValueError(f"need one token count per selected cell ({self.n_cells}), got shape {lengths.shape}")
        self._lengths, self._token_layouts = lengths, {}

    def set_epoch(self, epoch: int) -> None:
        """A new permutation each epoch (same for every rank); resets the position."""
        self.epoch = int(epoch)
        self._start_batch = 0
        self._position = 0
        self._history, self._resumed, self._token_rest = [], None, None
        self._token_layouts = {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self._position,
            "world_size": self.world_size,
            "rank": self.rank,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "batch_cells": self.batch_cells,
            "batch_tokens": self.batch_tokens,
            "fingerprint": self.fingerprint,
            "history": [st.to_dict() for st in self._history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        checks = (
            ("world_size", self.world_size, "world size"),
            ("fingerprint", self.fingerprint, "store selection"),
            ("seed", self.seed, "seed"),
            ("batch_cells", self.batch_cells, "batch size"),
            ("batch_tokens", self.batch_tokens, "token budget"),
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
        self._set_history([EpochStage.from_dict(d) for d in state.get("history", [])])
        self._start_batch = int(state["position"])
        self._position = self._start_batch
        self._saved_workers = state.get("num_workers", 0)

    def load_epoch_state(self, states: list[dict[str, Any]]) -> None:
        """Continue the epoch of a run saved on any world: ``states`` are the ``state_dict()`` of every
        stream of that world, in rank order. On the same world this is ``load_state_dict`` of this
        rank's state; on another one the epoch goes on with the cells the saved streams had not
        taken, shared by this world's ranks (the next epoch is laid out on this world as usual)."""
        world = len(states)
        if world == 0 or any(st.get("world_size") != world or st.get("rank") != r for r, st in enumerate(states)):
            raise HicellerError(f"loader states of {world} stream(s) do not form one world (rank r of world {world} each)")
        if world == self.world_size:
            self.load_state_dict(states[self.rank])
            return
        histories = {json.dumps(st.get("history", []), sort_keys=True) for st in states}
        if len({st.get("epoch") for st in states}) != 1 or len(histories) != 1:
            raise HicellerError("loader states of the saved world are from different epochs; the checkpoint is inconsistent")
        # The checks of load_state_dict (store, seed, batch size), with the saved world taken as ours.
        self.load_state_dict({**states[0], "world_size": self.world_size, "position": 0, "history": []})
        stage = EpochStage(world, int(states[0].get("num_workers", 0)), tuple(int(st["position"]) for st in states))
        self._set_history([EpochStage.from_dict(d) for d in states[0].get("history", [])] + [stage])
        self._saved_workers = None

    def _set_history(self, history: list[EpochStage]) -> None:
        self._history = history
        if self.batch_tokens is not None:
            # The cells left by the saved worlds, cut into this world's token-budget batches (layout_for).
            self._token_rest = None if not history else remaining_cells(
                self.cell_lengths(), history, batch_tokens=self.batch_tokens, block_size=self.block_size,
                buffer_blocks=self.buffer_blocks, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)
            self._token_layouts, self._resumed = {}, None
            return
        if not history:
            self._resumed = None
            return
        rest = remaining_order(self.n_cells, history, batch_cells=self.batch_cells, block_size=self.block_size,
                               buffer_blocks=self.buffer_blocks, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
                               remainder=self.remainder)
        # This rank's stretch only: the whole rest is freed here (workers get a copy of the stretch).
        self._resumed = rank_layout(len(rest), rank=self.rank, world_size=self.world_size, batch_cells=self.batch_cells,
                                    block_size=self.block_size, buffer_blocks=self.buffer_blocks, num_workers=1,
                                    shuffle=self.shuffle, seed=self.seed, epoch=self.epoch, remainder=self.remainder,
                                    base=rest).order

    # ------------------------------------------------------------------ layout
    def layout_for(self, rank: int | None = None, num_workers: int | None = None) -> StreamLayout | TokenBudgetLayout:
        """This epoch's layout of ``rank`` (data_store/layout.py; data_store/token_budget.py with a
        token budget, which reads the cells' lengths once)."""
        nw = max(1, self.num_workers if num_workers is None else num_workers)
        if self._resumed is not None:
            if rank is not None and rank != self.rank:
                raise ValueError("the layout of another rank in an epoch resumed on another world is not kept")
            n_batches = len(self)
            return StreamLayout(order=self._resumed, n_batches=n_batches,
                                window_batches=window_batches(n_batches, self.batch_cells, self.block_size, self.buffer_blocks, nw))
        if self.batch_tokens is not None:
            r = self.rank if rank is None else rank
            key = (self.epoch, r, nw)
            if key not in self._token_layouts:
                base = self._token_rest
                lengths = self.cell_lengths()
                lay = token_budget_layout(
                    lengths if base is None else lengths[base], rank=r, world_size=self.world_size,
                    batch_tokens=self.batch_tokens, block_size=self.block_size, buffer_blocks=self.buffer_blocks,
                    num_workers=nw, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)
                if base is not None:  # positions among the cells left -> positions into J
                    lay = dataclasses.replace(lay, order=base[lay.order])
                self._token_layouts = {key: lay}
            return self._token_layouts[key]
        len(self)  # refuses a selection too small for the world
        return rank_layout(
            self.n_cells,
            rank=self.rank if rank is None else rank,
            world_size=self.world_size,
            batch_cells=self.batch_cells,
            block_size=self.block_size,
            buffer_blocks=self.buffer_blocks,
            num_workers=nw,
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
        skips, turn = per_worker_skip(layout, nw, self._start_batch)
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

    def _window_batches(self, reader: "_BlockReader", layout: StreamLayout | TokenBudgetLayout, k: int) -> Iterator[Any]:
        if isinstance(layout, TokenBudgetLayout):
            yield from self._budget_batches(reader, layout, k)
            return
        sl = layout.window_slice(k)
        pos = layout.order[sl.start * self.batch_cells : sl.stop * self.batch_cells]
        # Tokens stay in sorted-unique order; each batch gathers straight from them (one copy per
        # batch instead of reordering the whole window first). Wrap mode may repeat a cell.
        uniq, where = np.unique(pos, return_inverse=True)
        cells = self._read_tokens(reader, uniq)
        perm = window_perm(len(pos), shuffle=self.shuffle, seed=self.seed, epoch=self.epoch, rank=self.rank, window=k,
                           stage=len(self._history))
        for b in range(sl.stop - sl.start):
            idx = perm[b * self.batch_cells : (b + 1) * self.batch_cells]
            p = pos[idx]
            labels = None if self.labels is None else torch.from_numpy(self.labels[p])
            batch = pack(cells.select(where[idx]), labels=labels, joinids=torch.from_numpy(self._selection.take(p)))
            yield to_padded(batch) if self.layout == "padded" else batch

    def _budget_batches(self, reader: "_BlockReader", layout: TokenBudgetLayout, k: int) -> Iterator[Any]:
        """Window ``k``'s token-budget batches; only the cells of the batches this rank keeps are read."""
        batches = layout.window_batches(k)
        uniq, where = np.unique(np.concatenate(batches), return_inverse=True)
        cells = self._read_tokens(reader, uniq)
        a = 0
        for p in batches:
            idx = where[a : a + len(p)]
            a += len(p)
            labels = None if self.labels is None else torch.from_numpy(self.labels[p])
            batch = pack(cells.select(idx), labels=labels, joinids=torch.from_numpy(self._selection.take(p)))
            if batch.n_tokens > self.batch_tokens:  # the lengths were read from this X: it changed since
                raise HicellerError(f"store {self.store_uri} changed while streaming: a batch of {batch.n_tokens} tokens "
                                    f"passed the budget of {self.batch_tokens}")
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
        expr = np.empty(bound if self.expression else 0, dtype=np.float32)
        offsets = np.zeros(len(jids) + 1, dtype=np.int64)
        pending = reader.submit(jids[:step])
        for lo in range(0, len(jids), step):
            chunk = jids[lo : lo + step]
            d0, genes, vals = pending.result()
            if lo + step < len(jids):
                pending = reader.submit(jids[lo + step : lo + 2 * step])
            rows, by_cell = _cell_rows(d0, chunk)
            if self.expression:
                vals = log1p_normalize(rows, vals, len(chunk), self._is_log(chunk))
            if self.gene_map is not None:
                mapped = self.gene_map[np.minimum(genes, len(self.gene_map) - 1)]
                keep = (genes < len(self.gene_map)) & (mapped >= 0)
                rows, genes, vals = rows[keep], mapped[keep], vals[keep]
            # Pieces of _TOKENIZE_CELLS when entries come grouped by cell (TileDB returns them so):
            # the tokenizer's sort ran ~1.7x faster per cell on 256 cells (keys stay in cache)
            # than on 2048. Otherwise the chunk is one piece.
            cuts = np.append(np.arange(0, len(chunk), _TOKENIZE_CELLS if by_cell else len(chunk)), len(chunk))
            ends = np.searchsorted(rows, cuts) if by_cell else np.array([0, len(rows)])
            for a, b, ea, eb in zip(cuts[:-1], cuts[1:], ends[:-1], ends[1:]):
                part = self.tokenizer.tokenize(
                    rows[ea:eb] - a, genes[ea:eb], vals[ea:eb], b - a, cell_keys=chunk[a:b].astype(np.uint64), epoch=self.epoch,
                    keep_values=self.expression,
                )
                t0 = offsets[lo + a]
                gene_ids[t0 : t0 + part.n_tokens] = part.gene_ids
                values[t0 : t0 + part.n_tokens] = part.values
                if self.expression:
                    expr[t0 : t0 + part.n_tokens] = part.expr
                offsets[lo + a + 1 : lo + b + 1] = part.offsets[1:] + t0
        n_tokens = int(offsets[-1])
        return TokenizedCells(gene_ids[:n_tokens], values[:n_tokens], offsets, len(jids),
                              expr[:n_tokens] if self.expression else None)

    def _is_log(self, jids: np.ndarray) -> np.ndarray:
        """Per cell of ``jids``: does it come from a log-expression dataset?"""
        starts, stops = self._log_ranges[:, 0], self._log_ranges[:, 1]
        k = np.searchsorted(starts, jids, side="right") - 1
        return (k >= 0) & (jids < stops[np.maximum(k, 0)]) if len(starts) else np.zeros(len(jids), dtype=bool)

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
        if s.batch_tokens is not None:
            s.layout_for()  # lengths read and cuts made once here, not again in every worker
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