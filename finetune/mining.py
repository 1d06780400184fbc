"""Hard-sample mining: which training cells a mining round trains on, and when to stop the rounds.

The public HiCeller sources name a second training phase on "hard" samples but give no rule, so this
project defines one (measure it against plain phase 1 before trusting it):

1. Score. After a phase, every training cell is scored from its logits and label (numpy, float64):
   ``loss`` = cross-entropy ``-log p_y``; ``margin`` = ``p_y - max_{k != y} p_k`` (the true class's
   probability lead, in [-1, 1], negative when another class wins; probabilities rather than logits so
   one threshold means the same thing at any logit scale); ``misclassified`` = ``argmax z != y``.
   ``score = tier + loss / (1 + loss)`` with tier 2 = misclassified, 1 = correct but
   ``margin < margin_threshold``, 0 = easy. The fraction lies in [0, 1), so every misclassified cell
   outranks every correct one, low-margin cells outrank easy ones, and the loss orders cells within a
   tier. Cells with ``score >= 1`` (tiers 1 and 2) are hard candidates.
2. Hard set, per class. A class's hard cells are its highest-scoring cells: all its candidates, but at
   most ``cap_per_class`` (so one big confusable class, or a class full of mislabelled cells, cannot
   flood the round) and at least ``min(min_per_class, class size)`` when the class has any candidate
   (the floor: a rare class with one or two hard cells brings its next-hardest cells too, so it carries
   enough weight in the round to move the decision boundary). Classes with no candidate add nothing.
3. Replay. ``round(replay_fraction * |hard|)`` cells drawn uniformly without replacement from the
   cells not in the hard set, split over classes in proportion to their remaining cells (largest
   remainder), with at least one cell of every class that has remaining cells, so the round cannot
   forget a class it contains no hard cells of. That floor may raise the replay size by up to the
   number of classes; ``replay_fraction = 0`` means no replay at all.
4. Rounds. Round 0 is phase 1; each round is scored on validation macro F1 and the rounds stop after
   ``patience`` rounds without improvement; the best round (possibly 0: mining did not help) is the
   one kept. An empty hard set means there is nothing left to mine. A round starts from the previous
   round's weights with a fresh optimizer at ``train.lr * finetune.mining_lr_scale`` (finetune/run.py):
   the hard set can be a dozen cells, and a fresh Adam at the full rate moves every weight by about the
   learning rate per step whatever the gradient's size.

Ties in the score are broken by cell position and the replay draw uses the caller's
``numpy.random.Generator``, so a round is reproducible from its seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from hiceller.config import FinetuneConfig

__all__ = [
    "BestRoundTracker",
    "HardMiner",
    "HardMiningRule",
    "HardnessScores",
    "MiningRound",
    "run_mining_rounds",
    "score_cells",
]


@dataclass(frozen=True)
class HardMiningRule:
    """The knobs of the rule in the module docstring."""

    cap_per_class: int = 200
    """At most this many hard cells of one class per round."""
    replay_fraction: float = 0.5
    """Replay sample size as a fraction of the hard-set size."""
    margin_threshold: float = 0.2
    """A correct cell whose probability margin is below this is hard (0: only misclassified cells)."""
    min_per_class: int = 5
    """A class with any hard candidate contributes at least this many cells (bounded by its size)."""

    def __post_init__(self) -> None:
        if self.cap_per_class < 1:
            raise ValueError(f"cap_per_class must be >= 1, got {self.cap_per_class}")
        if self.replay_fraction < 0:
            raise ValueError(f"replay_fraction must be >= 0, got {self.replay_fraction}")
        if not 0.0 <= self.margin_threshold <= 1.0:
            raise ValueError(f"margin_threshold must be in [0, 1], got {self.margin_threshold}")
        if not 0 <= self.min_per_class <= self.cap_per_class:
            raise ValueError(
                f"min_per_class must be in [0, cap_per_class={self.cap_per_class}], got {self.min_per_class}"
            )

    @classmethod
    def from_config(cls, cfg: FinetuneConfig) -> HardMiningRule:
        """The rule for a run, every knob from ``[finetune]``; the floor clamped to the cap."""
        return cls(
            cap_per_class=cfg.hard_cap_per_class,
            replay_fraction=cfg.replay_fraction,
            margin_threshold=cfg.margin_threshold,
            min_per_class=min(cfg.min_per_class, cfg.hard_cap_per_class),
        )


@dataclass(frozen=True)
class HardnessScores:
    """Per-cell hardness (numpy arrays of length N); ``score >= 1`` marks a hard candidate."""

    loss: np.ndarray
    margin: np.ndarray
    misclassified: np.ndarray
    score: np.ndarray

    @property
    def is_hard(self) -> np.ndarray:
        return self.score >= 1.0


def score_cells(logits: np.ndarray, labels: np.ndarray, margin_threshold: float = 0.2) -> HardnessScores:
    """Hardness of each cell from its logits (N, C) and integer label, as in rule step 1."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64, copy=False)
    if z.ndim != 2 or z.shape[1] < 2 or y.shape != (z.shape[0],):
        raise ValueError(f"logits must be (N, C >= 2) with N labels, got {z.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must lie in [0, {z.shape[1]}), got range [{y.min()}, {y.max()}]")
    rows = np.arange(y.size)
    shifted = z - z.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    loss = -log_p[rows, y]
    others = p.copy()
    others[rows, y] = -np.inf
    margin = p[rows, y] - others.max(axis=1)
    misclassified = z.argmax(axis=1) != y
    tier = np.where(misclassified, 2.0, np.where(margin < margin_threshold, 1.0, 0.0))
    return HardnessScores(loss=loss, margin=margin, misclassified=misclassified, score=tier + loss / (1.0 + loss))


