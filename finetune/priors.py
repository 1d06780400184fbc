"""Label-shift adaptation at annotation time: re-estimate the query's class priors, re-weight.

A classifier trained on a reference learns ``p(y | x)`` under the reference's class mix ``pi_ref``.
A query has its own mix ``pi_q`` (a donor without mast cells, a sorted population, a tissue
without acinar cells). If only the mix changed (``p(x | y)`` is the same: "label shift"), Bayes'
rule gives the query's posteriors from the reference's:

    p_q(y | x)  ∝  p_ref(y | x) * pi_q(y) / pi_ref(y)

``pi_q`` is unknown, but it is the mean of the query posteriors, so it is found by EM
(Saerens, Latinne & Decaestecker 2002, "Adjusting the outputs of a classifier to new a priori
probabilities"): start at ``pi_q = pi_ref``; E-step: the re-weighted posteriors; M-step: ``pi_q`` =
their mean over the query cells; repeat until ``pi_q`` moves less than ``tol``. Classes the query
lacks fade towards prior 0, so their sporadic calls ("phantom" types) go to the classes that are
there; classes the query holds in abundance gain. EM keeps every prior above ``min_prior`` so a
class is never ruled out outright.

``pi_ref`` is the training split's class share. The re-weighting assumes calibrated posteriors; a
model trained with GInf or logit adjustment has posteriors bent on purpose, which is why the
effect is measured per task (bench/RESULTS.md) before it is on by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_ADAPT_PRIORS", "PriorShift", "estimate_priors", "reweight"]

DEFAULT_ADAPT_PRIORS = False
"""Whether ``annotate`` / ``evaluate`` re-estimate the query's priors unless told (bench/RESULTS.md)."""


@dataclass(frozen=True)
class PriorShift:
    """The outcome of EM: the query's estimated priors and how EM got there."""

    priors: np.ndarray
    """Estimated class shares of the query (sum 1)."""
    reference: np.ndarray
    """The training split's class shares the model learned under."""
    n_iter: int
    """EM iterations run."""
    converged: bool
    """Whether the priors moved less than ``tol`` in the last iteration."""


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / x.sum(axis=-1, keepdims=True)


def reweight(proba: np.ndarray, reference: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """Posteriors under ``priors`` from posteriors learned under ``reference`` (rows sum to 1)."""
    w = np.asarray(priors, dtype=np.float64) / np.asarray(reference, dtype=np.float64)
    p = np.asarray(proba, dtype=np.float64) * w
    total = p.sum(axis=1, keepdims=True)
    # A row whose every class got weight ~0 keeps its original posterior rather than 0/0.
    return np.where(total > 0, p / np.where(total > 0, total, 1.0), proba)


def estimate_priors(
    proba: np.ndarray,
    reference_counts: np.ndarray,
    *,
    max_iter: int = 200,
    tol: float = 1e-6,
    min_prior: float = 1e-6,
) -> PriorShift:
    """EM estimate of the query's class priors from reference posteriors ``proba`` (N x C)."""
    proba = np.asarray(proba, dtype=np.float64)
    counts = np.asarray(reference_counts, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[0] == 0 or proba.shape[1] != counts.size:
        raise ValueError(f"proba must be (N > 0, {counts.size}), got {proba.shape}")
    if (counts < 0).any() or counts.sum() <= 0:
        raise ValueError("reference_counts must be >= 0 with a positive sum")
    # A class with no training cell cannot be predicted anyway; give it a tiny share, not 0/0.
    reference = _normalised(np.maximum(counts, 1e-3))
    priors = reference.copy()
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        new = reweight(proba, reference, priors).mean(axis=0)
        new = _normalised(np.maximum(new, min_prior))
        step = float(np.abs(new - priors).max())
        priors = new
        if step < tol:
            converged = True
            break
    return PriorShift(priors=priors, reference=reference, n_iter=it, converged=converged)
