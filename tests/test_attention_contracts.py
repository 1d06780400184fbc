"""The GPU attention kernels' contracts, checked on CPU.

Each GPU backend is run against a stand-in with the real kernel's signature. The stand-in checks what
the model hands it: fp16/bf16, dense ``(T, H, D)`` tensors, int32 ``cu_seqlens`` on the tensors'
device, ``max_seqlen`` as a Python int, dropout only in training, no causal mask. It then computes
the reference result, so forward and backward run through the model as they would on a GPU, and a
wrong call fails here rather than on the first GPU. Real-kernel checks: the ``gpu`` tests in
test_attention.py and test_model.py, and bench/gpu_check.sh.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch

from hiceller.config import ModelConfig
from pretrain import attention
from pretrain.attention import resolve_backend, resolve_backend_for, varlen_attention
from pretrain.model import N_SPECIAL, CellerModel

LENGTHS = [1, 7, 33, 12, 1, 40]
DEBUG = ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=128, dropout=0.0, attention="sdpa")


class ContractError(AssertionError):
    """A call the real kernel would refuse or compute differently."""


def _check_call(q, k, v, cu_q, cu_k, max_q, max_k, scale=None) -> None:
    """A self-attention call (``scale`` None: same cells for queries and keys), or the generative
    objective's unknown-query call (``scale`` given: each cell's queries over its own key set)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ContractError(what)

    cross = scale is not None
    need(q.dtype in (torch.float16, torch.bfloat16), f"q must be fp16 or bf16, got {q.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        need(t.dim() == 3, f"{name} must be (T, H, D), got {tuple(t.shape)}")
        need(t.dtype == q.dtype and t.device == q.device, f"{name} must match q's dtype and device")
        need(t.is_contiguous(), f"{name} must be contiguous, got strides {t.stride()}")
    if cross:
        need(k.shape == v.shape and q.shape[1:] == k.shape[1:], "k and v must match, and q's heads and head size")
        need(type(scale) is float and scale > 0, f"softmax scale must be a positive float, got {scale!r}")
    else:
        need(q.shape == k.shape == v.shape, "q, k, v must have one shape (no GQA here)")
    need(q.shape[-1] % 8 == 0 and q.shape[-1] <= 256, f"head size must be a multiple of 8 up to 256, got {q.shape[-1]}")
    for name, cu, t in (("cu_seqlens_q", cu_q, q), ("cu_seqlens_k", cu_k, k)):
        need(torch.is_tensor(cu) and cu.dtype == torch.int32, f"{name} must be an int32 tensor, got {cu!r:.60}")
        need(cu.device == q.device, f"{name} must be on {q.device}, got {cu.device}")
        need(cu.dim() == 1 and cu.is_contiguous(), f"{name} must be a contiguous 1-D tensor")
        need(int(cu[0]) == 0 and int(cu[-1]) == t.shape[0], f"{name} must run from 0 to T={t.shape[0]}")
        need(bool((cu.diff() >= 1).all()), f"{name} must give every cell at least one token")
    if cross:
        need(cu_q.shape == cu_k.shape, "query and key cells must be as many")
    else:
        need(torch.equal(cu_q, cu_k), "self-attention: query and key cells must be the same")
    for name, m, cu in (("max_seqlen_q", max_q, cu_q), ("max_seqlen_k", max_k, cu_k)):
        need(type(m) is int, f"{name} must be a Python int, got {type(m).__name__}")
        need(m >= int(cu.diff().max()), f"{name}={m} is shorter than the longest cell ({int(cu.diff().max())})")


def _reference(q, k, v, cu, dropout_p: float, cu_k=None, scale=None) -> torch.Tensor:
    """softmax(q k^T * scale) v per cell (scale 1/sqrt(D) unless given; key cells ``cu_k`` when they
    differ from the query cells), in float32, with inverted dropout on the probabilities."""
    cu_k = cu if cu_k is None else cu_k
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    outs = []
    for a, b, c, d in zip(cu[:-1].tolist(), cu[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        qi, ki, vi = q[a:b].float(), k[c:d].float(), v[c:d].float()
        p = (torch.einsum("qhd,khd->hqk", qi, ki) * scale).softmax(-1)
        if dropout_p > 0:
            p = torch.nn.functional.dropout(p, dropout_p)
        outs.append(torch.einsum("hqk,khd->qhd", p, vi))
    return torch.cat(outs).to(q.dtype)


def _call_info(dropout_p: float, scale) -> dict:
    return {"dropout_p": dropout_p} if scale is None else {"dropout_p": dropout_p, "keys": "known+self"}


class Kernels:
    """Stand-ins for flash_attn_varlen_func, varlen_attn and aten._flash_attention_forward."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):
        """flash-attn >= 2.6's signature."""
        _check_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)
        if causal or tuple(window_size) != (-1, -1):
            raise ContractError("genes are a set: no causal mask, no window")
        if softcap or alibi_slopes is not None or return_attn_probs:
            raise ContractError("only the plain softmax is expected")
        self.calls.append(("flash", _call_info(dropout_p, softmax_scale)))
        return _reference(q, k, v, cu_seqlens_q, dropout_p, cu_seqlens_k, softmax_scale)

    def varlen_attn(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        """torch 2.13's torch.nn.attention.varlen.varlen_attn (compared with the installed one below)."""
        _check_call(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale)
        if tuple(window_size) != (-1, -1):
            raise ContractError("genes are a set: window_size must stay (-1, -1) (no causal mask)")
        if return_aux is not None or enable_gqa or seqused_k is not None or block_table is not None:
            raise ContractError("only the plain softmax over whole cells is expected")
        self.calls.append(("varlen_attn", _call_info(0.0, scale)))
        return _reference(query, key, value, cu_seq_q, 0.0, cu_seq_k, scale)

    def aten_flash_attention_forward(self, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                                     return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None,
                                     seqused_k=None, alibi_slopes=None, block_table=None, num_splits=None):
        """aten::_flash_attention_forward's schema (compared with the installed one below)."""
        _check_call(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, scale)
        if is_causal or return_debug_mask:
            raise ContractError("genes are a set: is_causal must be False; no debug mask")
        if not 0.0 < dropout_p < 1.0:
            raise ContractError(f"the aten op is only for attention dropout, got dropout_p={dropout_p}")
        self.calls.append(("aten", _call_info(dropout_p, scale)))
        out = _reference(query, key, value, cum_seq_q, dropout_p, cum_seq_k, scale)
        lse = torch.empty(query.shape[1], query.shape[0])
        return out, lse, torch.empty(2), torch.empty(0), torch.empty(0)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture()
def kernels(monkeypatch) -> Kernels:
    """Both GPU backends 'available' on CPU, backed by the stand-ins."""
    ks = Kernels()
    monkeypatch.setitem(attention._KERNELS, "flash", (ks.flash_attn_varlen_func, ""))
    monkeypatch.setitem(attention._KERNELS, "torch_varlen", (ks.varlen_attn, ""))
    monkeypatch.setattr(attention, "_aten_flash_attention_forward", ks.aten_flash_attention_forward)
    monkeypatch.setattr(attention, "_device_unusable_reason", lambda q: "")
    return ks


def _params(fn) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_stand_ins_have_the_real_signatures() -> None:
    from torch.nn.attention.varlen import varlen_attn

    ks = Kernels()
    assert _params(ks.varlen_attn) == _params(varlen_attn)
    schema = torch.ops.aten._flash_attention_forward.default._schema
    real = [(a.name, a.kwarg_only) for a in schema.arguments]
    mine = [(p.name, p.kind == inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(ks.aten_flash_attention_forward).parameters.values()]
    assert mine == real
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return  # not installed here: the stand-in follows flash-attn 2.6's published signature
    assert _params(ks.flash_attn_varlen_func)[:10] == _params(flash_attn_varlen_func)[:10]


def _cells(lengths: list[int], n_genes: int = 50, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {
        "gene_ids": torch.randint(N_SPECIAL, n_genes + N_SPECIAL, (n,), generator=g),
        "values": torch.randint(0, 51, (n,), generator=g),
        "cu_seqlens": cu,
        "max_seqlen": max(lengths),
    }


def _pair(backend: str, dropout: float = 0.0, dtype=torch.bfloat16) -> tuple[CellerModel, CellerModel]:
    """An SDPA model and a ``backend`` model with the same weights (state dict loaded strictly)."""
    torch.manual_seed(0)
    ref = CellerModel(dataclasses.replace(DEBUG, dropout=dropout), n_genes=50, n_bins=51).to(dtype)
    other = CellerModel(dataclasses.replace(DEBUG, dropout=dropout, attention=backend), n_genes=50, n_bins=51).to(dtype)
    other.load_state_dict(ref.state_dict(), strict=True)
    return ref, other


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("backend, kernel", [("flash", "flash"), ("torch_varlen", "varlen_attn")])
def test_gpu_backend_forward_and_grads_match_sdpa(kernels, backend, kernel) -> None:
    ref, other = _pair(backend)
    cells = _cells(LENGTHS)
    upstream = torch.randn(sum(LENGTHS), DEBUG.d_model, generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (ref, other):
        (model(**cells).hidden.float() * upstream).sum().backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None and p.grad.any()})
        model.eval()
        with torch.no_grad():
            grads[-1]["hidden"] = model(**cells).hidden.float()
    # One kernel call per layer per forward; no dropout anywhere (dropout 0).
    assert kernels.names() == [kernel] * 4 and all(c["dropout_p"] == 0.0 for _, c in kernels.calls)
    # Relative to each tensor's norm: bf16 on both sides, so 1e-2 is a few roundings, not slack.
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    worst = max(grads[0], key=lambda n: _rel(grads[1][n], grads[0][n]))
    assert _rel(grads[1][worst], grads[0][worst]) < 2e-2, worst


@pytest.mark.parametrize("backend, train_kernel, eval_kernel", [("flash", "flash", "flash"), ("torch_varlen", "aten", "varlen_attn")])
def test_dropout_only_in_training(kernels, backend, train_kernel, eval_kernel) -> None:
    _, model = _pair(backend, dropout=0.2)
    cells = _cells(LENGTHS)
    model.train()
    out = model(**cells)
    out.hidden.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert kernels.calls == [(train_kernel, {"dropout_p": 0.2})] * 2
    kernels.calls.clear()
    model.eval()
    with torch.no_grad():
        model(**cells)
    assert kernels.calls == [(eval_kernel, {"dropout_p": 0.0})] * 2


def test_autocast_hands_the_kernel_bf16(kernels) -> None:
    """Under bf16 autocast (train.autocast) the fp32 model's attention inputs are bf16, so the packed
    kernel is used and gets what it accepts."""
    torch.manual_seed(0)
    model = CellerModel(dataclasses.replace(DEBUG, attention="auto"), n_genes=50, n_bins=51)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**_cells(LENGTHS))
    out.hidden.float().sum().backward()
    assert kernels.names() == ["flash", "flash"]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_auto_prefers_flash_then_torch_varlen_then_sdpa(kernels, monkeypatch) -> None:
    q = torch.zeros(3, 4, 16, dtype=torch.bfloat16)
    assert resolve_backend("auto", q) == "flash"
    monkeypatch.setitem(attention._KERNELS, "flash", (None, "flash_attn cannot be imported (ImportError: no)"))
    assert resolve_backend("auto", q) == "torch_varlen"
    assert resolve_backend("auto", q.float()) == "sdpa"  # fp32: no flash kernel takes it
    assert resolve_backend("auto", torch.zeros(3, 4, 12, dtype=torch.bfloat16)) == "sdpa"  # head size not a multiple of 8
    monkeypatch.setitem(attention._KERNELS, "torch_varlen", (None, "torch 2.9 has no varlen_attn"))
    assert resolve_backend("auto", q) == "sdpa"
    with pytest.raises(RuntimeError, match=r"'torch_varlen' cannot run: torch 2.9 has no varlen_attn.*torch >= 2.10"):
        resolve_backend("torch_varlen", q)


def test_gpu_backends_on_cpu_say_why(monkeypatch) -> None:
    """Without the stand-ins: on this CPU machine auto is SDPA and an explicit GPU backend refuses."""
    monkeypatch.setitem(attention._KERNELS, "torch_varlen", (lambda *a, **k: None, ""))  # as if torch had the kernel
    q = torch.zeros(5, 4, 16, dtype=torch.bfloat16)
    assert resolve_backend("auto", q) == "sdpa"
    assert resolve_backend_for("auto", "cpu", torch.bfloat16, 64) == "sdpa"
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"'torch_varlen' cannot run: flash kernels run only on CUDA.*no build"):
        varlen_attention(q, q, q, cu, 5, backend="torch_varlen")


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda a: {**a, "q": a["q"].transpose(0, 1).contiguous().transpose(0, 1)}, "contiguous"),
        (lambda a: {**a, "cu": a["cu"].long()}, "int32"),
        (lambda a: {**a, "max": torch.tensor(a["max"])}, "Python int"),
        (lambda a: {**a, "max": a["max"] - 1}, "shorter than the longest"),
        (lambda a: {**a, **{x: a[x].float() for x in "qkv"}}, "fp16 or bf16"),
    ],
)
def test_the_contract_catches_wrong_calls(break_it, message) -> None:
    """The stand-ins are only worth something if a wrong call fails them."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(LENGTHS), 4, 16, generator=g, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    a = break_it({"q": q, "k": k, "v": v, "cu": cu, "max": max(LENGTHS)})
    with pytest.raises(ContractError, match=message):
        Kernels().varlen_attn(a["q"], a["k"], a["v"], a["cu"], a["cu"], a["max"], a["max"])


# ------------------------------------------------------------------ the generative pattern's two calls
def _split_for(lengths: list[int], seed: int = 0):
    """About half of each cell's genes unknown (never <cls>; a 1-token cell has none)."""
    from pretrain.generative import GenerativeSplit

    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    known = torch.rand(sum(lengths), generator=g) < 0.5
    known[cu[:-1].long()] = True
    return GenerativeSplit.from_known(known, cu)


