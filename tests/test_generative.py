"""scGPT's generative attention and the objectives that use it, against a dense reference.

The reference builds the whole ``T x T`` "may attend" matrix of a few packed cells (same cell, and
the key known or the key being the query itself) and runs plain softmax attention under it; the
backends must give the same outputs and gradients without ever building that matrix (the GPU
kernels' calls are pinned in test_attention_contracts.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from hiceller.config import ModelConfig, load_config
from hiceller.errors import ConfigError
from pretrain.attention import varlen_attention
from pretrain.generative import GenerativeSplit, generative_attention
from pretrain.model import CLS_ID, MASK_VALUE, N_SPECIAL, CellerModel
from pretrain.objective import draw_mask, pretraining_loss
from pretrain.task import PretrainTask

LENGTHS = [1, 6, 2, 17, 9, 30]
TINY = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, attention="sdpa")


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _known(lengths: list[int], seed: int = 0) -> torch.Tensor:
    cu = _cu(lengths)
    return ~draw_mask(cu, sum(lengths), 0.5, torch.Generator().manual_seed(seed))


def dense_pattern(known: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Bool ``[T, T]``: query i may attend to key j (same cell, and j known or j == i)."""
    cell = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return (cell[:, None] == cell[None, :]) & (known[None, :] | torch.eye(known.numel(), dtype=torch.bool))


