"""`hiceller finetune` / `python -m finetune`: tissue fine-tuning, then hard-mining rounds.

    select the tissue's labelled cells -> split (by donor when known) -> phase 1 on the train split
    -> R mining rounds (hard set + replay, finetune/mining.py) until validation macro-F1 stops
    improving -> the best round's weights -> test metrics -> RUN/model (a bundle)

Every phase runs through the pretraining loop (pretrain/loop.py) with a ClassifierTask, DeepSpeed
included. MLflow: the fine-tuning run is the parent; phase 1 and every round are child runs with
their metrics, hard-set make-up and artifacts (confusion matrix, per-class F1, hard cell ids).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hiceller.config import RunConfig, load_config, override_keys
from hiceller.errors import HicellerError, InputError

__all__ = ["add_finetune_args", "run_finetune", "main"]


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
    p.add_argument("--query-genes", type=Path, default=None,
                   help="train on the genes this query measures only: an .h5ad (its var_names) or a text file, one gene per line")
    p.add_argument("--min-gene-overlap", type=float, default=0.25, help="least share of the store's genes the pretrained vocabulary must know")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def _barrier(dist) -> None:
    import torch

    if dist.world_size > 1:
        torch.distributed.barrier()


def _variable_genes(cfg: RunConfig, dist, store, train_joinids: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Store gene ids of the ``finetune.n_hvg`` most variable training genes: read and computed once,
    on rank 0, and sent to the other ranks (it is a pass over every training cell's X)."""
    import torch

    from finetune.genes import highly_variable_genes

    hv = [None]
    if dist.is_main:
        print(f"selecting the {cfg.finetune.n_hvg} most variable genes over {len(train_joinids)} training cells", flush=True)
        hv = [highly_variable_genes(store, train_joinids, cfg.finetune.n_hvg, candidates=candidates)]
    if dist.world_size > 1:
        torch.distributed.broadcast_object_list(hv, src=0)
    return hv[0]


def _select_cells(store, tissue: str | None, label_column: str) -> pd.DataFrame:
    if label_column != "cell_type":
        raise InputError(f"store obs has no label column {label_column!r}: store labels are in 'cell_type'")
    value_filter = None
    if tissue:
        tissues = store.summary()["cells_per_tissue"]
        if tissue not in tissues:
            raise InputError(f"tissue {tissue!r} is not in store {store.uri} (tissues: {', '.join(sorted(tissues)) or 'none'})")
        value_filter = f"tissue == {json.dumps(tissue)}"
    obs = store.obs(column_names=["cell_type", "donor_id", "dataset_id", "tissue"], value_filter=value_filter)
    labeled = {d.dataset_id for d in store.complete_datasets() if d.labeled}
    obs = obs[obs["dataset_id"].isin(labeled)].reset_index(drop=True)
    if obs.empty:
        raise InputError(f"store {store.uri} has no labelled cell" + (f" in tissue {tissue!r}" if tissue else ""))
    return obs.sort_values("soma_joinid").reset_index(drop=True)