@dataclass
class MiningRound:
    """The cells one mining round trains on: the hard set plus the replay sample."""

    hard_idx: np.ndarray
    replay_idx: np.ndarray
    composition: dict[int, int] = field(default_factory=dict)
    """Hard cells per class label."""
    replay_composition: dict[int, int] = field(default_factory=dict)
    """Replay cells per class label."""

    @property
    def train_idx(self) -> np.ndarray:
        """Positions the round trains on (hard and replay are disjoint by construction)."""
        return np.sort(np.concatenate([self.hard_idx, self.replay_idx]))

    def to_frame(self, labels: np.ndarray, scores: HardnessScores, joinids: np.ndarray | None = None) -> pd.DataFrame:
        """One row per selected cell (``role`` hard or replay), as written to the round's Parquet list."""
        idx = np.concatenate([self.hard_idx, self.replay_idx])
        role = np.repeat(["hard", "replay"], [self.hard_idx.size, self.replay_idx.size])
        return pd.DataFrame(
            {
                "joinid": (idx if joinids is None else np.asarray(joinids)[idx]).astype(np.int64),
                "label": np.asarray(labels)[idx],
                "role": role,
                "score": scores.score[idx],
                "loss": scores.loss[idx],
                "margin": scores.margin[idx],
                "misclassified": scores.misclassified[idx],
            }
        )


