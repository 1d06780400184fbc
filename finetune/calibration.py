"""What makes an annotation trustworthy, fitted on the fine-tuning run's own cells and kept in the bundle.

- Temperature (Guo et al. 2017, "On calibration of modern neural networks"): one scalar T fitted on
  the validation cells' logits by minimising their negative log-likelihood; annotation reports
  ``softmax(z / T)``, so a confidence of 0.9 is right about 90% of the time on cells like the
  validation cells. It never changes which class wins.
- min_confidence: the default of ``annotate --min-confidence``. Chosen on validation: the threshold
  (from a grid) whose abstentions, counted as misses, give the best validation macro-F1; the lowest
  one on a tie, so a model that is never confidently wrong abstains on nothing.
- Novelty: per class, the centroid of the training cells' L2-normalised ``<cls>`` embeddings and a
  radius, the 99th percentile of those cells' cosine distances to it (classes with fewer than
  ``MIN_CLASS_CELLS`` cells take the pooled percentile). A query cell outside ``margin x radius`` of
  every class is unlike any training cell: Unassigned, reason ``far_from_training``.
- Gene overlap: a query must hold ``min_read_overlap`` of the genes the classifier reads, else
  annotation refuses it (below ``warn_read_overlap`` it warns).
- min_genes: a cell expressing fewer of the genes the model reads than the 1st percentile of the
  training cells (at least 1) carries too little to go on: Unassigned, reason ``few_genes``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from finetune.metrics import expected_calibration_error, softmax

__all__ = ["Calibration", "fit_temperature", "choose_min_confidence", "fit_calibration", "REASONS"]

MIN_CLASS_CELLS = 10
RADIUS_QUANTILE = 0.99
DEFAULT_MARGIN = 1.0
CONFIDENCE_GRID = tuple(np.round(np.arange(0.0, 0.95, 0.05), 2))
REASONS = ("assigned", "low_confidence", "few_genes", "far_from_training")
"""Values of obs["celler_unassigned_reason"]; the first means the cell got a label."""


@dataclass
class Calibration:
    """The trust settings of a bundle (``calibration.json``)."""

    temperature: float = 1.0
    min_confidence: float = 0.0
    min_genes: int = 1
    centroids: list[list[float]] = field(default_factory=list)
    """Per class, the unit-norm centroid of its training cells' embeddings (empty: no novelty check)."""
    radius: list[float] = field(default_factory=list)
    """Per class, the cosine distance within which its training cells lie (99th percentile)."""
    margin: float = DEFAULT_MARGIN
    min_read_overlap: float = 0.5
    """Annotation refuses a query holding less than this share of the genes the model reads."""
    warn_read_overlap: float = 0.8
    """Below this share it warns and records the overlap."""
    ece_before: float | None = None
    """Validation ECE of the raw probabilities."""
    ece_after: float | None = None
    """Validation ECE after temperature scaling."""

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(np.asarray(logits, dtype=np.float64) / self.temperature)

    def novelty(self, embeddings: np.ndarray) -> np.ndarray:
        """Per cell, its cosine distance to the nearest class centroid in units of that class's
        radius times the margin: above 1 means outside every class (0 when there is no check)."""
        if not self.centroids:
            return np.zeros(len(embeddings))
        e = np.asarray(embeddings, dtype=np.float64)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        distance = 1.0 - e @ np.asarray(self.centroids, dtype=np.float64).T
        scaled = distance / np.maximum(np.asarray(self.radius) * self.margin, 1e-6)
        return scaled.min(axis=1)


def fit_temperature(logits: np.ndarray, y: np.ndarray, max_iter: int = 200) -> float:
    """The T > 0 minimising the NLL of ``softmax(logits / T)`` for labels ``y`` (LBFGS on log T)."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    t = torch.as_tensor(np.asarray(y, dtype=np.int64))
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), t)
        loss.backward()
        return loss

    opt.step(closure)
    return float(np.clip(log_t.exp().item(), 0.05, 20.0))


def _macro_f1_with_abstention(y: np.ndarray, proba: np.ndarray, threshold: float) -> float:
    pred = np.where(proba.max(1) >= threshold, proba.argmax(1), -1)  # -1: abstained, a miss
    f1 = []
    for c in np.unique(y):
        tp = np.sum((pred == c) & (y == c))
        denom = np.sum(pred == c) + np.sum(y == c)
        f1.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1))


def choose_min_confidence(y: np.ndarray, proba: np.ndarray) -> float:
    """The grid threshold with the best validation macro-F1 (abstentions are misses); lowest on a tie."""
    scores = [_macro_f1_with_abstention(y, proba, t) for t in CONFIDENCE_GRID]
    return float(CONFIDENCE_GRID[int(np.argmax(scores))])


def _centroids(emb: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[list, list]:
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    centroids = np.zeros((n_classes, e.shape[1]))
    distance = np.zeros(len(y))
    for c in range(n_classes):
        members = y == c
        if members.any():
            m = e[members].mean(0)
            centroids[c] = m / max(np.linalg.norm(m), 1e-12)
            distance[members] = 1.0 - e[members] @ centroids[c]
    pooled = float(np.quantile(distance, RADIUS_QUANTILE)) if len(distance) else 1.0
    radius = [float(np.quantile(distance[y == c], RADIUS_QUANTILE)) if np.sum(y == c) >= MIN_CLASS_CELLS else pooled
              for c in range(n_classes)]
    return centroids.tolist(), radius


def fit_calibration(val_logits: np.ndarray, val_y: np.ndarray, train_emb: np.ndarray, train_y: np.ndarray,
                    train_genes: np.ndarray, n_classes: int) -> Calibration:
    """A bundle's :class:`Calibration` from the best round's validation logits and training embeddings
    (labels are class ids; cells with label -100 are left out)."""
    ok_val, ok_train = val_y >= 0, train_y >= 0
    t = fit_temperature(val_logits[ok_val], val_y[ok_val])
    raw = softmax(val_logits[ok_val])
    scaled = softmax(val_logits[ok_val] / t)
    centroids, radius = _centroids(train_emb[ok_train], train_y[ok_train], n_classes)
    return Calibration(
        temperature=t,
        min_confidence=choose_min_confidence(val_y[ok_val], scaled),
        min_genes=max(1, int(np.quantile(train_genes, 0.01))),
        centroids=centroids,
        radius=radius,
        ece_before=expected_calibration_error(raw, val_y[ok_val]),
        ece_after=expected_calibration_error(scaled, val_y[ok_val]),
    )