def run_finetune(args: argparse.Namespace) -> int:
    from pretrain.distributed import setup_distributed

    cfg = load_config(args.config, args.overrides)
    out: Path = args.out
    if not 0 <= args.min_gene_overlap <= 1:
        raise InputError(f"--min-gene-overlap must be in [0, 1], got {args.min_gene_overlap}")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"run folder {out} is not empty; choose a new --out")
    if args.h5ad is not None and not args.h5ad.is_file():
        raise InputError(f"{args.h5ad}: file does not exist")
    from finetune.genes import read_query_genes

    query_genes = read_query_genes(args.query_genes) if args.query_genes is not None else None
    from finetune.weights import load_pretrained

    pre = load_pretrained(args.pretrained)
    cfg = _follow_pretrained(cfg, pre, args.overrides)
    dist = setup_distributed()
    import torch

    from data_store.store import CorpusStore

    store_uri = args.store
    if args.h5ad is not None:
        store_uri = str(out / "store")
        if dist.is_main:
            from data_store.ingest import IngestOptions, ingest_files

            ingest_files(store_uri, [args.h5ad], IngestOptions(label_column=args.label_column, batch_column=args.batch_column, tissue=args.tissue))
        _barrier(dist)
        label_column = "cell_type"
    else:
        label_column = args.label_column
    store = CorpusStore.open(store_uri)
    obs = _select_cells(store, args.tissue, label_column)

    # Genes: store vocabulary id -> pretrained vocabulary id.
    store_vocab = list(store.vocabulary())
    index = {g: i for i, g in enumerate(pre.vocab)}
    gene_map = np.array([index.get(g, -1) for g in store_vocab], dtype=np.int64)
    overlap = float((gene_map >= 0).mean()) if len(gene_map) else 0.0
    if overlap < args.min_gene_overlap:
        raise InputError(
            f"only {overlap:.1%} of the store's {len(store_vocab)} genes are in the pretrained vocabulary "
            f"({len(pre.vocab)} genes); minimum {args.min_gene_overlap:.0%} (--min-gene-overlap)"
        )

    from finetune.splits import make_split

    labels_all = obs["cell_type"].astype(str).to_numpy()
    donors = obs["donor_id"].astype(str).to_numpy()
    has_donors = not np.all(donors == "unknown")
    split = make_split(
        labels_all,
        donors=donors if has_donors else None,
        holdout_donors=args.holdout_donors if has_donors else None,
        val_fraction=cfg.finetune.val_fraction,
        seed=cfg.train.seed,
    )
    if args.holdout_donors and not has_donors:
        raise InputError("--holdout-donors given, but the cells have no donor ids")
    joinids = obs["soma_joinid"].to_numpy()
    names = sorted(set(labels_all[split.train_idx]))
    counts = np.array([(labels_all[split.train_idx] == n).sum() for n in names])
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        split.save(out / "split.parquet", joinids=joinids)
        for note in split.notes:
            print(f"warning: {note}", file=sys.stderr)
    from finetune.task import ClassifierTask
    from pretrain.model import CellerModel
    from pretrain.tracking import Tracker

    def fresh_task(state: dict[str, torch.Tensor], with_head: bool) -> ClassifierTask:
        torch.manual_seed(cfg.train.seed)
        model = CellerModel(pre.model_cfg, n_genes=len(pre.vocab), n_bins=pre.n_bins)
        task = ClassifierTask(
            model, len(names), cfg.finetune.loss, counts, cfg.finetune.ginf_mu, cfg.finetune.ginf_sigma, head=cfg.finetune.head
        )
        if with_head:
            task.load_state_dict(state, strict=True)
        else:
            enc = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
            model.load_state_dict(enc, strict=True)
        if cfg.finetune.freeze_encoder:
            for p in task.model.parameters():
                p.requires_grad_(False)
        return task

    input_genes = None
    if query_genes is not None:
        gene_map = _restrict_to_query(gene_map, store_vocab, query_genes)
        input_genes = [pre.vocab[i] for i in np.unique(gene_map[gene_map >= 0])]
    if cfg.finetune.n_hvg:
        hv = _variable_genes(cfg, dist, store, joinids[split.train_idx], np.flatnonzero(gene_map >= 0))
        kept = gene_map[hv]
        gene_map = np.full_like(gene_map, -1)
        gene_map[hv] = kept
        input_genes = [pre.vocab[i] for i in np.unique(kept)]
    ctx = _Context(cfg, args, dist, store_uri, joinids, labels_all, names, counts, gene_map, pre, out, input_genes)
    parent = Tracker(out, enabled=dist.is_main, tracking_uri=args.tracking_uri, run_name=f"finetune-{args.tissue or 'all'}")
    if dist.is_main:
        parent.log_params({**cfg.flat(), "tissue": args.tissue, "pretrained": str(pre.source), "n_classes": len(names)})
        parent.set_tags({"kind": "finetune", "run_dir": out.resolve(), "split": split.strategy})
        print(
            f"fine-tuning on {len(split.train_idx)} train / {len(split.val_idx)} val / {len(split.test_idx)} test cells, "
            f"{len(names)} classes, loss {cfg.finetune.loss}, split {split.strategy}, "
            + (f"{len(input_genes)} most variable genes" if input_genes else "all genes"),
            flush=True,
        )
    status = "FAILED"
    try:
        best = _phases(ctx, split, fresh_task, parent)
        status = "FINISHED"
    finally:
        if dist.is_main:
            parent.finish(status)
    if dist.is_main:
        print(f"best round {best['round']}: val macro-F1 {best['val']['macro_f1']:.3f}; bundle {out / 'model'}", flush=True)
        if best.get("test"):
            t = best["test"]
            rare = "n/a" if t.get("rare_class_f1") is None else f"{t['rare_class_f1']:.3f}"
            print(f"test: accuracy {t['accuracy']:.3f}, macro-F1 {t['macro_f1']:.3f}, rare-class F1 {rare}", flush=True)
    return 0


