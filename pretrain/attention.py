"""Bidirectional attention over packed cells: flash-attn varlen on CUDA, torch SDPA anywhere else.

Cells are concatenated into one token axis (``[T, H, Dh]``) and delimited by ``cu_seqlens``
(int32 ``[B + 1]``, cumulative lengths starting at 0). A token attends to every token of its own
cell and to nothing else; there is no causal mask (genes are a set).

Backends take the same inputs and no parameters, so a model's weights do not depend on the choice:

- ``flash``: ``flash_attn.flash_attn_varlen_func``. CUDA and fp16/bf16 only; ``flash_attn`` is the
  optional ``gpu`` extra (``pip install 'hiceller[gpu]'``).
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` called once per cell (see
  :func:`_sdpa_per_cell` for the measurement behind that choice).
- ``auto``: ``flash`` when it can run on the given tensors, else ``sdpa``.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BACKENDS",
    "flash_attn_available",
    "resolve_backend",
    "varlen_attention",
    "padded_attention",
]

BACKENDS = ("auto", "flash", "sdpa")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_INSTALL_HINT = "install the gpu extra on a CUDA machine: pip install 'hiceller[gpu]' (flash-attn>=2.6)"


@functools.cache
def _load_flash() -> tuple[Callable[..., Tensor] | None, str]:
    """``(flash_attn_varlen_func, "")`` or ``(None, why it cannot be imported)``; imported once."""
    try:
        from flash_attn import flash_attn_varlen_func
    except (ImportError, OSError) as e:  # OSError: a wheel built against another CUDA/torch ABI
        return None, f"flash_attn cannot be imported ({type(e).__name__}: {e})"
    return flash_attn_varlen_func, ""


def flash_attn_available() -> bool:
    """True when ``flash_attn`` imports and a CUDA device is present."""
    fn, _ = _load_flash()
    return fn is not None and torch.cuda.is_available()


def _flash_unusable_reason(q: Tensor) -> str:
    """Why flash-attn cannot run on ``q`` ("" when it can)."""
    fn, why = _load_flash()
    if fn is None:
        return why
    if not q.is_cuda:
        return f"flash-attn runs only on CUDA tensors, got device {q.device}"
    if q.dtype not in _FLASH_DTYPES:
        return f"flash-attn needs fp16 or bf16, got {q.dtype} (train with bf16/fp16 precision)"
    return ""


def resolve_backend(backend: str, q: Tensor) -> str:
    """The concrete backend (``flash`` or ``sdpa``) that ``backend`` means for tensors like ``q``.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: ``flash`` was asked for explicitly but cannot run here (the message says why).
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "sdpa":
        return "sdpa"
    reason = _flash_unusable_reason(q)
    if backend == "flash" and reason:
        raise RuntimeError(f"attention backend 'flash' cannot run: {reason}. To use it, {_INSTALL_HINT}; "
                           "or set model.attention = \"auto\" / \"sdpa\" (same weights).")
    return "sdpa" if reason else "flash"


def _sdpa_per_cell(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, dropout_p: float) -> Tensor:
    """SDPA called once per cell on ``[1, H, L_i, Dh]`` views of the packed tensors.

    Why a Python loop: measured with bench/attention_speed.py on CPU (torch 2.13, fp32, 1 thread,
    process CPU time, best of 2-3 after a warm-up; the 2-core machine was shared with other jobs,
    so wall time was not trustworthy). 32 cells of 201..1201 tokens (~22k tokens), heads =
    max(4, d_model / 64); milliseconds for attention forward+backward (forward only in brackets):

        d_model   per-cell loop   pad to Lmax + key mask   4 length buckets   nested jagged
        64          241 (70)           609 (184)              333 (108)         - (2293)
        256         766 (204)         1691 (564)              936 (301)         - (2620)
        512        1423 (364)         3746 (1113)            2026 (557)         - (5194)

    256 short cells (11..257 tokens), forward+backward: d_model 64: 112 vs 241 padded vs 154
    bucketed; d_model 512: 687 vs 1912 vs 1159. An earlier 2-thread wall-clock run on a quieter
    machine ranked them the same (d_model 512: loop 765, padded 2171, buckets 2974, nested 27496).
    Padding computes Lmax^2 scores for every cell (~2.5x the sum of L_i^2 for uniform 200..1200
    lengths) and pays a scatter/gather; buckets only shrink that waste; nested-jagged SDPA has no
    fused CPU kernel and falls back to a slow unfused path. The loop does exactly sum L_i^2 work in
    the fused CPU flash kernel, and 32..256 calls cost little next to that work.
    On CUDA the fast path is flash-attn; this loop is the correct fallback there (it reads the
    lengths on the host: one synchronisation per call). Not measured on a GPU.
    """
    lengths = cu_seqlens.diff().tolist()
    if len(set(lengths)) < len(lengths):
        return _sdpa_by_length(q, k, v, cu_seqlens, lengths, dropout_p)
    # [T, H, Dh] -> [1, H, T, Dh] once; split along tokens gives per-cell [1, H, L_i, Dh] views.
    # The leading 1 matters: torch's fused CPU flash kernel only accepts 4-D inputs, 3-D ones
    # silently take the unfused math path (bmm + softmax + bmm, L_i^2 memory).
    qs, ks, vs = (x.transpose(0, 1).unsqueeze(0).split(lengths, dim=2) for x in (q, k, v))
    outs = [F.scaled_dot_product_attention(qi, ki, vi, dropout_p=dropout_p) for qi, ki, vi in zip(qs, ks, vs)]
    return torch.cat(outs, dim=2).squeeze(0).transpose(0, 1)


