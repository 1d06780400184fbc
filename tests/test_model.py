"""CellerModel: packed == padded, <cls> embedding, backend-independent weights, checkpointing, FLOPs."""

from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hiceller.config import ModelConfig, load_config
from pretrain.attention import flash_attn_available, torch_varlen_available
from pretrain.flops import PEAK_FLOPS, mfu, model_flops_per_token, token_weighted_seqlen
from pretrain.model import CLS_ID, MASK_VALUE, N_SPECIAL, PAD_ID, CellerModel, count_parameters
from pretrain.parallelize import apply_activation_checkpointing, is_activation_checkpointed

N_GENES, N_BINS = 50, 51
DEBUG = ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=128, dropout=0.0, attention="sdpa")
LENGTHS = [1, 9, 30, 2, 17]  # token counts including <cls>; a cell with no gene included


def _cells(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Packed cells: <cls> (value 0) then distinct random genes with random bins."""
    g = torch.Generator().manual_seed(seed)
    genes, values = [], []
    for n in lengths:
        ids = torch.randperm(N_GENES, generator=g)[: n - 1] + N_SPECIAL
        genes.append(torch.cat([torch.tensor([CLS_ID]), ids]))
        values.append(torch.cat([torch.tensor([0]), torch.randint(0, N_BINS, (n - 1,), generator=g)]))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"gene_ids": torch.cat(genes), "values": torch.cat(values), "cu_seqlens": cu, "max_seqlen": max(lengths)}


def _padded(cells: dict[str, torch.Tensor], lengths: list[int]) -> dict[str, torch.Tensor]:
    width = max(lengths)
    gene_ids = torch.full((len(lengths), width), PAD_ID)
    values = torch.zeros(len(lengths), width, dtype=torch.long)
    padding_mask = torch.ones(len(lengths), width, dtype=torch.bool)
    for i, (g, v) in enumerate(zip(cells["gene_ids"].split(lengths), cells["values"].split(lengths))):
        gene_ids[i, : len(g)], values[i, : len(v)], padding_mask[i, : len(g)] = g, v, False
    return {"gene_ids": gene_ids, "values": values, "padding_mask": padding_mask}


def _model(cfg: ModelConfig = DEBUG, seed: int = 0) -> CellerModel:
    torch.manual_seed(seed)
    return CellerModel(cfg, N_GENES, N_BINS).eval()


def test_packed_forward_equals_padded_forward() -> None:
    model, cells = _model(), _cells(LENGTHS)
    packed = model(**cells)
    padded = model.forward_padded(**_padded(cells, LENGTHS))
    assert packed.hidden.shape == (sum(LENGTHS), DEBUG.d_model)
    assert packed.cell_emb.shape == padded.cell_emb.shape == (len(LENGTHS), model.embed_dim)
    unpadded = torch.cat([padded.hidden[i, :n] for i, n in enumerate(LENGTHS)])
    torch.testing.assert_close(packed.hidden, unpadded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.cell_emb, padded.cell_emb, atol=1e-5, rtol=1e-5)


def test_cell_emb_is_the_cls_hidden_state() -> None:
    model, cells = _model(), _cells(LENGTHS)
    out = model(**cells)
    starts = cells["cu_seqlens"][:-1].long()
    assert (cells["gene_ids"][starts] == CLS_ID).all()
    torch.testing.assert_close(out.cell_emb, out.hidden[starts], atol=0.0, rtol=0.0)


def test_genes_are_a_set_no_positional_encoding() -> None:
    # Shuffling one cell's genes (not <cls>) permutes its hidden states and keeps its embedding.
    model, cells = _model(), _cells(LENGTHS)
    lo, hi = int(cells["cu_seqlens"][2]) + 1, int(cells["cu_seqlens"][3])
    perm = torch.arange(len(cells["gene_ids"]))
    perm[lo:hi] = lo + torch.randperm(hi - lo, generator=torch.Generator().manual_seed(1))
    shuffled = dict(cells, gene_ids=cells["gene_ids"][perm], values=cells["values"][perm])
    base, out = model(**cells), model(**shuffled)
    torch.testing.assert_close(out.hidden, base.hidden[perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cell_emb, base.cell_emb, atol=1e-5, rtol=1e-5)


def test_masked_value_gets_the_learned_embedding() -> None:
    model = _model()
    enc = model.value_encoder(torch.tensor([MASK_VALUE, 0, N_BINS - 1]))
    torch.testing.assert_close(enc[0], model.value_encoder.mask_embedding.detach())
    assert not torch.allclose(enc[0], enc[1]) and not torch.allclose(enc[1], enc[2])


def test_init_is_deterministic_under_manual_seed() -> None:
    a, b, c = _model(seed=0).state_dict(), _model(seed=0).state_dict(), _model(seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.qkv.weight"], c["blocks.0.qkv.weight"])
    assert (a["gene_encoder.embedding.weight"][PAD_ID] == 0).all()
    assert 0.015 < a["blocks.0.ff1.weight"].std() < 0.025


def test_sdpa_state_dict_loads_under_every_backend() -> None:
    cells = _cells(LENGTHS)
    source = _model()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    for attention in ("auto", "flash", "torch_varlen"):
        buffer.seek(0)
        target = _model(dataclasses.replace(DEBUG, attention=attention), seed=123)
        target.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
        if attention == "auto":
            torch.testing.assert_close(target(**cells).hidden, source(**cells).hidden, atol=0.0, rtol=0.0)
        else:  # fp32 on CPU: a GPU backend refuses by name instead of running something else
            with pytest.raises(RuntimeError, match=attention):
                target(**cells)


def test_parameter_count_matches_closed_form() -> None:
    d, f, n = DEBUG.d_model, DEBUG.d_ff, DEBUG.n_layers
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    embeddings = (N_GENES + N_SPECIAL) * d + 2 * d + (d + d) + (d * d + d) + 2 * d + d
    heads = (d * d + d) + (d + 1) + d * d + (d * d + d)
    assert count_parameters(_model()) == embeddings + n * block + 2 * d + heads


def test_shipped_presets_build() -> None:
    debug = load_config("debug").model
    model = CellerModel(debug, N_GENES, N_BINS)
    assert len(model.blocks) == debug.n_layers and model.embed_dim == debug.d_model
    base = load_config("base").model
    assert (base.n_layers, base.d_model, base.n_heads, base.d_ff, base.dropout) == (12, 512, 8, 2048, 0.2)


def _loss_and_grads(model: CellerModel, cells: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(7)  # same dropout masks in both runs
    out = model(**cells)
    loss = model.value_head(out.hidden).square().mean() + out.cell_emb.square().mean()
    loss.backward()
    # Keyed by state-dict name: named_parameters() of a wrapped block carries the wrapper's prefix.
    names, params = list(model.state_dict()), list(model.parameters())
    assert len(names) == len(params)  # the model has no buffers, so both list the same tensors
    return loss.detach(), {k: p.grad.clone() for k, p in zip(names, params) if p.grad is not None}


def test_activation_checkpointing_gives_same_gradients() -> None:
    cells = _cells(LENGTHS)
    plain = _model(dataclasses.replace(DEBUG, dropout=0.1)).train()
    wrapped = apply_activation_checkpointing(copy.deepcopy(plain))
    assert is_activation_checkpointed(wrapped) and not is_activation_checkpointed(plain)
    assert list(wrapped.state_dict()) == list(plain.state_dict())

    # Recomputation really happens: each block's qkv runs twice per step (forward + backward).
    calls = []
    hook = wrapped.blocks[0].qkv.register_forward_hook(lambda *_: calls.append(1))
    loss_a, grads_a = _loss_and_grads(plain, cells)
    loss_b, grads_b = _loss_and_grads(wrapped, cells)
    hook.remove()
    assert len(calls) == 2
    torch.testing.assert_close(loss_a, loss_b, atol=0.0, rtol=0.0)
    assert grads_a.keys() == grads_b.keys() and "blocks.0.qkv.weight" in grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="already"):
        apply_activation_checkpointing(wrapped)


def test_forward_padded_works_on_checkpointed_model() -> None:
    cells = _cells(LENGTHS)
    model = _model()
    expected = model.forward_padded(**_padded(cells, LENGTHS)).hidden
    got = apply_activation_checkpointing(model).forward_padded(**_padded(cells, LENGTHS)).hidden
    torch.testing.assert_close(got, expected, atol=0.0, rtol=0.0)


def test_flops_formula_equals_counted_matmuls() -> None:
    # Equal-length cells make the token-weighted length exact; the math SDPA kernel decomposes
    # attention into bmm calls the counter sees. Heads run on every token, as the formula assumes.
    lengths = [16, 16, 16]
    model, cells = _model(), _cells(lengths)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(**cells)
        model.value_head(out.hidden)
        per_token_cell = out.cell_emb.repeat_interleave(lengths[0], dim=0)
        model.expr_head(per_token_cell, model.embed_genes(cells["gene_ids"]))
    counted = counter.get_total_flops() / sum(lengths)
    formula = model_flops_per_token(DEBUG, token_weighted_seqlen(lengths), N_GENES)
    assert formula == pytest.approx(3 * counted, rel=1e-12)


def test_flops_scale_linearly_with_layers_and_length() -> None:
    flops = [model_flops_per_token(dataclasses.replace(DEBUG, n_layers=n), 500.0, N_GENES) for n in (1, 2, 3, 4)]
    steps = [b - a for a, b in zip(flops, flops[1:])]
    assert steps[0] > 0 and steps == pytest.approx([steps[0]] * 3)
    base = ModelConfig()
    d_length = model_flops_per_token(base, 801.0, N_GENES) - model_flops_per_token(base, 800.0, N_GENES)
    assert d_length == pytest.approx(3 * base.n_layers * 4 * base.d_model)
    assert token_weighted_seqlen([100, 300]) == pytest.approx((100**2 + 300**2) / 400)


def test_mfu() -> None:
    per_token = model_flops_per_token(ModelConfig(), 700.0, 60_000)
    assert 2e8 < per_token < 4e8  # ~3 x 93 MFLOP for the base model at 700 tokens per cell
    assert mfu(1e5, per_token, PEAK_FLOPS["H100-bf16"]) == pytest.approx(1e5 * per_token / 989e12)


@pytest.mark.gpu
def test_flash_model_matches_sdpa_model_on_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not flash_attn_available():
        pytest.skip("needs flash_attn (pip install 'hiceller[gpu]')")
    cells = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in _cells(LENGTHS).items()}
    sdpa = _model().cuda().to(torch.bfloat16)
    flash = _model(dataclasses.replace(DEBUG, attention="flash")).cuda().to(torch.bfloat16)
    flash.load_state_dict(sdpa.state_dict(), strict=True)
    torch.testing.assert_close(flash(**cells).hidden.float(), sdpa(**cells).hidden.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
def test_torch_varlen_model_matches_sdpa_model_on_gpu() -> None:
    """Forward and gradients of the whole model, torch's varlen kernel vs SDPA, same bf16 weights."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not torch_varlen_available():
        pytest.skip("needs torch >= 2.10 with flash-attention kernels (torch.nn.attention.varlen)")
    cells = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in _cells(LENGTHS).items()}
    models = [_model().cuda().to(torch.bfloat16), _model(dataclasses.replace(DEBUG, attention="torch_varlen")).cuda().to(torch.bfloat16)]
    models[1].load_state_dict(models[0].state_dict(), strict=True)
    upstream = torch.randn(sum(LENGTHS), DEBUG.d_model, device="cuda")
    outs = []
    for m in models:
        hidden = m(**cells).hidden
        (hidden.float() * upstream).sum().backward()
        outs.append((hidden.float(), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None and p.grad.any()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=5e-2, rtol=5e-2)
    for name, g in outs[0][1].items():
        assert ((outs[1][1][name] - g).norm() / g.norm()).item() < 3e-2, name
