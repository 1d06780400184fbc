"""The classifier heads of finetune/task.py and the label-shift step of finetune/priors.py."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from data_store.batching import pack
from data_store.tokenize import N_SPECIAL, Tokenizer
from finetune.priors import estimate_priors, reweight
from finetune.task import ClassifierTask, WideLinear
from hiceller.config import ModelConfig
from pretrain.model import CellerModel

N_BINS = 11


def toy_cells(n_cells: int = 240, n_genes: int = 30, n_classes: int = 3, seed: int = 0):
    """Counts whose class shows in the expression ranks of a few marker genes per class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n_cells)
    rate = rng.gamma(2.0, 1.0, (n_classes, n_genes))
    for c in range(n_classes):
        rate[c, c * 5 : c * 5 + 5] *= 4.0
    counts = rng.poisson(rate[y]).astype(np.float32)
    return sp.coo_matrix(counts), y


def tokens(counts: sp.coo_matrix):
    tok = Tokenizer(n_bins=N_BINS, max_genes=1000).tokenize(
        counts.row, counts.col, counts.data, counts.shape[0], cell_keys=np.arange(counts.shape[0], dtype=np.uint64)
    )
    return tok, pack(tok)


def bin_features(tok, n_cells: int, n_genes: int) -> np.ndarray:
    """The matrix a logistic regression on bins sees: bin / (n_bins - 1) per (cell, gene)."""
    rows = np.repeat(np.arange(n_cells), tok.lengths)
    genes = tok.gene_ids.astype(np.int64) - N_SPECIAL
    keep = genes >= 0
    x = np.zeros((n_cells, n_genes))
    x[rows[keep], genes[keep]] = tok.values[keep] / (N_BINS - 1)
    return x


def test_wide_part_is_a_logistic_regression_on_the_bins():
    """Trained alone to the optimum of sklearn's L2 objective, the linear head gives sklearn's
    probabilities: it is a multinomial logistic regression on the expression bins of the tokens."""
    from sklearn.linear_model import LogisticRegression

    counts, y = toy_cells()
    n_cells, n_genes = counts.shape
    tok, batch = tokens(counts)
    x = bin_features(tok, n_cells, n_genes)
    C = 0.5
    ref = LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(x, y)

    wide = WideLinear(n_genes + N_SPECIAL, 3, N_BINS).double()
    opt = torch.optim.LBFGS(wide.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")
    target = torch.from_numpy(y)

    def closure():
        opt.zero_grad()
        logits = wide(batch.gene_ids, batch.values, batch.cu_seqlens)
        # sklearn minimises 0.5 ||W||^2 + C * sum CE (intercept not penalised); the same, divided by C n
        loss = F.cross_entropy(logits, target, reduction="sum") / n_cells + 0.5 * wide.weight.pow(2).sum() / (C * n_cells)
        loss.backward()
        return loss

    opt.step(closure)
    ours = torch.softmax(wide(batch.gene_ids, batch.values, batch.cu_seqlens), -1).detach().numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(x), atol=2e-4)
    # <cls> and padding carry bin 0: their weights never reach the logits
    assert ref.score(x, y) > 0.8


def _task(head: str, n_classes: int = 3, n_genes: int = 30) -> ClassifierTask:
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0, attention="sdpa")
    torch.manual_seed(0)
    return ClassifierTask(CellerModel(cfg, n_genes=n_genes, n_bins=N_BINS), n_classes, "ce", np.ones(n_classes), head=head)


def test_joint_head_starts_as_the_transformer_and_sums_both():
    counts, y = toy_cells(n_cells=20)
    _, b = tokens(counts)
    joint, plain = _task("joint"), _task("transformer")
    args = (b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen)
    # zero-initialised wide part: the joint model starts exactly where the transformer head starts
    torch.testing.assert_close(joint.logits(*args)[0], plain.logits(*args)[0])
    with torch.no_grad():
        joint.wide.weight.normal_()
    emb = joint.model(*args).cell_emb
    torch.testing.assert_close(joint.logits(*args)[0], joint.head(emb) + joint.wide(b.gene_ids, b.values, b.cu_seqlens))
    assert "wide.weight" in joint.state_dict() and "wide.weight" not in plain.state_dict()


def test_linear_head_trains_only_the_wide_part():
    counts, y = toy_cells(n_cells=20)
    _, b = tokens(counts)
    task = _task("linear")
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable == {"wide.weight", "wide.bias"}
    loss, _ = task(b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen, torch.from_numpy(y))
    loss.backward()
    assert task.wide.weight.grad is not None and task.head.weight.grad is None
    with pytest.raises(ValueError, match="head must be one of"):
        _task("wide")