def _restrict_to_query(gene_map: np.ndarray, store_vocab: list[str], wanted: set[str]) -> np.ndarray:
    """``gene_map`` with every store gene the query does not measure (``--query-genes``) mapped to -1."""
    measured = np.array([g.upper() in wanted for g in store_vocab], dtype=bool)
    restricted = np.where(measured, gene_map, -1)
    n = int((restricted >= 0).sum())
    if n == 0:
        raise InputError(f"--query-genes: none of the query's {len(wanted)} genes is both in the training cells and in the pretrained vocabulary")
    print(f"reading the {n} genes shared by the query ({len(wanted)} genes), the training cells and the pretrained vocabulary", flush=True)
    return restricted


def _follow_pretrained(cfg: RunConfig, pre: Any, overrides: list[str]) -> RunConfig:
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
    return dataclasses.replace(
        cfg, model=pre.model_cfg, data=dataclasses.replace(cfg.data, n_bins=pre.n_bins, max_genes=max_genes)
    )


@dataclasses.dataclass
class _Context:
    cfg: RunConfig
    args: argparse.Namespace
    dist: Any
    store_uri: str
    joinids: np.ndarray
    labels: np.ndarray
    names: list[str]
    counts: np.ndarray
    gene_map: np.ndarray
    pre: Any
    out: Path
    input_genes: list[str] | None = None
    """Vocabulary genes the classifier reads (``finetune.n_hvg``); None = all."""

    def stream(self, idx: np.ndarray, shuffle: bool, rank: int | None = None, world: int | None = None):
        from data_store.stream import CellStream
        from data_store.tokenize import Tokenizer

        return CellStream(
            self.store_uri,
            batch_cells=self.cfg.train.micro_batch_cells,
            tokenizer=Tokenizer(n_bins=self.cfg.data.n_bins, max_genes=self.cfg.data.max_genes, seed=self.cfg.train.seed),
            shuffle=shuffle,
            seed=self.cfg.train.seed if shuffle else None,
            joinids=self.joinids[idx],
            labels=True,
            label_names=self.names,
            block_size=self.cfg.data.block_size,
            buffer_blocks=self.cfg.data.buffer_blocks,
            remainder="wrap",
            gene_map=self.gene_map,
            rank=self.dist.rank if rank is None else rank,
            world_size=self.dist.world_size if world is None else world,
        )


