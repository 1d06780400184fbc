"""What separates the joint head's linear part from the L1 baseline on the PBMC tasks: the training
recipe, one change at a time, on the baseline's own input (log1p per 10k, max-abs scaled, the 2,000
most variable shared genes) with the harness of bench/wide_inputs.py (which reproduces the pipeline's
linear head).

Changes: the 10% validation split (train on all), epochs (8 -> 30), GInf noise (off), the softmax
against one sigmoid per class (one-vs-rest, as liblinear), and the L1 strength. Macro-F1 on the query
as bench/quality_tasks.py scores it; one JSON line per fit.

Usage: ``python bench/wide_recipe.py pbmc pbmc3pv1 baron`` (h5ad files made by bench/annotate_quality.py).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_tasks as qt  # noqa: E402
from wide_inputs import load_task, train_lr  # noqa: E402

VARIANTS = {
    "pipeline (l1 1e-4)": {"l1": 1e-4},
    "no val split": {"l1": 1e-4, "split": 1.0},
    "30 epochs": {"l1": 1e-4, "epochs": 30},
    "no GInf noise": {"l1": 1e-4, "ginf": 0.0},
    "one-vs-rest": {"l1": 1e-4, "ovr": True},
    "one-vs-rest, l1 3e-5": {"l1": 3e-5, "ovr": True},
    "one-vs-rest, all of the above": {"l1": 1e-4, "ovr": True, "split": 1.0, "epochs": 30, "ginf": 0.0},
}


def main() -> None:
    for task in sys.argv[1:]:
        _train, test, y, la, lb, _genes, disp = load_task(task)
        idx = np.sort(np.argsort(-disp, kind="stable")[:2000])
        sa, sb = la[:, idx], lb[:, idx]
        scale = np.asarray(abs(sa).max(0).todense()).ravel()
        scale[scale == 0] = 1
        xa, xb = sa @ sp.diags(1 / scale), sb @ sp.diags(1 / scale)
        for name, kw in VARIANTS.items():
            t0 = time.time()
            s = qt.score(test.obs.cell_type, train_lr(xa, y, xb, **kw), y)
            print(json.dumps({"task": task, "variant": name, "genes": len(idx), "accuracy": round(s["accuracy"], 4),
                              "macro_f1": round(s["macro_f1"], 4), "rare_class_f1": s.get("rare_class_f1"),
                              "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
