"""Masked-expression objective: mask properties, the loss's inputs and value, and that it trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hiceller.config import ModelConfig
from pretrain.model import CLS_ID, MASK_VALUE, N_SPECIAL, CellerModel
from pretrain.objective import draw_mask, pick_mask_ratio, pretraining_loss

N_GENES, N_BINS = 40, 51
TINY = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, attention="sdpa")
LENGTHS = [1, 2, 3, 11, 40, 8, 25]


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _cells(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    genes, values = [], []
    for n in lengths:
        genes.append(torch.cat([torch.tensor([CLS_ID]), torch.randperm(N_GENES, generator=g)[: n - 1] + N_SPECIAL]))
        values.append(torch.cat([torch.tensor([0]), torch.randint(1, N_BINS, (n - 1,), generator=g)]))
    return {"gene_ids": torch.cat(genes), "values": torch.cat(values), "cu_seqlens": _cu(lengths),
            "max_seqlen": max(lengths)}


def _model(seed: int = 0) -> CellerModel:
    torch.manual_seed(seed)
    return CellerModel(TINY, N_GENES, N_BINS)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.1])
def test_mask_count_per_cell_and_never_cls(ratio: float) -> None:
    cu = _cu(LENGTHS)
    mask = draw_mask(cu, sum(LENGTHS), ratio, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (sum(LENGTHS),)
    for i, cell_mask in enumerate(mask.split(LENGTHS)):
        n_genes = LENGTHS[i] - 1
        assert not cell_mask[0], "the <cls> token must never be masked"
        assert int(cell_mask.sum()) == (max(1, round(ratio * n_genes)) if n_genes else 0)


def test_mask_is_deterministic_per_seed() -> None:
    cu, n = _cu(LENGTHS), sum(LENGTHS)
    a = draw_mask(cu, n, 0.5, torch.Generator().manual_seed(3))
    b = draw_mask(cu, n, 0.5, torch.Generator().manual_seed(3))
    c = draw_mask(cu, n, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mask_chooses_genes_uniformly() -> None:
    # Over many draws every gene of a 9-gene cell is masked ~ 3/9 of the time (fixed seed: no flake).
    lengths = [10] * 400
    mask = draw_mask(_cu(lengths), sum(lengths), 1 / 3, torch.Generator().manual_seed(0)).view(400, 10)
    freq = mask.float().mean(0)
    assert freq[0] == 0
    assert ((freq[1:] - 1 / 3).abs() < 0.08).all(), freq


def test_mask_ratio_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="ratio"):
        draw_mask(_cu([3]), 3, 1.0, torch.Generator())


def test_pick_mask_ratio() -> None:
    ratios = (0.25, 0.5, 0.75)
    draws = [pick_mask_ratio(ratios, torch.Generator().manual_seed(s)) for s in range(60)]
    assert set(draws) == set(ratios)
    assert draws == [pick_mask_ratio(ratios, torch.Generator().manual_seed(s)) for s in range(60)]
    with pytest.raises(ValueError):
        pick_mask_ratio((), torch.Generator())


def test_loss_hides_masked_values_and_matches_its_definition() -> None:
    model, cells = _model().eval(), _cells(LENGTHS)
    mask = draw_mask(cells["cu_seqlens"], len(cells["gene_ids"]), 0.5, torch.Generator().manual_seed(0))
    seen: dict[str, torch.Tensor] = {}

    def record_inputs(_module: torch.nn.Module, args: tuple) -> None:
        seen.setdefault("values", args[1].clone())

    model.register_forward_pre_hook(record_inputs)
    loss, metrics = pretraining_loss(model, mask=mask, **cells)

    # The encoder saw MASK_VALUE exactly at the masked positions and the true bins elsewhere.
    assert (seen["values"][mask] == MASK_VALUE).all()
    assert torch.equal(seen["values"][~mask], cells["values"][~mask])

    # Recompute both terms independently: per masked token, the cell of that token found by a loop.
    with torch.no_grad():
        out = model(cells["gene_ids"], seen["values"], cells["cu_seqlens"], cells["max_seqlen"])
        cell_of = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])
        target = cells["values"][mask].float()
        mse_value = F.mse_loss(model.value_head(out.hidden[mask]), target)
        gene_emb = model.embed_genes(cells["gene_ids"][mask])
        mse_expr = F.mse_loss(model.expr_head(out.cell_emb[cell_of[mask]], gene_emb), target)
    assert torch.isfinite(loss)
    assert metrics["n_masked"] == float(mask.sum())
    assert metrics["mse_value"] == pytest.approx(float(mse_value), rel=1e-5)
    assert metrics["mse_expr_from_cell"] == pytest.approx(float(mse_expr), rel=1e-5)
    assert loss.item() == pytest.approx(metrics["mse_value"] + metrics["mse_expr_from_cell"], rel=1e-6)
    assert metrics["loss"] == pytest.approx(loss.item())


def test_no_masked_token_gives_zero_loss_and_gradients_everywhere() -> None:
    model, cells = _model(), _cells([1, 1, 1])  # cells with only <cls>: nothing to mask
    mask = draw_mask(cells["cu_seqlens"], 3, 0.5, torch.Generator().manual_seed(0))
    loss, metrics = pretraining_loss(model, mask=mask, **cells)
    loss.backward()
    assert float(loss.detach()) == 0.0 and metrics["n_masked"] == 0.0
    used = [n for n, p in model.named_parameters() if p.grad is None and n != "value_encoder.mask_embedding"]
    assert used == [], f"parameters left out of the graph: {used}"


def test_tiny_model_overfits_one_batch() -> None:
    model, cells = _model(), _cells([30, 20, 25, 12, 40, 18])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mask = draw_mask(cells["cu_seqlens"], len(cells["gene_ids"]), 0.25, torch.Generator().manual_seed(0))
    losses = []
    for _ in range(50):
        optimizer.zero_grad()
        loss, _ = pretraining_loss(model, mask=mask, **cells)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.2 * losses[0], losses[::10]
