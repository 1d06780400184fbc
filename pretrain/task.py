"""The pretraining objective as a module the training loop can drive (one loop, objectives as tasks).

A task is an ``nn.Module`` with two methods the loop calls:

* ``prepare(batch, seed) -> tuple``: everything random about a micro batch (here the mask and its
  ratio), drawn from a generator seeded by (run seed, step, micro batch, shard), so a resumed
  run draws exactly what the uninterrupted run would have drawn.
* ``forward(*prepared) -> (loss, metrics)``: called through the DeepSpeed engine.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from data_store.batching import PackedBatch
from pretrain.model import CellerModel
from pretrain.objective import draw_mask, pick_mask_ratio, pretraining_loss

__all__ = ["PretrainTask", "micro_seed"]


def micro_seed(seed: int, step: int, micro: int, shard: int) -> int:
    """A 63-bit seed for one micro batch, distinct across steps, micro batches and shards."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + micro * 0x94D049BB133111EB + shard * 0x2545F4914F6CDD1D) & (
        (1 << 64) - 1
    )
    x ^= x >> 31
    return x & ((1 << 63) - 1)


class PretrainTask(nn.Module):
    """Masked-expression prediction (MSE on masked bins) + expression from the cell embedding."""

    def __init__(self, model: CellerModel, mask_ratios: Sequence[float]):
        super().__init__()
        self.model = model
        self.mask_ratios = tuple(mask_ratios)

    def prepare(self, batch: PackedBatch, seed: int, device: torch.device) -> tuple:
        g = torch.Generator().manual_seed(seed)
        ratio = pick_mask_ratio(self.mask_ratios, g)
        mask = draw_mask(batch.cu_seqlens, batch.n_tokens, ratio, g)
        b = batch.to(device)
        return (b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen, mask.to(device))

    def forward(self, gene_ids: Tensor, values: Tensor, cu_seqlens: Tensor, max_seqlen: int, mask: Tensor):
        return pretraining_loss(self.model, gene_ids, values, cu_seqlens, max_seqlen, mask)
