"""Evaluation metrics against sklearn and against hand-computed calibration errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from finetune.metrics import (
    classification_report,
    expected_calibration_error,
    per_class_table,
    plot_confusion_matrix,
    row_normalised_confusion,
)

NAMES = [f"type_{i}" for i in range(8)]
TRAIN_COUNTS = np.array([5000, 3000, 1000, 500, 40, 20, 5, 0])  # classes 4..7 are < 1 % of 9565


def _random_predictions(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 7, size=n)  # class 7 is never true ...
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, 8, size=n))  # ... but may be predicted
    proba = rng.dirichlet(np.ones(8), size=n)
    return y_true, y_pred, proba


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_report_matches_sklearn(seed: int) -> None:
    y_true, y_pred, proba = _random_predictions(seed)
    report = classification_report(y_true, y_pred, proba, NAMES, TRAIN_COUNTS, rare_threshold=0.01)
    present = np.union1d(y_true, y_pred)
    assert report["n_cells"] == 400
    assert report["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert report["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=present, average="macro"))
    assert report["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=present, average="weighted"))
    per_class = f1_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    assert report["per_class_f1"] == pytest.approx({NAMES[c]: v for c, v in zip(present, per_class)})
    assert report["per_class_support"] == {NAMES[c]: int((y_true == c).sum()) for c in present}
    rare = [c for c in present if c >= 4]
    assert report["rare_classes"] == [NAMES[c] for c in rare]
    assert report["rare_class_f1"] == pytest.approx(np.mean([report["per_class_f1"][NAMES[c]] for c in rare]))
    json.dumps(report)  # must be loggable as it is


def test_absent_classes_do_not_enter_macro_f1() -> None:
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 0, 1, 0])
    report = classification_report(y_true, y_pred, None, NAMES, TRAIN_COUNTS)
    # Over classes {0, 1} only; over all 8 names it would be a quarter of this.
    assert report["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert set(report["per_class_f1"]) == {"type_0", "type_1"}
    assert report["rare_class_f1"] is None and report["rare_classes"] == []
    assert report["ece"] is None


def test_rare_class_share_uses_training_counts() -> None:
    y_true = np.array([0, 4, 4, 1])
    y_pred = np.array([0, 4, 0, 1])
    report = classification_report(y_true, y_pred, None, NAMES, TRAIN_COUNTS, rare_threshold=0.01)
    assert report["rare_classes"] == ["type_4"]
    assert report["rare_class_f1"] == pytest.approx(2 / 3)
    # Raising the threshold past class 1's share (3000/9565 = 0.31) makes it rare too, not class 0 (0.52).
    wide = classification_report(y_true, y_pred, None, NAMES, TRAIN_COUNTS, rare_threshold=0.4)
    assert wide["rare_classes"] == ["type_1", "type_4"]
    assert wide["rare_class_f1"] == pytest.approx((1.0 + 2 / 3) / 2)


def _onehot_conf(conf: list[float], correct: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Two-class probabilities with the given max probability, labelled right or wrong."""
    proba = np.array([[c, 1.0 - c] for c in conf])
    y = np.array([0 if ok else 1 for ok in correct])
    return proba, y


def test_ece_hand_cases() -> None:
    proba, y = _onehot_conf([0.8] * 10, [True] * 8 + [False] * 2)
    assert expected_calibration_error(proba, y) == pytest.approx(0.0, abs=1e-12)
    proba, y = _onehot_conf([1.0] * 4, [False] * 4)
    assert expected_calibration_error(proba, y) == pytest.approx(1.0)
    # Half the cells at 0.9 all right (gap 0.1), half at 0.6 with one in four right (gap 0.35).
    proba, y = _onehot_conf([0.9] * 4 + [0.6] * 4, [True] * 4 + [True] + [False] * 3)
    assert expected_calibration_error(proba, y) == pytest.approx(0.5 * 0.1 + 0.5 * 0.35)


def test_ece_bins_are_closed_on_the_right() -> None:
    # With 2 bins, 0.5 belongs to (0, 0.5] and 0.6 to (0.5, 1]: 0.5*0.5 + 0.5*0.6.
    proba, y = _onehot_conf([0.5, 0.6], [True, False])
    assert expected_calibration_error(proba, y, n_bins=2) == pytest.approx(0.55)


