"""Can a biologist trust an annotation? Calibration and abstention of a Baron-pancreas bundle.

Fine-tunes Celler on Baron human1-3 (the README recipe: joint head, the 2,000 most variable genes,
8 epochs; pretrained P6000 of bench/annotate_quality.py) for each seed, then annotates:

  baron_h4   the held-out donor of the same study (a tissue the bundle knows)
  xin        pancreas from another lab and protocol (log-expression, 980 genes)
  pbmc3k     blood (a tissue the bundle never saw), 2,000 genes
  symphony   blood, 1,767 genes

and reports, per query: whether annotation refuses it (the overlap with the genes the model reads,
against the bundle's minimum) and, annotated anyway (``min_overlap=0``), the share of Unassigned
cells by reason; on baron_h4 the expected calibration error of the raw and the temperature-scaled
probabilities (the validation ECE before/after comes from the bundle). Ends with one JSON line.

  python bench/trust.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_tasks import DATA, make_task  # noqa: E402

from finetune.annotate import Annotator  # noqa: E402
from finetune.metrics import expected_calibration_error, softmax  # noqa: E402
from hiceller.errors import InputError  # noqa: E402

HICELLER = str(Path(sys.executable).with_name("hiceller"))
QUERIES = {"xin": "xin_pancreas_scclassify_logexpr.h5ad", "pbmc3k": "pbmc3k_clustifyr_counts.h5ad",
           "symphony": "pbmc_symphony_3batch_counts.h5ad"}


def finetune(train: Path, pretrained: Path, seed: int, out: Path, epochs: int) -> Path:
    if not (out / "model").exists():
        cmd = [HICELLER, "finetune", "--h5ad", str(train), "--pretrained", str(pretrained), "--out", str(out), "--no-progress",
               "--set", f"train.seed={seed}", "--set", f"finetune.epochs={epochs}", "--set", f"finetune.mining_epochs={epochs // 2}",
               "--set", "finetune.n_hvg=2000", "--set", "data.max_genes=512"]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out / "model"


def query_row(ann: Annotator, adata) -> dict:
    """Refused or not at the bundle's minimum; Unassigned shares when annotated anyway."""
    row: dict = {"cells": adata.n_obs}
    try:
        ann.check_genes(adata)
        row["refused"] = False
    except InputError as e:
        row["refused"] = True
        row["refusal"] = str(e)
    out = ann.annotate(adata, min_overlap=0.0)
    reasons = out.obs["celler_unassigned_reason"].astype(str)
    row["read_gene_overlap"] = round(float(out.uns["celler"]["gene_overlap"]), 4)
    row["unassigned"] = round(float((reasons != "assigned").mean()), 4)
    row["by_reason"] = {r: round(float((reasons == r).mean()), 4) for r in sorted(set(reasons)) if r != "assigned"}
    return row


def ece_row(ann: Annotator, test, names) -> dict:
    """ECE of the raw and the calibrated probabilities on the held-out donor's cells of known classes."""
    pred = ann.predict(test, min_overlap=0.0)
    truth = test.obs.cell_type.astype(str).to_numpy()
    index = {n: i for i, n in enumerate(names)}
    y = np.array([index.get(t, -1) for t in truth])
    known = y >= 0
    logits = np.log(np.maximum(pred.proba, 1e-30)) * ann.calibration.temperature  # undo the scaling
    raw = softmax(logits)
    return {"ece_raw": round(expected_calibration_error(raw[known], y[known]), 4),
            "ece_calibrated": round(expected_calibration_error(pred.proba[known], y[known]), 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--pretrained", type=Path, default=Path("bench/out/aq/P6000"))
    p.add_argument("--work", type=Path, default=Path("bench/out/trust"))
    p.add_argument("--epochs", type=int, default=8)
    a = p.parse_args()
    train, test_path = make_task("baron", Path("bench/out/aq/runs"))
    test = ad.read_h5ad(test_path)
    queries = {"baron_h4": test, **{k: ad.read_h5ad(DATA / f) for k, f in QUERIES.items()}}
    rows = []
    for seed in a.seeds:
        ann = Annotator.load(finetune(train, a.pretrained, seed, a.work / f"baron_s{seed}", a.epochs))
        cal = ann.calibration
        row = {"seed": seed, "temperature": round(cal.temperature, 3), "min_confidence": cal.min_confidence,
               "val_ece_raw": round(cal.ece_before, 4), "val_ece_calibrated": round(cal.ece_after, 4),
               **ece_row(ann, test, ann.labels), "queries": {k: query_row(ann, q) for k, q in queries.items()}}
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    summary = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in ("val_ece_raw", "val_ece_calibrated", "ece_raw", "ece_calibrated")}
    summary["unassigned"] = {q: round(float(np.mean([r["queries"][q]["unassigned"] for r in rows])), 4) for q in queries}
    summary["refused"] = {q: [r["queries"][q]["refused"] for r in rows] for q in queries}
    print(json.dumps({"bench": "trust", "seeds": a.seeds, "summary": summary, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
