"""Annotation-quality benchmark: L1 logistic regression vs Celler (scratch/pretrained, CE/GInf/mining).

Tasks (real data in ../shared/data):
  baron : Baron human pancreas, train donors human1-3, test human4
  pbmc  : Symphony PBMC, train 3pv1+3pv2, test 5p
  xin   : Baron (all donors) -> Xin (log-expression); only classes shared by both, names mapped
          by lower-casing + the alias table XIN_ALIAS below.
Methods:
  a  L1 logistic regression (sklearn saga, C=1) on log1p(counts normalised to 1e4) of shared genes
  b  Celler "from scratch": pretraining run with train.steps=1 (random init) + CE, no mining
  c  pretrained + CE, no mining      d  pretrained + GInf, no mining
  e  pretrained + GInf + hard mining (finetune.mining_rounds=2)
Metrics come from `hiceller evaluate --json` on the test .h5ad (same classification_report as
finetune/metrics.py: rare = < 1 % of the training cells).

  python bench/annotate_quality.py --pretrained P --random R --tasks baron --methods a b c d e --seeds 0 1 2
  python bench/annotate_quality.py --quick   # baron, seed 0, 1 epoch; ends with one JSON line

P and R (the pretrained and the random-init runs) are made on first use when missing (``prepare``):
P is the debug model pretrained 6,000 steps, bench/out/aq/P6000 (about 30 minutes on 2 CPU cores);
``--pretrain-steps N`` uses bench/out/aq/PN instead (N = 1500: bench/out/aq/P, the older RESULTS tables'
and ``--quick``'s), ``--pretrained`` any run folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HICELLER = str(Path(sys.executable).with_name("hiceller"))  # this interpreter's entry point, activated or not
XIN_ALIAS = {"alpha": "alpha", "beta": "beta", "gamma": "gamma", "pp": "gamma", "delta": "delta"}  # Xin name (lower) -> Baron name


def _load(name):
    import anndata as ad

    return ad.read_h5ad(DATA / name)


def make_task(task: str, work: Path) -> tuple[Path, Path, list[str] | None]:
    """Writes train/test .h5ad files; returns (train, test, holdout donors for finetune)."""
    work.mkdir(parents=True, exist_ok=True)
    tr, te = work / f"{task}_train.h5ad", work / f"{task}_test.h5ad"
    if tr.exists() and te.exists():
        return tr, te, None
    if task == "baron":
        a = _load("baron_human_pancreas_came_counts.h5ad")
        train, test = a[a.obs.batch != "human4"].copy(), a[a.obs.batch == "human4"].copy()
    elif task == "pbmc":
        a = _load("pbmc_symphony_3batch_counts.h5ad")
        train, test = a[a.obs.batch != "5p"].copy(), a[a.obs.batch == "5p"].copy()
    elif task == "xin":
        b, x = _load("baron_human_pancreas_came_counts.h5ad"), _load("xin_pancreas_scclassify_logexpr.h5ad")
        x.obs["cell_type"] = [XIN_ALIAS.get(str(c).lower(), str(c).lower()) for c in x.obs.cell_type]
        b.obs["cell_type"] = b.obs.cell_type.astype(str).str.lower()
        shared = sorted(set(b.obs.cell_type) & set(x.obs.cell_type))
        train, test = b.copy(), x[x.obs.cell_type.isin(shared)].copy()
    else:
        raise SystemExit(f"unknown task {task}")
    for d in (train, test):
        d.obs["cell_type"] = d.obs.cell_type.astype(str).astype("category")
        d.obs["batch"] = d.obs.batch.astype(str).astype("category")
    train.write_h5ad(tr)
    test.write_h5ad(te)
    return tr, te, None


def _lognorm(X, is_log: bool):
    import scipy.sparse as sp

    X = sp.csr_matrix(X, dtype=np.float64)
    if is_log:
        return X
    s = np.asarray(X.sum(1)).ravel()
    s[s == 0] = 1
    X = sp.diags(1e4 / s) @ X
    X.data = np.log1p(X.data)
    return X


def run_logreg(train: Path, test: Path, seed: int) -> dict:
    import anndata as ad
    from sklearn.linear_model import LogisticRegression

    from finetune.metrics import classification_report

    a, b = ad.read_h5ad(train), ad.read_h5ad(test)
    ga = {g.upper(): i for i, g in enumerate(a.var_names)}
    gb = {g.upper(): i for i, g in enumerate(b.var_names)}
    genes = sorted(set(ga) & set(gb))
    Xa = _lognorm(a.X, False)[:, [ga[g] for g in genes]]
    Xb = _lognorm(b.X, "logexpr" in test.name or "xin" in test.name)[:, [gb[g] for g in genes]]
    # scale per gene by training max so saga converges; same transform on test
    mx = np.asarray(Xa.max(0).todense()).ravel()
    mx[mx == 0] = 1
    import scipy.sparse as sp

    Xa, Xb = Xa @ sp.diags(1 / mx), Xb @ sp.diags(1 / mx)
    names = sorted(set(a.obs.cell_type.astype(str)))
    idx = {n: i for i, n in enumerate(names)}
    ya = np.array([idx[c] for c in a.obs.cell_type.astype(str)])
    yb = np.array([idx.get(c, -1) for c in b.obs.cell_type.astype(str)])
    clf = LogisticRegression(penalty="l1", solver="saga", C=1.0, max_iter=300, random_state=seed)
    clf.fit(Xa, ya)
    k = yb >= 0
    proba = np.zeros((len(yb), len(names)))
    proba[:, clf.classes_] = clf.predict_proba(Xb)
    counts = np.bincount(ya, minlength=len(names))
    r = classification_report(yb[k], proba[k].argmax(1), proba[k], names, counts)
    return {**read_report(r), "genes": len(genes)}


def read_report(report: dict) -> dict:
    """A benchmark row from a classification report: its headline metrics, and the same read over the
    classes of the test set only. The report averages over the classes present in the labels *or* the
    predictions (sklearn's default), so one cell predicted as a type the test donor lacks adds a class
    with F1 0 to both means; ``phantom`` names those types."""
    f1, support = report["per_class_f1"], report["per_class_support"]
    real = [c for c in f1 if support[c] > 0]
    rare = [c for c in report["rare_classes"] if support[c] > 0]
    return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "rare_class_f1": report["rare_class_f1"],
            "per_class_f1": f1, "test_cells": support, "train_cells": report["per_class_train_count"],
            "phantom": sorted(c for c in f1 if support[c] == 0),
            "macro_f1_test_classes": float(np.mean([f1[c] for c in real])),
            "rare_class_f1_test_classes": float(np.mean([f1[c] for c in rare])) if rare else None}


METHODS = {
    "b": ("random", ["finetune.loss=ce", "finetune.mining_rounds=0"]),
    "c": ("pretrained", ["finetune.loss=ce", "finetune.mining_rounds=0"]),
    "d": ("pretrained", ["finetune.loss=ginf", "finetune.mining_rounds=0"]),
    "e": ("pretrained", ["finetune.loss=ginf", "finetune.mining_rounds=2"]),
}


def run_celler(method, train, test, seed, pre, rnd, epochs, out: Path, max_genes: int | None = None, n_hvg: int = 0,
               extra: list[str] = ()) -> dict:
    which, sets = METHODS[method]
    # the folder names every setting, so a run made with other settings is never reused
    o = out / (f"{train.stem}_{method}_s{seed}_e{epochs}_g{max_genes or 'pre'}" + (f"_hvg{n_hvg}" if n_hvg else "")
               + "".join("_" + s.removeprefix("finetune.").replace("=", "") for s in extra)
               # runs from bench/out/aq/P (the 1,500-step pretraining of the older tables) carry no suffix
               + (f"_{pre.name}" if which == "pretrained" and pre.name != "P" else ""))
    if not (o / "model").exists():
        cmd = [HICELLER, "finetune", "--h5ad", str(train), "--pretrained", str(pre if which == "pretrained" else rnd),
               "--out", str(o), "--no-progress", "--set", f"train.seed={seed}", "--set", f"finetune.epochs={epochs}",
               "--set", f"finetune.mining_epochs={max(1, epochs // 2)}"]
        for s in sets + ([f"data.max_genes={max_genes}"] if max_genes else []) + [f"finetune.n_hvg={n_hvg}", *extra]:
            cmd += ["--set", s]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    saved = o / "eval" / "metrics.json"  # what `evaluate --out` wrote last time; delete eval/ to re-run it
    if not saved.exists():
        cmd = [HICELLER, "evaluate", "--model", str(o), "--input", str(test), "--json", "--out", str(o / "eval")]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    r = json.loads(saved.read_text())
    summ = json.loads((o / "summary.json").read_text())
    return {**read_report(r), "best_round": summ["round"]}


def prepare(pretrained: Path, random: Path, steps: int) -> None:
    """The pretraining store and runs when they do not exist yet: a 5k-cell synthetic corpus plus every
    file of ../shared/data (labels unused), the debug model pretrained ``steps`` steps on it (P), and a
    1-step run as the random initialisation of method b (R). Same commands as in bench/RESULTS.md."""
    if (pretrained / "checkpoints").is_dir() and (random / "checkpoints").is_dir():
        return
    store = pretrained.parent / "S"
    run = lambda *a: subprocess.run([HICELLER, *map(str, a), "--no-progress"], check=True)  # noqa: E731
    if not (store / "obs").exists():
        run("synth", "--store", store, "--cells", 5000, "--genes", 2000, "--seed", 0)
        run("ingest", "--store", store, *sorted(DATA.glob("*.h5ad")), "--skip-existing")
    if not (pretrained / "checkpoints").is_dir():
        run("pretrain", "--config", "debug", "--store", store, "--out", pretrained, "--set", f"train.steps={steps}",
            "--set", "train.micro_batch_cells=32", "--set", "train.checkpoint_every=500", "--set", "train.warmup_steps=50")
    if not (random / "checkpoints").is_dir():
        run("pretrain", "--config", "debug", "--store", store, "--out", random, "--set", "train.steps=1",
            "--set", "train.checkpoint_every=1")


def per_class_table(rows: list[dict], methods: list[str]) -> str:
    """Markdown: one row per class, rarest first; F1 per method as the mean over the seeds whose report
    holds the class (a phantom counts as 0), with "-" where no seed's report holds it."""
    train, test = {}, {}
    for r in rows:  # the largest count seen: (a) counts the whole training file, Celler its training split
        for c, n in r["train_cells"].items():
            train[c] = max(train.get(c, 0), n)
        test.update(r["test_cells"])
    lines = ["| class | train cells | test cells | " + " | ".join(f"({m})" for m in methods) + " |",
             "|---|---:|---:|" + "---:|" * len(methods)]
    for c in sorted(train, key=lambda c: (train[c], c)):
        f1 = [[r["per_class_f1"][c] for r in rows if r["method"] == m and c in r["per_class_f1"]] for m in methods]
        lines.append(f"| {c} | {train[c]} | {test.get(c, 0)} | " + " | ".join(f"{np.mean(v):.2f}" if v else "-" for v in f1) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--pretrained", type=Path, default=None, help="pretraining run (default bench/out/aq/P<steps>)")
    p.add_argument("--random", type=Path, default=Path("bench/out/aq/R"))
    p.add_argument("--work", type=Path, default=Path("bench/out/aq/runs"))
    p.add_argument("--tasks", nargs="+", default=["baron", "pbmc", "xin"])
    p.add_argument("--methods", nargs="+", default=list("abcde"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--pretrain-steps", type=int, default=None, help="steps of P when it has to be made (6000; --quick: 1500)")
    p.add_argument("--max-genes", type=int, default=512, help="genes per cell when fine-tuning and annotating (0: the pretrained value)")
    p.add_argument("--n-hvg", type=int, default=0, help="fine-tune Celler on the N most variable training genes (finetune.n_hvg; 0: all)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="one more config override for every Celler run (e.g. finetune.ginf_mu=-1); named in the run folder")
    p.add_argument("--per-class", action="store_true", help="also print each task's per-class F1 table (markdown, stdout)")
    p.add_argument("--quick", action="store_true", help="baron, seed 0, 1 epoch, methods a and e")
    a = p.parse_args()
    if a.quick:
        a.tasks, a.seeds, a.epochs, a.methods = ["baron"], [0], 1, ["a", "e"]
    a.pretrain_steps = a.pretrain_steps or (1500 if a.quick else 6000)
    # bench/out/aq/P is the 1,500-step run of the older RESULTS tables (its runs' folders carry no suffix)
    a.pretrained = a.pretrained or Path("bench/out/aq") / ("P" if a.pretrain_steps == 1500 else f"P{a.pretrain_steps}")
    if any(m != "a" for m in a.methods):
        prepare(a.pretrained, a.random, a.pretrain_steps)
    rows = []
    for t in a.tasks:
        tr, te, _ = make_task(t, a.work)
        for m in a.methods:
            for s in a.seeds:
                t0 = time.time()
                r = run_logreg(tr, te, s) if m == "a" else run_celler(m, tr, te, s, a.pretrained, a.random, a.epochs, a.work, a.max_genes or None, a.n_hvg, a.sets)
                r.update(task=t, method=m, seed=s, seconds=round(time.time() - t0, 1))
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k not in ("per_class_f1", "test_cells", "train_cells")}),
                      file=sys.stderr, flush=True)
    if a.per_class:
        for t in a.tasks:
            print(per_class_table([r for r in rows if r["task"] == t], a.methods))
    agg = {}
    for t in a.tasks:
        for m in a.methods:
            sel = [r for r in rows if r["task"] == t and r["method"] == m]
            d = {}
            for k in ("accuracy", "macro_f1", "rare_class_f1", "macro_f1_test_classes", "rare_class_f1_test_classes"):
                v = [r[k] for r in sel if r[k] is not None]
                d[k] = [round(float(np.mean(v)), 4), round(float(np.std(v)), 4)] if v else None
            d["n_seeds"] = len(sel)
            d["phantom_per_seed"] = round(float(np.mean([len(r["phantom"]) for r in sel])), 2) if sel else None
            agg[f"{t}/{m}"] = d
    print(json.dumps({"bench": "annotate_quality", "epochs": a.epochs, "max_genes": a.max_genes, "n_hvg": a.n_hvg, "sets": a.sets, "results": agg}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
