"""What `hiceller evaluate`, `annotate`, `embed`, `export` and `inspect` do (their arguments: finetune/cli.py).

Every handler checks its inputs and output paths before it loads a model or reads cells, writes
through a temporary file renamed into place, and logs to the project's one MLflow home
(pretrain/tracking.py), nested under the fine-tuning run that made the bundle when it is there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from finetune.annotate import Annotator
from finetune.export import export_bundle, log_pyfunc
from finetune.groups import group_column, group_reports, log_group_table, train_diseases, unseen_disease_line
from finetune.inspect import describe
from finetune.metrics import labelled_report, write_eval_artifacts
from finetune.plots import plot_embedding_umap, plot_per_class_f1
from hiceller.errors import InputError
from hiceller.paths import check_output_dir, check_output_file
from hiceller.progress import progress_factory
from pretrain.layout import CHECKSUMS, bundle_of
from pretrain.tracking import Tracker, resolve_tracking_uri

__all__ = ["evaluate", "annotate", "embed", "export", "inspect"]


def _read_h5ad(path: Path, backed: bool = False):
    if not path.is_file():
        raise InputError(f"{path}: file does not exist")
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as e:
        raise InputError(f"{path}: not a readable .h5ad file ({type(e).__name__})") from None


def _bundle_path(model: str, tracking_uri: str | None) -> Path:
    """A bundle folder, a fine-tuning run folder (its bundle) or a registered ``models:/NAME/VERSION``."""
    if not model.startswith("models:/"):
        return bundle_of(Path(model))
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model, tracking_uri=resolve_tracking_uri(tracking_uri)))
    except Exception as e:
        raise InputError(f"--model {model}: not found in the MLflow registry ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    found = list(local.rglob(CHECKSUMS))
    if not found:
        raise InputError(f"--model {model}: the registered model holds no HiCeller bundle")
    return found[0].parent


def _check_common(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.min_overlap is not None and not 0 <= args.min_overlap <= 1:
        raise InputError(f"--min-overlap must be in [0, 1], got {args.min_overlap}")


def _evaluation_run(ann: Annotator, args: argparse.Namespace, out: Path) -> Tracker:
    """A new MLflow run for this evaluation, nested under the bundle's fine-tuning run when that
    logs to the same store."""
    uri = resolve_tracking_uri(args.tracking_uri)
    made = ann.trained.provenance
    parent = made.get("mlflow_run_id") if made.get("tracking_uri") == uri else None
    (out / "mlflow_run_id").unlink(missing_ok=True)  # every evaluation is a run of its own
    tracker = Tracker(out, enabled=True, tracking_uri=uri, run_name=f"evaluate-{args.input.stem}", parent_run_id=parent)
    tracker.set_tags({"kind": "evaluate", "bundle": str(ann.trained.source)})
    tracker.log_params({"model": str(args.model), "input": str(args.input), "adapt_priors": args.adapt_priors})
    return tracker


def evaluate(args: argparse.Namespace) -> int:
    _check_common(args)
    out = args.out or args.input.with_suffix("").parent / f"{args.input.stem}_celler_eval"
    check_output_dir(out, "--out")
    ann = Annotator.load(bundle_of(args.model))
    adata = _read_h5ad(args.input, backed=True)
    if args.label_column not in adata.obs.columns:
        raise InputError(f"{args.input}: obs has no label column {args.label_column!r}")
    groups = group_column(adata.obs, args.group_by, args.group_column) if args.group_by else None
    proba = ann.predict(adata, batch_size=args.batch_size, gene_column=args.gene_column, min_overlap=args.min_overlap).proba
    if args.adapt_priors:
        proba, _ = ann.adapt_priors(proba)
    index = {n: i for i, n in enumerate(ann.labels)}
    y = np.array([index.get(t, -1) for t in adata.obs[args.label_column].astype(str)])
    known = y >= 0
    if not known.any():
        raise InputError(f"{args.input}: none of its labels is a class of the model ({', '.join(ann.labels[:8])}...)")
    report = labelled_report(y, proba, ann.labels, ann.spec.label_counts or [1] * len(ann.labels))
    report.update(gene_overlap=ann.last_check.overlap, gene_overlap_rule=ann.last_check.rule)
    files = write_eval_artifacts(report, y[known], proba[known].argmax(1), ann.labels, out)
    files.append(plot_per_class_f1(report, out / "per_class_f1.png"))
    rare = report.get("rare_class_f1")
    print(f"{args.input.name}: {int(known.sum())} cells ({report['cells_with_unknown_labels']} with labels unknown to the model), "
          f"accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}, "
          f"rare-class F1 {'n/a' if rare is None else f'{rare:.3f}'}; plots in {out}")
    tracker = None if args.no_mlflow else _evaluation_run(ann, args, out)
    if tracker:
        tracker.log_metrics({k: float(v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=0)
        for f in files:
            tracker.log_artifact(f)
    if groups is not None:
        _report_groups(args, ann, y, proba, groups, report, out, tracker)
    if tracker:
        tracker.finish()
    if args.json:
        print(json.dumps(report, default=float))
    return 0


def _report_groups(args, ann: Annotator, y, proba, groups, report: dict, out: Path, tracker: Tracker | None) -> None:
    """--group-by: the metrics of every group, printed, in the JSON report, as CSV and MLflow table."""
    seen = train_diseases(ann.trained) if args.group_by == "disease" else None
    frame = group_reports(y, proba, groups, ann.labels, ann.spec.label_counts or [1] * len(ann.labels), seen=seen)
    report[f"by_{args.group_by}"] = json.loads(frame.to_json(orient="records"))
    csv = log_group_table(frame, args.group_by, out, tracker)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 40):
        print(frame.drop(columns=["classes"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"metrics by {args.group_by}: {csv}" + (" (and MLflow)" if tracker else ""))


def _check_annotate(args: argparse.Namespace) -> None:
    _check_common(args)
    if args.min_confidence is not None and not 0 <= args.min_confidence <= 1:
        raise InputError(f"--min-confidence must be in [0, 1], got {args.min_confidence}")
    if not args.input.is_file():
        raise InputError(f"{args.input}: file does not exist")
    check_output_file(args.output, "--output", inputs=(args.input,), suffix=".h5ad")
    if args.plot:
        check_output_file(args.plot, "--plot", inputs=(args.input, args.output), suffix=".png")


def _write_h5ad(adata, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        adata.write_h5ad(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _print_annotation(out, ann: Annotator, path: Path) -> None:
    celler = out.uns["celler"]
    print(f"annotated {out.n_obs} cells -> {path}")
    for label, n in out.obs["celler_label"].value_counts().items():
        print(f"  {n:>8}  {n / out.n_obs:6.1%}  {label}")
    if celler["unassigned"]:
        why = ", ".join(f"{r} {n}" for r, n in celler["unassigned"].items())
        print(f"Unassigned: {why} (min confidence {celler['min_confidence']:.2f}; obs['celler_unassigned_reason'])")


def annotate(args: argparse.Namespace) -> int:
    _check_annotate(args)
    ann = Annotator.load(_bundle_path(args.model, args.tracking_uri), device=args.device)
    adata = _read_h5ad(args.input)
    for column in (args.label_column, args.disease_column):
        if column and column not in adata.obs.columns:
            raise InputError(f"{args.input}: obs has no column {column!r}")
    factory = progress_factory(not args.no_progress)
    out = ann.annotate(adata, batch_size=args.batch_size, min_confidence=args.min_confidence, gene_column=args.gene_column,
                       min_overlap=args.min_overlap, progress=factory("annotate", adata.n_obs) if factory else None,
                       adapt_priors=args.adapt_priors, probabilities=args.probabilities)
    print(ann.last_check.describe())
    if ann.last_check.warning:
        print(f"warning: {ann.last_check.warning}")
    unseen = unseen_disease_line(ann.trained, adata.obs, args.disease_column or "disease")
    if unseen:
        print(unseen)
    _write_h5ad(out, args.output)
    _print_annotation(out, ann, args.output)
    if args.plot:
        cols = ["celler_label"] + ([args.label_column] if args.label_column else [])
        plot_embedding_umap(out, cols, args.plot)
        print(f"UMAP plot: {args.plot}")
    return 0


def embed(args: argparse.Namespace) -> int:
    """``<cls>`` embeddings of a query into obsm X_celler (finetune/embed.py), written atomically."""
    from finetune.embed import Embedder
    from pretrain.layout import load_trained

    _check_common(args)
    if not args.input.is_file():
        raise InputError(f"{args.input}: file does not exist")
    check_output_file(args.output, "--output", inputs=(args.input,), suffix=".h5ad")
    embedder = Embedder(load_trained(_bundle_path(args.model, args.tracking_uri)), device=args.device)
    adata = _read_h5ad(args.input)
    factory = progress_factory(not args.no_progress)
    emb = embedder.embed(adata, batch_size=args.batch_size, gene_column=args.gene_column, min_overlap=args.min_overlap,
                         progress=factory("embed", adata.n_obs) if factory else None)
    check = embedder.last_check
    adata.obsm["X_celler"] = emb
    adata.uns["celler_embed"] = {"model": str(embedder.trained.source), "gene_overlap_rule": check.rule,
                                 "gene_overlap": float(check.overlap), "genes_matched": int(check.mapping.n_matched)}
    print(check.describe())
    if check.warning:
        print(f"warning: {check.warning}")
    _write_h5ad(adata, args.output)
    print(f"embedded {adata.n_obs} cells ({emb.shape[1]} dimensions, obsm['X_celler']) from {embedder.trained.source} -> {args.output}")
    return 0


def export(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:
        raise InputError(f"bundle {args.out} already exists (remove it, choose another --out, or --force)")
    check_output_dir(args.out, "--out")
    bundle = export_bundle(args.checkpoint, args.out, overwrite=args.force)
    print(f"bundle written to {bundle}")
    if not args.no_mlflow:
        uri = resolve_tracking_uri(args.tracking_uri)
        model_uri = log_pyfunc(bundle, uri, args.register)
        extra = f", registered as {args.register}" if args.register else ""
        print(f"logged to MLflow ({uri}) as {model_uri}{extra}")
    return 0


def inspect(args: argparse.Namespace) -> int:
    info = describe(Path(args.path))
    if args.json:
        print(json.dumps(info, default=str))
        return 0
    for line in info["lines"]:
        print(line)
    return 0
