"""The annotation-quality tasks, the simple baselines and the one scoring rule of bench/annotate_quality.py.

Tasks (real data in ../shared/data; every task is a reference .h5ad of counts and a query .h5ad):

  baron     Baron human pancreas, donors human1-3 -> human4 (within study, long tail)
  baron3    Baron human1, 2, 4 -> human3
  xin       Baron (all donors) -> Xin (another lab and protocol, log-expression, 980 genes)
  wang      Baron -> Wang (log-expression, 219 genes); Baron's activated/quiescent stellate cells are
            one "stellate" type for this task, as Wang labels them (the mapping is the user's to give)
  pbmc      Symphony PBMC 3pv1 + 3pv2 -> 5p (chemistry shift)
  pbmc3pv1  Symphony PBMC 3pv2 + 5p -> 3pv1
  pbmc3k    10x PBMC 3k, a class-stratified 80/20 split (seed 0)

Baselines (what a careful user runs beside an annotator): logistic regression with an L1 penalty
(liblinear, one-vs-rest) or an L2 penalty (multinomial), its C chosen by 3-fold stratified cross-validation on the reference only, on log1p of
counts normalised to 10,000 (log-expression is exponentiated back first), genes shared by
reference and query (upper-cased symbols), each gene scaled by its reference maximum; and
CellTypist (``celltypist.train`` defaults on the same log1p data, best-match mode).

Scoring (:func:`score`), the same for every method: macro-F1 over the classes present in the
query's truth (a class of the truth the model cannot name scores 0; a predicted type the query
lacks, a "phantom", is counted beside it, not averaged in); rare-class F1 the mean over the truth's
classes with under 1% of the reference's cells; accuracy over all query cells.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RARE_SHARE = 0.01
C_GRID = (0.01, 0.1, 1.0, 10.0)

TASKS = {
    "baron": "Baron human1-3 -> human4",
    "baron3": "Baron human1,2,4 -> human3",
    "xin": "Baron -> Xin (log-expression, 980 genes)",
    "wang": "Baron -> Wang (log-expression, 219 genes)",
    "pbmc": "Symphony PBMC 3pv1+3pv2 -> 5p",
    "pbmc3pv1": "Symphony PBMC 3pv2+5p -> 3pv1",
    "pbmc3k": "pbmc3k 80/20",
}
_BARON = "baron_human_pancreas_came_counts.h5ad"
_SYMPHONY = "pbmc_symphony_3batch_counts.h5ad"


def _load(name: str):
    import anndata as ad

    return ad.read_h5ad(DATA / name)


def _by_batch(a, test_batch: str):
    return a[a.obs.batch != test_batch].copy(), a[a.obs.batch == test_batch].copy()


def _split_80_20(a, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = a.obs.cell_type.astype(str).to_numpy()
    test = np.zeros(a.n_obs, dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_test = int(round(0.2 * members.size))
        test[rng.permutation(members)[:n_test]] = True
    return a[~test].copy(), a[test].copy()


def _cross_study(query_file: str, merge: dict[str, str]):
    ref, query = _load(_BARON), _load(query_file)
    ref.obs["cell_type"] = [merge.get(c, c) for c in ref.obs.cell_type.astype(str).str.lower()]
    query.obs["cell_type"] = query.obs.cell_type.astype(str).str.lower()
    return ref, query


def _build(task: str):
    if task == "baron":
        return _by_batch(_load(_BARON), "human4")
    if task == "baron3":
        return _by_batch(_load(_BARON), "human3")
    if task == "xin":
        return _cross_study("xin_pancreas_scclassify_logexpr.h5ad", {})
    if task == "wang":
        return _cross_study("wang_pancreas_scclassify_logexpr.h5ad", {"activated_stellate": "stellate", "quiescent_stellate": "stellate"})
    if task == "pbmc":
        return _by_batch(_load(_SYMPHONY), "5p")
    if task == "pbmc3pv1":
        return _by_batch(_load(_SYMPHONY), "3pv1")
    if task == "pbmc3k":
        return _split_80_20(_load("pbmc3k_clustifyr_counts.h5ad"))
    raise SystemExit(f"unknown task {task!r} (known: {', '.join(TASKS)})")


def make_task(task: str, work: Path) -> tuple[Path, Path]:
    """``WORK/<task>_train.h5ad`` and ``WORK/<task>_test.h5ad`` (written once)."""
    work.mkdir(parents=True, exist_ok=True)
    tr, te = work / f"{task}_train.h5ad", work / f"{task}_test.h5ad"
    if tr.exists() and te.exists():
        return tr, te
    train, test = _build(task)
    for d in (train, test):
        d.obs["cell_type"] = d.obs.cell_type.astype(str).astype("category")
        d.obs["batch"] = d.obs.batch.astype(str).astype("category")
    train.write_h5ad(tr)
    test.write_h5ad(te)
    return tr, te


def is_log_expression(adata) -> bool:
    """Non-integer values in X: log-normalised input (the shared files' README names them)."""
    x = adata.X[: min(adata.n_obs, 200)]
    data = x.data if sp.issparse(x) else np.asarray(x).ravel()
    return bool(data.size) and not np.allclose(data, np.round(data))


def log1p_cp10k(adata) -> sp.csr_matrix:
    """log1p of counts normalised to 10,000 per cell; log-expression is exponentiated back first."""
    x = sp.csr_matrix(adata.X, dtype=np.float64)
    if is_log_expression(adata):
        x.data = np.expm1(x.data)
    total = np.asarray(x.sum(1)).ravel()
    total[total == 0] = 1
    x = sp.csr_matrix(sp.diags(1e4 / total) @ x)
    x.data = np.log1p(x.data)
    return x


def shared_features(train, test) -> tuple[sp.csr_matrix, sp.csr_matrix, list[str]]:
    """log1p-CP10k matrices of the genes both measure (upper-cased), normalised over all genes first."""
    ga = {g.upper(): i for i, g in enumerate(train.var_names)}
    gb = {g.upper(): i for i, g in enumerate(test.var_names)}
    genes = sorted(set(ga) & set(gb))
    xa = log1p_cp10k(train)[:, [ga[g] for g in genes]]
    xb = log1p_cp10k(test)[:, [gb[g] for g in genes]]
    return sp.csr_matrix(xa), sp.csr_matrix(xb), genes


def score(truth, predicted, train_labels) -> dict:
    """The benchmark's one reading of a prediction (module docstring)."""
    from sklearn.metrics import f1_score

    truth = np.asarray(truth, dtype=object).astype(str)
    predicted = np.asarray(predicted, dtype=object).astype(str)
    train_labels = np.asarray(train_labels, dtype=object).astype(str)
    classes = sorted(set(truth))
    f1 = f1_score(truth, predicted, labels=classes, average=None, zero_division=0)
    names, counts = np.unique(train_labels, return_counts=True)
    share = dict(zip(names.tolist(), (counts / counts.sum()).tolist()))
    rare = [c for c in classes if share.get(c, 0.0) < RARE_SHARE]
    per_class = dict(zip(classes, map(float, f1)))
    phantom = sorted(set(predicted) - set(truth))
    return {
        "accuracy": float((truth == predicted).mean()),
        "macro_f1": float(np.mean(f1)),
        "rare_class_f1": float(np.mean([per_class[c] for c in rare])) if rare else None,
        "phantom": phantom,
        "phantom_cells": int(np.isin(predicted, phantom).sum()),
        "per_class_f1": per_class,
        "test_cells": {c: int((truth == c).sum()) for c in classes},
        "train_cells": {c: int(n) for c, n in zip(names.tolist(), counts.tolist())},
    }


def logistic_regression(train, test, penalty: str, seed: int = 0, c_grid: tuple[float, ...] = C_GRID) -> tuple[np.ndarray, dict]:
    """Predicted labels of an L1/L2 logistic regression with C chosen by 3-fold CV on the reference
    (no CV when ``c_grid`` holds one value)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.preprocessing import MaxAbsScaler

    xa, xb, genes = shared_features(train, test)
    scaler = MaxAbsScaler().fit(xa)
    xa, xb = scaler.transform(xa), scaler.transform(xb)
    y = train.obs.cell_type.astype(str).to_numpy()
    from sklearn.multiclass import OneVsRestClassifier

    def model(c: float):
        # L1: liblinear one-vs-rest (saga's multinomial L1 took 490 s per fit on Baron, liblinear 5 s,
        # with the same predictions at C = 0.1); L2: multinomial lbfgs.
        if penalty == "l1":
            return OneVsRestClassifier(LogisticRegression(penalty="l1", C=c, solver="liblinear", max_iter=1000, random_state=seed))
        return LogisticRegression(penalty="l2", C=c, max_iter=1000, random_state=seed)

    # Classes with fewer cells than folds cannot be stratified: CV folds keep what they can.
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=seed)
    cv = {} if len(c_grid) == 1 else {c: float(np.mean(cross_val_score(model(c), xa, y, cv=folds, scoring="f1_macro"))) for c in c_grid}
    best = max(c_grid, key=lambda c: (cv.get(c, 0.0), -c))
    clf = model(best).fit(xa, y)
    return clf.predict(xb), {"C": best, "cv_macro_f1": cv, "genes": len(genes)}


class _OneVsRestLR:
    """What CellTypist 1.7 builds, ``LogisticRegression(multi_class="ovr", ...)``, for a scikit-learn
    that no longer takes ``multi_class`` (1.8+): one binary logistic regression per class, exposing
    the ``classes_``, ``coef_``, ``intercept_`` and ``decision_function`` CellTypist reads."""

    def __init__(self, multi_class: str = "ovr", n_jobs: int | None = None, **kwargs):
        if multi_class != "ovr":
            raise ValueError(f"only one-vs-rest is emulated, got multi_class={multi_class!r}")
        self.kwargs = kwargs

    def fit(self, x, y):
        from sklearn.linear_model import LogisticRegression
        from sklearn.multiclass import OneVsRestClassifier

        ovr = OneVsRestClassifier(LogisticRegression(**self.kwargs)).fit(x, y)
        self.classes_ = ovr.classes_
        self.coef_ = np.vstack([e.coef_ for e in ovr.estimators_])
        self.intercept_ = np.concatenate([e.intercept_ for e in ovr.estimators_])
        self.n_features_in_ = self.coef_.shape[1]
        return self

    def decision_function(self, x):
        return np.asarray(x @ self.coef_.T) + self.intercept_


def celltypist_predict(train, test, seed: int = 0) -> tuple[np.ndarray, dict]:
    """CellTypist with its training defaults on log1p-CP10k of the shared genes."""
    import anndata as ad
    import celltypist

    try:  # scikit-learn >= 1.8 dropped the multi_class argument CellTypist 1.7 passes
        from sklearn.linear_model import LogisticRegression

        LogisticRegression(multi_class="ovr")
    except TypeError:
        # (``celltypist.train`` is the function; its module is in sys.modules)
        sys.modules["celltypist.train"].LogisticRegression = _OneVsRestLR

    xa, xb, genes = shared_features(train, test)
    ref = ad.AnnData(sp.csr_matrix(xa, dtype=np.float32))
    ref.var_names = genes
    query = ad.AnnData(sp.csr_matrix(xb, dtype=np.float32))
    query.var_names = genes
    np.random.seed(seed)
    model = celltypist.train(ref, labels=train.obs.cell_type.astype(str).to_numpy(), check_expression=False, n_jobs=1)
    result = celltypist.annotate(query, model=model, majority_voting=False)
    return result.predicted_labels["predicted_labels"].astype(str).to_numpy(), {"genes": len(genes)}


def run_baseline(method: str, tr: Path, te: Path, cache: Path, seed: int = 0) -> dict:
    """Score of one baseline on one task; cached (the baselines are deterministic)."""
    import anndata as ad

    if cache.is_file():
        return json.loads(cache.read_text())
    train, test = ad.read_h5ad(tr), ad.read_h5ad(te)
    if method == "celltypist":
        pred, info = celltypist_predict(train, test, seed)
    elif method == "a":  # the older fixed baseline: L1, C = 1
        pred, info = logistic_regression(train, test, "l1", seed, c_grid=(1.0,))
    else:
        pred, info = logistic_regression(train, test, method, seed)
    row = {**score(test.obs.cell_type, pred, train.obs.cell_type), **info}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(row))
    return row
