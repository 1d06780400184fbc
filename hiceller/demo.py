"""`make demo`: the whole HiCeller pipeline on generated data (plus ../shared/data when present).

    synth -> ingest -> info -> pretrain (DeepSpeed ZeRO-2, 2 CPU ranks, validated on 1% of the cells held
    out: loss and kNN probe in MLflow, the best checkpoint kept) -> fine-tune one tissue
    (GInf + 2 hard-mining rounds, one donor held out) -> export (registered in MLflow) -> annotate the held-out donor's
    cells -> evaluate -> summary

Each stage runs the real CLI command, as a user would type it, and the command is printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad

__all__ = ["main"]


def _run(cmd: list[str], capture: bool = False) -> str:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    if proc.returncode != 0:
        sys.exit(f"demo: stage failed (exit {proc.returncode}): {shlex.join(cmd)}")
    print(f"  ({time.time() - t:.1f} s)", flush=True)
    return proc.stdout or ""


def _pick_tissue(hc: list[str], store: Path) -> str:
    """The synthetic tissue with the most cells (`hiceller synth` names its datasets synth-*)."""
    info = json.loads(_run(hc + ["info", "--store", str(store), "--json"], capture=True).strip().splitlines()[-1])
    synthetic = {d: n for d, n in info["cells_per_dataset"].items() if d.startswith("synth-")}
    biggest = max(synthetic, key=synthetic.get)
    return info["tissue_per_dataset"][biggest]


def _heldout_h5ad(hc: list[str], store: Path, tissue: str, path: Path) -> tuple[str, int]:
    """The tissue's second-largest donor (its largest when it has one), its cells written to ``path``."""
    tissue_file = path.with_name("tissue_cells.h5ad")
    tissue_file.unlink(missing_ok=True)
    _run(hc + ["store", "export", "--store", str(store), "--filter", f"tissue == {json.dumps(tissue)}", "--out", str(tissue_file)])
    cells = ad.read_h5ad(tissue_file)
    donors = cells.obs["donor_id"].astype(str).value_counts()
    donor = donors.index[1] if len(donors) > 1 else donors.index[0]
    cells[cells.obs["donor_id"].astype(str) == donor].copy().write_h5ad(path)
    tissue_file.unlink()
    return donor, int(donors[donor])


def _validation_line(run: Path) -> str:
    """The last validation figures of a pretraining run (metrics.jsonl) and its best checkpoint."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in line]
    if not rows:
        return "no validation figures"
    r = rows[-1]
    best = json.loads((run / "best_checkpoint.json").read_text())
    probe = f", kNN probe accuracy {r['probe_accuracy']:.3f} / macro-F1 {r['probe_macro_f1']:.3f}" if "probe_accuracy" in r else ""
    return f"step {r['step']} loss {r['loss']:.1f}, held-out loss {r['val_loss']:.1f}{probe}; best checkpoint {best['checkpoint']}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hiceller.demo", description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--cells", type=int, default=30_000)
    ap.add_argument("--steps", type=int, default=150, help="pretraining steps (debug model, 2 CPU ranks)")
    ap.add_argument("--finetune-epochs", type=int, default=4)
    # Fine-tuning reads the 2,000 most variable genes of the tissue's training cells (finetune.n_hvg): all of a
    # cell's informative genes fit in the preset's 256, none is dropped at random. Held-out donor here: macro-F1
    # 0.41 / accuracy 0.87 (fine-tuning 38 s), against 0.30 / 0.80 with all genes at 768 per cell (minutes longer).
    ap.add_argument("--finetune-max-genes", type=int, default=256)
    ap.add_argument("--finetune-n-hvg", type=int, default=2000, help="fine-tune on the N most variable genes (0: all)")
    args = ap.parse_args(argv)
    hc = [str(Path(sys.executable).with_name("hiceller"))]
    out = args.out
    store, pre, ft = out / "store", out / "pretrain", out / "finetune"
    bundle, query, annotated = out / "bundle", out / "heldout_donor.h5ad", out / "heldout_donor_annotated.h5ad"
    out.mkdir(parents=True, exist_ok=True)
    # One MLflow home for the whole demo, in its output folder (the commands inherit it).
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    t0 = time.time()

    _run(hc + ["synth", "--store", str(store), "--cells", str(args.cells), "--seed", "0"])
    tissue = _pick_tissue(hc, store)
    files = sorted(args.shared.glob("*.h5ad")) if args.shared.is_dir() else []
    if files:
        _run(hc + ["ingest", "--store", str(store), "--skip-existing", *map(str, files)])
    else:
        print(f"\n{args.shared} not found: the real data sets are skipped")
    _run(hc + ["info", "--store", str(store)])
    _run(
        hc
        + ["launch", "--config", "debug", "--store", str(store), "--out", str(pre), "--nodes", "1", "--gpus-per-node", "2"]
        + ["--set", f"train.steps={args.steps}", "--set", "deepspeed.zero_stage=2", "--resume", "auto"]
        + ["--set", f"validation.every={max(1, args.steps // 3)}"]
    )
    donor, n = _heldout_h5ad(hc, store, tissue, query)
    for p in (ft, bundle):
        if p.exists():
            shutil.rmtree(p)
    _run(
        hc
        + ["finetune", "--config", "debug", "--store", str(store), "--pretrained", str(pre), "--tissue", tissue]
        + ["--holdout-donors", donor, "--out", str(ft)]
        + ["--set", 'finetune.loss="ginf"', "--set", f"finetune.epochs={args.finetune_epochs}"]
        + ["--set", "finetune.mining_rounds=2", "--set", "finetune.mining_patience=2"]
        + ["--set", f"data.max_genes={args.finetune_max_genes}", "--set", f"finetune.n_hvg={args.finetune_n_hvg}"]
    )
    _run(hc + ["export", "--checkpoint", str(ft), "--out", str(bundle), "--force", "--register", "celler-demo"])
    print(f"\nthe {n} cells of held-out donor {donor} are in {query}")
    _run(hc + ["annotate", "--model", str(bundle), "--input", str(query), "--output", str(annotated), "--label-column", "cell_type"])
    report = json.loads(_run(hc + ["evaluate", "--model", str(bundle), "--input", str(annotated), "--json"], capture=True).strip().splitlines()[-1])
    rare = report.get("rare_class_f1")
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    print(f"  pretraining: {_validation_line(pre)}")
    print(f"  tissue {tissue}, held-out donor {donor}: {n} cells")
    print(f"  macro-F1 {report['macro_f1']:.3f}, rare-class F1 {'n/a' if rare is None else f'{rare:.3f}'}, accuracy {report['accuracy']:.3f}")
    print(f"  store:       {store}")
    print(f"  bundle:      {bundle}")
    print(f"  annotated:   {annotated}")
    print(f"  MLflow:      {hc[0]} ui --tracking-uri {os.environ['MLFLOW_TRACKING_URI']}")
    print("               (pretraining, the fine-tuning nested under it with its rounds, the export; Models: celler-demo)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
