"""Annotation-quality benchmark: Celler against the simple baselines a user runs, on real transfer tasks.

Tasks, baselines and the scoring rule are in bench/quality_tasks.py (seven tasks: Baron donor
transfer both ways, Baron -> Xin / Wang across studies, Symphony PBMC across chemistries both
ways, pbmc3k 80/20). Methods:

  l1, l2      logistic regression, C by 3-fold CV on the reference (log1p CP10k, shared genes)
  celltypist  CellTypist with its training defaults on the same data
  a           the older fixed L1 baseline (C = 1, no CV), kept for the older RESULTS tables
  b           Celler from a random init (train.steps=1 "pretraining"), transformer head, CE
  c, d, e     pretrained, transformer head: CE / GInf / GInf + 2 mining rounds
  transformer, linear, joint
              pretrained, GInf + mining, with the classifier head named (finetune.head)
  celler      pretrained, the preset's fine-tuning settings as they are (what the README runs)

Every Celler run is fine-tuned by `hiceller finetune` (a subprocess, as a user runs it) and its
bundle is scored in this process on the query's cells, twice: as annotated, and with the query's
class priors re-estimated by EM (``em_*`` keys; finetune/priors.py).

  python bench/annotate_quality.py --tasks baron xin --methods l1 l2 celltypist joint --seeds 0 1 2 3 4
  python bench/annotate_quality.py --quick   # baron, seed 0, 1 epoch, l2 and joint; ends with one JSON line

P (pretrained) and R (random init) are made on first use when missing (``prepare``): P is the debug
model pretrained 6,000 steps (bench/out/aq/P6000, about 30 minutes on 2 CPU cores); ``--pretrain-steps
N`` uses bench/out/aq/PN (N = 1500: bench/out/aq/P), ``--pretrained`` any run or checkpoint folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_tasks import DATA, TASKS, make_task, run_baseline, score  # noqa: E402

HICELLER = str(Path(sys.executable).with_name("hiceller"))  # this interpreter's entry point, activated or not
BASELINES = ("l1", "l2", "celltypist", "a")
_TRANSFORMER = ["finetune.head=transformer"]
METHODS = {
    "b": ("random", ["finetune.loss=ce", "finetune.mining_rounds=0", *_TRANSFORMER]),
    "c": ("pretrained", ["finetune.loss=ce", "finetune.mining_rounds=0", *_TRANSFORMER]),
    "d": ("pretrained", ["finetune.loss=ginf", "finetune.mining_rounds=0", *_TRANSFORMER]),
    "e": ("pretrained", ["finetune.loss=ginf", "finetune.mining_rounds=2", *_TRANSFORMER]),
    "transformer": ("pretrained", ["finetune.loss=ginf", "finetune.mining_rounds=2", *_TRANSFORMER]),
    "linear": ("pretrained", ["finetune.loss=ginf", "finetune.mining_rounds=2", "finetune.head=linear"]),
    "joint": ("pretrained", ["finetune.loss=ginf", "finetune.mining_rounds=2", "finetune.head=joint"]),
    "celler": ("pretrained", []),
}
HEADLINE = ("accuracy", "macro_f1", "rare_class_f1")


def run_name(task: str, method: str, seed: int, a: argparse.Namespace, pre: Path) -> str:
    """A folder name that names every setting, so a run made with other settings is never reused."""
    parts = [task, method, f"s{seed}", f"e{a.epochs}", f"g{a.max_genes or 'pre'}", f"hvg{a.n_hvg}"]
    parts += ["qgenes"] if a.query_genes else []
    parts += [s.removeprefix("finetune.").replace("=", "") for s in a.sets]
    parts += [pre.name] if METHODS[method][0] == "pretrained" else []
    return "_".join(parts)


def finetune_cmd(method: str, tr: Path, te: Path, seed: int, pre: Path, out: Path, a: argparse.Namespace) -> list[str]:
    which, sets = METHODS[method]
    cmd = [HICELLER, "finetune", "--h5ad", str(tr), "--pretrained", str(pre if which == "pretrained" else a.random),
           "--out", str(out), "--no-progress", "--set", f"train.seed={seed}", "--set", f"finetune.epochs={a.epochs}",
           "--set", f"finetune.mining_epochs={max(1, a.epochs // 2)}", "--set", f"finetune.n_hvg={a.n_hvg}"]
    cmd += ["--query-genes", str(te)] if a.query_genes else []
    for s in sets + ([f"data.max_genes={a.max_genes}"] if a.max_genes else []) + a.sets:
        cmd += ["--set", s]
    return cmd


def celler_probabilities(bundle: Path, te: Path, cache: Path) -> dict:
    """Class probabilities of every query cell (cached beside the run) and the bundle's classes."""
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        return {k: z[k] for k in z.files}
    import anndata as ad

    from finetune.annotate import Annotator

    ann = Annotator.load(bundle)
    proba, _ = ann.predict_proba(ad.read_h5ad(te), min_overlap=0.0)
    out = {"proba": proba, "labels": np.array(ann.labels), "train_counts": np.array(ann.spec.label_counts)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def run_celler(method: str, task: str, tr: Path, te: Path, seed: int, pre: Path, a: argparse.Namespace) -> dict:
    import anndata as ad

    from finetune.priors import estimate_priors, reweight

    o = a.work / run_name(task, method, seed, a, pre)
    if not (o / "model").exists():
        shutil.rmtree(o, ignore_errors=True)  # what a killed run left
        cmd = finetune_cmd(method, tr, te, seed, pre, o, a)
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    p = celler_probabilities(o / "model", te, o / "eval" / "proba.npz")
    truth = ad.read_h5ad(te, backed="r").obs.cell_type.astype(str).to_numpy()
    train = ad.read_h5ad(tr, backed="r").obs.cell_type.astype(str).to_numpy()
    labels = p["labels"]
    row = score(truth, labels[p["proba"].argmax(1)], train)
    shift = estimate_priors(p["proba"], p["train_counts"])
    adapted = reweight(p["proba"], shift.reference, shift.priors)
    em = score(truth, labels[adapted.argmax(1)], train)
    row.update({f"em_{k}": em[k] for k in (*HEADLINE, "phantom")})
    summary = json.loads((o / "summary.json").read_text())
    row["best_round"], row["val_macro_f1"] = summary["round"], summary["val"]["macro_f1"]
    return row


def prepare(pretrained: Path, random: Path, steps: int) -> None:
    """The pretraining store and runs when they do not exist yet: a 5k-cell synthetic corpus plus every
    file of ../shared/data (labels unused), the debug model pretrained ``steps`` steps on it (P), and a
    1-step run as the random initialisation of method b (R). Same commands as in bench/RESULTS.md."""
    if (pretrained / "checkpoints").is_dir() and (random / "checkpoints").is_dir():
        return
    store = Path("bench/out/aq/S")
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
    """Markdown: one row per query class, rarest first; F1 per method, mean over seeds."""
    train, test = {}, {}
    for r in rows:
        train.update(r["train_cells"])
        test.update(r["test_cells"])
    lines = ["| class | reference cells | query cells | " + " | ".join(f"{m}" for m in methods) + " |",
             "|---|---:|---:|" + "---:|" * len(methods)]
    for c in sorted(test, key=lambda c: (train.get(c, 0), c)):
        f1 = [[r["per_class_f1"][c] for r in rows if r["method"] == m] for m in methods]
        lines.append(f"| {c} | {train.get(c, 0)} | {test[c]} | " + " | ".join(f"{np.mean(v):.2f}" if v else "-" for v in f1) + " |")
    return "\n".join(lines)


def aggregate(rows: list[dict]) -> dict:
    """Mean and sd over seeds of every headline figure, per task and method."""
    out = {}
    for key in sorted({(r["task"], r["method"]) for r in rows}):
        sel = [r for r in rows if (r["task"], r["method"]) == key]
        d = {"n_seeds": len(sel), "phantom_per_run": round(float(np.mean([len(r["phantom"]) for r in sel])), 2)}
        for k in (*HEADLINE, *(f"em_{h}" for h in HEADLINE), "val_macro_f1"):
            v = [r[k] for r in sel if r.get(k) is not None]
            d[k] = [round(float(np.mean(v)), 4), round(float(np.std(v)), 4)] if v else None
        out["/".join(key)] = d
    return out


def markdown(agg: dict) -> str:
    lines = ["| task | method | runs | accuracy | macro-F1 | rare-class F1 | phantom types / run | EM: macro-F1 | EM: rare-class F1 |",
             "|---|---|---:|---|---|---|---:|---|---|"]
    f = lambda v: "n/a" if v is None else f"{v[0]:.3f} ± {v[1]:.3f}"  # noqa: E731
    for key, d in agg.items():
        task, method = key.split("/")
        lines.append(f"| {TASKS[task]} | {method} | {d['n_seeds']} | {f(d['accuracy'])} | {f(d['macro_f1'])} | {f(d['rare_class_f1'])} | "
                     f"{d['phantom_per_run']} | {f(d.get('em_macro_f1'))} | {f(d.get('em_rare_class_f1'))} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained", type=Path, default=None, help="pretraining run or checkpoint (default bench/out/aq/P<steps>)")
    p.add_argument("--random", type=Path, default=Path("bench/out/aq/R"))
    p.add_argument("--work", type=Path, default=Path("bench/out/aq/runs"))
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--methods", nargs="+", default=["l1", "l2", "celltypist", "joint"], choices=[*BASELINES, *METHODS])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--pretrain-steps", type=int, default=None, help="steps of P when it has to be made (6000; --quick: 1500)")
    p.add_argument("--max-genes", type=int, default=512, help="genes per cell when fine-tuning and annotating (0: the pretrained value)")
    p.add_argument("--n-hvg", type=int, default=2000, help="fine-tune on the N most variable training genes (finetune.n_hvg; 0: all)")
    p.add_argument("--query-genes", action="store_true", help="fine-tune on the genes the query measures (finetune --query-genes)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="one more config override for every Celler run (e.g. finetune.ginf_mu=-1); named in the run folder")
    p.add_argument("--per-class", action="store_true", help="also print each task's per-class F1 table (markdown)")
    p.add_argument("--table", action="store_true", help="also print the summary as a markdown table")
    p.add_argument("--quick", action="store_true", help="baron, seed 0, 1 epoch, methods l2 and joint, the 1,500-step P")
    a = p.parse_args(argv)
    if a.quick:
        a.tasks, a.seeds, a.epochs, a.methods = ["baron"], [0], 1, ["l2", "joint"]
    a.pretrain_steps = a.pretrain_steps or (1500 if a.quick else 6000)
    a.pretrained = a.pretrained or Path("bench/out/aq") / ("P" if a.pretrain_steps == 1500 else f"P{a.pretrain_steps}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if any(m in METHODS for m in a.methods):
        prepare(a.pretrained, a.random, a.pretrain_steps)
    rows = []
    for t in a.tasks:
        tr, te = make_task(t, a.work)
        for m in a.methods:
            for s in (a.seeds if m in METHODS else [0]):  # the baselines are deterministic
                t0 = time.time()
                if m == "a":
                    r = run_baseline("a", tr, te, a.work / "baselines" / f"{t}_a.json")
                elif m in BASELINES:
                    r = run_baseline(m, tr, te, a.work / "baselines" / f"{t}_{m}.json")
                else:
                    r = run_celler(m, t, tr, te, s, a.pretrained, a)
                r.update(task=t, method=m, seed=s, seconds=round(time.time() - t0, 1))
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k not in ("per_class_f1", "test_cells", "train_cells")}),
                      file=sys.stderr, flush=True)
    if a.per_class:
        for t in a.tasks:
            print(f"\n{TASKS[t]}\n\n" + per_class_table([r for r in rows if r["task"] == t], a.methods))
    agg = aggregate(rows)
    if a.table:
        print(markdown(agg))
    print(json.dumps({"bench": "annotate_quality", "epochs": a.epochs, "max_genes": a.max_genes, "n_hvg": a.n_hvg,
                      "query_genes": a.query_genes, "pretrained": str(a.pretrained), "sets": a.sets, "results": agg}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
