"""scGPT's generative attention over packed cells, on every attention backend.

In a generative micro batch each cell's tokens are split into known ones (``<cls>`` and the genes
whose value the model is given) and unknown ones (genes whose value it must produce from their
identity alone). Within a cell, query ``i`` may attend to key ``j`` when::

    allowed[i, j] = known[j] or i == j

so known genes attend to the known genes, and each unknown gene to the known genes and to itself
(never to another unknown gene: scGPT's ``FlashscGPTMHA``, whose cross attention puts every unknown
gene alone in front of the known keys plus its own key).

Backends compute exactly that pattern, with the weights of the plain (bidirectional) encoder:

- ``sdpa``: per group of equal-length cells, SDPA with the block mask above (``[g, 1, L, L]``: a
  mask per cell, never ``T x T``).
- ``flash`` / ``torch_varlen``: two varlen kernel calls and no mask at all:

  1. known queries over known keys: the known tokens, packed cell by cell, as plain self-attention;
  2. unknown queries over their cell's known keys plus their own key. A varlen call gives every
     query of a cell the same key set, so the own key enters through a *self slot*: one extra key
     per cell, ``e_D`` (a unit vector in an added head coordinate), whose value is ``e_D`` too.
     Query ``i`` carries ``a_i = q_i . k_i`` in that coordinate, so its score against the slot is
     exactly its score against its own key (known keys are 0 there), and the slot's attention
     probability comes back in the added output coordinate: ``out_i = o_i[:Dh] + o_i[Dh] * v_i``.
     Gradients flow through the kernels' own backward (and through ``a_i`` and the product); the
     head is padded by 8 coordinates because the kernels want multiples of 8, and the softmax
     scale stays ``1 / sqrt(Dh)``. Cost: the known tokens' attention plus ``U x (K + 1)`` per
     cell, less than the masked pattern's ``L^2``.

:class:`GenerativeSplit` holds the index arrays both paths need. It is built on the host from the
known mask and the cell boundaries (the task's ``prepare``, beside the mask itself), so the forward
pass reads no sizes from the device.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import torch
from torch import Tensor

from pretrain import attention

__all__ = ["SLOT_PAD", "GenerativeSplit", "generative_attention"]

SLOT_PAD = 8
"""Head coordinates added for the self slot (one used, the rest keep the head a multiple of 8)."""


@dataclass(frozen=True)
class GenerativeSplit:
    """Which packed tokens are known, as the index arrays of the two varlen calls (module docstring).

    Token order inside each call is the packed order, so cells stay contiguous and in order.
    """

    known: Tensor
    """Bool ``[T]``: the token's value is given (every cell's ``<cls>`` is known)."""
    known_idx: Tensor
    """Long ``[Tk]``: packed positions of the known tokens."""
    cu_known: Tensor
    """Int32 ``[B + 1]``: cumulative known tokens per cell (every cell has its ``<cls>``)."""
    max_known: int
    unknown_idx: Tensor
    """Long ``[Tu]``: packed positions of the unknown tokens."""
    cu_unknown: Tensor
    """Int32 ``[B' + 1]``: cumulative unknown tokens over the B' cells that have any."""
    cu_context: Tensor
    """Int32 ``[B' + 1]``: cumulative keys of the unknown call (a cell's known keys + its slot)."""
    max_unknown: int
    max_context: int
    context_idx: Tensor
    """Long ``[Tk' + B']``: rows of ``cat(known keys, slot row)`` that make the unknown call's keys."""
    inverse: Tensor
    """Long ``[T]``: where each packed token's output sits in ``cat(known outputs, unknown outputs)``."""

    @classmethod
    def from_known(cls, known: Tensor, cu_seqlens: Tensor) -> "GenerativeSplit":
        """The split of packed cells ``cu_seqlens`` (int32 ``[B + 1]``) with known tokens ``known``."""
        known = known.to(device="cpu", dtype=torch.bool)
        cu = cu_seqlens.to(device="cpu", dtype=torch.long)
        lengths = cu.diff()
        n_cells, n_tokens = lengths.numel(), known.numel()
        if int(cu[-1]) != n_tokens:
            raise ValueError(f"cu_seqlens ends at {int(cu[-1])}, the known mask has {n_tokens} tokens")
        if n_cells and not bool(known[cu[:-1]].all()):
            raise ValueError("every cell's first token (<cls>) must be known")
        cell = torch.repeat_interleave(torch.arange(n_cells), lengths)
        known_idx, unknown_idx = known.nonzero().squeeze(-1), (~known).nonzero().squeeze(-1)
        n_known = torch.bincount(cell[known_idx], minlength=n_cells)
        n_unknown = torch.bincount(cell[unknown_idx], minlength=n_cells)
        cu_known = _cumsum0(n_known)
        with_unknown = n_unknown > 0
        n_context = n_known[with_unknown] + 1
        cu_context = _cumsum0(n_context)
        # Key row r of the unknown call: known row (cell's start + offset), or the slot row (Tk).
        offset = torch.arange(int(cu_context[-1])) - torch.repeat_interleave(cu_context[:-1].long(), n_context)
        context_idx = torch.repeat_interleave(cu_known[:-1][with_unknown].long(), n_context) + offset
        context_idx[offset == torch.repeat_interleave(n_known[with_unknown], n_context)] = known_idx.numel()
        inverse = torch.empty(n_tokens, dtype=torch.long)
        inverse[torch.cat([known_idx, unknown_idx])] = torch.arange(n_tokens)
        return cls(
            known=known, known_idx=known_idx, cu_known=cu_known, max_known=_max(n_known),
            unknown_idx=unknown_idx, cu_unknown=_cumsum0(n_unknown[with_unknown]), cu_context=cu_context,
            max_unknown=_max(n_unknown), max_context=_max(n_context), context_idx=context_idx, inverse=inverse,
        )

    @property
    def n_unknown(self) -> int:
        return self.unknown_idx.numel()

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> "GenerativeSplit":
        """A copy with ``fn`` applied to every tensor (device copies, pinning)."""
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self) if torch.is_tensor(getattr(self, f.name))})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "GenerativeSplit":
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))


