"""Bidirectional attention over packed cells: flash kernels on CUDA, torch SDPA anywhere else.

Cells are concatenated into one token axis (``[T, H, Dh]``) and delimited by ``cu_seqlens``
(int32 ``[B + 1]``, cumulative lengths starting at 0). A token attends to every token of its own
cell and to nothing else; there is no causal mask (genes are a set).

Backends take the same inputs and no parameters, so a model's weights do not depend on the choice:

- ``flash``: ``flash_attn.flash_attn_varlen_func``. CUDA and fp16/bf16 only; ``flash_attn`` is the
  optional ``gpu`` extra (``pip install 'hiceller[gpu]'``), built from source against torch.
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn``, the flash-attention varlen kernel that
  ships inside torch (>= 2.10): same packed layout, nothing to build. CUDA (Ampere or newer) and
  fp16/bf16 only. With attention dropout in training it calls the aten op that ``varlen_attn``
  wraps, since ``varlen_attn`` itself takes no dropout (see :func:`_torch_varlen`).
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` called once per cell (see
  :func:`_sdpa_per_cell` for the measurement behind that choice).
- ``auto``: the first of ``flash``, ``torch_varlen`` that can run on the given tensors, else ``sdpa``:
  flash-attn on a GPU machine that has it, torch's own kernel on one that does not, SDPA on CPU
  and in fp32.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BACKENDS",
    "GPU_BACKENDS",
    "flash_attn_available",
    "torch_varlen_available",
    "backend_unusable_reason",
    "resolve_backend",
    "resolve_backend_for",
    "varlen_attention",
    "padded_attention",
    "sdpa_with_known",
]

BACKENDS = ("auto", "flash", "torch_varlen", "sdpa")
GPU_BACKENDS = ("flash", "torch_varlen")
"""The packed-kernel backends, in the order ``auto`` tries them."""
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256  # the largest head both flash kernels compile for
_HINTS = {
    "flash": "install the gpu extra on a CUDA machine: pip install 'hiceller[gpu]' (flash-attn>=2.6)",
    "torch_varlen": "use torch >= 2.10 with CUDA on an Ampere or newer GPU (the kernel ships with torch, no build)",
}


def _import_flash() -> tuple[Callable[..., Tensor] | None, str]:
    """``(flash_attn_varlen_func, "")`` or ``(None, why it cannot be imported)``."""
    try:
        from flash_attn import flash_attn_varlen_func
    except (ImportError, OSError) as e:  # OSError: a wheel built against another CUDA/torch ABI
        return None, f"flash_attn cannot be imported ({type(e).__name__}: {e})"
    return flash_attn_varlen_func, ""


def _import_torch_varlen() -> tuple[Callable[..., Tensor] | None, str]:
    """``(torch.nn.attention.varlen.varlen_attn, "")`` or ``(None, why this torch lacks it)``."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (added in torch 2.10)"
    if not torch.backends.cuda.is_flash_attention_available():
        return None, f"torch {torch.__version__} was built without flash-attention kernels"
    return varlen_attn, ""


_IMPORTERS = {"flash": _import_flash, "torch_varlen": _import_torch_varlen}
# Imported once per process. Plain dicts rather than functools.cache: torch.compile reads a filled
# dict as a constant, where it would trace through a cache wrapper (and warn) on every block.
_KERNELS: dict[str, tuple[Callable[..., Tensor] | None, str]] = {}
_CAPABILITY: dict[int, tuple[int, int]] = {}


def _kernel(name: str) -> tuple[Callable[..., Tensor] | None, str]:
    """``(kernel function, "")`` or ``(None, why it cannot be imported)`` for a GPU backend."""
    if name not in _KERNELS:
        _KERNELS[name] = _IMPORTERS[name]()
    return _KERNELS[name]


def flash_attn_available() -> bool:
    """True when ``flash_attn`` imports and a CUDA device is present."""
    return _kernel("flash")[0] is not None and torch.cuda.is_available()


