"""Hard-sample mining rule, per-class caps and floors, replay, and the best-round tracker."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.mining import (
    BestRoundTracker,
    HardMiner,
    HardMiningRule,
    HardnessScores,
    run_mining_rounds,
    score_cells,
)
from hiceller.config import FinetuneConfig


def _long_tail(seed: int = 0, n: int = 3000, n_classes: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Labels with a long tail and logits that are right most of the time, less so for rare classes."""
    rng = np.random.default_rng(seed)
    share = np.array([0.55, 0.25, 0.12, 0.05, 0.025, 0.005])[:n_classes]
    labels = rng.choice(n_classes, p=share / share.sum(), size=n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), labels] += np.where(labels < 3, 3.0, 1.0)
    return logits, labels


def test_scores_match_direct_formulas() -> None:
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 5.0]])
    labels = np.array([0, 0, 2])
    s = score_cells(logits, labels, margin_threshold=0.2)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(s.loss, -np.log(p[np.arange(3), labels]))
    np.testing.assert_allclose(s.margin, [p[0, 0] - p[0, 1], p[1, 0] - p[1, 1], p[2, 2] - p[2, 0]])
    assert s.misclassified.tolist() == [False, True, False]
    # cell 0 is right with margin 0.66 (easy), cell 1 wrong, cell 2 right with margin 0.96.
    np.testing.assert_allclose(s.score, [0, 2, 0] + s.loss / (1 + s.loss))


def test_misclassified_rank_hardest_then_low_margin() -> None:
    logits, labels = _long_tail()
    s = score_cells(logits, labels, margin_threshold=0.3)
    low_margin = ~s.misclassified & (s.margin < 0.3)
    easy = ~s.misclassified & ~low_margin
    assert s.misclassified.any() and low_margin.any() and easy.any()
    assert s.score[s.misclassified].min() > s.score[~s.misclassified].max()
    assert s.score[low_margin].min() > s.score[easy].max()
    assert np.array_equal(s.is_hard, s.misclassified | low_margin)


def test_cap_floor_and_representation() -> None:
    logits, labels = _long_tail()
    rule = HardMiningRule(cap_per_class=40, replay_fraction=0.5, margin_threshold=0.3, min_per_class=8)
    miner = HardMiner(rule)
    s = miner.score(logits, labels)
    rnd = miner.select(s, labels, np.random.default_rng(0))
    for cls in np.unique(labels):
        n_members = int((labels == cls).sum())
        n_candidates = int(s.is_hard[labels == cls].sum())
        n_hard = int((labels[rnd.hard_idx] == cls).sum())
        assert n_hard <= rule.cap_per_class
        if n_candidates:
            assert rnd.composition[int(cls)] == n_hard == min(40, max(n_candidates, min(8, n_members)))
        else:
            assert int(cls) not in rnd.composition and n_hard == 0
    assert max(rnd.composition.values()) == 40  # the abundant classes hit the cap


def test_floor_brings_a_rare_class_hardest_cells() -> None:
    labels = np.array([0] * 50 + [1] * 10)
    logits = np.zeros((60, 2))
    logits[:50, 0] = 4.0  # class 0: all confidently right
    logits[50:, 1] = np.linspace(4.0, 1.5, 10)  # class 1: right, margins shrinking with position
    logits[59] = [3.0, 0.0]  # ... and one wrong
    rule = HardMiningRule(cap_per_class=100, replay_fraction=1.0, margin_threshold=0.2, min_per_class=4)
    miner = HardMiner(rule)
    s = miner.score(logits, labels)
    assert s.is_hard.sum() == 1
    rnd = miner.select(s, labels, np.random.default_rng(0))
    assert rnd.composition == {1: 4}
    assert rnd.hard_idx.tolist() == [56, 57, 58, 59]  # the wrong cell and the three lowest-margin ones


