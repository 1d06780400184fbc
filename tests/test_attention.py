"""Packed (varlen) attention: equal to padded and per-cell attention, no leakage between cells."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.attention import (
    flash_attn_available,
    torch_varlen_available,
    padded_attention,
    resolve_backend,
    varlen_attention,
)

# Includes length-1 cells (a cell with only <cls>), the edge case padding code gets wrong.
LENGTHS = [1, 7, 1, 33, 12, 1, 64, 5]
HEADS, HEAD_DIM = 4, 16


def _packed(lengths: list[int], seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q, k, v = (torch.randn(n, HEADS, HEAD_DIM, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu, max(lengths)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(Dh)) v per cell in float64: independent of SDPA."""
    outs = []
    for qi, ki, vi in zip(q.double().split(lengths), k.double().split(lengths), v.double().split(lengths)):
        scores = torch.einsum("qhd,khd->hqk", qi, ki) / math.sqrt(qi.shape[-1])
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vi))
    return torch.cat(outs).float()


def _to_padded(x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, H, Dh] -> [B, H, L, Dh] and padding mask [B, L]."""
    width = max(lengths)
    padded = x.new_zeros(len(lengths), width, *x.shape[1:])
    mask = torch.ones(len(lengths), width, dtype=torch.bool)
    for i, chunk in enumerate(x.split(lengths)):
        padded[i, : len(chunk)] = chunk
        mask[i, : len(chunk)] = False
    return padded.transpose(1, 2), mask


def test_packed_matches_per_cell_reference() -> None:
    q, k, v, cu, max_len = _packed(LENGTHS)
    out = varlen_attention(q, k, v, cu, max_len, backend="sdpa")
    assert out.shape == q.shape
    torch.testing.assert_close(out, _reference(q, k, v, LENGTHS), atol=1e-5, rtol=1e-5)


def test_packed_matches_padded() -> None:
    q, k, v, cu, max_len = _packed(LENGTHS, seed=1)
    packed = varlen_attention(q, k, v, cu, max_len, backend="sdpa")
    (pq, mask), (pk, _), (pv, _) = (_to_padded(x, LENGTHS) for x in (q, k, v))
    padded = padded_attention(pq, pk, pv, mask).transpose(1, 2)  # [B, L, H, Dh]
    unpadded = torch.cat([padded[i, :n] for i, n in enumerate(LENGTHS)])
    torch.testing.assert_close(packed, unpadded, atol=1e-5, rtol=1e-5)


def test_packed_gradients_match_reference() -> None:
    q, k, v, cu, max_len = _packed(LENGTHS, seed=2)
    weights = torch.randn_like(q)  # a non-uniform upstream gradient
    grads = []
    for fn in (lambda a, b, c: varlen_attention(a, b, c, cu, max_len, backend="sdpa"),
               lambda a, b, c: _reference(a, b, c, LENGTHS)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*leaves) * weights).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_no_attention_across_cells() -> None:
    q, k, v, cu, max_len = _packed(LENGTHS, seed=3)
    base = varlen_attention(q, k, v, cu, max_len, backend="sdpa")
    victim = 3  # perturb every token of one cell
    lo, hi = int(cu[victim]), int(cu[victim + 1])
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[lo:hi] += 5.0 * torch.randn(hi - lo, HEADS, HEAD_DIM)
    out = varlen_attention(q2, k2, v2, cu, max_len, backend="sdpa")
    others = torch.ones(len(q), dtype=torch.bool)
    others[lo:hi] = False
    torch.testing.assert_close(out[others], base[others], atol=0.0, rtol=0.0)
    assert not torch.allclose(out[lo:hi], base[lo:hi], atol=1e-3)


def test_length_one_cell_returns_its_value() -> None:
    # A single token attends only to itself: the softmax weight is 1, the output is v.
    q, k, v, cu, max_len = _packed([1, 4, 1], seed=4)
    out = varlen_attention(q, k, v, cu, max_len, backend="sdpa")
    torch.testing.assert_close(out[0], v[0])
    torch.testing.assert_close(out[5], v[5])


def test_dropout_changes_output_only_when_asked() -> None:
    q, k, v, cu, max_len = _packed(LENGTHS, seed=5)
    plain = varlen_attention(q, k, v, cu, max_len, backend="sdpa")
    torch.manual_seed(0)
    dropped = varlen_attention(q, k, v, cu, max_len, backend="sdpa", dropout_p=0.5)
    assert not torch.allclose(plain, dropped)
    torch.testing.assert_close(varlen_attention(q, k, v, cu, max_len, backend="sdpa", dropout_p=0.0), plain)


def test_cpu_sdpa_path_uses_the_fused_kernel() -> None:
    # The per-cell loop was chosen for the fused CPU flash kernel; 3-D inputs would silently fall
    # back to the unfused math path (several times slower), which this test would catch.
    q, k, v, cu, max_len = _packed(LENGTHS)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        varlen_attention(*leaves, cu, max_len, backend="sdpa").sum().backward()
    ops = {event.name for event in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops


def test_auto_uses_sdpa_for_cpu_or_fp32() -> None:
    q = torch.zeros(3, HEADS, HEAD_DIM)
    assert resolve_backend("auto", q) == "sdpa"
    assert resolve_backend("sdpa", q) == "sdpa"


def test_flash_where_it_cannot_run_says_why_and_how() -> None:
    q, k, v, cu, max_len = _packed(LENGTHS)
    with pytest.raises(RuntimeError, match=r"cannot run: .*hiceller\[gpu\]"):
        varlen_attention(q, k, v, cu, max_len, backend="flash")


def test_bad_arguments_are_refused() -> None:
    q, k, v, cu, max_len = _packed(LENGTHS)
    with pytest.raises(ValueError, match="backend"):
        varlen_attention(q, k, v, cu, max_len, backend="xformers")
    with pytest.raises(ValueError, match=r"\[T, H, Dh\]"):
        varlen_attention(q[:, 0], k[:, 0], v[:, 0], cu, max_len)
    with pytest.raises(ValueError, match="padding_mask"):
        padded_attention(q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
                         torch.zeros(2, 3, dtype=torch.bool))


@pytest.mark.gpu
def test_flash_matches_sdpa_on_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not flash_attn_available():
        pytest.skip("needs flash_attn (pip install 'hiceller[gpu]')")
    q, k, v, cu, max_len = _packed(LENGTHS, dtype=torch.bfloat16, device="cuda")
    assert resolve_backend("auto", q) == "flash"
    flash = varlen_attention(q, k, v, cu, max_len, backend="flash")
    sdpa = varlen_attention(q, k, v, cu, max_len, backend="sdpa")
    torch.testing.assert_close(flash.float(), sdpa.float(), atol=2e-2, rtol=2e-2)


def _skip_unless_torch_varlen() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not torch_varlen_available():
        pytest.skip("needs torch >= 2.10 with flash-attention kernels (torch.nn.attention.varlen)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_varlen_matches_sdpa_on_gpu(dtype) -> None:
    """Forward and q/k/v gradients of torch's own varlen kernel against per-cell SDPA."""
    _skip_unless_torch_varlen()
    q, k, v, cu, max_len = _packed(LENGTHS, dtype=dtype, device="cuda")
    if not flash_attn_available():
        assert resolve_backend("auto", q) == "torch_varlen"
    weights = torch.randn_like(q)
    results = []
    for backend in ("torch_varlen", "sdpa"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = varlen_attention(*leaves, cu, max_len, backend=backend)
        (out.float() * weights.float()).sum().backward()
        results.append([out] + [t.grad for t in leaves])
    for got, want in zip(*results):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_torch_varlen_dropout_trains_on_gpu() -> None:
    """With attention dropout (the aten op path): finite gradients, no leak between cells, and the
    mean over many draws approaches the dropout-free output (inverted dropout is unbiased)."""
    _skip_unless_torch_varlen()
    q, k, v, cu, max_len = _packed(LENGTHS, dtype=torch.bfloat16, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = varlen_attention(*leaves, cu, max_len, dropout_p=0.2, backend="torch_varlen")
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    plain = varlen_attention(q, k, v, cu, max_len, backend="torch_varlen").float()
    assert not torch.allclose(out.float(), plain)
    mean = sum(varlen_attention(q, k, v, cu, max_len, dropout_p=0.2, backend="torch_varlen").float() for _ in range(400)) / 400
    assert (mean - plain).abs().mean().item() < 0.05


@pytest.mark.parametrize("lengths", [[7, 7, 7, 7], [5, 9, 5, 3, 9, 9, 1], [4]])
def test_grouping_cells_by_length_is_exact(lengths):
    """Cells of equal length share one SDPA call: outputs and gradients equal the per-cell path."""
    from pretrain.attention import _sdpa_by_length

    torch.manual_seed(0)
    T, H, D = sum(lengths), 2, 8
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    q, k, v = (torch.randn(T, H, D, requires_grad=True) for _ in range(3))
    ref = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(*(x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v)))
            .squeeze(0)
            .transpose(0, 1)
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())
        ]
    )
    got = _sdpa_by_length(q, k, v, cu, lengths, 0.0)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    g1 = torch.autograd.grad(got.sum(), (q, k, v))
    g2 = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
