"""`hiceller finetune`, `evaluate`, `export`, `annotate`: their arguments and handlers. A handler
imports the heavy modules (torch, DeepSpeed, TileDB-SOMA, MLflow) only when it runs, so `hiceller
--help` and other commands stay quick."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from finetune.priors import DEFAULT_ADAPT_PRIORS
from hiceller.errors import InputError
from hiceller.progress import progress_factory

__all__ = ["register", "add_finetune_args"]


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="debug", help="preset or TOML (its [train], [deepspeed], [finetune] sections are used)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", help="corpus store with the tissue's labelled cells")
    src.add_argument("--h5ad", type=Path, help="fine-tune on one labelled .h5ad instead of a store")
    p.add_argument("--pretrained", type=Path, required=True, help="pretraining run folder, checkpoint folder or bundle")
    p.add_argument("--tissue", default=None, help="tissue to fine-tune on (store obs 'tissue'); all cells when omitted")
    p.add_argument("--out", type=Path, required=True, help="fine-tuning run folder")
    p.add_argument("--label-column", default="cell_type", help="label column (store: cell_type; --h5ad: any obs column)")
    p.add_argument("--batch-column", default="batch", help="--h5ad: obs column naming donors (default: batch)")
    p.add_argument("--holdout-donors", nargs="*", default=None, help="donors kept out of training, evaluated as test")
    p.add_argument("--diseases", nargs="+", default=None, metavar="DISEASE",
                   help="fine-tune on the cells of these diseases (obs 'disease', e.g. normal) only")
    p.add_argument("--holdout-diseases", nargs="+", default=None, metavar="DISEASE",
                   help="diseases kept out of training, evaluated as test: transfer to an unseen condition")
    p.add_argument("--query-genes", type=Path, default=None,
                   help="train on the genes this query measures only: an .h5ad (its var_names) or a text file, one gene per line")
    p.add_argument("--min-gene-overlap", type=float, default=0.25, help="least share of the store's genes the pretrained vocabulary must know")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def register(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--min-overlap", type=float, default=0.25, help="least share of the query's genes the model must know")
    p.add_argument("--out", type=Path, default=None, help="folder for the confusion matrix and per-class table")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the metrics")
    p.add_argument("--group-by", choices=("disease", "donor", "dataset"), default=None,
                   help="also score every disease / donor / dataset apart (obs disease, donor_id, dataset_id); "
                   "table in OUT and MLflow")
    p.add_argument("--group-column", default=None, help="obs column holding the --group-by groups (e.g. batch)")
    p.add_argument("--tracking-uri", default=None, help="MLflow for --group-by (default: OUT/mlflow.db)")
    _add_adapt_priors(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "export",
        help="consolidate a fine-tuning checkpoint (any ZeRO stage) into an annotator bundle",
        description="Writes model.safetensors, config.json, vocab.json, labels.json, metrics.json and "
        "checksums.sha256 (atomically), and logs the bundle to MLflow as a pyfunc model.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="fine-tuning run folder, round folder or checkpoint folder")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    p.add_argument("--register", default=None, metavar="NAME", help="register the pyfunc model under NAME")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite file beside the bundle)")
    p.add_argument("--no-mlflow", action="store_true", help="write the bundle only")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "annotate",
        help="label the cells of an .h5ad with a bundle (obs celler_label / celler_confidence, obsm X_celler)",
    )
    p.add_argument("--model", required=True, help="bundle folder, fine-tuning run folder, or models:/NAME/VERSION")
    p.add_argument("--input", type=Path, required=True, help="query .h5ad (counts or log-normalised)")
    p.add_argument("--output", type=Path, required=True, help="annotated .h5ad to write")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--min-confidence", type=float, default=0.0, help="below it the label is 'Unassigned'")
    p.add_argument("--gene-column", default=None, help="var column of gene ids (default: var_names, any case)")
    p.add_argument("--min-overlap", type=float, default=0.25, help="least share of the query's genes the model must know")
    p.add_argument("--label-column", default=None, help="true labels, for the plot")
    p.add_argument("--plot", type=Path, default=None, help="UMAP of the embeddings, coloured by label, as PNG")
    p.add_argument("--tracking-uri", default=None, help="for models:/ URIs")
    p.add_argument("--disease-column", default=None, help="obs column of the query's diseases (default: disease, when "
                   "present); cells of a disease the model was not trained on are counted in the report")
    p.add_argument("--no-progress", action="store_true")
    _add_adapt_priors(p)
    p.set_defaults(func=_annotate)


def _add_adapt_priors(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapt-priors", action=argparse.BooleanOptionalAction, default=DEFAULT_ADAPT_PRIORS,
                   help="re-estimate the query's class mix by EM and re-weight the probabilities (label shift)")


def _finetune(args: argparse.Namespace) -> int:
    from finetune.run import run_finetune

    return run_finetune(args)


def _evaluate(args: argparse.Namespace) -> int:
    import anndata as ad

    from finetune.annotate import Annotator
    from finetune.groups import group_column
    from finetune.metrics import labelled_report, write_eval_artifacts
    from pretrain.layout import bundle_of

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    ann = Annotator.load(bundle_of(args.model))
    if not args.input.is_file():
        raise InputError(f"{args.input}: file does not exist")
    try:
        adata = ad.read_h5ad(args.input, backed="r")
    except Exception as e:
        raise InputError(f"{args.input}: not a readable .h5ad file ({type(e).__name__})") from None
    if args.label_column not in adata.obs.columns:
        raise InputError(f"{args.input}: obs has no label column {args.label_column!r}")
    truth = adata.obs[args.label_column].astype(str).to_numpy()
    groups = group_column(adata.obs, args.group_by, args.group_column) if args.group_by else None
    probs = []
    for _, p, _ in ann.iter_predictions(adata, batch_size=args.batch_size, gene_column=args.gene_column, min_overlap=args.min_overlap):
        probs.append(p)
    proba = np.concatenate(probs)
    if args.adapt_priors:
        proba, _ = ann.adapt_priors(proba)
    index = {n: i for i, n in enumerate(ann.labels)}
    y = np.array([index.get(t, -1) for t in truth])
    known = y >= 0
    if not known.any():
        raise InputError(f"{args.input}: none of its labels is a class of the model ({', '.join(ann.labels[:8])}...)")
    report = labelled_report(y, proba, ann.labels, ann.spec.label_counts or [1] * len(ann.labels))
    report["gene_overlap"] = ann.last_mapping.overlap
    report["vocab_coverage"] = ann.last_mapping.vocab_coverage
    out = args.out or args.input.with_suffix("").parent / f"{args.input.stem}_celler_eval"
    write_eval_artifacts(report, y[known], proba[known].argmax(1), ann.labels, out)
    rare = report.get("rare_class_f1")
    print(
        f"{args.input.name}: {int(known.sum())} cells ({report['cells_with_unknown_labels']} with labels unknown to the model), "
        f"accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}, "
        f"rare-class F1 {'n/a' if rare is None else f'{rare:.3f}'}; plots in {out}"
    )
    if groups is not None:
        _report_groups(args, ann, y, proba, groups, report, out)
    if args.json:
        print(json.dumps(report, default=float))
    return 0


def _report_groups(args: argparse.Namespace, ann, y, proba, groups, report: dict, out: Path) -> None:
    """--group-by: the metrics of every group, printed, in the JSON report, as CSV and MLflow table."""
    import pandas as pd

    from finetune.groups import group_reports, log_group_table, train_diseases

    seen = train_diseases(ann.trained) if args.group_by == "disease" else None
    frame = group_reports(y, proba, groups, ann.labels, ann.spec.label_counts or [1] * len(ann.labels), seen=seen)
    report[f"by_{args.group_by}"] = json.loads(frame.to_json(orient="records"))
    csv = log_group_table(frame, args.group_by, report, out, args.tracking_uri,
                          {"model": str(args.model), "input": str(args.input), "group_column": groups.name})
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 40):
        print(frame.drop(columns=["classes"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"metrics by {args.group_by}: {csv} (and MLflow, run evaluate-by-{args.group_by})")


def _export(args: argparse.Namespace) -> int:
    from finetune.export import export_bundle, log_pyfunc

    bundle = export_bundle(args.checkpoint, args.out, overwrite=args.force)
    print(f"bundle written to {bundle}")
    if not args.no_mlflow:
        uri = args.tracking_uri or f"sqlite:///{bundle.resolve().parent / 'mlflow.db'}"
        model_uri = log_pyfunc(bundle, uri, args.register)
        extra = f", registered as {args.register}" if args.register else ""
        print(f"logged to MLflow ({uri}) as {model_uri}{extra}")
    return 0


def _resolve_bundle(model: str, tracking_uri: str | None) -> Path:
    from pretrain.layout import CHECKSUMS, bundle_of

    if model.startswith("models:/"):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
        except Exception as e:
            raise InputError(f"--model {model}: not found in the MLflow registry ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        found = list(local.rglob(CHECKSUMS))
        if not found:
            raise InputError(f"--model {model}: the registered model holds no HiCeller bundle")
        return found[0].parent
    return bundle_of(Path(model))


def _annotate(args: argparse.Namespace) -> int:
    import anndata as ad

    from finetune.annotate import Annotator
    from finetune.groups import unseen_disease_line

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.min_confidence <= 1:
        raise InputError(f"--min-confidence must be in [0, 1], got {args.min_confidence}")
    if not args.input.is_file():
        raise InputError(f"{args.input}: file does not exist")
    if args.output.resolve() == args.input.resolve():
        raise InputError(f"--output {args.output} is the input file; write the annotation to a new file")
    ann = Annotator.load(_resolve_bundle(args.model, args.tracking_uri), device=args.device)
    try:
        adata = ad.read_h5ad(args.input)
    except Exception as e:
        raise InputError(f"{args.input}: not a readable .h5ad file ({type(e).__name__})") from None
    for column in (args.label_column, args.disease_column):
        if column and column not in adata.obs.columns:
            raise InputError(f"{args.input}: obs has no column {column!r}")
    factory = progress_factory(not args.no_progress)
    bar = factory("annotate", adata.n_obs) if factory else None
    out = ann.annotate(
        adata,
        batch_size=args.batch_size,
        min_confidence=args.min_confidence,
        gene_column=args.gene_column,
        min_overlap=args.min_overlap,
        progress=bar,
        adapt_priors=args.adapt_priors,
    )
    print(ann.last_mapping.describe())
    unseen = unseen_disease_line(ann.trained, adata.obs, args.disease_column or "disease")
    if unseen:
        print(unseen)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(f".{args.output.name}.partial")
    out.write_h5ad(tmp)
    tmp.replace(args.output)
    dist = out.obs["celler_label"].value_counts()
    print(f"annotated {out.n_obs} cells -> {args.output}")
    for label, n in dist.items():
        print(f"  {n:>8}  {n / out.n_obs:6.1%}  {label}")
    if args.plot:
        from finetune.plots import plot_embedding_umap

        cols = ["celler_label"] + ([args.label_column] if args.label_column else [])
        plot_embedding_umap(out, cols, args.plot)
        print(f"UMAP plot: {args.plot}")
    return 0
