"""The pretraining objective as a module the training loop can drive (one loop, objectives as tasks).

A task is an ``nn.Module`` with two methods the loop calls:

* ``prepare(batch, seed, device, index) -> tuple``: everything random about a micro batch (here
  the mask and its ratio), drawn from a generator seeded by (run seed, step, micro batch, shard),
  so a resumed run draws exactly what the uninterrupted run would have drawn. ``index`` counts the
  micro batches of this data shard (0, 1, 2, ...; a function of the step, so also exact on resume):
  ``train.objective = "both"`` alternates on it.
* ``forward(*prepared) -> (loss, metrics)``: called through the DeepSpeed engine.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from data_store.batching import PackedBatch
from pretrain.generative import GenerativeSplit
from pretrain.model import CellerModel
from pretrain.objective import draw_mask, pick_mask_ratio, pretraining_loss

__all__ = ["OBJECTIVES", "PretrainTask", "micro_seed"]

OBJECTIVES = ("masked", "generative", "both")


def micro_seed(seed: int, step: int, micro: int, shard: int) -> int:
    """A 63-bit seed for one micro batch, distinct across steps, micro batches and shards."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + micro * 0x94D049BB133111EB + shard * 0x2545F4914F6CDD1D) & (
        (1 << 64) - 1
    )
    x ^= x >> 31
    return x & ((1 << 63) - 1)


class PretrainTask(nn.Module):
    """Hidden-expression prediction (MSE on hidden bins) + expression from the cell embedding, under
    the masked or the generative attention pattern (pretrain/objective.py).

    ``objective``: ``masked``, ``generative``, or ``both``: scGPT trains both modes, here one per
    micro batch in turn (even shard micro batches masked, odd ones generative), so every rank and
    every ZeRO stage sees the same sequence and a resumed run continues it exactly.
    """

    def __init__(self, model: CellerModel, mask_ratios: Sequence[float], objective: str = "masked"):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.model = model
        self.mask_ratios = tuple(mask_ratios)
        self.objective = objective

    def is_generative(self, index: int) -> bool:
        """Whether micro batch ``index`` of a shard trains the generative mode."""
        return self.objective == "generative" or (self.objective == "both" and index % 2 == 1)

    def prepare(self, batch: PackedBatch, seed: int, device: torch.device, index: int = 0) -> tuple:
        g = torch.Generator().manual_seed(seed)
        ratio = pick_mask_ratio(self.mask_ratios, g)
        mask = draw_mask(batch.cu_seqlens, batch.n_tokens, ratio, g)
        # The split's index arrays are built here, on the host, so the forward pass syncs on nothing.
        split = GenerativeSplit.from_known(~mask, batch.cu_seqlens).to(device) if self.is_generative(index) else None
        b = batch.to(device)
        return (b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen, mask.to(device), split)

    def forward(self, gene_ids: Tensor, values: Tensor, cu_seqlens: Tensor, max_seqlen: int, mask: Tensor,
                split: GenerativeSplit | None = None):
        loss, metrics = pretraining_loss(self.model, gene_ids, values, cu_seqlens, max_seqlen, mask, split)
        if self.objective != "masked":
            metrics["generative"] = float(split is not None)  # averaged per step: the generative share
        return loss, metrics
