"""`hiceller pretrain` and `hiceller ui`: their arguments; the handlers import the heavy modules
(torch, DeepSpeed, TileDB-SOMA) only when they run, so `hiceller --help` and other commands stay quick."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hiceller.errors import InputError
from pretrain.tracking import default_tracking_uri

__all__ = ["register", "add_pretrain_args"]


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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain Celler with the masked-expression objective on DeepSpeed",
        description="One process per rank: run it under the deepspeed launcher (`hiceller launch`, or "
        "`deepspeed --module pretrain ...`) for several processes, or directly for one.",
    )
    add_pretrain_args(p)
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("ui", help="serve the MLflow UI of a run folder (or tracking URI) on 127.0.0.1")
    p.add_argument("--run", type=str, default=None, help="run folder (uses its mlflow.db)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=_ui)


def _pretrain(args: argparse.Namespace) -> int:
    from pretrain.run import run_pretrain

    return run_pretrain(args)


def _ui(args: argparse.Namespace) -> int:
    if args.tracking_uri:
        uri = args.tracking_uri
    elif args.run:
        if not (Path(args.run) / "mlflow.db").is_file():
            raise InputError(f"{args.run} has no mlflow.db (is it a run folder?)")
        uri = default_tracking_uri(Path(args.run))
    else:
        raise InputError("give --run RUN_DIR or --tracking-uri URI")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)]
    print(f"MLflow UI on http://127.0.0.1:{args.port} (Ctrl-C to stop)", flush=True)
    os.execv(sys.executable, cmd)
    return 0