@pytest.mark.parametrize("backend, kernel", [("flash", "flash"), ("torch_varlen", "varlen_attn")])
def test_generative_pattern_on_gpu_backends_matches_sdpa(kernels, backend, kernel, monkeypatch) -> None:
    """Per layer: one self-attention call over the known tokens and one call of the unknown queries
    over their cell's known keys + self slot; no SDPA and no T x T mask anywhere; forward and
    gradients equal to the SDPA block-mask path with the same weights."""
    lengths = [1, 7, 2, 33, 12, 40]
    ref, other = _pair(backend)
    cells, split = _cells(lengths), _split_for(lengths)
    upstream = torch.randn(sum(lengths), DEBUG.d_model, generator=torch.Generator().manual_seed(1))
    (ref(**cells, split=split).hidden.float() * upstream).sum().backward()

    def no_sdpa(*a, **k):
        raise AssertionError("the GPU path must not fall back to SDPA")

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", no_sdpa)
    (other(**cells, split=split).hidden.float() * upstream).sum().backward()
    cross = {"dropout_p": 0.0, "keys": "known+self"}
    assert kernels.calls == [(kernel, {"dropout_p": 0.0}), (kernel, cross)] * DEBUG.n_layers
    grads = [{n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None and p.grad.any()} for m in (ref, other)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    worst = max(grads[0], key=lambda n: _rel(grads[1][n], grads[0][n]))
    assert _rel(grads[1][worst], grads[0][worst]) < 2e-2, worst


def test_generative_dropout_goes_to_both_calls(kernels) -> None:
    _, model = _pair("torch_varlen", dropout=0.2)
    lengths = [5, 9, 2, 17]
    cells, split = _cells(lengths), _split_for(lengths)
    model.train()
    model(**cells, split=split).hidden.float().sum().backward()
    assert kernels.calls == [("aten", {"dropout_p": 0.2}), ("aten", {"dropout_p": 0.2, "keys": "known+self"})] * 2
    kernels.calls.clear()
    model.eval()
    with torch.no_grad():
        model(**cells, split=split)
    assert kernels.names() == ["varlen_attn"] * 4


def test_generative_unknown_call_is_per_cell_not_t_by_t(kernels) -> None:
    """The unknown call's keys are each cell's known keys plus one slot: sum(K_c + 1) rows, never T."""
    lengths = [3, 30, 30, 30]
    split = _split_for(lengths)
    q = torch.randn(sum(lengths), 4, 16, dtype=torch.bfloat16)
    from pretrain.generative import SLOT_PAD, generative_attention

    shapes = []
    orig = kernels.varlen_attn

    def spy(query, key, *a, **kw):
        shapes.append((tuple(query.shape), tuple(key.shape)))
        return orig(query, key, *a, **kw)

    attention._KERNELS["torch_varlen"] = (spy, "")
    generative_attention(q, q, q, torch.tensor([0, 3, 33, 63, 93], dtype=torch.int32), split, backend="torch_varlen")
    n_known, n_unknown = int(split.known.sum()), int((~split.known).sum())
    cells_with_unknown = split.cu_unknown.numel() - 1
    assert shapes == [((n_known, 4, 16), (n_known, 4, 16)),
                      ((n_unknown, 4, 16 + SLOT_PAD), (n_known + cells_with_unknown, 4, 16 + SLOT_PAD))]