def test_ece_matches_loop_reference() -> None:
    rng = np.random.default_rng(5)
    proba = rng.dirichlet(np.ones(4) * 0.5, size=300)
    y = rng.integers(0, 4, size=300)
    conf, pred = proba.max(axis=1), proba.argmax(axis=1)
    want = 0.0
    for lo, hi in zip(np.linspace(0, 1, 16)[:-1], np.linspace(0, 1, 16)[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            want += in_bin.mean() * abs((pred[in_bin] == y[in_bin]).mean() - conf[in_bin].mean())
    assert expected_calibration_error(proba, y) == pytest.approx(want)


def test_per_class_table_and_errors() -> None:
    y_true, y_pred, proba = _random_predictions(0)
    report = classification_report(y_true, y_pred, proba, NAMES, TRAIN_COUNTS)
    table = per_class_table(report)
    assert list(table.columns) == ["class", "train_count", "support", "precision", "recall", "f1"]
    assert table["train_count"].is_monotonic_increasing
    row = table.set_index("class").loc["type_3"]
    assert row["f1"] == pytest.approx(report["per_class_f1"]["type_3"]) and row["train_count"] == 500
    with pytest.raises(ValueError, match="train_counts"):
        classification_report(y_true, y_pred, proba, NAMES, TRAIN_COUNTS[:3])
    with pytest.raises(ValueError, match="y_pred"):
        classification_report(y_true, y_pred + 8, proba, NAMES, TRAIN_COUNTS)
    with pytest.raises(ValueError, match="proba"):
        classification_report(y_true, y_pred, proba[:, :3], NAMES, TRAIN_COUNTS)


def test_confusion_matrix_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    names = [f"a fairly long cell type name {i}" for i in range(20)]
    y_true = rng.integers(0, 20, size=1000)
    y_pred = np.where(rng.random(1000) < 0.7, y_true, rng.integers(0, 20, size=1000))
    present = np.union1d(y_true, y_pred)
    want = confusion_matrix(y_true, y_pred, labels=present, normalize="true")
    np.testing.assert_allclose(row_normalised_confusion(y_true, y_pred, present), want)
    out = plot_confusion_matrix(y_true, y_pred, names, tmp_path / "plots" / "cm.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    height, width = imread(out).shape[:2]
    assert height >= 1000 and width >= 1000  # large enough for 20 rotated labels


def test_confusion_rows_of_predicted_only_classes_stay_zero() -> None:
    matrix = row_normalised_confusion(np.array([0, 0]), np.array([0, 1]), np.array([0, 1]))
    np.testing.assert_allclose(matrix, [[0.5, 0.5], [0.0, 0.0]])


def test_labelled_report_leaves_out_unknown_labels() -> None:
    from finetune.metrics import labelled_report, softmax

    logits = np.array([[1000.0, 0.0], [0.0, 1000.0], [5.0, 1.0], [0.0, 3.0]])  # large logits: no overflow
    proba = softmax(logits)
    assert np.isfinite(proba).all() and np.allclose(proba.sum(1), 1.0)
    report = labelled_report(np.array([0, 1, -1, 0]), proba, ["a", "b"], [50, 50])
    assert report["n_cells"] == 3 and report["cells_with_unknown_labels"] == 1
    assert report["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="none of the cells"):
        labelled_report(np.array([-1, -1]), proba[:2], ["a", "b"], [50, 50])


def test_benchmark_scores_over_the_query_classes() -> None:
    """bench/quality_tasks.py's one reading: macro-F1 over the classes of the query's truth; a type
    predicted but absent from the truth (a phantom) is counted beside, not averaged in; a class of
    the truth the model cannot name scores 0; rare = under 1% of the reference."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("qt", Path(__file__).parents[1] / "bench" / "quality_tasks.py")
    qt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qt)
    train = ["big"] * 900 + ["mid"] * 95 + ["rare_a"] * 3 + ["rare_b"] * 2
    truth = ["big"] * 8 + ["mid"] * 4 + ["rare_a"] + ["unknown"]
    pred = ["big"] * 7 + ["rare_b"] + ["mid"] * 4 + ["rare_a"] + ["big"]
    r = qt.score(truth, pred, train)
    assert r["phantom"] == ["rare_b"] and r["phantom_cells"] == 1
    big = f1_score(np.array(truth) == "big", np.array(pred) == "big")
    assert r["per_class_f1"] == pytest.approx({"big": big, "mid": 1.0, "rare_a": 1.0, "unknown": 0.0})
    assert r["macro_f1"] == pytest.approx((big + 2.0) / 4)
    assert r["rare_class_f1"] == pytest.approx((1.0 + 0.0) / 2)  # rare_a and the never-seen "unknown"
    assert r["accuracy"] == pytest.approx(12 / 14)
