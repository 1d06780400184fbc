"""`hiceller pretrain` / `python -m pretrain`: build model, streams and tracker, then run the loop.

Every rank runs this same function (the deepspeed launcher starts one process per GPU, or per
CPU slot with DS_ACCELERATOR=cpu); rank 0 alone writes the run folder's shared files and MLflow.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from data_store.gene_map import map_genes
from data_store.store import CorpusStore
from data_store.stream import stream_from_config
from hiceller.config import RunConfig, load_config
from hiceller.errors import HicellerError
from pretrain import layout
from pretrain.distributed import setup_distributed
from pretrain.flops import model_flops_per_token
from pretrain.layout import ModelSpec
from pretrain.loop import train
from pretrain.model import CellerModel, count_parameters
from pretrain.parallelize import apply_activation_checkpointing
from pretrain.plots import plot_loss_curve
from pretrain.task import PretrainTask
from pretrain.tracking import Tracker
from pretrain.validation import Validator, hold_out

__all__ = ["run_pretrain", "build_streams", "share_cell_lengths"]


def build_streams(cfg: RunConfig, store: str, rank: int, world: int, **kw):
    """This rank's data shards: shard s of rank r is rank r*S+s of a world of world*S shards."""
    S = cfg.train.data_shards_per_rank
    return [stream_from_config(cfg, store, rank=rank * S + s, world_size=world * S, **kw) for s in range(S)]


def share_cell_lengths(streams, dist) -> None:
    """Token-budget streams need every selected cell's token count: each rank reads the X of 1/world
    of the cells (a contiguous part: range reads) and the parts are gathered, so a rank's start-up
    read stays 1/world of the corpus instead of all of it (data_store/token_budget.py)."""
    s = streams[0]
    if s.batch_tokens is None or dist.world_size == 1:
        return
    bounds = np.linspace(0, s.n_cells, dist.world_size + 1).astype(np.int64)
    parts = [None] * dist.world_size
    torch.distributed.all_gather_object(parts, s.cell_lengths(slice(bounds[dist.rank], bounds[dist.rank + 1])))
    lengths = np.concatenate(parts)
    for st in streams:  # every shard of this rank selects the same cells
        st.set_cell_lengths(lengths)


def _resume_spec(cfg: RunConfig, out: Path, resume: str | None, vocab: list[str]) -> tuple[str | None, ModelSpec]:
    """(what to resume from, the model's spec). A resumed model keeps the vocabulary of its
    checkpoint, whatever the store has gained since; an explicit --resume that does not resolve fails
    here, before the run folder is written."""
    if resume == "auto" and layout.latest_complete(out) is None:
        resume = None  # nothing to resume yet (or only a checkpoint killed while saving): start over
    if resume is not None:
        vocab = layout.read_spec(layout.resolve_checkpoint(out if resume == "auto" else Path(resume)))[0].vocab
    return resume, ModelSpec(cfg.model, cfg.data.n_bins, cfg.data.max_genes, vocab)


def _start_run_folder(cfg: RunConfig, out: Path, resume_flag: str | None, vocab: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if resume_flag is None and layout.list_checkpoints(out, complete_only=False):
        raise HicellerError(f"run folder {out} already has checkpoints: pass --resume auto, or use a new --out")
    layout.write_run_files(out, cfg, vocab)


def _describe(cfg: RunConfig, model: CellerModel, streams, dist, tracker: Tracker, args, out: Path, n_genes: int) -> None:
    tracker.log_params(cfg.flat())
    tracker.set_tags({
        "kind": "pretrain", "run_dir": out.resolve(), "store": args.store, "world_size": dist.world_size, "n_genes": n_genes,
        "parameters": count_parameters(model),
        "flops_per_token": f"{model_flops_per_token(cfg.model, cfg.data.max_genes / 2, n_genes):.4g}",
    })
    print(f"pretraining {count_parameters(model):,} parameters on {streams[0].n_cells:,} cells, "
          f"{dist.world_size} rank(s), {len(streams[0])} batches per shard per epoch", flush=True)


def run_pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    dist = setup_distributed()
    out: Path = args.out
    store = CorpusStore.open(args.store)
    store_vocab = list(store.vocabulary())
    resume, spec = _resume_spec(cfg, out, args.resume, store_vocab)
    if dist.is_main:
        _start_run_folder(cfg, out, args.resume, store_vocab)
    torch.manual_seed(cfg.train.seed)
    model = CellerModel(cfg.model, n_genes=len(spec.vocab), n_bins=cfg.data.n_bins)
    if cfg.deepspeed.activation_checkpointing:
        apply_activation_checkpointing(model)
    task = PretrainTask(model, cfg.train.mask_ratios, cfg.train.objective)
    # Store genes the model does not know (added to the store after its vocabulary) are dropped.
    gene_map = map_genes(store_vocab, spec.vocab, upper=False).ids
    # Validation holds cells out of every training shard (the same split on every rank).
    held = hold_out(store, cfg) if cfg.validation.every else None
    streams = build_streams(cfg, args.store, dist.rank, dist.world_size, gene_map=gene_map, **(held.train if held else {}))
    share_cell_lengths(streams, dist)
    tracker = Tracker(out, enabled=dist.is_main, tracking_uri=args.tracking_uri, run_name=f"pretrain-{out.name}")
    if dist.is_main:
        _describe(cfg, model, streams, dist, tracker, args, out, len(spec.vocab))
    validator = Validator(cfg, task, held, args.store, dist, gene_map) if held else None
    status = "FAILED"
    try:
        result = train(cfg, task, streams, out, dist, tracker, spec=spec, resume=resume,
                       stop_after_steps=args.stop_after_steps, progress=not args.no_progress, validator=validator)
        status = "FINISHED" if not result.stopped_early else "KILLED"
    finally:
        if dist.is_main:
            try:
                _finish(out, tracker, status)
            except Exception as e:
                if status != "FAILED":
                    raise
                # Report the error that stopped training, not this one (a full disk fails both).
                print(f"hiceller pretrain: warning: could not close the MLflow run: {e}", file=sys.stderr, flush=True)
    if dist.is_main:
        print(f"pretraining stopped at step {result.step}; checkpoint {result.last_checkpoint}", flush=True)
    return 0


def _finish(out: Path, tracker, status: str) -> None:
    """Loss curve plot from metrics.jsonl, logged as an artifact; the MLflow run is closed."""
    path = out / layout.METRICS
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            png = plot_loss_curve(rows, out / "loss_curve.png")
            tracker.log_artifact(png)
            tracker.log_artifact(path)
    tracker.finish(status)
