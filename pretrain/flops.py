"""Model FLOPs per token and model FLOPs utilisation (MFU) of the Celler transformer.

MFU = achieved model FLOPs / peak FLOPs of the hardware, counting only the matmuls the model
needs (PaLM appendix B convention): recomputation by activation checkpointing is *not* counted,
so enabling it lowers MFU, as it should.
"""

from __future__ import annotations

from typing import Sequence

from hiceller.config import ModelConfig

__all__ = ["PEAK_FLOPS", "model_flops_per_token", "token_weighted_seqlen", "mfu"]

PEAK_FLOPS: dict[str, float] = {"H100-bf16": 989e12, "A100-bf16": 312e12}
"""Dense (no sparsity) tensor-core peak, FLOP/s, from the vendors' data sheets (H100 SXM, A100)."""


def model_flops_per_token(cfg: ModelConfig, mean_seqlen: float, n_genes: int) -> float:
    """Training FLOPs (forward + backward) per token, counting matrix multiplications only.

    With ``d = d_model``, ``f = d_ff``, ``n = n_layers``, ``L = mean_seqlen``, one multiply-add = 2 FLOPs:

        forward = 2d + 2d^2                      value encoder Linear(1, d), Linear(d, d)
                + n * (6d^2 + 2d^2               qkv and output projections
                       + 4 d f                   feed-forward d -> f -> d
                       + 4 L d)                  QK^T scores and scores x V (full, non-causal)
                + 6d^2 + 2d                      heads: MaskedValueHead (d->d->1) and
                                                 ExpressionFromCellHead (two d x d)
        training = 3 * forward                   backward = 2x forward (grads of inputs and weights)

    The heads are counted on every token although the objective runs them on the masked tokens
    only; they are < 3% of the total at the base size, so this is a slight upper bound.
    ``L`` is the length of the cell a token belongs to, averaged over tokens: for cells of lengths
    L_i pass :func:`token_weighted_seqlen` (sum L_i^2 / sum L_i), not the plain mean length.
    ``n_genes`` sizes the gene embedding, a table lookup: it holds parameters but costs no FLOPs,
    so it does not enter the sum (why a "6 x parameters" estimate would be wrong here).
    """
    if mean_seqlen <= 0:
        raise ValueError(f"mean_seqlen must be > 0, got {mean_seqlen}")
    if n_genes < 1:
        raise ValueError(f"n_genes must be >= 1, got {n_genes}")
    d, f = cfg.d_model, cfg.d_ff
    value_encoder = 2 * d + 2 * d * d
    per_layer = 8 * d * d + 4 * d * f + 4 * mean_seqlen * d
    heads = 6 * d * d + 2 * d
    forward = value_encoder + cfg.n_layers * per_layer + heads
    return 3.0 * forward


def token_weighted_seqlen(lengths: Sequence[int]) -> float:
    """``sum L_i^2 / sum L_i``: the cell length seen by an average token (for attention FLOPs)."""
    total = sum(lengths)
    if total <= 0:
        raise ValueError("lengths must contain at least one token")
    return sum(n * n for n in lengths) / total


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation in [0, 1]: ``tokens_per_s * flops_per_token / peak_flops``.

    ``tokens_per_s`` and ``peak_flops`` must describe the same hardware (one GPU, or all of them).
    """
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
    return tokens_per_s * flops_per_token / peak_flops
