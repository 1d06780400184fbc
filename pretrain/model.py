"""The Celler transformer: gene + value embeddings, pre-LayerNorm encoder over packed cells, heads.

A plain ``nn.Module`` (no DeepSpeed, no tracking, no I/O): activation checkpointing and the
DeepSpeed engine are applied from outside (``pretrain/parallelize.py``, the training loop).

Input layout (from ``data_store``): each cell is ``<cls>`` followed by its non-zero genes; token id
= gene vocabulary id + ``N_SPECIAL``; value = the gene's expression bin in ``[0, n_bins)`` or
``MASK_VALUE`` where the objective hides it. There is no positional encoding: genes are a set, so
the encoder is permutation-equivariant within a cell.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from data_store.tokenize import CLS_ID, MASK_VALUE, N_SPECIAL, PAD_ID
from hiceller.config import ModelConfig
from pretrain.attention import padded_attention, varlen_attention
from pretrain.generative import GenerativeSplit, generative_attention

__all__ = [
    "PAD_ID",
    "CLS_ID",
    "N_SPECIAL",
    "MASK_VALUE",
    "CellerOutput",
    "GeneEncoder",
    "ValueEncoder",
    "EncoderBlock",
    "MaskedValueHead",
    "ExpressionFromCellHead",
    "CellerModel",
    "count_parameters",
    "cell_index",
]

_INIT_STD = 0.02


class CellerOutput(NamedTuple):
    """What the encoder returns."""

    hidden: Tensor
    """Final hidden states: ``[T, d]`` packed or ``[B, L, d]`` padded (pad positions zeroed)."""
    cell_emb: Tensor
    """``[B, d]``: the hidden state of each cell's ``<cls>`` token."""


def cell_index(cu_seqlens: Tensor, n_tokens: int) -> Tensor:
    """Long ``[T]``: the cell each packed token belongs to (``output_size`` avoids a host sync)."""
    lengths = cu_seqlens.diff().long()
    cells = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(cells, lengths, output_size=n_tokens)


class GeneEncoder(nn.Module):
    """Gene token embedding followed by LayerNorm (scGPT's GeneEncoder)."""

    def __init__(self, n_tokens: int, d_model: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model, padding_idx=PAD_ID)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, gene_ids: Tensor) -> Tensor:
        return self.norm(self.embedding(gene_ids))


class ValueEncoder(nn.Module):
    """scGPT's ContinuousValueEncoder on bins, with a learned vector for masked values.

    The bin is scaled to [0, 1] (so the MLP sees the same range whatever ``n_bins``), mapped by
    Linear(1, d) - ReLU - Linear(d, d) - LayerNorm. A masked value gets ``mask_embedding`` instead:
    a learned vector cannot be confused with any real bin, unlike feeding -1 through the MLP.
    """

    def __init__(self, d_model: int, n_bins: int) -> None:
        super().__init__()
        self.scale = 1.0 / max(n_bins - 1, 1)
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.mask_embedding = nn.Parameter(torch.zeros(d_model))

    def forward(self, values: Tensor) -> Tensor:
        masked = (values == MASK_VALUE).unsqueeze(-1)
        # Cast to the weights' dtype: under DeepSpeed bf16 the module itself is bf16 (no autocast).
        x = values.clamp(min=0).to(self.linear1.weight.dtype).mul(self.scale).unsqueeze(-1)
        h = self.norm(self.linear2(self.activation(self.linear1(x))))
        return torch.where(masked, self.mask_embedding.to(h.dtype), h)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + FFN(LN(x)).

    The fused ``qkv`` projection is the only attention parameter besides ``out_proj``; the attention
    backend is a function choice, so weights are interchangeable between flash, torch_varlen and SDPA.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.dropout_p = cfg.dropout
        self.backend = cfg.attention
        self.attn_norm = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ff_norm = nn.LayerNorm(cfg.d_model)
        self.ff1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.ff_activation = nn.GELU()
        self.ff2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[..., d]`` -> three ``[..., H, Dh]`` tensors."""
        q, k, v = self.qkv(self.attn_norm(x)).chunk(3, dim=-1)
        shape = (*x.shape[:-1], self.n_heads, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.ff2(self.dropout(self.ff_activation(self.ff1(self.ff_norm(x))))))

    @property
    def _attn_dropout(self) -> float:
        return self.dropout_p if self.training else 0.0

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, split: GenerativeSplit | None = None) -> Tensor:
        """Packed cells: ``x`` ``[T, d]`` -> ``[T, d]``; with ``split``, scGPT's generative attention
        pattern (pretrain/generative.py) instead of every token attending to its whole cell."""
        q, k, v = self._qkv(x)
        if split is None:
            a = varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p=self._attn_dropout, backend=self.backend)
        else:
            a = generative_attention(q, k, v, cu_seqlens, split, dropout_p=self._attn_dropout, backend=self.backend)
        x = x + self.dropout(self.out_proj(a.reshape(x.shape)))
        return self._feed_forward(x)

    def forward_padded(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        """Padded cells: ``x`` ``[B, L, d]``, ``padding_mask`` ``[B, L]`` (True = pad) -> ``[B, L, d]``."""
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x))  # [B, H, L, Dh]
        a = padded_attention(q, k, v, padding_mask, self._attn_dropout).transpose(1, 2)
        x = x + self.dropout(self.out_proj(a.reshape(x.shape)))
        return self._feed_forward(x)


class MaskedValueHead(nn.Module):
    """Per-token regression of the expression bin from the token's hidden state (d -> d -> 1)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_model)
        self.activation = nn.GELU()
        self.linear2 = nn.Linear(d_model, 1)

    def forward(self, hidden: Tensor) -> Tensor:
        """``[..., d]`` -> ``[...]`` predicted bins."""
        return self.linear2(self.activation(self.linear1(hidden))).squeeze(-1)


