"""Gaussian Inflation (GInf) loss: cross-entropy on logits perturbed more for rarer classes.

The HiCeller recipe for long-tail annotation. With training-split class counts ``N_c``,
``delta_c = log N_max - log N_c`` is 0 for the largest class and grows with rarity; during training
the logits become ``z~ = z + delta * eps`` with ``eps ~ N(mu, sigma^2)`` drawn per sample and class,
and the loss is ``cross_entropy(z~, y)``. In eval mode the logits are used as they are, so the loss
equals plain cross-entropy and predictions never depend on a random draw.

What the loss does in expectation (checked in tests/test_ginf.py, measured in bench/RESULTS.md):
- ``mu`` shifts class c's training logit by ``mu * delta_c``. With ``mu = -1`` that shift is
  ``log N_c - log N_max = log pi_c + const``, so GInf(mu=-1, sigma=0) *is* the logit-adjusted
  cross-entropy of Menon et al. (2021, "Long-tail learning via logit adjustment"): rare classes are
  handicapped while training, and the plain logits at test time come out balanced across classes.
- ``sigma`` adds zero-mean noise. Inside the softmax normaliser it acts, to second order, like a
  training bonus of ``delta_c^2 sigma^2 / 2`` on class c's logit, so the test-time logits learn to give
  rare classes *less* mass than their training share. With the published defaults (mu=0, sigma=0.1)
  this lean against rare classes is small (a rarest class with delta = 7 loses ~0.25 of log-odds);
  it grows with sigma^2.
So a lean toward the tail can only come from ``mu < 0``; ``finetune.ginf_mu=-1`` targets balanced error
(mean recall) and suits test sets whose class mix is flatter than the training mix. On test donors as
skewed as the training set it scored lower F1 than the defaults (false positives of rare types,
bench/RESULTS.md), so the defaults stay those of the method as published.

A class with count 0 in the training split is treated as count 1: it is the rarest possible class,
so it gets the largest inflation ``log N_max``, and no ``log 0`` reaches the logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GInfLoss", "class_counts_from_labels", "inflation_offsets", "make_classification_loss"]

IGNORE_INDEX = -100


def class_counts_from_labels(labels: Sequence[int] | np.ndarray | torch.Tensor, n_classes: int) -> np.ndarray:
    """``N_c`` from integer training labels; ``ignore_index`` cells are not counted.

    Counts must come from the training split only: validation or test cells leaking into them would
    tell the loss how rare a class is in data the model is judged on.
    """
    arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).ravel()
    arr = arr[arr != IGNORE_INDEX]
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(
            f"labels must lie in [0, {n_classes}) or be {IGNORE_INDEX}, got range [{arr.min()}, {arr.max()}]"
        )
    return np.bincount(arr, minlength=n_classes).astype(np.int64)


def inflation_offsets(class_counts: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """``delta_c = log N_max - log N_c`` (float32), with zero counts raised to 1 (see module doc)."""
    counts = torch.as_tensor(np.asarray(class_counts.cpu() if isinstance(class_counts, torch.Tensor) else class_counts))
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    if (counts < 0).any():
        raise ValueError("class_counts must be >= 0")
    counts = counts.to(torch.float64).clamp_min(1.0)
    return (counts.max().log() - counts.log()).to(torch.float32)


class GInfLoss(nn.Module):
    """Cross-entropy on Gaussian-inflated logits (noise only while ``self.training``).

    ``forward(logits, targets, noise=None)``: ``logits`` is (N, C), ``targets`` (N,) class indices
    with ``-100`` ignored. ``noise`` (N, C), when given, is used as ``eps`` instead of a draw, so a test
    can fix it; like a draw, it is only applied in training mode (eval always uses plain logits).
    """

    delta: torch.Tensor

    def __init__(
        self,
        class_counts: Sequence[int] | np.ndarray | torch.Tensor,
        mu: float = 0.0,
        sigma: float = 0.1,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
        self.mu = float(mu)
        self.sigma = float(sigma)
        self.generator = generator
        self.reduction = reduction
        # A buffer, not a parameter: it moves with .to(device) but is never trained, and it is not
        # saved (persistent=False): it is a function of the class counts, which the bundle keeps.
        self.register_buffer("delta", inflation_offsets(class_counts), persistent=False)

    @property
    def n_classes(self) -> int:
        return int(self.delta.numel())

    def extra_repr(self) -> str:
        return f"n_classes={self.n_classes}, mu={self.mu}, sigma={self.sigma}, reduction={self.reduction!r}"

    def _draw_noise(self, logits: torch.Tensor) -> torch.Tensor:
        """``eps ~ N(mu, sigma^2)`` per sample and class, on the generator's device when one is set."""
        if self.generator is None:
            eps = torch.randn(logits.shape, device=logits.device, dtype=logits.dtype)
        else:
            eps = torch.randn(logits.shape, generator=self.generator, device=self.generator.device, dtype=logits.dtype)
            eps = eps.to(logits.device)
        return eps * self.sigma + self.mu

    def inflate(self, logits: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``z + delta * eps``; the random draw is skipped when ``noise`` is given."""
        if logits.ndim != 2 or logits.shape[1] != self.n_classes:
            raise ValueError(f"logits must be (N, {self.n_classes}), got {tuple(logits.shape)}")
        if noise is None:
            noise = self._draw_noise(logits)
        elif noise.shape != logits.shape:
            raise ValueError(f"noise must have the logits' shape {tuple(logits.shape)}, got {tuple(noise.shape)}")
        delta = self.delta.to(device=logits.device, dtype=logits.dtype)
        return logits + delta * noise.to(device=logits.device, dtype=logits.dtype)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        z = self.inflate(logits, noise) if self.training else logits
        return F.cross_entropy(z, targets, ignore_index=IGNORE_INDEX, reduction=self.reduction)


def make_classification_loss(
    kind: str,
    class_counts: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    mu: float = 0.0,
    sigma: float = 0.1,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """The classifier objective named by ``finetune.loss``: ``ce`` or ``ginf``.

    Both modules are called as ``loss(logits, targets)`` and ignore ``-100`` targets, so the training
    loop does not branch on the kind. ``ginf`` needs the training split's class counts.
    """
    if kind == "ce":
        return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    if kind == "ginf":
        if class_counts is None:
            raise ValueError("the ginf loss needs the training split's class_counts")
        return GInfLoss(class_counts, mu=mu, sigma=sigma, generator=generator)
    raise ValueError(f"unknown classification loss {kind!r} (known: ce, ginf)")
