"""Which input and penalty make the joint head's linear part a match for the L1 baseline.

The linear part alone, trained the way fine-tuning trains it (softmax regression, AdamW at lr 1e-2,
batch 16, 8 epochs, warm-up then cosine to 10%, GInf noise sigma 0.1, weight decay 0.01, on 90% of the
reference), on the 2,000 most variable shared genes (or 35% of the shared genes: the former
``finetune.n_hvg_max_fraction`` cap), reading one of:

- ``bins``: the tokenizer's per-cell value bins / 50 (what the linear part read before);
- ``log1p/9.2``: log1p(counts per 10k) / log1p(1e4);
- ``log1p_maxabs``: log1p(counts per 10k) divided per gene by its largest training value (the
  baseline's input; ``finetune.wide_input=expression``),

each with an L1 penalty ``l1 * sum |W|`` of 0, 1e-4 and 3e-4 (``finetune.wide_l1``). Macro-F1 on the
query as bench/quality_tasks.py scores it; one JSON line per fit. The real pipeline's linear head
(`hiceller finetune --set finetune.head=linear --set finetune.loss=ce --set finetune.mining_rounds=0`)
scored 0.8323 on Symphony -> 5p where this harness gives 0.8323 for bins on the same genes.

Usage: ``python bench/wide_inputs.py pbmc pbmc3pv1 pbmc3k xin baron wang`` (tasks of quality_tasks.py;
their h5ad files are made by bench/annotate_quality.py in bench/out/aq/runs).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_tasks as qt  # noqa: E402
from linear_inputs import _bins  # noqa: E402

from finetune.genes import dispersion_scores  # noqa: E402

RUNS = Path("bench/out/aq/runs")


def train_lr(xa, y, xb, epochs=8, lr=1e-2, bs=16, seed=0, wd=0.01, split=0.9, ginf=0.1, warm=1000, l1=0.0, ovr=False):
    """Predicted labels of the query ``xb`` by a softmax regression trained as described above
    (``ovr``: one sigmoid per class against the rest instead of the softmax, as liblinear's L1-LR)."""
    torch.manual_seed(seed)
    classes, yi = np.unique(y, return_inverse=True)
    rng = np.random.default_rng(seed)
    keep = rng.permutation(xa.shape[0])[: int(split * xa.shape[0])]
    xa = sp.csr_matrix(xa, dtype=np.float32)[keep]
    yt = torch.from_numpy(yi[keep])
    counts = np.bincount(yi[keep], minlength=len(classes)).clip(1)
    delta = torch.tensor(np.log(counts.max()) - np.log(counts), dtype=torch.float32)
    W = torch.zeros(xa.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.AdamW([W, b], lr=lr, weight_decay=wd)
    total = epochs * math.ceil(xa.shape[0] / bs)
    warm, step = min(warm, total // 10), 0
    for _ in range(epochs):
        perm = rng.permutation(xa.shape[0])
        for i in range(0, len(perm), bs):
            f = (step + 1) / warm if step < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))
            for g in opt.param_groups:
                g["lr"] = lr * f
            idx = perm[i : i + bs]
            z = torch.from_numpy(xa[idx].toarray()) @ W + b
            z = z + delta * torch.randn_like(z) * ginf
            if ovr:
                target = torch.nn.functional.one_hot(yt[idx], len(classes)).float()
                data = torch.nn.functional.binary_cross_entropy_with_logits(z, target, reduction="sum") / len(idx)
            else:
                data = torch.nn.functional.cross_entropy(z, yt[idx])
            loss = data + l1 * W.abs().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        z = torch.from_numpy(sp.csr_matrix(xb, dtype=np.float32).toarray()) @ W + b
    return classes[z.argmax(1).numpy()]


def load_task(task: str):
    """(train, test, reference labels, log1p of shared genes for reference and query, the shared genes,
    their dispersion on the reference) of one task of quality_tasks.py."""
    train, test = ad.read_h5ad(RUNS / f"{task}_train.h5ad"), ad.read_h5ad(RUNS / f"{task}_test.h5ad")
    y = train.obs.cell_type.astype(str).to_numpy()
    la, lb, genes = qt.shared_features(train, test)
    cp = la.copy()
    cp.data = np.expm1(cp.data)
    disp = np.nan_to_num(dispersion_scores(np.asarray(cp.sum(0)).ravel(), np.asarray(cp.multiply(cp).sum(0)).ravel(),
                                           cp.shape[0]), nan=-np.inf)
    return train, test, y, la, lb, genes, disp


def main() -> None:
    for task in sys.argv[1:]:
        train, test, y, la, lb, genes, disp = load_task(task)
        ga = {g.upper(): i for i, g in enumerate(train.var_names)}
        gb = {g.upper(): i for i, g in enumerate(test.var_names)}
        ra = sp.csr_matrix(train.X, dtype=np.float64)[:, [ga[g] for g in genes]]
        rb = sp.csr_matrix(test.X, dtype=np.float64)[:, [gb[g] for g in genes]]
        for n_top in (2000, int(0.35 * len(genes))):
            idx = np.sort(np.argsort(-disp, kind="stable")[:n_top])
            sa, sb = la[:, idx], lb[:, idx]
            scale = np.asarray(abs(sa).max(0).todense()).ravel()
            scale[scale == 0] = 1
            inputs = {"bins": (_bins(ra[:, idx]), _bins(rb[:, idx])),
                      "log1p/9.2": (sa / np.log1p(1e4), sb / np.log1p(1e4)),
                      "log1p_maxabs": (sa @ sp.diags(1 / scale), sb @ sp.diags(1 / scale))}
            for name, (xa, xb) in inputs.items():
                for l1 in (0.0, 1e-4, 3e-4):
                    s = qt.score(test.obs.cell_type, train_lr(xa, y, xb, l1=l1), y)
                    print(json.dumps({"task": task, "genes": len(idx), "input": name, "l1": l1,
                                      "accuracy": round(s["accuracy"], 4), "macro_f1": round(s["macro_f1"], 4)}), flush=True)


if __name__ == "__main__":
    main()
