"""GInf loss against a separately written numpy version of the formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from finetune.ginf import GInfLoss, class_counts_from_labels, inflation_offsets, make_classification_loss


def _reference_ginf(logits: np.ndarray, targets: np.ndarray, counts: np.ndarray, eps: np.ndarray) -> float:
    """The published formula, written from scratch in float64, mean over non-ignored cells."""
    n = np.maximum(counts.astype(np.float64), 1.0)
    delta = np.log(n.max()) - np.log(n)
    z = logits.astype(np.float64) + delta[None, :] * eps.astype(np.float64)
    keep = targets != -100
    z, t = z[keep], targets[keep]
    zmax = z.max(axis=1, keepdims=True)
    log_softmax = z - zmax - np.log(np.exp(z - zmax).sum(axis=1, keepdims=True))
    return float(-log_softmax[np.arange(len(t)), t].mean())


@pytest.fixture()
def batch() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(32, 5)) * 3, dtype=torch.float32)
    targets = torch.tensor(rng.integers(0, 5, size=32))
    counts = np.array([1000, 300, 40, 5, 1])
    return logits, targets, counts


def test_matches_reference_with_fixed_noise(batch: tuple[torch.Tensor, torch.Tensor, np.ndarray]) -> None:
    logits, targets, counts = batch
    eps = np.random.default_rng(1).normal(0.3, 0.5, size=logits.shape)
    loss = GInfLoss(counts, mu=0.3, sigma=0.5).train()
    got = loss(logits, targets, noise=torch.tensor(eps, dtype=torch.float32)).item()
    want = _reference_ginf(logits.numpy(), targets.numpy(), counts, eps)
    assert got == pytest.approx(want, rel=1e-5)
    # The noise must actually matter: plain CE differs from GInf here.
    assert abs(got - nn.functional.cross_entropy(logits, targets).item()) > 1e-3


def test_eval_mode_equals_cross_entropy(batch: tuple[torch.Tensor, torch.Tensor, np.ndarray]) -> None:
    logits, targets, counts = batch
    loss = GInfLoss(counts, mu=1.0, sigma=2.0).eval()
    ce = nn.functional.cross_entropy(logits, targets)
    assert loss(logits, targets).item() == pytest.approx(ce.item(), rel=1e-6)
    assert loss(logits, targets, noise=torch.ones_like(logits)).item() == pytest.approx(ce.item(), rel=1e-6)


def test_training_draw_is_seeded_and_distributed_as_specified() -> None:
    counts = np.array([10_000, 100, 1])
    loss = GInfLoss(counts, mu=0.5, sigma=0.2, generator=torch.Generator().manual_seed(3)).train()
    zeros = torch.zeros(20_000, 3)
    inflated = loss.inflate(zeros)
    delta = inflation_offsets(counts)
    assert torch.all(inflated[:, 0] == 0)  # the largest class is never inflated
    eps = inflated[:, 1:] / delta[1:]
    assert eps.mean().item() == pytest.approx(0.5, abs=0.01)
    assert eps.std().item() == pytest.approx(0.2, abs=0.01)
    again = GInfLoss(counts, mu=0.5, sigma=0.2, generator=torch.Generator().manual_seed(3)).train()
    assert torch.equal(again.inflate(zeros), inflated)


def test_rarer_classes_get_larger_inflation() -> None:
    delta = inflation_offsets([500, 50, 5, 0])
    assert delta[0].item() == 0.0
    assert torch.all(delta[1:] > delta[:-1])
    # Count 0 is treated as count 1, so its offset is log N_max.
    assert delta[3].item() == pytest.approx(np.log(500), rel=1e-6)
    assert torch.all(torch.isfinite(delta))


def test_gradients_flow_to_logits(batch: tuple[torch.Tensor, torch.Tensor, np.ndarray]) -> None:
    logits, targets, counts = batch
    logits = logits.clone().requires_grad_(True)
    GInfLoss(counts, generator=torch.Generator().manual_seed(0)).train()(logits, targets).backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_ignore_index(batch: tuple[torch.Tensor, torch.Tensor, np.ndarray]) -> None:
    logits, targets, counts = batch
    targets = targets.clone()
    targets[::3] = -100
    eps = np.random.default_rng(2).normal(size=logits.shape)
    got = GInfLoss(counts).train()(logits, targets, noise=torch.tensor(eps, dtype=torch.float32)).item()
    assert got == pytest.approx(_reference_ginf(logits.numpy(), targets.numpy(), counts, eps), rel=1e-5)


def test_shape_errors(batch: tuple[torch.Tensor, torch.Tensor, np.ndarray]) -> None:
    logits, targets, counts = batch
    loss = GInfLoss(counts).train()
    with pytest.raises(ValueError, match="noise"):
        loss(logits, targets, noise=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="logits"):
        loss(logits[:, :4], targets)
    with pytest.raises(ValueError):
        GInfLoss([3, -1])


def test_factory_and_counts() -> None:
    counts = class_counts_from_labels([0, 0, 2, -100, 2, 2], n_classes=4)
    assert counts.tolist() == [2, 0, 3, 0]
    assert isinstance(make_classification_loss("ce"), nn.CrossEntropyLoss)
    ginf = make_classification_loss("ginf", counts, mu=0.1, sigma=0.2)
    assert isinstance(ginf, GInfLoss) and ginf.sigma == 0.2 and ginf.mu == 0.1
    with pytest.raises(ValueError, match="class_counts"):
        make_classification_loss("ginf")
    with pytest.raises(ValueError, match="unknown"):
        make_classification_loss("focal", counts)
    with pytest.raises(ValueError):
        class_counts_from_labels([0, 4], n_classes=4)


def _learned_prior(counts: list[int], mu: float, sigma: float, steps: int = 1500) -> np.ndarray:
    """The class distribution a bias-only model learns under GInf: softmax of the fitted logits."""
    n = torch.tensor(counts)
    y = torch.repeat_interleave(torch.arange(len(counts)), n)
    bias = torch.zeros(len(counts), requires_grad=True)
    loss = GInfLoss(n, mu=mu, sigma=sigma, generator=torch.Generator().manual_seed(0)).train()
    opt = torch.optim.Adam([bias], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss(bias.expand(len(y), -1), y).backward()
        opt.step()
    return torch.softmax(bias.detach(), 0).numpy()


def test_mean_zero_noise_lowers_the_rare_prior() -> None:
    """In expectation, zero-mean inflation adds about delta_c^2 sigma^2 / 2 to class c's logit inside
    the softmax while training, so the plain logits used at test time learn to give rare classes *less*
    mass than their training share; the published default (mu=0) therefore leans against rare classes."""
    counts = [1000, 100, 10]
    prior = np.array(counts) / sum(counts)
    ce = _learned_prior(counts, mu=0.0, sigma=0.0)
    np.testing.assert_allclose(ce, prior, atol=2e-3)
    small, large = _learned_prior(counts, 0.0, 0.1), _learned_prior(counts, 0.0, 0.5)
    assert large[2] < small[2] < ce[2]
    # second-order estimate of the rarest class's log-odds shift against the largest: -delta^2 sigma^2 / 2
    delta = np.log(1000 / 10)
    shift = np.log(large[2] / large[0]) - np.log(prior[2] / prior[0])
    assert -delta**2 * 0.5**2 / 2 * 1.5 < shift < -delta**2 * 0.5**2 / 2 * 0.5


def test_mu_minus_one_without_noise_is_the_logit_adjusted_loss(batch: tuple[torch.Tensor, torch.Tensor, np.ndarray]) -> None:
    """mu=-1, sigma=0 shifts every logit by log N_c - log N_max = log pi_c + const: the logit-adjusted
    cross-entropy of Menon et al. (2021), whose bias-only fit is the uniform prior (balanced error)."""
    logits, targets, counts = batch
    ginf = GInfLoss(counts, mu=-1.0, sigma=0.0).train()
    log_prior = torch.log(torch.as_tensor(counts, dtype=torch.float32).clamp_min(1) / counts.sum())
    expected = nn.functional.cross_entropy(logits + log_prior, targets, ignore_index=-100)
    torch.testing.assert_close(ginf(logits, targets), expected)
    np.testing.assert_allclose(_learned_prior([1000, 100, 10], mu=-1.0, sigma=0.0), [1 / 3] * 3, atol=2e-3)
