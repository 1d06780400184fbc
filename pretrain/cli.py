"""`hiceller pretrain` and `hiceller ui`: their arguments; the handlers import the heavy modules
(torch, DeepSpeed, TileDB-SOMA) only when they run, so `hiceller --help` and other commands stay quick."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from hiceller.errors import InputError
from pretrain.tracking import EXPERIMENT, RUN_ID_FILE, resolve_tracking_uri

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
        help="pretrain Celler (masked, generative or both objectives) on DeepSpeed",
        description="One process per rank: run it under the deepspeed launcher (`hiceller launch`, or "
        "`deepspeed --module pretrain ...`) for several processes, or directly for one.",
    )
    add_pretrain_args(p)
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("ui", help="serve the MLflow UI of this workspace (or of a run folder / tracking URI) on 127.0.0.1",
                       description="Every command logs to one tracking store (pretrain/tracking.py): --tracking-uri, "
                       "else MLFLOW_TRACKING_URI, else ./mlflow.db of the workspace ($HICELLER_WORKSPACE or here).")
    p.add_argument("--run", type=Path, default=None, help="a run folder: the store it logs to")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=_ui)


def _pretrain(args: argparse.Namespace) -> int:
    from pretrain.run import run_pretrain

    return run_pretrain(args)


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def ui_url(uri: str, port: int) -> str:
    """The address that opens HiCeller's experiment in MLflow's model-training view. MLflow 3 shows an
    experiment in the view the URL's ``workflowType`` names, else the browser's last choice (GenAI
    on first use): the experiment's kind tag alone does not switch it."""
    import mlflow

    exp = mlflow.MlflowClient(uri).get_experiment_by_name(EXPERIMENT)
    page = f"experiments/{exp.experiment_id}/runs" if exp is not None else ""
    return f"http://127.0.0.1:{port}/#/{page}?workflowType=machine_learning"


def _ui(args: argparse.Namespace) -> int:
    if args.run is not None and not (args.run / RUN_ID_FILE).is_file():
        raise InputError(f"{args.run} has no MLflow run (is it a HiCeller run folder?)")
    uri = resolve_tracking_uri(args.tracking_uri, args.run)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise InputError(f"no tracking store at {uri} (run a command here first, or give --run / --tracking-uri)")
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1-65535, got {args.port}")
    if _port_taken(args.port):
        raise InputError(f"port {args.port} on 127.0.0.1 is in use; choose another with --port")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)]
    print(f"MLflow UI of {uri} on {ui_url(uri, args.port)} (Ctrl-C to stop)", flush=True)
    os.execv(sys.executable, cmd)
    return 0