def _sdpa_by_length(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, lengths: list[int], dropout_p: float) -> Tensor:
    """One SDPA call per distinct cell length: cells of equal length are gathered into one
    ``[g, H, L, Dh]`` batch, so the work is still exactly sum L_i^2 (no padding) but with one call
    per length instead of one per cell. Cells cut at ``max_genes`` all share one length, which made
    the per-cell loop 2-3x slower than a padded batch (bench/train.py, bench/annotate_speed.py).

    Tokens are reordered ONCE (cells sorted by length, one ``index_select`` per tensor) and every
    group is a contiguous slice of that copy. Gathering per group instead cost O(T) per call when
    ``q, k, v`` are the non-contiguous views of the fused qkv projection: 44% of a 256-cell
    inference forward with 188 distinct lengths went into ``index_select``.
    """
    H, Dh = q.shape[1], q.shape[2]
    dev = q.device
    lens = torch.tensor(lengths, device=dev)
    starts = cu_seqlens[:-1].to(device=dev, dtype=torch.long)
    by_len = torch.argsort(lens, stable=True)
    sorted_lens = lens[by_len]
    new_starts = torch.cumsum(sorted_lens, 0) - sorted_lens
    # token j of the reordered copy comes from start(cell) + (j - new_start(cell))
    idx = torch.repeat_interleave(starts[by_len] - new_starts, sorted_lens) + torch.arange(q.shape[0], device=dev)
    qs, ks, vs = (x.index_select(0, idx) for x in (q, k, v))
    group_lens, group_cells = torch.unique_consecutive(sorted_lens, return_counts=True)
    sizes = (group_lens * group_cells).tolist()
    outs = []
    for L, g, qg, kg, vg in zip(group_lens.tolist(), group_cells.tolist(), qs.split(sizes), ks.split(sizes), vs.split(sizes)):
        o = F.scaled_dot_product_attention(*(t.view(g, L, H, Dh).transpose(1, 2) for t in (qg, kg, vg)), dropout_p=dropout_p)
        outs.append(o.transpose(1, 2).reshape(g * L, H, Dh))
    out = torch.cat(outs, 0)
    # Back to packed order: position idx[j] receives row j.
    inverse = torch.empty_like(idx)
    inverse[idx] = torch.arange(idx.numel(), device=dev)
    return out.index_select(0, inverse)


def _check_packed(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> None:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [T, H, Dh], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be [B + 1] with B >= 1, got shape {tuple(cu_seqlens.shape)}")


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Softmax attention within each packed cell; ``q, k, v`` are ``[T, H, Dh]``, returns ``[T, H, Dh]``.

    Args:
        q, k, v: packed queries, keys and values of all cells (cell ``i`` owns tokens
            ``cu_seqlens[i]:cu_seqlens[i+1]``). Every cell must have at least one token.
        cu_seqlens: int32 ``[B + 1]`` cumulative lengths, ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == T``.
        max_seqlen: the longest cell (flash-attn sizes its launch grid with it).
        dropout_p: attention-probability dropout; pass 0.0 in evaluation.
        backend: ``auto``, ``flash`` or ``sdpa`` (see the module docstring).
    """
    _check_packed(q, k, v, cu_seqlens)
    if resolve_backend(backend, q) == "flash":
        flash_varlen, _ = _load_flash()
        assert flash_varlen is not None  # resolve_backend returned "flash" only if it imported
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return flash_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=dropout_p, causal=False)
    return _sdpa_per_cell(q, k, v, cu_seqlens, dropout_p)


def padded_attention(q: Tensor, k: Tensor, v: Tensor, padding_mask: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Attention on a padded batch: ``q, k, v`` ``[B, H, L, Dh]``, ``padding_mask`` ``[B, L]`` (True = pad).

    Pad keys are masked out; pad queries still produce (meaningless) outputs that the caller must
    ignore. A row made only of padding would give NaN, so every sequence needs one real token.
    """
    if padding_mask.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"padding_mask must be [B, L] = {(q.shape[0], q.shape[2])}, got {tuple(padding_mask.shape)}")
    keep = ~padding_mask.bool()[:, None, None, :]  # SDPA's boolean mask means "may attend"
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p)
