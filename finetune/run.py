"""`hiceller finetune` / `python -m finetune`: tissue fine-tuning, then hard-mining rounds.

    the pretrained model (pretrain/layout.py: a run, a checkpoint or a bundle)
    -> the cells, labels, split and genes read (finetune/data.py)
    -> phase 1 and the mining rounds, the best round's bundle (finetune/rounds.py)

MLflow: the fine-tuning run is the parent; phase 1 and every round are child runs with their
metrics, hard-set make-up and artifacts (confusion matrix, per-class F1, hard cell ids).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

from finetune.data import prepare_data
from finetune.genes import read_query_genes
from finetune.rounds import RoundContext, finish, run_rounds
from hiceller.config import RunConfig, load_config, override_keys
from hiceller.paths import check_output_dir
from hiceller.errors import HicellerError, InputError
from pretrain.distributed import setup_distributed
from pretrain.layout import BUNDLE_DIR, ModelSpec, load_trained, run_folder_of
from pretrain.tracking import Tracker, resolve_tracking_uri, run_id_of

__all__ = ["follow_pretrained", "run_finetune"]


def _check_args(args: argparse.Namespace) -> set[str] | None:
    """Everything about the command line that can be refused before any work; the query's genes."""
    if not 0 <= args.min_gene_overlap <= 1:
        raise InputError(f"--min-gene-overlap must be in [0, 1], got {args.min_gene_overlap}")
    check_output_dir(args.out, "--out", must_be_empty=True)
    if args.h5ad is not None and not args.h5ad.is_file():
        raise InputError(f"{args.h5ad}: file does not exist")
    if not args.pretrained.exists():
        raise InputError(f"--pretrained {args.pretrained} does not exist")
    return read_query_genes(args.query_genes) if args.query_genes is not None else None


def follow_pretrained(cfg: RunConfig, pre: ModelSpec, overrides: list[str]) -> RunConfig:
    """The run's config with the pretrained model's architecture and value bins.

    The encoder's shape and its value encoder's bins are fixed by the weights, so ``model.*`` and
    ``data.n_bins`` come from the pretrained model; an override asking for something else is an
    error, not silently ignored. ``data.max_genes`` may differ (genes carry no positions, so the
    encoder takes cells of any length): the pretrained value is the default, ``--set
    data.max_genes=N`` fine-tunes (and the bundle annotates) with up to N genes per cell.
    """
    given = override_keys(overrides)
    for key in sorted(given):
        section, _, name = key.partition(".")
        if section == "model" and getattr(cfg.model, name) != getattr(pre.model_cfg, name):
            raise InputError(f"--set {key}: the architecture comes from the pretrained model ({name} = {getattr(pre.model_cfg, name)!r})")
        if key == "data.n_bins" and cfg.data.n_bins != pre.n_bins:
            raise InputError(f"--set data.n_bins={cfg.data.n_bins}: the pretrained model was trained with {pre.n_bins} bins")
    max_genes = cfg.data.max_genes if "data.max_genes" in given else pre.max_genes
    return dataclasses.replace(cfg, model=pre.model_cfg, data=dataclasses.replace(cfg.data, n_bins=pre.n_bins, max_genes=max_genes))


def _announce(ctx: RoundContext, parent: Tracker, args: argparse.Namespace) -> None:
    cfg, data, split = ctx.cfg, ctx.data, ctx.data.split
    parent.log_params({**cfg.flat(), "tissue": args.tissue, "pretrained": str(ctx.pretrained.source), "n_classes": len(data.names)})
    parent.set_tags({"kind": "finetune", "run_dir": ctx.out.resolve(), "split": split.strategy,
                     "train_diseases": ", ".join(data.train_diseases or [])[:5000]})
    genes = f"{len(data.input_genes)} genes read" if data.input_genes else "all genes"
    print(f"fine-tuning on {len(split.train_idx)} train / {len(split.val_idx)} val / {len(split.test_idx)} test cells, "
          f"{len(data.names)} classes, loss {cfg.finetune.loss}, head {cfg.finetune.head}, split {split.strategy}, {genes}", flush=True)
    if args.holdout_diseases or args.diseases:
        held = f"; held out as test: {', '.join(args.holdout_diseases)}" if args.holdout_diseases else ""
        print(f"diseases trained on: {', '.join(data.train_diseases or [])}{held}", flush=True)


def _print_result(out: Path, summary: dict) -> None:
    print(f"best round {summary['round']}: val macro-F1 {summary['val']['macro_f1']:.3f}; bundle {out / BUNDLE_DIR}", flush=True)
    if summary.get("test"):
        t = summary["test"]
        rare = "n/a" if t.get("rare_class_f1") is None else f"{t['rare_class_f1']:.3f}"
        print(f"test: accuracy {t['accuracy']:.3f}, macro-F1 {t['macro_f1']:.3f}, rare-class F1 {rare}", flush=True)


def _empty(folder: Path, remove: bool) -> None:
    if remove:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _pretraining_run(pretrained, args: argparse.Namespace) -> str | None:
    """The MLflow run of the pretraining run folder the weights come from, when it logs to the same
    store: the fine-tuning run is nested under it, so one UI shows a pretraining with its fine-tunings."""
    folder = run_folder_of(pretrained.source)
    return None if folder is None else run_id_of(folder, resolve_tracking_uri(args.tracking_uri, args.out))


def run_finetune(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    query_genes = _check_args(args)
    pretrained = load_trained(args.pretrained)
    cfg = follow_pretrained(cfg, pretrained.spec, args.overrides)
    dist = setup_distributed()
    created = not args.out.exists()
    if dist.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
    try:
        data = prepare_data(args, cfg, pretrained.spec.vocab, dist, args.out, query_genes)
    except HicellerError:
        # Refused before any training: leave --out as it was, so the fixed command can re-run into it.
        if dist.is_main:
            _empty(args.out, remove=created)
        raise
    ctx = RoundContext(cfg, dist, data, pretrained, args.out, progress=not args.no_progress)
    parent = Tracker(args.out, enabled=dist.is_main, tracking_uri=args.tracking_uri, run_name=f"finetune-{args.tissue or 'all'}",
                     parent_run_id=_pretraining_run(pretrained, args))
    if dist.is_main:
        _announce(ctx, parent, args)
    status = "FAILED"
    try:
        summary = finish(ctx, run_rounds(ctx, parent), parent)
        status = "FINISHED"
    finally:
        if dist.is_main:
            parent.finish(status)
    if dist.is_main:
        _print_result(args.out, summary)
    return 0
