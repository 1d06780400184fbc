"""`hiceller finetune`, `evaluate`, `export`, `annotate`, `embed`: their arguments and handlers. A handler
imports the heavy modules (torch, DeepSpeed, TileDB-SOMA, MLflow) only when it runs, so `hiceller
--help` and other commands stay quick."""

from __future__ import annotations

import argparse
from pathlib import Path

from finetune.priors import DEFAULT_ADAPT_PRIORS

__all__ = ["register", "add_finetune_args"]

MIN_OVERLAP_HELP = ("least share of the genes the model reads that the query must have (default: the bundle's, 50%); "
                    "for a model that reads every gene, the share of the query's genes it knows (default 25%)")


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
    _add_evaluate(sub)
    _add_export(sub)
    _add_annotate(sub)
    _add_embed(sub)
    p = sub.add_parser("inspect", help="what a bundle or run folder holds: classes, genes read, metrics, provenance, calibration")
    p.add_argument("path", help="bundle folder, fine-tuning run folder or pretraining run folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_inspect)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="accuracy, macro-F1, rare-class F1, ECE and plots of a model on a labelled .h5ad")
    p.add_argument("--model", type=Path, required=True, help="bundle, or fine-tuning run folder (uses RUN/model)")
    p.add_argument("--input", type=Path, required=True, help="labelled .h5ad")
    p.add_argument("--label-column", default="cell_type")
    p.add_argument("--gene-column", default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--min-overlap", type=float, default=None, help=MIN_OVERLAP_HELP)
    p.add_argument("--out", type=Path, default=None, help="folder for the confusion matrix and per-class table")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the metrics")
    p.add_argument("--group-by", choices=("disease", "donor", "dataset"), default=None,
                   help="also score every disease / donor / dataset apart (obs disease, donor_id, dataset_id); "
                   "table in OUT and MLflow")
    p.add_argument("--group-column", default=None, help="obs column holding the --group-by groups (e.g. batch)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: the workspace's, see `hiceller ui --help`)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log this evaluation to MLflow")
    _add_adapt_priors(p)
    p.set_defaults(func=_evaluate)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="consolidate a fine-tuning checkpoint (any ZeRO stage) into an annotator bundle",
        description="Writes model.safetensors, config.json, vocab.json, labels.json, metrics.json and "
        "checksums.sha256 (atomically), and logs the bundle to MLflow as a pyfunc model.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="fine-tuning run folder, round folder or checkpoint folder")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    p.add_argument("--register", default=None, metavar="NAME", help="register the pyfunc model under NAME")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: the workspace's, see `hiceller ui --help`)")
    p.add_argument("--no-mlflow", action="store_true", help="write the bundle only")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.set_defaults(func=_export)


def _add_annotate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "annotate",
        help="label the cells of an .h5ad with a bundle (obs celler_label / celler_confidence, obsm X_celler)",
    )
    p.add_argument("--model", required=True, help="bundle folder, fine-tuning run folder, or models:/NAME/VERSION")
    p.add_argument("--input", type=Path, required=True, help="query .h5ad (counts or log-normalised)")
    p.add_argument("--output", type=Path, required=True, help="annotated .h5ad to write")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--min-confidence", type=float, default=None,
                   help="below it the label is 'Unassigned' (default: the bundle's, chosen on its validation cells)")
    p.add_argument("--gene-column", default=None, help="var column of gene ids (default: var_names, any case)")
    p.add_argument("--min-overlap", type=float, default=None, help=MIN_OVERLAP_HELP)
    p.add_argument("--probabilities", action="store_true", help="also write every class's probability (obsm celler_probabilities)")
    p.add_argument("--label-column", default=None, help="true labels, for the plot")
    p.add_argument("--plot", type=Path, default=None, help="UMAP of the embeddings, coloured by label, as PNG")
    p.add_argument("--tracking-uri", default=None, help="for models:/ URIs")
    p.add_argument("--disease-column", default=None, help="obs column of the query's diseases (default: disease, when "
                   "present); cells of a disease the model was not trained on are counted in the report")
    p.add_argument("--no-progress", action="store_true")
    _add_adapt_priors(p)
    p.set_defaults(func=_annotate)


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="<cls> cell embeddings of an .h5ad from a pretrained model (obsm X_celler), no fine-tuning",
        description="Reads the query as annotate does (gene matching, overlap check, chunks) and writes it with "
        "obsm['X_celler'], for reference mapping and integration. A pretraining run folder gives its best checkpoint "
        "by validation loss (else its newest); name a checkpoint folder for another step.",
    )
    p.add_argument("--model", required=True,
                   help="pretraining run or checkpoint folder, bundle, fine-tuning run folder (its bundle), or models:/NAME/VERSION")
    p.add_argument("--input", type=Path, required=True, help="query .h5ad (counts or log-normalised)")
    p.add_argument("--output", type=Path, required=True, help=".h5ad to write (the query with obsm X_celler)")
    p.add_argument("--batch-size", type=int, default=256, help="cells per chunk")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--gene-column", default=None, help="var column of gene ids (default: var_names, any case)")
    p.add_argument("--min-overlap", type=float, default=None, help=MIN_OVERLAP_HELP)
    p.add_argument("--tracking-uri", default=None, help="for models:/ URIs")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_embed)


def _add_adapt_priors(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapt-priors", action=argparse.BooleanOptionalAction, default=DEFAULT_ADAPT_PRIORS,
                   help="re-estimate the query's class mix by EM and re-weight the probabilities (label shift)")


def _finetune(args: argparse.Namespace) -> int:
    from finetune.run import run_finetune

    return run_finetune(args)


def _evaluate(args: argparse.Namespace) -> int:
    from finetune.commands import evaluate

    return evaluate(args)


def _annotate(args: argparse.Namespace) -> int:
    from finetune.commands import annotate

    return annotate(args)


def _embed(args: argparse.Namespace) -> int:
    from finetune.commands import embed

    return embed(args)


def _export(args: argparse.Namespace) -> int:
    from finetune.commands import export

    return export(args)


def _inspect(args: argparse.Namespace) -> int:
    from finetune.commands import inspect

    return inspect(args)
