"""finetune/calibration.py: temperature, the default confidence threshold, novelty and its bundle file."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.calibration import Calibration, choose_min_confidence, fit_calibration, fit_temperature
from finetune.metrics import expected_calibration_error, softmax


def overconfident(n: int = 4000, c: int = 4, t_true: float = 3.0, seed: int = 0):
    """Labels drawn from softmax(z / t_true): logits z are t_true times too sharp."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, (n, c)) * t_true
    p = softmax(z / t_true)
    y = np.array([rng.choice(c, p=row) for row in p])
    return z, y


def test_temperature_recovers_the_sharpening_and_lowers_ece():
    z, y = overconfident()
    t = fit_temperature(z, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert expected_calibration_error(softmax(z / t), y) < 0.5 * expected_calibration_error(softmax(z), y)
    # the argmax, and so every label, is unchanged
    assert (softmax(z / t).argmax(1) == z.argmax(1)).all()


def test_min_confidence_is_zero_when_abstaining_only_costs():
    y = np.array([0, 0, 1, 1, 2, 2])
    proba = np.eye(3)[y] * 0.6 + 0.4 / 3  # always right, 0.73 confident
    assert choose_min_confidence(y, proba) == 0.0


def test_min_confidence_abstains_on_confidently_wrong_noise():
    """Uncertain cells are wrong calls that cost a class its precision: a threshold above their
    confidence gives the best macro-F1 with abstentions counted as misses."""
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 50)
    proba = np.full((150, 3), 0.02)
    proba[np.arange(150), y] = 0.96
    noisy = rng.choice(np.arange(50, 150), 40, replace=False)  # cells of classes 1 and 2 ...
    proba[noisy] = [0.36, 0.34, 0.30]  # ... near-uniform, and called class 0: always wrong
    t = choose_min_confidence(y, proba)
    assert 0.36 < t <= 0.9


def test_novelty_flags_cells_outside_every_class():
    rng = np.random.default_rng(2)
    centers = np.eye(8)[:3] * 10
    train_y = np.repeat([0, 1, 2], 200)
    train_emb = centers[train_y] + rng.normal(0, 1, (600, 8))
    val_logits = np.eye(3)[train_y[:90]] * 5
    cal = fit_calibration(val_logits, train_y[:90], train_emb, train_y, np.full(600, 50), n_classes=3)
    inside = centers[[0, 1, 2]] + rng.normal(0, 1, (3, 8))
    outside = np.eye(8)[5:8] * 10  # along axes no class lives on
    assert (cal.novelty(inside) < 1).all() and (cal.novelty(outside) > 1).all()
    assert cal.min_genes == 50
    again = Calibration.from_dict(cal.as_dict())
    np.testing.assert_allclose(again.novelty(outside), cal.novelty(outside))


def test_an_empty_calibration_changes_nothing():
    cal = Calibration()
    z = np.array([[2.0, 0.0, -1.0]])
    np.testing.assert_allclose(cal.probabilities(z), softmax(z))
    assert (cal.novelty(np.ones((4, 3))) == 0).all() and cal.min_confidence == 0.0