def test_replay_disjoint_stratified_and_sized() -> None:
    logits, labels = _long_tail(1)
    miner = HardMiner(HardMiningRule(cap_per_class=30, replay_fraction=0.5, margin_threshold=0.3, min_per_class=5))
    rnd = miner.select(miner.score(logits, labels), labels, np.random.default_rng(4))
    assert np.intersect1d(rnd.hard_idx, rnd.replay_idx).size == 0
    rest = np.setdiff1d(np.arange(labels.size), rnd.hard_idx)
    assert set(labels[rnd.replay_idx]) == set(labels[rest])  # every class with easy cells replays
    target = round(0.5 * rnd.hard_idx.size)
    assert target <= rnd.replay_idx.size <= target + len(np.unique(labels))
    assert sum(rnd.replay_composition.values()) == rnd.replay_idx.size
    assert np.array_equal(rnd.train_idx, np.sort(np.concatenate([rnd.hard_idx, rnd.replay_idx])))
    frame = rnd.to_frame(labels, miner.score(logits, labels), joinids=np.arange(labels.size) + 100)
    assert (frame["role"] == "hard").sum() == rnd.hard_idx.size and frame["joinid"].min() >= 100


def test_no_replay_when_fraction_zero_and_empty_round() -> None:
    logits, labels = _long_tail()
    miner = HardMiner(HardMiningRule(replay_fraction=0.0))
    assert miner.select(miner.score(logits, labels), labels, np.random.default_rng(0)).replay_idx.size == 0
    easy = np.eye(3)[[0, 1, 2, 0]] * 10.0
    rnd = miner.select(miner.score(easy, np.array([0, 1, 2, 0])), np.array([0, 1, 2, 0]), np.random.default_rng(0))
    assert rnd.hard_idx.size == 0 and rnd.replay_idx.size == 0 and rnd.composition == {}


def test_deterministic_for_a_seed() -> None:
    logits, labels = _long_tail(2)
    miner = HardMiner(HardMiningRule(cap_per_class=50, replay_fraction=0.8))
    s = miner.score(logits, labels)
    a = miner.select(s, labels, np.random.default_rng(11))
    b = miner.select(s, labels, np.random.default_rng(11))
    c = miner.select(s, labels, np.random.default_rng(12))
    assert np.array_equal(a.hard_idx, b.hard_idx) and np.array_equal(a.replay_idx, b.replay_idx)
    assert np.array_equal(a.hard_idx, c.hard_idx) and not np.array_equal(a.replay_idx, c.replay_idx)


def test_rule_validation_and_config() -> None:
    with pytest.raises(ValueError):
        HardMiningRule(cap_per_class=3, min_per_class=5)
    with pytest.raises(ValueError):
        HardMiningRule(margin_threshold=1.5)
    rule = HardMiningRule.from_config(FinetuneConfig(hard_cap_per_class=3, replay_fraction=0.25))
    assert (rule.cap_per_class, rule.replay_fraction, rule.min_per_class) == (3, 0.25, 3)
    with pytest.raises(ValueError, match="labels"):
        score_cells(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="different cells"):
        bad = HardnessScores(np.zeros(2), np.zeros(2), np.zeros(2, bool), np.zeros(2))
        HardMiner(HardMiningRule()).select(bad, np.zeros(3, int), np.random.default_rng(0))


def test_tracker_stops_after_patience_and_keeps_best() -> None:
    tracker = BestRoundTracker(patience=2)
    assert tracker.update(0, 0.50)
    assert tracker.update(1, 0.60)
    assert tracker.update(2, 0.58)  # one round without improvement: keep going
    assert not tracker.update(3, 0.60)  # a tie is not an improvement: second miss, stop
    assert (tracker.best_round, tracker.best_score) == (1, 0.60)
    impatient = BestRoundTracker(patience=1, min_delta=0.02)
    assert impatient.update(0, 0.50)
    assert not impatient.update(1, 0.51)  # below min_delta
    assert impatient.best_round == 0
    with pytest.raises(ValueError, match="increase"):
        impatient.update(1, 0.9)
    with pytest.raises(ValueError, match="finite"):
        BestRoundTracker().update(0, float("nan"))


def test_run_mining_rounds() -> None:
    calls: list[int] = []
    results = {1: 0.70, 2: 0.75, 3: 0.74, 4: 0.80}

    def run_round(r: int) -> float:
        calls.append(r)
        return results[r]

    tracker = run_mining_rounds(run_round, max_rounds=4, baseline_macro_f1=0.65, patience=1)
    assert calls == [1, 2, 3] and tracker.best_round == 2
    calls.clear()
    worse = run_mining_rounds(lambda r: calls.append(r) or 0.1, max_rounds=5, baseline_macro_f1=0.65)
    assert calls == [1] and worse.best_round == 0  # mining never helped: keep the phase-1 model