class ExpressionFromCellHead(nn.Module):
    """scGPT's GEPC/MVC decoder: a gene's bin from the cell embedding alone.

    ``pred = <W cell_emb, sigmoid(Q gene_emb)>``: the gene embedding carries no value, so the
    prediction has to come from what ``<cls>`` learned about the whole cell.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.cell_proj = nn.Linear(d_model, d_model, bias=False)
        self.gene_query = nn.Linear(d_model, d_model)

    def forward(self, cell_emb: Tensor, gene_emb: Tensor) -> Tensor:
        """``cell_emb`` and ``gene_emb`` ``[N, d]`` (the cell of each of N tokens) -> ``[N]``."""
        query = torch.sigmoid(self.gene_query(gene_emb))
        return (self.cell_proj(cell_emb) * query).sum(-1)


class CellerModel(nn.Module):
    """Celler encoder with its pretraining heads.

    Args:
        cfg: sizes, dropout and attention backend.
        n_genes: size of the gene vocabulary (token ids go up to ``n_genes + N_SPECIAL - 1``).
        n_bins: number of expression bins (values in ``[0, n_bins)``).
    """

    def __init__(self, cfg: ModelConfig, n_genes: int, n_bins: int) -> None:
        super().__init__()
        if n_genes < 1 or n_bins < 2:
            raise ValueError(f"need n_genes >= 1 and n_bins >= 2, got n_genes={n_genes}, n_bins={n_bins}")
        self.cfg = cfg
        self.n_genes = n_genes
        self.n_bins = n_bins
        self.gene_encoder = GeneEncoder(n_genes + N_SPECIAL, cfg.d_model)
        self.value_encoder = ValueEncoder(cfg.d_model, n_bins)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.blocks: nn.ModuleList = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)
        self.value_head = MaskedValueHead(cfg.d_model)
        self.expr_head = ExpressionFromCellHead(cfg.d_model)
        self.reset_parameters()

    @property
    def embed_dim(self) -> int:
        """Width of ``hidden`` and ``cell_emb``."""
        return self.cfg.d_model

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights, zero biases, unit LayerNorms; residual outputs scaled down.

        Scaling ``out_proj`` and ``ff2`` by 1/sqrt(2 n_layers) (GPT-2) keeps the residual stream's
        variance from growing with depth at init. Uses the global RNG, so torch.manual_seed fixes it.
        """
        residual_std = _INIT_STD / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("out_proj", "ff2")) else _INIT_STD
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=_INIT_STD)
                with torch.no_grad():
                    module.weight[PAD_ID].zero_()
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        nn.init.normal_(self.value_encoder.mask_embedding, std=_INIT_STD)

    def embed_genes(self, gene_ids: Tensor) -> Tensor:
        """Gene embeddings without values (the query side of :class:`ExpressionFromCellHead`)."""
        return self.gene_encoder(gene_ids)

    def _embed(self, gene_ids: Tensor, values: Tensor) -> Tensor:
        return self.embed_dropout(self.gene_encoder(gene_ids) + self.value_encoder(values))

    def forward(self, gene_ids: Tensor, values: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                split: GenerativeSplit | None = None) -> CellerOutput:
        """Packed cells: ``gene_ids``, ``values`` ``[T]``; ``cu_seqlens`` int32 ``[B + 1]``.

        ``split`` (generative pretraining): which tokens are known; unknown tokens then see only
        their cell's known tokens and themselves, in every block. ``<cls>`` is always known.
        """
        x = self._embed(gene_ids, values)
        for block in self.blocks:
            x = block(x, cu_seqlens, max_seqlen, split)
        hidden = self.final_norm(x)
        return CellerOutput(hidden=hidden, cell_emb=hidden[cu_seqlens[:-1].long()])

    def forward_padded(self, gene_ids: Tensor, values: Tensor, padding_mask: Tensor) -> CellerOutput:
        """Padded cells: ``[B, L]`` inputs, ``padding_mask`` True at pads; same weights as :meth:`forward`."""
        x = self._embed(gene_ids, values)
        for block in self.blocks:
            x = block.forward_padded(x, padding_mask)
        hidden = self.final_norm(x).masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return CellerOutput(hidden=hidden, cell_emb=hidden[:, 0])


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once)."""
    params = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in params.values())
