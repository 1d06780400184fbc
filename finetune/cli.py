"""`hiceller finetune`, `hiceller evaluate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    from finetune.run import add_finetune_args

    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained Celler on a tissue (GInf or CE), then hard-mining rounds",
        description="Phase 1 on the train split, then hard-mining rounds until validation macro-F1 stops "
        "improving; the best round is written as a bundle to OUT/model. MLflow: parent run + child per round.",
    )
    add_finetune_args(p)
    p.set_defaults(func=_finetune)

    p = sub.add_parser("evaluate", help="accuracy, macro-F1, rare-class F1, ECE and plots of a model on a labelled .h5ad")
    p.add_argument("--model", type=Path, required=True, help="bundle, or fine-tuning run folder (uses RUN/model)")
    p.add_argument("--input", type=Path, required=True, help="labelled .h5ad")
    p.add_argument("--label-column", default="cell_type")
    p.add_argument("--gene-column", default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--min-overlap", type=float, default=0.25)
    p.add_argument("--out", type=Path, default=None, help="folder for the confusion matrix and per-class table")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the metrics")
    p.set_defaults(func=_evaluate)


def _finetune(args: argparse.Namespace) -> int:
    from finetune.run import run_finetune

    return run_finetune(args)


def resolve_model(path: Path) -> Path:
    if (path / "model" / "checksums.sha256").is_file():
        return path / "model"
    return path


def _evaluate(args: argparse.Namespace) -> int:
    import anndata as ad
    import numpy as np

    from finetune.annotate import Annotator
    from finetune.metrics import classification_report, per_class_table, plot_confusion_matrix
    from hiceller.errors import InputError

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    ann = Annotator.load(resolve_model(args.model))
    if not args.input.is_file():
        raise InputError(f"{args.input}: file does not exist")
    try:
        adata = ad.read_h5ad(args.input, backed="r")
    except Exception as e:
        raise InputError(f"{args.input}: not a readable .h5ad file ({type(e).__name__})") from None
    if args.label_column not in adata.obs.columns:
        raise InputError(f"{args.input}: obs has no label column {args.label_column!r}")
    truth = adata.obs[args.label_column].astype(str).to_numpy()
    probs = []
    for _, p, _ in ann.iter_predictions(adata, batch_size=args.batch_size, gene_column=args.gene_column, min_overlap=args.min_overlap):
        probs.append(p)
    proba = np.concatenate(probs)
    index = {n: i for i, n in enumerate(ann.labels)}
    y = np.array([index.get(t, -1) for t in truth])
    known = y >= 0
    if not known.any():
        raise InputError(f"{args.input}: none of its labels is a class of the model ({', '.join(ann.labels[:8])}...)")
    report = classification_report(
        y[known], proba[known].argmax(1), proba[known], ann.labels, ann.bundle.label_counts or [1] * len(ann.labels)
    )
    report["cells_with_unknown_labels"] = int((~known).sum())
    report["gene_overlap"] = ann.last_mapping.overlap
    out = args.out or args.input.with_suffix("").parent / f"{args.input.stem}_celler_eval"
    out.mkdir(parents=True, exist_ok=True)
    plot_confusion_matrix(y[known], proba[known].argmax(1), ann.labels, out / "confusion.png")
    per_class_table(report).to_csv(out / "per_class_f1.csv", index=False)
    rare = report.get("rare_class_f1")
    print(
        f"{args.input.name}: {int(known.sum())} cells ({report['cells_with_unknown_labels']} with labels unknown to the model), "
        f"accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}, "
        f"rare-class F1 {'n/a' if rare is None else f'{rare:.3f}'}; plots in {out}"
    )
    if args.json:
        print(json.dumps(report, default=float))
    return 0