def _hardest_first(members: np.ndarray, score: np.ndarray) -> np.ndarray:
    """``members`` (ascending positions) by descending score; stable, so ties go to the lower position."""
    return members[np.argsort(-score[members], kind="stable")]


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers proportional to ``weights`` that sum to ``total``."""
    exact = total * weights / weights.sum()
    base = np.floor(exact).astype(np.int64)
    short = total - int(base.sum())
    base[np.argsort(-(exact - base), kind="stable")[:short]] += 1
    return base


class HardMiner:
    """Applies a :class:`HardMiningRule` to scored cells (steps 2 and 3 of the module docstring)."""

    def __init__(self, rule: HardMiningRule) -> None:
        self.rule = rule

    def score(self, logits: np.ndarray, labels: np.ndarray) -> HardnessScores:
        return score_cells(logits, labels, self.rule.margin_threshold)

    def _hard_set(self, scores: HardnessScores, labels: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
        chosen: list[np.ndarray] = []
        composition: dict[int, int] = {}
        hard = scores.is_hard
        for cls in np.unique(labels):
            members = np.flatnonzero(labels == cls)
            n_candidates = int(hard[members].sum())
            if n_candidates == 0:
                continue
            floor = min(self.rule.min_per_class, members.size)
            n_take = min(self.rule.cap_per_class, max(n_candidates, floor))
            chosen.append(_hardest_first(members, scores.score)[:n_take])
            composition[int(cls)] = n_take
        return (np.sort(np.concatenate(chosen)) if chosen else np.empty(0, np.int64)), composition

    def _replay(
        self, rest: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, dict[int, int]]:
        if size == 0 or rest.size == 0:
            return np.empty(0, np.int64), {}
        classes, counts = np.unique(labels[rest], return_counts=True)
        quota = np.minimum(np.maximum(_largest_remainder(size, counts.astype(np.float64)), 1), counts)
        picked = [
            rng.choice(rest[labels[rest] == cls], size=int(q), replace=False)
            for cls, q in zip(classes, quota, strict=True)
        ]
        composition = {int(c): int(q) for c, q in zip(classes, quota, strict=True)}
        return np.sort(np.concatenate(picked)).astype(np.int64), composition

    def select(self, scores: HardnessScores, labels: np.ndarray, rng: np.random.Generator) -> MiningRound:
        """The hard set (capped, floored per class) and a stratified replay sample of the rest."""
        labels = np.asarray(labels)
        if labels.shape != scores.score.shape:
            raise ValueError(f"labels {labels.shape} and scores {scores.score.shape} describe different cells")
        hard_idx, composition = self._hard_set(scores, labels)
        rest = np.setdiff1d(np.arange(labels.size), hard_idx)
        replay_size = round(self.rule.replay_fraction * hard_idx.size)
        replay_idx, replay_composition = self._replay(rest, labels, replay_size, rng)
        return MiningRound(hard_idx, replay_idx, composition, replay_composition)


class BestRoundTracker:
    """Early stopping over mining rounds on validation macro F1, remembering the best round.

    ``update`` returns whether to run another round: False once ``patience`` consecutive rounds have
    not beaten the best by more than ``min_delta``. Round 0 (phase 1) is an ordinary entry, so the best
    round can be "no mining".
    """

    def __init__(self, patience: int = 1, min_delta: float = 0.0) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.patience = patience
        self.min_delta = min_delta
        self.best_round: int | None = None
        self.best_score: float | None = None
        self.history: list[tuple[int, float]] = []
        self._since_best = 0

    def update(self, round_idx: int, macro_f1: float) -> bool:
        if not np.isfinite(macro_f1):
            raise ValueError(f"round {round_idx}: macro F1 must be finite, got {macro_f1}")
        if self.history and round_idx <= self.history[-1][0]:
            raise ValueError(f"rounds must increase: got {round_idx} after {self.history[-1][0]}")
        self.history.append((round_idx, float(macro_f1)))
        if self.best_score is None or macro_f1 > self.best_score + self.min_delta:
            self.best_round, self.best_score = round_idx, float(macro_f1)
            self._since_best = 0
        else:
            self._since_best += 1
        return self._since_best < self.patience


def run_mining_rounds(
    run_round: Callable[[int], float],
    max_rounds: int,
    baseline_macro_f1: float,
    patience: int = 1,
) -> BestRoundTracker:
    """Call ``run_round(r)`` for r = 1..max_rounds (it trains round r, returns validation macro F1).

    The caller keeps the weights of ``tracker.best_round`` (0 = the phase-1 model); this loop only
    decides how many rounds run.
    """
    tracker = BestRoundTracker(patience)
    tracker.update(0, baseline_macro_f1)
    for r in range(1, max_rounds + 1):
        if not tracker.update(r, run_round(r)):
            break
    return tracker