def torch_varlen_available() -> bool:
    """True when this torch has ``varlen_attn`` with flash kernels and a CUDA device is present."""
    return _kernel("torch_varlen")[0] is not None and torch.cuda.is_available()


def _capability(index: int) -> tuple[int, int]:
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def _device_unusable_reason(q: Tensor) -> str:
    """Why the flash kernels cannot run on ``q``'s device ("" when they can). Tests replace this
    function to run the kernel contracts with CPU stand-ins."""
    if not q.is_cuda:
        return f"flash kernels run only on CUDA tensors, got device {q.device}"
    major, minor = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if major < 8:
        return f"flash kernels need an Ampere or newer GPU (compute capability >= 8.0), this one is {major}.{minor}"
    return ""


def backend_unusable_reason(backend: str, q: Tensor) -> str:
    """Why the GPU backend ``backend`` cannot run on tensors like ``q`` ("" when it can)."""
    fn, why = _kernel(backend)
    if fn is None:
        return why
    why = _device_unusable_reason(q)
    if why:
        return why
    if q.dtype not in _HALF_DTYPES:
        return f"{backend} needs fp16 or bf16, got {q.dtype} (train with deepspeed.precision bf16)"
    head_dim = q.shape[-1]
    if head_dim > _MAX_HEAD_DIM or head_dim % 8:
        return f"{backend} needs a head size that is a multiple of 8 up to {_MAX_HEAD_DIM}, got {head_dim}"
    return ""


def resolve_backend(backend: str, q: Tensor) -> str:
    """The concrete backend (``flash``, ``torch_varlen`` or ``sdpa``) that ``backend`` means for ``q``.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: a GPU backend was asked for explicitly but cannot run here (the message says why).
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "sdpa":
        return "sdpa"
    if backend in GPU_BACKENDS:
        reason = backend_unusable_reason(backend, q)
        if reason:
            raise RuntimeError(f"attention backend {backend!r} cannot run: {reason}. To use it, {_HINTS[backend]}; "
                               "or set model.attention = \"auto\" / \"sdpa\" (same weights).")
        return backend
    # Written out rather than a loop over GPU_BACKENDS: torch.compile traces this per block, and a
    # loop over a tuple that returns early made its guards index past the tuple (torch 2.13).
    if not backend_unusable_reason("flash", q):
        return "flash"
    if not backend_unusable_reason("torch_varlen", q):
        return "torch_varlen"
    return "sdpa"


def resolve_backend_for(backend: str, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str:
    """:func:`resolve_backend` for a run, before any tensor exists: what its attention will use on
    ``device`` with activations in ``dtype`` (what the training loop logs and the doctor reports)."""
    return resolve_backend(backend, torch.empty((0, 1, head_dim), device=device, dtype=dtype))


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
    On CUDA the fast paths are the flash kernels; this loop is the correct fallback there (fp32) (it reads the
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


def _sdpa_by_length(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, lengths: list[int], dropout_p: float,
                    known: Tensor | None = None) -> Tensor:
    """One SDPA call per distinct cell length: cells of equal length are gathered into one
    ``[g, H, L, Dh]`` batch, so the work is still exactly sum L_i^2 (no padding) but with one call
    per length instead of one per cell. Cells cut at ``max_genes`` all share one length, which made
    the per-cell loop 2-3x slower than a padded batch (bench/train.py, bench/annotate_speed.py).

    Tokens are reordered ONCE (cells sorted by length, one ``index_select`` per tensor) and every
    group is a contiguous slice of that copy. Gathering per group instead cost O(T) per call when
    ``q, k, v`` are the non-contiguous views of the fused qkv projection: 44% of a 256-cell
    inference forward with 188 distinct lengths went into ``index_select``.

    ``known`` (bool ``[T]``, optional): the generative pattern of pretrain/generative.py, as a block
    mask per group (``[g, 1, L, L]``: key ``j`` allowed when known, or when it is the query itself).
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
    masks = known.index_select(0, idx).split(sizes) if known is not None else [None] * len(sizes)
    outs = []
    for L, g, qg, kg, vg, kn in zip(group_lens.tolist(), group_cells.tolist(), qs.split(sizes), ks.split(sizes), vs.split(sizes), masks):
        mask = None if kn is None else kn.view(g, 1, 1, L) | torch.eye(L, dtype=torch.bool, device=dev)
        o = F.scaled_dot_product_attention(*(t.view(g, L, H, Dh).transpose(1, 2) for t in (qg, kg, vg)), attn_mask=mask,
                                           dropout_p=dropout_p)
        outs.append(o.transpose(1, 2).reshape(g * L, H, Dh))
    out = torch.cat(outs, 0)
    # Back to packed order: position idx[j] receives row j.
    inverse = torch.empty_like(idx)
    inverse[idx] = torch.arange(idx.numel(), device=dev)
    return out.index_select(0, inverse)


