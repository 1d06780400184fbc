"""The validation probe's yardstick: the same kNN probe (pretrain/validation.py ``knn_probe``) on the
same held-out cells, read from principal components of their log-normalised expression instead of
Celler ``<cls>`` embeddings.

The probe of a run whose ``validation.datasets`` names one dataset uses ``probe_cells`` of its cells,
evenly spaced over its rows (one rank, or any number dividing the cells into whole batches); this
script takes the same rows of the dataset's .h5ad.

  python bench/probe_baseline.py ../shared/data/pbmc_zheng_sorted_mudan_counts.h5ad --cells 1024
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pretrain.validation import knn_probe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("h5ad", type=Path)
    ap.add_argument("--cells", type=int, default=1024, help="validation.probe_cells of the run")
    ap.add_argument("--k", type=int, default=10, help="validation.probe_k of the run")
    ap.add_argument("--pcs", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--label-column", default="cell_type")
    args = ap.parse_args()
    a = ad.read_h5ad(args.h5ad)
    rows = np.linspace(0, a.n_obs - 1, min(args.cells, a.n_obs)).round().astype(np.int64)
    x = sp.csr_matrix(a.X[rows]).astype(np.float64)
    x = sp.diags(1e4 / np.maximum(np.asarray(x.sum(1)).ravel(), 1)) @ x
    x = np.log1p(x.toarray())
    x -= x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    labels = a.obs[args.label_column].astype(str).to_numpy()[rows]
    for n in args.pcs:
        print(json.dumps({"pcs": n, "cells": len(rows), "k": args.k, **knn_probe(u[:, :n] * s[:n], labels, args.k)}))


if __name__ == "__main__":
    main()
