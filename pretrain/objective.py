"""Pretraining objectives of scGPT/Celler: masked-expression and generative.

Per micro batch one ratio is drawn (0.25 / 0.5 / 0.75 by default); in every cell that share of gene
tokens has its value hidden (``MASK_VALUE``: the learned "value unknown" embedding). Two
predictions of the hidden bins are scored with MSE on the hidden tokens only:

- ``MaskedValueHead`` on each hidden token's own hidden state;
- ``ExpressionFromCellHead`` from the cell's ``<cls>`` embedding and the gene's embedding
  (scGPT's GEPC/MVC), which forces the cell embedding to summarise the whole cell.

The two objectives differ only in what a hidden token may look at (``train.objective``):

- masked: every token attends to its whole cell, hidden ones included (scGPT's "perceptual" mode);
- generative: the hidden genes are scGPT's *unknown* genes. Known genes attend to known genes, each
  unknown gene to the known genes and itself (pretrain/generative.py), so an unknown gene's value
  is predicted from its identity and the known part of the cell, never from another unknown gene.
  scGPT marks unknown tokens with a learned flag embedding; here that is the learned vector a
  hidden value already gets, so both modes train the same weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.generative import GenerativeSplit
from pretrain.model import MASK_VALUE, CellerModel, cell_index

__all__ = ["draw_mask", "pretraining_loss", "pick_mask_ratio"]


def pick_mask_ratio(ratios: Sequence[float], generator: torch.Generator) -> float:
    """One ratio drawn uniformly from ``ratios`` with ``generator`` (one draw per micro batch)."""
    if len(ratios) == 0:
        raise ValueError("ratios must not be empty")
    i = int(torch.randint(len(ratios), (1,), generator=generator, device=generator.device).item())
    return float(ratios[i])


def draw_mask(cu_seqlens: Tensor, n_tokens: int, ratio: float, generator: torch.Generator) -> Tensor:
    """Bool ``[T]``: the gene tokens whose value is hidden; never a cell's first (``<cls>``) token.

    Cell ``i`` with ``n_i = L_i - 1`` genes gets exactly ``max(1, round(ratio * n_i))`` masked genes
    when ``n_i > 0`` (``round`` halves to even, like Python's), none otherwise, chosen uniformly
    without replacement. Deterministic given the generator's state; the draw happens on the
    generator's device and the mask is returned on ``cu_seqlens``' device.

    How, without a loop over cells: every token gets a uniform key, ``<cls>`` gets 2 (above every
    key, so it ranks last); a stable sort by key then by cell yields each token's rank inside its
    cell, and the tokens whose rank is below the cell's quota are masked.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    device = cu_seqlens.device
    starts = cu_seqlens[:-1].long()
    n_genes = cu_seqlens.diff().long() - 1
    quota = torch.where(n_genes > 0, torch.round(n_genes * ratio).long().clamp(min=1), 0)

    keys = torch.rand(n_tokens, generator=generator, device=generator.device).to(device)
    keys[starts] = 2.0
    cell = cell_index(cu_seqlens, n_tokens)
    by_key = torch.argsort(keys)
    order = by_key[torch.argsort(cell[by_key], stable=True)]  # grouped by cell, keys ascending
    rank = torch.empty(n_tokens, dtype=torch.long, device=device)
    rank[order] = torch.arange(n_tokens, device=device) - starts[cell[order]]
    return rank < quota[cell]


def pretraining_loss(
    model: CellerModel,
    gene_ids: Tensor,
    values: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    mask: Tensor,
    split: GenerativeSplit | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Masked-expression (``split`` None) or generative loss of one packed micro batch.

    Args:
        model: the encoder with its heads (a DeepSpeed engine wrapping it works too: its attribute
            lookup reaches the module's heads).
        gene_ids, values: ``[T]`` packed tokens and their true bins.
        cu_seqlens, max_seqlen: cell boundaries (see ``varlen_attention``).
        mask: bool ``[T]`` from :func:`draw_mask`: the hidden (masked or unknown) tokens.
        split: for the generative objective, ``GenerativeSplit.from_known(~mask, cu_seqlens)``.

    Returns:
        ``loss = mse_value + mse_expr_from_cell``, each the mean squared error (in bins) over the
        masked tokens of this micro batch, and float metrics ``loss``, ``mse_value``,
        ``mse_expr_from_cell``, ``n_masked``. With no masked token (cells without genes) the loss is
        0 and still reaches every parameter through empty index ops (zero gradients), so a
        data-parallel backward never waits for a missing gradient.
    """
    inputs = values.masked_fill(mask, MASK_VALUE)
    out = model(gene_ids, inputs, cu_seqlens, max_seqlen, split)
    # Heads run on the masked tokens only: the others have no target and would only cost compute.
    positions = mask.nonzero().squeeze(-1)
    target = values[positions].float()
    pred_value = model.value_head(out.hidden[positions]).float()
    cells = cell_index(cu_seqlens, gene_ids.numel())[positions]
    pred_expr = model.expr_head(out.cell_emb[cells], model.embed_genes(gene_ids[positions])).float()

    n_masked = positions.numel()
    denom = max(n_masked, 1)
    mse_value = F.mse_loss(pred_value, target, reduction="sum") / denom
    mse_expr = F.mse_loss(pred_expr, target, reduction="sum") / denom
    loss = mse_value + mse_expr
    # One host transfer for all metrics instead of one .item() per value.
    loss_f, value_f, expr_f = torch.stack([loss, mse_value, mse_expr]).detach().tolist()
    metrics = {"loss": loss_f, "mse_value": value_f, "mse_expr_from_cell": expr_f, "n_masked": float(n_masked)}
    return loss, metrics