def sdpa_with_known(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, known: Tensor, dropout_p: float) -> Tensor:
    """SDPA under the generative pattern (pretrain/generative.py): one call per group of
    equal-length cells with that group's block mask."""
    lengths = cu_seqlens.diff().tolist()
    return _sdpa_by_length(q, k, v, cu_seqlens, lengths, dropout_p, known=known.to(device=q.device, dtype=torch.bool))


def _check_packed(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> None:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [T, H, Dh], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be [B + 1] with B >= 1, got shape {tuple(cu_seqlens.shape)}")


def _aten_flash_attention_forward(*args, **kwargs):
    """``torch.ops.aten._flash_attention_forward``: the op ``varlen_attn`` wraps; tests stand it in."""
    return torch.ops.aten._flash_attention_forward(*args, **kwargs)


def _torch_varlen(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_seqlen: int, dropout_p: float) -> Tensor:
    """torch's own flash varlen kernel. ``varlen_attn`` takes no dropout (its op passes 0.0 to the
    kernel), so attention dropout in training calls the aten op it wraps, which takes ``dropout_p``
    and has its own backward: the call torch's nested-tensor SDPA trains through. Positional
    arguments only: their order is the same in every torch that has ``varlen_attn``, keywords
    (``is_causal`` then ``window_size``) changed between versions, and the default is non-causal."""
    if dropout_p > 0.0:
        return _aten_flash_attention_forward(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p, False, False)[0]
    varlen_attn, _ = _kernel("torch_varlen")
    assert varlen_attn is not None  # resolve_backend returned "torch_varlen" only if it imported
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen)


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
        max_seqlen: the longest cell, a Python int (the flash kernels size their launch grid with it).
        dropout_p: attention-probability dropout; pass 0.0 in evaluation.
        backend: ``auto``, ``flash``, ``torch_varlen`` or ``sdpa`` (see the module docstring).
    """
    _check_packed(q, k, v, cu_seqlens)
    chosen = resolve_backend(backend, q)
    if chosen == "sdpa":
        return _sdpa_per_cell(q, k, v, cu_seqlens, dropout_p)
    # The fused qkv projection hands strided views; both kernels want dense [T, H, Dh] tensors.
    q, k, v = (t.contiguous() for t in (q, k, v))
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if chosen == "flash":
        flash_varlen, _ = _kernel("flash")
        assert flash_varlen is not None  # resolve_backend returned "flash" only if it imported
        return flash_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=dropout_p, causal=False)
    return _torch_varlen(q, k, v, cu, max_seqlen, dropout_p)


def padded_attention(q: Tensor, k: Tensor, v: Tensor, padding_mask: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Attention on a padded batch: ``q, k, v`` ``[B, H, L, Dh]``, ``padding_mask`` ``[B, L]`` (True = pad).

    Pad keys are masked out; pad queries still produce (meaningless) outputs that the caller must
    ignore. A row made only of padding would give NaN, so every sequence needs one real token.
    """
    if padding_mask.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"padding_mask must be [B, L] = {(q.shape[0], q.shape[2])}, got {tuple(padding_mask.shape)}")
    keep = ~padding_mask.bool()[:, None, None, :]  # SDPA's boolean mask means "may attend"
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p)
