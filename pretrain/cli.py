"""`hiceller pretrain` and `hiceller ui`."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    from pretrain.run import add_pretrain_args

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
    import os
    import sys
    from pathlib import Path

    from hiceller.errors import InputError
    from pretrain.tracking import default_tracking_uri

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
