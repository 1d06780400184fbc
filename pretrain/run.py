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

from hiceller.config import RunConfig, load_config
from hiceller.errors import HicellerError

__all__ = ["add_pretrain_args", "run_pretrain", "build_streams", "main"]


def add_pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="debug", help="preset name (debug, base) or TOML file (default: debug)")
    p.add_argument("--store", required=True, help="corpus store directory or s3:// URI")
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, metrics, MLflow)")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint) or a checkpoint folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite file in the run folder)")
    p.add_argument("--stop-after-steps", type=int, default=None, help="stop (with a checkpoint) after N steps of this invocation")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # added by the deepspeed launcher


def build_streams(cfg: RunConfig, store: str, rank: int, world: int, **kw):
    """This rank's data shards: shard s of rank r is rank r*S+s of a world of world*S shards."""
    from data_store.stream import CellStream
    from data_store.tokenize import Tokenizer

    tok = Tokenizer(n_bins=cfg.data.n_bins, max_genes=cfg.data.max_genes, seed=cfg.train.seed)
    S = cfg.train.data_shards_per_rank
    return [
        CellStream(
            store,
            batch_cells=cfg.train.micro_batch_cells,
            tokenizer=tok,
            seed=cfg.train.seed,
            obs_filter=cfg.data.obs_filter or None,
            block_size=cfg.data.block_size,
            buffer_blocks=cfg.data.buffer_blocks,
            rank=rank * S + s,
            world_size=world * S,
            **kw,
        )
        for s in range(S)
    ]


def run_pretrain(args: argparse.Namespace) -> int:
    from pretrain.distributed import setup_distributed

    cfg = load_config(args.config, args.overrides)
    dist = setup_distributed()
    import torch

    from data_store.store import CorpusStore
    from pretrain import checkpoint as ckpt
    from pretrain.loop import train
    from pretrain.model import CellerModel, count_parameters
    from pretrain.task import PretrainTask
    from pretrain.tracking import Tracker

    out: Path = args.out
    store = CorpusStore.open(args.store)
    vocab = list(store.vocabulary())
    resume = args.resume
    if resume == "auto" and ckpt.latest_complete(out) is None:
        resume = None
    # An explicit --resume that does not resolve fails before the run folder is written.
    cp = ckpt.resolve_checkpoint(Path(resume)) if resume not in (None, "auto") else None
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # With --resume auto and only incomplete checkpoints (killed while saving the first one) it
        # starts over: the next save overwrites or prunes them.
        if args.resume is None and ckpt.list_checkpoints(out, complete_only=False):
            raise HicellerError(f"run folder {out} already has checkpoints: pass --resume auto, or use a new --out")
        (out / "config.toml").write_text(cfg.to_toml())
        (out / "vocab.json").write_text(json.dumps(vocab))
    if resume is not None:
        # The model size must match the checkpoint's, whatever the store has gained since.
        cp = cp or ckpt.resolve_checkpoint(out)
        vocab = json.loads((cp / "vocab.json").read_text())
    torch.manual_seed(cfg.train.seed)
    model = CellerModel(cfg.model, n_genes=len(vocab), n_bins=cfg.data.n_bins)
    if cfg.deepspeed.activation_checkpointing:
        from pretrain.parallelize import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    task = PretrainTask(model, cfg.train.mask_ratios)
    # Store genes the model does not know (added to the store after its vocabulary) are dropped.
    n_store = len(store.vocabulary())
    gene_map = np.where(np.arange(n_store) < len(vocab), np.arange(n_store), -1)
    streams = build_streams(cfg, args.store, dist.rank, dist.world_size, gene_map=gene_map)
    tracker = Tracker(out, enabled=dist.is_main, tracking_uri=args.tracking_uri, run_name=f"pretrain-{out.name}")
    if dist.is_main:
        from pretrain.flops import model_flops_per_token

        tracker.log_params(cfg.flat())
        tracker.set_tags(
            {
                "kind": "pretrain",
                "run_dir": out.resolve(),
                "store": args.store,
                "world_size": dist.world_size,
                "n_genes": len(vocab),
                "parameters": count_parameters(model),
                "flops_per_token": f"{model_flops_per_token(cfg.model, cfg.data.max_genes / 2, len(vocab)):.4g}",
            }
        )
        print(
            f"pretraining {count_parameters(model):,} parameters on {streams[0].n_cells:,} cells, "
            f"{dist.world_size} rank(s), {len(streams[0])} batches per shard per epoch",
            flush=True,
        )

    def vocab_file(cp: Path) -> None:
        (cp / "vocab.json").write_text(json.dumps(vocab))

    status = "FAILED"
    try:
        result = train(
            cfg,
            task,
            streams,
            out,
            dist,
            tracker,
            resume=resume,
            stop_after_steps=args.stop_after_steps,
            extra_checkpoint_files=vocab_file,
            progress=not args.no_progress,
        )
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
    path = out / "metrics.jsonl"
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            from pretrain.plots import plot_loss_curve

            png = plot_loss_curve(rows, out / "loss_curve.png")
            tracker.log_artifact(png)
            tracker.log_artifact(path)
    tracker.finish(status)


def main(argv: list[str] | None = None) -> int:
    from hiceller.cli import module_main

    return module_main("pretrain", "Pretrain Celler (one process per rank).", add_pretrain_args, run_pretrain, argv)

if __name__ == "__main__":
    sys.exit(main())
