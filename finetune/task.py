"""The fine-tuning objective for the shared training loop: a classifier on the <cls> embedding,
a linear classifier on the cell's expression (the "wide" part), or both summed.

``finetune.head`` picks the classifier:
- ``transformer``: ``head(cell_emb)``, a Linear on the encoder's ``<cls>`` embedding (scGPT, Celler).
- ``linear``: :class:`WideLinear` alone, a multinomial logistic regression on the cell's expression
  of the genes read; the encoder is not trained (it still gives ``X_celler`` at annotation).
- ``joint``: the sum of both, trained together (wide-and-deep). The wide part starts at zero, so
  the joint model starts as the transformer model, and it can always fall back on the linear
  solution: on a small reference a linear model on marker genes is hard to beat, and the encoder
  has to earn its share of the logits.

What the wide part reads (``finetune.wide_input``):
- ``expression``: each token's ``log1p(counts per 10k)`` (log-expression input is
  exponentiated back first), scaled per gene by the largest value in the training cells: the input
  of the logistic regressions it has to match. With an L1 penalty (``finetune.wide_l1``) it is
  their model, trained by the shared loop. Batches carry it as ``PackedBatch.expr``.
- ``bins`` (the default): the encoder's value bins divided by the top bin (no other input; models
  before the option read them). Rank bins lose what log1p keeps: on the PBMC tasks the same L1
  regression scored 0.05-0.06 macro-F1 lower on bins, while on Baron expression with the L1 penalty
  lost a 3-cell class (bench/RESULTS.md, issue 1/8).

State dict keys are ``model.*`` (the Celler encoder, as pretrained), ``head.*`` (a Linear from the
cell embedding to the classes) and, with a wide part, ``wide.*``: the same keys in DeepSpeed
checkpoints and in bundles. GInf's ``delta`` is a non-persistent buffer, never saved.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_store.batching import PackedBatch
from finetune.ginf import GInfLoss
from pretrain.model import CellerModel, cell_index

__all__ = ["HEADS", "WIDE_INPUTS", "ClassifierTask", "WideLinear", "l1_class_scale", "predict_logits"]

HEADS = ("transformer", "linear", "joint")
"""Values of ``finetune.head``: which logits the classifier sums (module docstring)."""
WIDE_INPUTS = ("expression", "bins")
"""Values of ``finetune.wide_input``: what the wide part reads (module docstring)."""


class WideLinear(nn.Module):
    """Logistic-regression logits from the tokens: ``bias + sum_g weight[g] * x_g``.

    ``x_g`` is ``expr_g * gene_scale[g]`` (``reads="expression"``) or ``bin_g / (n_bins - 1)``
    (``reads="bins"``). One row of ``weight`` per token id (``[n_tokens, n_classes]``,
    zero-initialised); ``<cls>`` carries 0 and so adds nothing. The sum over a cell's tokens is one
    ``index_add_`` over the packed layout. With ``track_l1``, ``l1`` is the (class-weighted)
    ``sum |weight|`` of the last training pass, taken inside it so that ZeRO-3 has the weight gathered.
    """

    def __init__(self, n_tokens: int, n_classes: int, n_bins: int, reads: str = "bins"):
        super().__init__()
        if reads not in WIDE_INPUTS:
            raise ValueError(f"reads must be one of {WIDE_INPUTS}, got {reads!r}")
        self.weight = nn.Parameter(torch.zeros(n_tokens, n_classes))
        self.bias = nn.Parameter(torch.zeros(n_classes))
        self.reads = reads
        self.scale = 1.0 / max(n_bins - 1, 1)
        if reads == "expression":
            # 1 / the gene's largest training value: a saved buffer, so a bundle reads queries alike.
            self.register_buffer("gene_scale", torch.ones(n_tokens))
        # Per-class weight of the L1 penalty (ClassifierTask sets it with wide_l1_class_power); not saved.
        self.register_buffer("l1_class_scale", torch.ones(n_classes), persistent=False)
        self.l1: Tensor | None = None
        self.track_l1 = False  # ClassifierTask turns it on when wide_l1 > 0

    def forward(self, gene_ids: Tensor, values: Tensor, cu_seqlens: Tensor, expr: Tensor | None = None) -> Tensor:
        if self.reads == "expression":
            if expr is None:
                raise ValueError("this linear part reads expression: tokenize with keep_values (PackedBatch.expr)")
            x = expr.to(self.weight.dtype) * self.gene_scale[gene_ids].to(self.weight.dtype)
        else:
            x = values.clamp(min=0).to(self.weight.dtype) * self.scale
        contrib = self.weight[gene_ids] * x.unsqueeze(-1)
        cells = cell_index(cu_seqlens, gene_ids.numel())
        out = self.bias.expand(cu_seqlens.numel() - 1, -1).clone()
        if self.training and self.track_l1:
            self.l1 = (self.weight.abs() * self.l1_class_scale.to(self.weight.dtype)).sum()
        return out.index_add_(0, cells, contrib)


def l1_class_scale(class_counts: np.ndarray, power: float = 1.0) -> np.ndarray:
    """Each class's share of the L1 penalty: ``min(1, (n_c * K / N) ** power)`` for K classes and N cells.

    The training loss is a mean over cells, so a class of n_c cells pulls its weights with a force
    proportional to n_c / N while a uniform L1 pushes every weight to zero alike; with Adam (which
    normalises each weight's step) a class of 3 cells in 2,000 loses its weights to the penalty.
    Scaling its penalty by its share (relative to an even share, at most 1) keeps the ratio of
    penalty to data the same for every class at or under an even share; common classes keep the
    full penalty; ``power`` < 1 softens it (0.5: the square root of the share)."""
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.sum() <= 0:
        return np.ones(len(counts), dtype=np.float32)
    share = counts * len(counts) / counts.sum()
    return np.minimum(1.0, share**power).astype(np.float32)


class ClassifierTask(nn.Module):
    """Celler encoder + classifier (``head`` in :data:`HEADS`), trained with cross-entropy or GInf.

    GInf's noise is drawn in ``prepare`` from the micro batch's seeded generator and passed in, so a
    resumed run draws the same noise; in eval mode the loss is plain cross-entropy (no noise)."""

    def __init__(
        self,
        model: CellerModel,
        n_classes: int,
        loss: str,
        class_counts: np.ndarray,
        mu: float = 0.0,
        sigma: float = 0.1,
        head: str = "transformer",
        wide_lr_scale: float = 1.0,
        wide_input: str = "bins",
        wide_l1: float = 0.0,
        wide_l1_class_power: float = 0.0,
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.model = model
        self.head = nn.Linear(model.embed_dim, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.head_kind = head
        n_tokens = model.gene_encoder.embedding.num_embeddings
        self.wide = WideLinear(n_tokens, n_classes, model.n_bins, reads=wide_input) if head != "transformer" else None
        self.wide_l1 = float(wide_l1)
        if self.wide is not None:
            self.wide.track_l1 = self.wide_l1 > 0
        if self.wide is not None and wide_l1_class_power > 0:
            self.wide.l1_class_scale.copy_(torch.from_numpy(l1_class_scale(class_counts, wide_l1_class_power)))
        if self.wide is not None:
            for p in self.wide.parameters():
                p.lr_scale = wide_lr_scale  # read by pretrain/optim.py's param_groups
        if head == "linear":
            # The encoder only provides embeddings at annotation; nothing of it is trained.
            for p in (*self.model.parameters(), *self.head.parameters()):
                p.requires_grad_(False)
        self.loss_kind = loss
        self.n_classes = n_classes
        self.mu, self.sigma = mu, sigma
        self.ginf = GInfLoss(class_counts, mu=mu, sigma=sigma) if loss == "ginf" else None

    @property
    def reads_expression(self) -> bool:
        """Do batches need ``PackedBatch.expr`` (tokenize with ``keep_values``)?"""
        return self.wide is not None and self.wide.reads == "expression"

    def logits(self, gene_ids: Tensor, values: Tensor, cu_seqlens: Tensor, max_seqlen: int,
               expr: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Class logits and ``<cls>`` embeddings of packed cells."""
        out = self.model(gene_ids, values, cu_seqlens, max_seqlen)
        return self._combine(out.cell_emb, gene_ids, values, cu_seqlens, expr), out.cell_emb

    def _combine(self, cell_emb: Tensor | None, gene_ids: Tensor, values: Tensor, cu_seqlens: Tensor,
                 expr: Tensor | None = None) -> Tensor:
        if self.head_kind == "transformer":
            return self.head(cell_emb)
        wide = self.wide(gene_ids, values, cu_seqlens, expr)
        if self.head_kind == "linear":
            return wide
        return self.head(cell_emb).float() + wide.float()

    def train_logits(self, gene_ids: Tensor, values: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                     expr: Tensor | None = None) -> Tensor:
        """Logits for the loss; a linear-only head skips the (untrained) encoder."""
        if self.head_kind == "linear":
            return self._combine(None, gene_ids, values, cu_seqlens, expr)
        return self.logits(gene_ids, values, cu_seqlens, max_seqlen, expr)[0]

    def prepare(self, batch: PackedBatch, seed: int, device: torch.device, index: int = 0) -> tuple:
        noise = None
        if self.ginf is not None:
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn(batch.n_cells, self.n_classes, generator=g).mul_(self.sigma).add_(self.mu).to(device)
        b = batch.to(device)
        return (b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen, b.labels, noise, b.expr)

    def forward(self, gene_ids, values, cu_seqlens, max_seqlen, labels, noise=None, expr=None) -> tuple[Tensor, dict[str, Any]]:
        logits = self.train_logits(gene_ids, values, cu_seqlens, max_seqlen, expr).float()
        if self.ginf is not None:
            loss = self.ginf(logits, labels, noise=noise)
        else:
            loss = F.cross_entropy(logits, labels, ignore_index=-100)
        if self.training and self.wide_l1 > 0 and self.wide is not None and self.wide.l1 is not None:
            loss = loss + self.wide_l1 * self.wide.l1.float()  # the lasso of an L1 logistic regression
        with torch.no_grad():
            ok = labels != -100
            acc = (logits.argmax(-1)[ok] == labels[ok]).float().mean() if ok.any() else torch.tensor(0.0)
        loss_f, acc_f = torch.stack([loss.detach(), acc]).tolist()
        return loss, {"loss": loss_f, "train_accuracy": acc_f}


@torch.no_grad()
def predict_logits(task: ClassifierTask, batches, device: torch.device) -> dict[str, np.ndarray]:
    """Logits, cell embeddings, joinids, labels and genes read per cell of every cell in ``batches``
    (eval mode, no noise)."""
    was = task.training
    task.eval()
    logits, embs, jids, labels, genes = [], [], [], [], []
    try:
        for b in batches:
            b = b.to(device)
            lg, emb = task.logits(b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen, b.expr)
            logits.append(lg.float().cpu())
            embs.append(emb.float().cpu())
            jids.append(b.joinids.cpu())
            labels.append(b.labels.cpu())
            genes.append((b.seqlens - 1).cpu())  # tokens minus <cls>
    finally:
        task.train(was)
    return {
        "logits": torch.cat(logits).numpy(),
        "embeddings": torch.cat(embs).numpy(),
        "joinids": torch.cat(jids).numpy(),
        "labels": torch.cat(labels).numpy(),
        "n_genes": torch.cat(genes).numpy(),
    }