def dense_attention(q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


def test_split_index_arrays_on_a_hand_made_batch() -> None:
    # cell 0: <cls> only; cell 1: <cls> g1 g2(unknown) g3(unknown); cell 2: <cls> g1(unknown)
    known = torch.tensor([1, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    split = GenerativeSplit.from_known(known, _cu([1, 4, 2]))
    assert split.known_idx.tolist() == [0, 1, 2, 5] and split.cu_known.tolist() == [0, 1, 3, 4]
    assert split.unknown_idx.tolist() == [3, 4, 6] and split.cu_unknown.tolist() == [0, 2, 3]
    # the unknown call's keys: cell 1's known keys (rows 1, 2) + the slot (row 4 = Tk), cell 2's (row 3) + slot
    assert split.context_idx.tolist() == [1, 2, 4, 3, 4] and split.cu_context.tolist() == [0, 3, 5]
    assert (split.max_known, split.max_unknown, split.max_context) == (2, 2, 3)
    assert torch.cat([split.known_idx, split.unknown_idx])[split.inverse].tolist() == list(range(7))
    assert all(t.dtype == torch.int32 for t in (split.cu_known, split.cu_unknown, split.cu_context))


def test_split_refuses_an_unknown_cls() -> None:
    with pytest.raises(ValueError, match="<cls>"):
        GenerativeSplit.from_known(torch.tensor([1, 1, 0, 1], dtype=torch.bool), _cu([2, 2]))


def test_sdpa_block_mask_equals_the_dense_reference() -> None:
    g = torch.Generator().manual_seed(0)
    T = sum(LENGTHS)
    q, k, v = (torch.randn(T, 4, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    known = _known(LENGTHS)
    assert (~known).any() and not known[_cu(LENGTHS)[:-1].long()].logical_not().any()
    ref = dense_attention(q, k, v, dense_pattern(known, LENGTHS))
    out = generative_attention(q, k, v, _cu(LENGTHS), GenerativeSplit.from_known(known, _cu(LENGTHS)), backend="sdpa")
    torch.testing.assert_close(out, ref)
    up = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((ref * up).sum(), (q, k, v)), torch.autograd.grad((out * up).sum(), (q, k, v))):
        torch.testing.assert_close(b, a)


def test_all_known_is_plain_attention() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(sum(LENGTHS), 4, 8, generator=g) for _ in range(3))
    cu = _cu(LENGTHS)
    split = GenerativeSplit.from_known(torch.ones(sum(LENGTHS), dtype=torch.bool), cu)
    torch.testing.assert_close(generative_attention(q, k, v, cu, split, backend="sdpa"),
                               varlen_attention(q, k, v, cu, max(LENGTHS), backend="sdpa"))


def _cells(lengths: list[int], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    genes, values = [], []
    for n in lengths:
        genes.append(torch.cat([torch.tensor([CLS_ID]), torch.randperm(40, generator=g)[: n - 1] + N_SPECIAL]))
        values.append(torch.cat([torch.tensor([0]), torch.randint(1, 51, (n - 1,), generator=g)]))
    return {"gene_ids": torch.cat(genes), "values": torch.cat(values), "cu_seqlens": _cu(lengths), "max_seqlen": max(lengths)}


def test_an_unknown_gene_sees_the_known_genes_and_itself_only() -> None:
    """Through the whole model: an unknown gene's output ignores the other unknown genes (identity and
    value), and follows its cell's known values; under the masked pattern it sees them all."""
    torch.manual_seed(0)
    model = CellerModel(TINY, 40, 51).eval()
    cells = _cells([12, 9])
    known = _known([12, 9], seed=3)
    unknown = (~known).nonzero().squeeze(-1)
    i, j = unknown[0].item(), unknown[1].item()  # two unknown genes of cell 0
    assert j < 12 and known[1:12].any()
    split = GenerativeSplit.from_known(known, cells["cu_seqlens"])
    inputs = cells["values"].masked_fill(~known, MASK_VALUE)
    base = model(cells["gene_ids"], inputs, cells["cu_seqlens"], 12, split).hidden
    other = cells["gene_ids"].clone()
    other[j] = 40 + N_SPECIAL - 1 if other[j] != 40 + N_SPECIAL - 1 else N_SPECIAL
    changed = model(other, inputs, cells["cu_seqlens"], 12, split).hidden
    torch.testing.assert_close(changed[i], base[i])  # another unknown gene is invisible
    assert not torch.allclose(changed[j], base[j])  # (its own output does change)
    k = known[1:12].nonzero()[0].item() + 1  # a known gene of cell 0
    moved = inputs.clone()
    moved[k] = (moved[k] + 7) % 51
    assert not torch.allclose(model(cells["gene_ids"], moved, cells["cu_seqlens"], 12, split).hidden[i], base[i])
    masked = model(cells["gene_ids"], inputs, cells["cu_seqlens"], 12).hidden
    assert not torch.allclose(model(other, inputs, cells["cu_seqlens"], 12).hidden[i], masked[i])


def test_generative_loss_trains() -> None:
    torch.manual_seed(0)
    model = CellerModel(TINY, 40, 51)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cells = _cells([20] * 16)
    mask = draw_mask(cells["cu_seqlens"], 320, 0.5, torch.Generator().manual_seed(0))
    split = GenerativeSplit.from_known(~mask, cells["cu_seqlens"])
    losses = []
    for _ in range(40):
        loss, metrics = pretraining_loss(model, **cells, mask=mask, split=split)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(metrics["loss"])
    assert metrics["n_masked"] == float(mask.sum()) and losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("objective, generative", [("masked", [0, 0, 0, 0]), ("generative", [1, 1, 1, 1]), ("both", [0, 1, 0, 1])])
def test_objective_choice_per_micro_batch(objective: str, generative: list[int]) -> None:
    from data_store.batching import PackedBatch

    cells = _cells(LENGTHS)
    batch = PackedBatch(cells["gene_ids"], cells["values"], cells["cu_seqlens"], max(LENGTHS),
                        torch.full((len(LENGTHS),), -100), torch.full((len(LENGTHS),), -1))
    task = PretrainTask(CellerModel(TINY, 40, 51), (0.5,), objective)
    args = [task.prepare(batch, seed=7, device=torch.device("cpu"), index=i) for i in range(4)]
    assert [int(a[-1] is not None) for a in args] == generative
    # the hidden genes are the same draw whichever mode: only the attention pattern differs
    assert all(torch.equal(a[4], args[0][4]) for a in args)
    for a in args:
        if a[-1] is not None:
            assert torch.equal(a[-1].known, ~a[4])
    loss, metrics = task(*args[1])
    assert math.isfinite(loss.item()) and (metrics.get("generative") == float(generative[1]) or objective == "masked")


def test_objective_config() -> None:
    assert load_config("debug").train.objective == "masked"
    assert load_config("debug", ['train.objective="both"']).train.objective == "both"
    with pytest.raises(ConfigError, match="train.objective: must be masked, generative or both"):
        load_config("debug", ['train.objective="causal"'])