def _cumsum0(counts: Tensor) -> Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)


def _max(counts: Tensor) -> int:
    return int(counts.max()) if counts.numel() else 0


def _resolve(backend: str, q: Tensor) -> str:
    """The backend for a generative call: the unknown call's head is ``Dh + SLOT_PAD`` wide, so the
    GPU kernels must take that width (an explicit backend that cannot fails as for plain attention)."""
    probe = q.new_empty((0, q.shape[1], q.shape[2] + SLOT_PAD))
    return attention.resolve_backend(backend, probe)


def _kernel_call(chosen: str, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                 dropout_p: float, scale: float) -> Tensor:
    """One non-causal varlen call with separate query and key cells (the unknown queries' call)."""
    if chosen == "flash":
        flash_varlen, _ = attention._kernel("flash")
        return flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p, softmax_scale=scale, causal=False)
    if dropout_p > 0.0:  # varlen_attn takes no dropout: the aten op it wraps does (see attention._torch_varlen)
        return attention._aten_flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, False, False, scale=scale)[0]
    varlen_attn, _ = attention._kernel("torch_varlen")
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale)


def _unknown_queries(chosen: str, q: Tensor, k: Tensor, v: Tensor, split: GenerativeSplit, dropout_p: float) -> Tensor:
    """Unknown queries over their cell's known keys plus their own key, through the self slot."""
    T_k, H, Dh = split.known_idx.numel(), q.shape[1], q.shape[2]
    qu, ku, vu = (t.index_select(0, split.unknown_idx) for t in (q, k, v))
    own = (qu * ku).sum(-1, keepdim=True)  # a_i = q_i . k_i: the score of the slot is the own-key score
    q_aug = torch.cat([qu, own, qu.new_zeros(qu.shape[0], H, SLOT_PAD - 1)], -1)
    slot = q.new_zeros(1, H, Dh + SLOT_PAD)
    slot[..., Dh] = 1.0

    def context(t: Tensor) -> Tensor:
        known = torch.cat([t.index_select(0, split.known_idx), t.new_zeros(T_k, H, SLOT_PAD)], -1)
        return torch.cat([known, slot]).index_select(0, split.context_idx)

    o = _kernel_call(chosen, q_aug.contiguous(), context(k), context(v), split.cu_unknown, split.cu_context,
                     split.max_unknown, split.max_context, dropout_p, Dh ** -0.5)
    return o[..., :Dh] + o[..., Dh:Dh + 1] * vu


def generative_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, split: GenerativeSplit, *,
                         dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """Attention under the generative pattern; ``q, k, v`` ``[T, H, Dh]`` packed, returns ``[T, H, Dh]``.

    ``split`` comes from :meth:`GenerativeSplit.from_known` for these cells, on ``q``'s device.
    """
    attention._check_packed(q, k, v, cu_seqlens)
    chosen = _resolve(backend, q)
    if chosen == "sdpa":
        return attention.sdpa_with_known(q, k, v, cu_seqlens, split.known, dropout_p)
    q, k, v = (t.contiguous() for t in (q, k, v))
    qk, kk, vk = (t.index_select(0, split.known_idx) for t in (q, k, v))
    out = attention.varlen_attention(qk, kk, vk, split.cu_known, split.max_known, dropout_p=dropout_p, backend=chosen)
    if split.n_unknown:
        out = torch.cat([out, _unknown_queries(chosen, q, k, v, split, dropout_p)])
    return out.index_select(0, split.inverse)