def _phases(ctx: _Context, split, fresh_task, parent) -> dict[str, Any]:
    from finetune.mining import BestRoundTracker, HardMiner, HardMiningRule
    from pretrain.loop import full_state_dict, train

    cfg, dist = ctx.cfg, ctx.dist
    fcfg = cfg.finetune
    state = ctx.pre.state_dict
    task = fresh_task(state, with_head=False)
    tracker_best = BestRoundTracker(patience=fcfg.mining_patience)
    best: dict[str, Any] = {}
    train_idx = split.train_idx
    miner = HardMiner(HardMiningRule.from_config(fcfg))
    rng = np.random.default_rng(cfg.train.seed)
    hard = scores = None  # the mining selection that round rnd > 0 trains on
    for rnd in range(0, fcfg.mining_rounds + 1):
        name = "phase1" if rnd == 0 else f"round{rnd}"
        run_dir = ctx.out / name
        stream = ctx.stream(train_idx, shuffle=True)
        epochs = fcfg.epochs if rnd == 0 else fcfg.mining_epochs
        steps = max(1, epochs * len(stream) // cfg.train.grad_accum)
        rcfg = dataclasses.replace(
            cfg,
            train=dataclasses.replace(
                cfg.train, steps=steps, checkpoint_every=steps, warmup_steps=min(cfg.train.warmup_steps, steps // 10), data_shards_per_rank=1,
                lr=cfg.train.lr * (1.0 if rnd == 0 else fcfg.mining_lr_scale),
            ),
        )
        child = parent.child(run_dir, f"{name}", "mlflow_run_id") if dist.is_main else parent
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            child.log_params({"round": rnd, "train_cells": len(train_idx), "steps": steps, "epochs": epochs, "lr": rcfg.train.lr})

        def save_labels(cp: Path) -> None:
            (cp / "vocab.json").write_text(json.dumps(ctx.pre.vocab))
            labels = {"names": ctx.names, "train_counts": ctx.counts.tolist()}
            if ctx.input_genes is not None:
                labels["input_genes"] = ctx.input_genes
            (cp / "labels.json").write_text(json.dumps(labels))

        result = train(rcfg, task, [stream], run_dir, dist, child, extra_checkpoint_files=save_labels, progress=not ctx.args.no_progress, log_prefix=f"{name} ")
        state = full_state_dict(result.engine)
        del result
        eval_task = fresh_task(state, with_head=True)
        val = _evaluate(ctx, eval_task, split.val_idx)
        if dist.is_main:
            _log_eval(child, val, run_dir, "val")
            child.log_metrics({f"val_{k}": v for k, v in _scalars(val["report"]).items()}, step=rnd)
        if hard is not None and dist.is_main:
            child.log_metrics({"hard_set_size": float(len(hard.hard_idx)), "replay_size": float(len(hard.replay_idx))}, step=rnd)
            child.log_params({"hard_composition": json.dumps(hard.composition)[:5000]})
            frame = hard.to_frame(ctx.labels[split.train_idx], scores, joinids=ctx.joinids[split.train_idx])
            frame.to_parquet(run_dir / "hard_cells.parquet")
            child.log_artifact(run_dir / "hard_cells.parquet")
        if dist.is_main:
            child.finish()
            r = val["report"]
            rare = "n/a" if r.get("rare_class_f1") is None else f"{r['rare_class_f1']:.3f}"
            print(f"{name}: {len(train_idx)} training cells, val accuracy {r['accuracy']:.3f}, macro-F1 {r['macro_f1']:.3f}, rare-class F1 {rare}", flush=True)
        improved = val["report"]["macro_f1"] > best.get("val", {}).get("macro_f1", -1.0)
        if improved:
            best = {"round": rnd, "val": val["report"], "state": state}
        go_on = tracker_best.update(rnd, val["report"]["macro_f1"])
        if rnd == fcfg.mining_rounds or not go_on:
            break
        # Mining: score every training cell with the current weights; next round trains on the
        # hard set plus a replay sample, starting from these weights.
        pred = _predict(ctx, eval_task, split.train_idx)
        y = _label_ids(ctx, split.train_idx)
        scores = miner.score(pred["logits"], y)
        hard = miner.select(scores, y, rng)
        if len(hard.hard_idx) == 0:
            if dist.is_main:
                print(f"no hard cell left after {name}: mining stops", flush=True)
            break
        train_idx = split.train_idx[hard.train_idx]
        task = fresh_task(state, with_head=True)
    # Best round's weights -> test metrics -> bundle.
    final = fresh_task(best["state"], with_head=True)
    test = _evaluate(ctx, final, split.test_idx) if len(split.test_idx) else None
    best_out = {"round": best["round"], "val": best["val"], "test": test["report"] if test else None}
    if dist.is_main:
        parent.log_metrics({"best_round": float(best["round"]), **{f"best_val_{k}": v for k, v in _scalars(best["val"]).items()}}, step=0)
        if test:
            parent.log_metrics({f"test_{k}": v for k, v in _scalars(test["report"]).items()}, step=0)
            _log_eval(parent, test, ctx.out, "test")
        parent.set_tags({"best_round": best["round"]})
        _write_bundle(ctx, best["state"], best_out)
        (ctx.out / "summary.json").write_text(json.dumps(best_out, indent=1, default=float))
    _barrier(dist)
    return best_out


def _label_ids(ctx: _Context, idx: np.ndarray) -> np.ndarray:
    lookup = {n: i for i, n in enumerate(ctx.names)}
    return np.array([lookup.get(x, -100) for x in ctx.labels[idx]], dtype=np.int64)


def _predict(ctx: _Context, task, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Logits of the cells ``idx`` in that order (every rank computes the same)."""
    from finetune.task import predict_logits

    stream = ctx.stream(idx, shuffle=False, rank=0, world=1)
    pred = predict_logits(task, stream, ctx.dist.device if ctx.dist.device.type == "cuda" else __import__("torch").device("cpu"))
    # wrap mode may repeat cells to fill the last batch: keep the first occurrence, in idx order
    pos = {j: i for i, j in enumerate(pred["joinids"].tolist()[::-1])}
    n = len(pred["joinids"])
    order = np.array([n - 1 - pos[j] for j in ctx.joinids[idx].tolist()])
    return {k: v[order] for k, v in pred.items()}


def _evaluate(ctx: _Context, task, idx: np.ndarray) -> dict[str, Any]:
    from finetune.metrics import labelled_report, softmax

    if len(idx) == 0:
        raise HicellerError("nothing to evaluate: the validation split is empty")
    pred = _predict(ctx, task, idx)
    y = _label_ids(ctx, idx)
    proba = softmax(pred["logits"])
    report = labelled_report(y, proba, ctx.names, ctx.counts, ctx.cfg.finetune.rare_class_threshold)
    known = y >= 0
    return {
        "report": report,
        "y": y[known],
        "pred": proba[known].argmax(1),
        "joinids": ctx.joinids[idx][known],
        "proba": proba[known],
        "class_names": ctx.names,
    }


def _scalars(report: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}


def _log_eval(tracker, ev: dict[str, Any], run_dir: Path, prefix: str) -> None:
    from finetune.metrics import write_eval_artifacts

    for f in write_eval_artifacts(ev["report"], ev["y"], ev["pred"], ev["class_names"], run_dir, f"{prefix}_"):
        tracker.log_artifact(f)


def _write_bundle(ctx: _Context, state, summary: dict[str, Any]) -> None:
    from finetune.bundle import write_bundle

    write_bundle(
        ctx.out / "model",
        {k: v for k, v in state.items() if not k.startswith("ginf.")},
        ctx.pre.model_cfg,
        ctx.cfg.data.n_bins,
        ctx.cfg.data.max_genes,
        ctx.pre.vocab,
        ctx.names,
        ctx.counts.tolist(),
        metrics=summary,
        extra_config={"loss": ctx.cfg.finetune.loss, "head": ctx.cfg.finetune.head, "pretrained": str(ctx.pre.source)},
        input_genes=ctx.input_genes,
    )


def main(argv: list[str] | None = None) -> int:
    from hiceller.cli import module_main

    return module_main("finetune", "Fine-tune Celler on a tissue (one process per rank).", add_finetune_args, run_finetune, argv)

if __name__ == "__main__":
    sys.exit(main())
