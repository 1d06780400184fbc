"""Real cells from .h5ad files with h5py alone: token batches for the training loop, and an
AnnData-like query for the Annotator, without the store stack (tiledbsoma, anndata).

Made for bench/gpu_check.py on a bare GPU machine, where every package beyond the image's has to be
carried as a wheel in 64 MiB. The tokens come from the project's own ``Tokenizer`` and ``pack``, so a
batch is what ``CellStream`` would give for the same cells; only the reading differs (h5py instead of
SOMA) and the order (one seeded shuffle per epoch instead of block shuffling).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import h5py
import numpy as np

from data_store.batching import PackedBatch, pack
from data_store.tokenize import TokenizedCells, Tokenizer

__all__ = ["H5adMatrix", "read_h5ad", "H5adCells", "ShuffledCells", "as_query"]


@dataclass
class H5adMatrix:
    """One file's counts as CSR arrays and its gene symbols."""

    path: Path
    genes: list[str]
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray

    @property
    def n_cells(self) -> int:
        return len(self.indptr) - 1


def _strings(ds: h5py.Dataset) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in ds[()]]


def read_h5ad(path: str | Path) -> H5adMatrix:
    """X (CSR, as the shared files and most writers store counts) and var names of an .h5ad file.

    Raises:
        ValueError: X is not stored as a CSR group, or var has no index column.
    """
    path = Path(path)
    with h5py.File(path, "r") as f:
        x = f["X"]
        if not isinstance(x, h5py.Group) or x.attrs.get("encoding-type") != "csr_matrix":
            raise ValueError(f"{path}: X must be a CSR matrix (encoding-type csr_matrix), got {dict(x.attrs)}")
        index = f["var"].attrs.get("_index")
        if index is None or index not in f["var"]:
            raise ValueError(f"{path}: var has no index column")
        genes = _strings(f["var"][index])
        n_cells, n_genes = (int(n) for n in x.attrs["shape"])
        if n_genes != len(genes):
            raise ValueError(f"{path}: X has {n_genes} columns but var has {len(genes)} genes")
        return H5adMatrix(path, genes, x["indptr"][()].astype(np.int64), x["indices"][()].astype(np.int64),
                          x["data"][()].astype(np.float32))


class H5adCells:
    """The cells of several .h5ad files on one gene vocabulary (sorted union of upper-cased symbols)."""

    def __init__(self, paths: list[Path], max_cells_per_file: int | None = None) -> None:
        if not paths:
            raise ValueError("no .h5ad files given")
        self.files = [read_h5ad(p) for p in paths]
        self.vocab = sorted({g.upper() for m in self.files for g in m.genes})
        index = {g: i for i, g in enumerate(self.vocab)}
        rows, cols, vals, offset = [], [], [], 0
        for m in self.files:
            n = m.n_cells if max_cells_per_file is None else min(m.n_cells, max_cells_per_file)
            end = int(m.indptr[n])
            col_ids = np.array([index[g.upper()] for g in m.genes], dtype=np.int64)
            rows.append(np.repeat(np.arange(n, dtype=np.int64), np.diff(m.indptr[: n + 1])) + offset)
            cols.append(col_ids[m.indices[:end]])
            vals.append(m.data[:end])
            offset += n
        self.n_cells = offset
        self.rows, self.cols, self.vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        # Symbols that differ only in case name one vocabulary gene: keep the first entry of a pair.
        key = self.rows * len(self.vocab) + self.cols
        _, first = np.unique(key, return_index=True)
        if len(first) < len(key):
            keep = np.sort(first)
            self.rows, self.cols, self.vals = self.rows[keep], self.cols[keep], self.vals[keep]

    def tokenize(self, tokenizer: Tokenizer, epoch: int = 0) -> TokenizedCells:
        return tokenizer.tokenize(self.rows, self.cols, self.vals, self.n_cells,
                                  cell_keys=np.arange(self.n_cells, dtype=np.uint64), epoch=epoch)


class ShuffledCells:
    """A CellStream stand-in for one rank: full batches of ``batch_cells`` in a seeded shuffle per
    epoch, with the interface the training loop uses (``dataloader``, ``set_epoch``, state)."""

    def __init__(self, cells: H5adCells, tokenizer: Tokenizer, batch_cells: int, seed: int) -> None:
        if cells.n_cells < batch_cells:
            raise ValueError(f"{cells.n_cells} cells are fewer than one batch of {batch_cells}")
        self.cells, self.tokenizer, self.batch_cells, self.seed = cells, tokenizer, batch_cells, seed
        self.rank, self.epoch, self.position = 0, 0, 0
        self.n_cells = cells.n_cells
        self._tokens: dict[int, TokenizedCells] = {}

    def __len__(self) -> int:
        return self.n_cells // self.batch_cells

    def tokens(self, epoch: int) -> TokenizedCells:
        """All cells tokenized for ``epoch`` (the tokenizer re-draws gene samples per epoch)."""
        if epoch not in self._tokens:
            self._tokens = {epoch: self.cells.tokenize(self.tokenizer, epoch)}
        return self._tokens[epoch]

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def dataloader(self, num_workers: int = 0) -> Iterator[PackedBatch]:
        tok = self.tokens(self.epoch)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_cells)
        while self.position + 1 <= len(self):
            a = self.position * self.batch_cells
            self.position += 1
            yield pack(tok.select(order[a : a + self.batch_cells]))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def as_query(m: H5adMatrix, max_cells: int | None = None) -> SimpleNamespace:
    """What ``Annotator.iter_predictions`` reads of an AnnData: ``n_obs``, ``var_names``, ``var``, ``X``."""
    import pandas as pd
    import scipy.sparse as sp

    n = m.n_cells if max_cells is None else min(m.n_cells, max_cells)
    end = int(m.indptr[n])
    x = sp.csr_matrix((m.data[:end], m.indices[:end], m.indptr[: n + 1]), shape=(n, len(m.genes)))
    names = pd.Index(m.genes)
    return SimpleNamespace(n_obs=n, var_names=names, var=pd.DataFrame(index=names), X=x)