def _shifted_query(priors, n: int, means, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.choice(len(priors), size=n, p=priors)
    return rng.normal(np.asarray(means)[y], 1.0), y


def _posteriors(x, means, priors):
    lik = np.exp(-0.5 * (x[:, None] - np.asarray(means)[None, :]) ** 2)
    p = lik * np.asarray(priors)
    return p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("query_priors", [(0.1, 0.2, 0.7), (0.5, 0.5, 0.0), (0.6, 0.3, 0.1)])
def test_em_recovers_known_query_priors(query_priors):
    """Exact posteriors under the reference's mix, a query drawn with another mix: EM finds it,
    and re-weighting does not lose accuracy (it gains where the mix moved)."""
    means, ref = (-2.0, 0.0, 2.0), np.array([0.6, 0.3, 0.1])
    x, y = _shifted_query(query_priors, 20000, means, seed=1)
    proba = _posteriors(x, means, ref)
    shift = estimate_priors(proba, ref * 1000)
    assert shift.converged
    np.testing.assert_allclose(shift.priors, query_priors, atol=0.02)
    adapted = reweight(proba, shift.reference, shift.priors)
    np.testing.assert_allclose(adapted.sum(1), 1.0)
    before, after = (proba.argmax(1) == y).mean(), (adapted.argmax(1) == y).mean()
    assert after >= before - 0.002
    if query_priors != (0.6, 0.3, 0.1):
        assert after > before + 0.02
    if query_priors[2] == 0.0:  # an absent class fades: its calls go to the classes that are there
        assert shift.priors[2] < 0.01 and (adapted.argmax(1) == 2).sum() < (proba.argmax(1) == 2).sum() / 10


def test_em_refuses_bad_shapes():
    with pytest.raises(ValueError, match="proba must be"):
        estimate_priors(np.ones((0, 3)), [1, 1, 1])
    with pytest.raises(ValueError, match="reference_counts"):
        estimate_priors(np.full((2, 2), 0.5), [0, 0])


def test_wide_part_trains_at_its_own_rate():
    """finetune.wide_lr_scale: the linear part's parameters form their own optimizer groups at lr x scale
    (decay on the matrix only); every other parameter keeps the base rate."""
    from pretrain.optim import param_groups

    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0, attention="sdpa")
    task = ClassifierTask(CellerModel(cfg, n_genes=30, n_bins=N_BINS), 3, "ce", np.ones(3), head="joint", wide_lr_scale=20.0)
    groups = param_groups(task, weight_decay=0.01, lr=1e-3)
    wide = {id(p) for p in task.wide.parameters()}
    for g in groups:
        in_wide = {id(p) in wide for p in g["params"]}
        assert len(in_wide) == 1  # a group is all wide or all not
        assert g.get("lr", 1e-3) == pytest.approx(2e-2 if in_wide.pop() else 1e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(task.parameters()))
    scaled = [g for g in groups if "lr" in g]
    assert sorted(g["weight_decay"] for g in scaled) == [0.0, 0.01]


def test_wide_part_reading_expression_is_a_regression_on_scaled_log1p_with_an_l1_penalty():
    """finetune.wide_input=expression: the linear part's logits are ``bias + W^T x`` with ``x`` the
    cell's log1p(counts per 10k) divided per gene by its ``gene_scale`` max (the baseline's input);
    wide_l1 adds ``l1 * sum |W|`` to the training loss only, and a batch without expr is refused."""
    from data_store.tokenize import log1p_normalize

    counts, y = toy_cells(n_cells=40)
    n_cells, n_genes = counts.shape
    norm = log1p_normalize(counts.row, counts.data, n_cells)
    tok = Tokenizer(n_bins=N_BINS, max_genes=1000).tokenize(counts.row, counts.col, norm, n_cells,
                                                           cell_keys=np.arange(n_cells, dtype=np.uint64), keep_values=True)
    b = pack(tok)
    x = np.zeros((n_cells, n_genes), dtype=np.float32)
    x[counts.row, counts.col] = norm
    top = x.max(0)
    task = ClassifierTask(CellerModel(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0, attention="sdpa"),
                                      n_genes=n_genes, n_bins=N_BINS), 3, "ce", np.ones(3), head="linear",
                          wide_input="expression", wide_l1=1e-2)
    assert task.reads_expression and "wide.gene_scale" in task.state_dict()
    with torch.no_grad():
        task.wide.gene_scale[N_SPECIAL:] = torch.from_numpy(1 / top)
        task.wide.weight.normal_()
    w = task.wide.weight.detach().numpy()[N_SPECIAL:]
    want = (x / top) @ w + task.wide.bias.detach().numpy()
    got = task.train_logits(b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen, b.expr).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    labels = torch.from_numpy(y)
    task.train()
    loss, _ = task(b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen, labels, None, b.expr)
    ce = F.cross_entropy(torch.from_numpy(want).float(), labels)
    torch.testing.assert_close(loss, ce + 1e-2 * task.wide.weight.abs().sum(), rtol=1e-4, atol=1e-4)
    task.eval()
    loss_eval, _ = task(b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen, labels, None, b.expr)
    torch.testing.assert_close(loss_eval, ce, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="reads expression"):
        task.train_logits(b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen)


