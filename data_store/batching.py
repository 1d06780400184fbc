"""Token batches for the model: varlen packing (no padding) and the padded layout.

The packed layout is what flash-attn's varlen kernel consumes: all cells' tokens concatenated,
with ``cu_seqlens`` (int32, cumulative lengths starting at 0) marking cell boundaries. Padding
wastes nothing there, which matters because cell lengths range from a handful to ``max_genes + 1``
tokens. The padded layout ``[B, L]`` with a boolean padding mask is for torch SDPA and for the
classifier; both convert into each other without a Python loop over cells.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from data_store.tokenize import PAD_ID, PAD_VALUE, TokenizedCells

__all__ = [
    "IGNORE_LABEL",
    "UNKNOWN_JOINID",
    "PackedBatch",
    "PaddedBatch",
    "pack",
    "iter_token_budget_batches",
    "to_padded",
    "from_padded",
    "collate_packed",
]

IGNORE_LABEL = -100
"""Label of an unlabeled cell (``torch.nn.functional.cross_entropy``'s default ignore_index)."""
UNKNOWN_JOINID = -1
"""Joinid of a cell whose origin was not given."""


@dataclass
class PackedBatch:
    """``B`` cells' tokens concatenated; cell ``i`` is ``[cu_seqlens[i], cu_seqlens[i+1])``."""

    gene_ids: torch.Tensor
    """LongTensor[T]: token ids (``<cls>`` first in each cell)."""
    values: torch.Tensor
    """LongTensor[T]: expression bins."""
    cu_seqlens: torch.Tensor
    """IntTensor[B+1] (int32, as flash-attn's varlen kernel wants): cumulative lengths from 0."""
    max_seqlen: int
    """Longest cell in tokens (flash-attn takes it as a Python int to size its grid)."""
    labels: torch.Tensor
    """LongTensor[B]: class per cell, ``IGNORE_LABEL`` when unlabeled."""
    joinids: torch.Tensor
    """LongTensor[B]: soma_joinid per cell, ``UNKNOWN_JOINID`` when not given."""
    expr: torch.Tensor | None = None
    """FloatTensor[T]: each token's normalised expression (0 at ``<cls>``) when the cells were
    tokenized with ``keep_values`` (a classifier's linear part reads it); None otherwise. The padded
    layout does not carry it."""

    @property
    def n_cells(self) -> int:
        """Number of cells ``B``."""
        return self.cu_seqlens.numel() - 1

    @property
    def n_tokens(self) -> int:
        """Number of tokens ``T``."""
        return self.gene_ids.numel()

    @property
    def seqlens(self) -> torch.Tensor:
        """Tokens per cell (int32)."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """Every tensor on ``device`` (``non_blocking`` pays off from pinned memory)."""
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedBatch:
        """Every tensor in page-locked memory, for asynchronous host-to-GPU copies."""
        return _map_tensors(self, torch.Tensor.pin_memory)


@dataclass
class PaddedBatch:
    """The same cells as ``[B, L]`` rows, tokens left-aligned, the rest padding."""

    gene_ids: torch.Tensor
    """LongTensor[B, L]; ``PAD_ID`` at padding."""
    values: torch.Tensor
    """LongTensor[B, L]; ``PAD_VALUE`` at padding."""
    padding_mask: torch.Tensor
    """BoolTensor[B, L]; True at padding (the ``key_padding_mask`` convention)."""
    labels: torch.Tensor
    """LongTensor[B]."""
    joinids: torch.Tensor
    """LongTensor[B]."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PaddedBatch:
        """Every tensor on ``device``."""
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))


_Batch = TypeVar("_Batch", PackedBatch, PaddedBatch)
PerCell = npt.ArrayLike | torch.Tensor | None
"""Per-cell labels or joinids: numpy array, list or tensor of length n_cells, or None."""


def pack(
    tokenized: TokenizedCells, labels: PerCell = None, joinids: PerCell = None
) -> PackedBatch:
    """All cells of ``tokenized`` as one packed batch."""
    n = tokenized.n_cells
    if tokenized.n_tokens > np.iinfo(np.int32).max:
        raise ValueError(f"{tokenized.n_tokens} tokens do not fit int32 cu_seqlens; split the block")
    lengths = tokenized.lengths
    return PackedBatch(
        gene_ids=torch.from_numpy(tokenized.gene_ids).long(),
        values=torch.from_numpy(tokenized.values).long(),
        cu_seqlens=torch.from_numpy(tokenized.offsets.astype(np.int32)),
        max_seqlen=int(lengths.max()) if n else 0,
        labels=_per_cell(labels, n, IGNORE_LABEL, "labels"),
        joinids=_per_cell(joinids, n, UNKNOWN_JOINID, "joinids"),
        expr=None if tokenized.expr is None else torch.from_numpy(tokenized.expr),
    )


