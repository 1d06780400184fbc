"""The fine-tuning objective for the shared training loop: a classifier on the <cls> embedding.

State dict keys are ``model.*`` (the Celler encoder, as pretrained) and ``head.*`` (a Linear from
the cell embedding to the classes): the same keys in DeepSpeed checkpoints and in bundles.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_store.batching import PackedBatch
from finetune.ginf import GInfLoss
from pretrain.model import CellerModel

__all__ = ["ClassifierTask", "predict_logits"]


class ClassifierTask(nn.Module):
    """Celler encoder + linear classifier, trained with cross-entropy or GInf.

    GInf's noise is drawn in ``prepare`` from the micro batch's seeded generator and passed in, so a
    resumed run draws the same noise; in eval mode the loss is plain cross-entropy (no noise)."""

    def __init__(self, model: CellerModel, n_classes: int, loss: str, class_counts: np.ndarray, mu: float = 0.0, sigma: float = 0.1):
        super().__init__()
        self.model = model
        self.head = nn.Linear(model.embed_dim, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.loss_kind = loss
        self.n_classes = n_classes
        self.mu, self.sigma = mu, sigma
        self.ginf = GInfLoss(class_counts, mu=mu, sigma=sigma) if loss == "ginf" else None

    def logits(self, gene_ids: Tensor, values: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> tuple[Tensor, Tensor]:
        out = self.model(gene_ids, values, cu_seqlens, max_seqlen)
        return self.head(out.cell_emb), out.cell_emb

    def prepare(self, batch: PackedBatch, seed: int, device: torch.device) -> tuple:
        noise = None
        if self.ginf is not None:
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn(batch.n_cells, self.n_classes, generator=g).mul_(self.sigma).add_(self.mu).to(device)
        b = batch.to(device)
        return (b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen, b.labels, noise)

    def forward(self, gene_ids, values, cu_seqlens, max_seqlen, labels, noise=None) -> tuple[Tensor, dict[str, Any]]:
        logits, _ = self.logits(gene_ids, values, cu_seqlens, max_seqlen)
        logits = logits.float()
        if self.ginf is not None:
            loss = self.ginf(logits, labels, noise=noise)
        else:
            loss = F.cross_entropy(logits, labels, ignore_index=-100)
        with torch.no_grad():
            ok = labels != -100
            acc = (logits.argmax(-1)[ok] == labels[ok]).float().mean() if ok.any() else torch.tensor(0.0)
        loss_f, acc_f = torch.stack([loss.detach(), acc]).tolist()
        return loss, {"loss": loss_f, "train_accuracy": acc_f}


@torch.no_grad()
def predict_logits(task: ClassifierTask, batches, device: torch.device) -> dict[str, np.ndarray]:
    """Logits, cell embeddings and joinids of every cell in ``batches`` (eval mode, no noise)."""
    was = task.training
    task.eval()
    logits, embs, jids, labels = [], [], [], []
    try:
        for b in batches:
            b = b.to(device)
            lg, emb = task.logits(b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen)
            logits.append(lg.float().cpu())
            embs.append(emb.float().cpu())
            jids.append(b.joinids.cpu())
            labels.append(b.labels.cpu())
    finally:
        task.train(was)
    return {
        "logits": torch.cat(logits).numpy(),
        "embeddings": torch.cat(embs).numpy(),
        "joinids": torch.cat(jids).numpy(),
        "labels": torch.cat(labels).numpy(),
    }
