"""What the linear part of Celler's joint head loses by reading value bins instead of expression.

The same L1 logistic regression (liblinear one-vs-rest, C chosen by 3-fold CV on the reference, as
bench/quality_tasks.py's baseline) fitted on the same genes of the same cells, in three inputs:

- ``log1p``: log1p of counts per 10k, max-abs scaled: the baseline's input;
- ``bins``: the tokenizer's per-cell value bins (data_store/tokenize.py, 51 bins, every expressed
  gene kept), divided by the top bin: what the joint head's linear part reads;
- ``bins_hvg``: ``bins`` on the 2,000 most variable training genes (Seurat dispersion,
  finetune/genes.py) among those the query measures: the README recipe's genes.

Usage: ``python bench/linear_inputs.py [--tasks baron xin]``; one JSON line per (task, input) and a
last line with all of them. Scored with quality_tasks.score (macro-F1 over the query's classes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_tasks as qt  # noqa: E402

from data_store.tokenize import N_SPECIAL, Tokenizer  # noqa: E402
from finetune.genes import dispersion_scores  # noqa: E402


def _bins(x: sp.csr_matrix, n_bins: int = 51) -> sp.csr_matrix:
    coo = x.tocoo()
    tok = Tokenizer(n_bins=n_bins, max_genes=10**7, seed=0)
    t = tok.tokenize(coo.row, coo.col, coo.data, x.shape[0], cell_keys=np.arange(x.shape[0], dtype=np.uint64))
    rows = np.repeat(np.arange(t.n_cells), t.lengths)
    keep = t.gene_ids >= N_SPECIAL
    return sp.csr_matrix((t.values[keep].astype(np.float64) / (n_bins - 1), (rows[keep], t.gene_ids[keep] - N_SPECIAL)),
                         shape=x.shape)


def _l1(xa, xb, y, seed: int = 0) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.multiclass import OneVsRestClassifier

    def model(c):
        return OneVsRestClassifier(LogisticRegression(penalty="l1", C=c, solver="liblinear", max_iter=1000, random_state=seed))

    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=seed)
    cv = {c: float(np.mean(cross_val_score(model(c), xa, y, cv=folds, scoring="f1_macro"))) for c in qt.C_GRID}
    best = max(qt.C_GRID, key=lambda c: (cv[c], -c))
    return model(best).fit(xa, y).predict(xb), best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["baron", "xin"])
    p.add_argument("--work", type=Path, default=Path("bench/out/aq/runs"))
    a = p.parse_args()
    rows = []
    for task in a.tasks:
        tr_path, te_path = qt.make_task(task, a.work)
        train, test = ad.read_h5ad(tr_path), ad.read_h5ad(te_path)
        y = train.obs.cell_type.astype(str).to_numpy()
        la, lb, genes = qt.shared_features(train, test)
        scale = np.asarray(abs(la).max(0).todense()).ravel()
        scale[scale == 0] = 1
        # the raw values of the shared genes, binned per cell as the tokenizer does
        ga = {g.upper(): i for i, g in enumerate(train.var_names)}
        gb = {g.upper(): i for i, g in enumerate(test.var_names)}
        ra = sp.csr_matrix(train.X, dtype=np.float64)[:, [ga[g] for g in genes]]
        rb = sp.csr_matrix(test.X, dtype=np.float64)[:, [gb[g] for g in genes]]
        ba, bb = _bins(ra), _bins(rb)
        cp10k = la.copy()
        cp10k.data = np.expm1(cp10k.data)
        total = np.asarray(cp10k.sum(0)).ravel()
        total_sq = np.asarray(cp10k.multiply(cp10k).sum(0)).ravel()
        disp = np.nan_to_num(dispersion_scores(total, total_sq, cp10k.shape[0]), nan=-np.inf)
        idx = np.sort(np.argsort(-disp, kind="stable")[:2000])
        inputs = {
            "log1p": (la @ sp.diags(1 / scale), lb @ sp.diags(1 / scale)),
            "bins": (ba, bb),
            "bins_hvg": (ba[:, idx], bb[:, idx]),
        }
        for name, (xa, xb) in inputs.items():
            t0 = time.time()
            pred, c = _l1(sp.csr_matrix(xa), sp.csr_matrix(xb), y)
            s = qt.score(test.obs.cell_type, pred, y)
            row = {"task": task, "input": name, "genes": xa.shape[1], "C": c, "accuracy": round(s["accuracy"], 4),
                   "macro_f1": round(s["macro_f1"], 4), "phantom_cells": s["phantom_cells"], "seconds": round(time.time() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"bench": "linear_inputs", "rows": rows}))


if __name__ == "__main__":
    main()