def iter_token_budget_batches(
    tokenized: TokenizedCells,
    token_budget: int,
    labels: PerCell = None,
    joinids: PerCell = None,
) -> Iterator[PackedBatch]:
    """Consecutive cells packed greedily, in order, into batches of at most ``token_budget`` tokens.

    A batch takes cells while their total stays within the budget; a single cell longer than the
    budget is never dropped or truncated: it forms a batch of its own. Order is kept so that
    shuffling stays the stream's job and resumption stays exact. The loop is per batch (each
    boundary is one binary search on the cumulative offsets), never per cell.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    n = tokenized.n_cells
    label_t = _per_cell(labels, n, IGNORE_LABEL, "labels")
    joinid_t = _per_cell(joinids, n, UNKNOWN_JOINID, "joinids")
    offsets = tokenized.offsets
    start = 0
    while start < n:
        # Last cell boundary within budget of this batch's first token.
        stop = int(np.searchsorted(offsets, offsets[start] + token_budget, side="right")) - 1
        stop = max(stop, start + 1)  # an over-budget cell goes alone
        yield pack(tokenized.select(slice(start, stop)), label_t[start:stop], joinid_t[start:stop])
        start = stop


def to_padded(packed: PackedBatch, pad_to_multiple_of: int = 1) -> PaddedBatch:
    """``[B, L]`` layout with ``L = max_seqlen`` rounded up to ``pad_to_multiple_of``.

    Rounding L up (e.g. to 8) keeps tensor-core friendly shapes and fewer distinct shapes for
    compiled kernels.
    """
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    width = -(-packed.max_seqlen // pad_to_multiple_of) * pad_to_multiple_of
    lengths = packed.seqlens.to(torch.long)
    positions = torch.arange(width, device=lengths.device)
    padding_mask = positions[None, :] >= lengths[:, None]
    gene_ids = _scatter_rows(packed.gene_ids, padding_mask, PAD_ID)
    values = _scatter_rows(packed.values, padding_mask, PAD_VALUE)
    return PaddedBatch(gene_ids, values, padding_mask, packed.labels, packed.joinids)


def from_padded(padded: PaddedBatch) -> PackedBatch:
    """Back to the packed layout; padding must be a suffix of each row (as ``to_padded`` makes)."""
    mask = padded.padding_mask
    if mask.ndim != 2 or mask.shape != padded.gene_ids.shape or mask.shape != padded.values.shape:
        raise ValueError("gene_ids, values and padding_mask must share one [B, L] shape")
    if mask.shape[1] > 1 and bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError("padding_mask has a token after padding; tokens must be left-aligned")
    keep = ~mask
    lengths = keep.sum(dim=1, dtype=torch.int32)
    cu_seqlens = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    torch.cumsum(lengths, dim=0, out=cu_seqlens[1:])
    return PackedBatch(
        gene_ids=padded.gene_ids[keep],  # row-major boolean selection = packed order
        values=padded.values[keep],
        cu_seqlens=cu_seqlens,
        max_seqlen=int(lengths.max()) if lengths.numel() else 0,
        labels=padded.labels,
        joinids=padded.joinids,
    )


def collate_packed(batches: Sequence[PackedBatch]) -> PackedBatch:
    """Concatenate packed batches into one, shifting each part's ``cu_seqlens``."""
    if not batches:
        raise ValueError("collate_packed needs at least one batch")
    token_starts = np.cumsum([0] + [b.n_tokens for b in batches])
    if token_starts[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"{token_starts[-1]} tokens do not fit int32 cu_seqlens")
    cu_parts = [batches[0].cu_seqlens[:1]]
    cu_parts += [b.cu_seqlens[1:] + int(s) for b, s in zip(batches, token_starts[:-1])]
    return PackedBatch(
        gene_ids=torch.cat([b.gene_ids for b in batches]),
        values=torch.cat([b.values for b in batches]),
        cu_seqlens=torch.cat(cu_parts).to(torch.int32),
        max_seqlen=max(b.max_seqlen for b in batches),
        labels=torch.cat([b.labels for b in batches]),
        joinids=torch.cat([b.joinids for b in batches]),
        expr=torch.cat([b.expr for b in batches]) if all(b.expr is not None for b in batches) else None,
    )


def _scatter_rows(flat: torch.Tensor, padding_mask: torch.Tensor, fill: int) -> torch.Tensor:
    """Tokens into the non-padding slots of a ``[B, L]`` tensor, in row-major order."""
    out = torch.full(padding_mask.shape, fill, dtype=flat.dtype, device=flat.device)
    out[~padding_mask] = flat  # boolean assignment fills row by row: exactly the packed order
    return out


def _per_cell(given: PerCell, n: int, default: int, name: str) -> torch.Tensor:
    """A LongTensor[n] from ``given`` (array, list or tensor), or ``default`` everywhere."""
    if given is None:
        return torch.full((n,), default, dtype=torch.long)
    t = torch.as_tensor(np.asarray(given) if not isinstance(given, torch.Tensor) else given).to(torch.long)
    if t.shape != (n,):
        raise ValueError(f"{name} must have one entry per cell ({n}), got shape {tuple(t.shape)}")
    return t


def _map_tensors(batch: _Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> _Batch:
    """A copy of ``batch`` with ``fn`` applied to every tensor field."""
    moved = {f.name: fn(v) for f in fields(batch) if isinstance(v := getattr(batch, f.name), torch.Tensor)}
    return replace(batch, **moved)