def test_l1_class_power_scales_each_class_penalty_by_its_share_and_keeps_a_rare_class():
    """wide_l1_class_power: class c's L1 is weighted min(1, (n_c * K / N) ** p); not saved. On a
    toy set with a 3-cell class, training the linear part with a uniform L1 leaves that class's
    weights far smaller than with the per-class penalty."""
    from finetune.task import l1_class_scale

    np.testing.assert_allclose(l1_class_scale(np.array([100, 97, 3])), [1.0, 1.0, 0.045], rtol=1e-6)
    np.testing.assert_allclose(l1_class_scale(np.array([10, 10])), [1.0, 1.0])
    np.testing.assert_allclose(l1_class_scale(np.array([100, 97, 3]), 0.5), [1.0, 1.0, 0.045**0.5], rtol=1e-6)

    counts, y = toy_cells(n_cells=200, seed=1)
    keep = np.flatnonzero(y != 2)[:197].tolist() + np.flatnonzero(y == 2)[:3].tolist()
    dense = counts.toarray()[keep]
    y = y[keep]
    c = sp.coo_matrix(dense)
    tok = Tokenizer(n_bins=N_BINS, max_genes=1000).tokenize(c.row, c.col, c.data, len(y),
                                                           cell_keys=np.arange(len(y), dtype=np.uint64))
    b = pack(tok)
    labels = torch.from_numpy(y)
    norms = {}
    for by_class in (False, True):
        torch.manual_seed(0)
        task = ClassifierTask(CellerModel(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0, attention="sdpa"),
                                          n_genes=30, n_bins=N_BINS), 3, "ce", np.bincount(y, minlength=3), head="linear",
                              wide_l1=3e-3, wide_l1_class_power=1.0 if by_class else 0.0)
        assert "wide.l1_class_scale" not in task.state_dict()
        opt = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=0.05)
        task.train()
        for _ in range(300):
            loss, _ = task(b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            task(b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen, labels)
        w = task.wide.weight.detach()
        torch.testing.assert_close(task.wide.l1, (w.abs() * task.wide.l1_class_scale).sum(), rtol=1e-3, atol=1e-3)
        norms[by_class] = float(w[:, 2].abs().sum())
    assert norms[True] > 2.5 * norms[False], norms


def test_bundle_round_trip_keeps_what_the_linear_part_reads(tmp_path):
    """A bundle says what its linear part reads; the spec and the weights must agree on it."""
    from dataclasses import replace

    from hiceller.errors import InputError
    from pretrain.layout import ModelSpec, TrainedModel, _check_bundle_weights, load_bundle, write_bundle

    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0, attention="sdpa")
    task = ClassifierTask(CellerModel(cfg, n_genes=30, n_bins=N_BINS), 3, "ce", np.ones(3), head="joint", wide_input="expression")
    spec = ModelSpec(cfg, N_BINS, 100, [f"G{i}" for i in range(30)], labels=["a", "b", "c"], label_counts=[5, 5, 5],
                     head="joint", wide_input="expression")
    state = {k: v.clone() for k, v in task.state_dict().items()}
    out = write_bundle(tmp_path / "b", TrainedModel(spec, state, tmp_path, {}, {}))
    loaded = load_bundle(out)
    assert loaded.spec.wide_input == "expression" and "wide.gene_scale" in loaded.state_dict
    config = {"n_genes": 30, "n_classes": 3}
    with pytest.raises(InputError, match="reading 'bins' does not match"):
        _check_bundle_weights(out, replace(spec, wide_input="bins"), config, state)
    bins_state = {k: v for k, v in state.items() if k != "wide.gene_scale"}
    _check_bundle_weights(out, replace(spec, wide_input="bins"), config, bins_state)  # older bundles: fine
    with pytest.raises(InputError, match="reading 'expression' does not match"):
        _check_bundle_weights(out, spec, config, bins_state)
