"""Subcommands of ``cluster/``: ``launch``, ``doctor`` and ``cluster {slurm,ds-config}``.

Importing this module is cheap (no torch): ``hiceller --help`` builds every parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hiceller.errors import InputError

__all__ = ["register", "build_parser", "main"]


def _add_config_args(p: argparse.ArgumentParser, default: str | None = "debug") -> None:
    p.add_argument("--config", default=default, help=f"preset name or TOML file (default: {default})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set deepspeed.zero_stage=3 (repeatable)")


def _add_launch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="write the run directory and start (or print) the deepspeed launcher",
                       description="Write RUN/config.toml, RUN/ds_config.json and RUN/.deepspeed_env, "
                                   "then exec the deepspeed launcher (or print it with --dry-run).")
    _add_config_args(p)
    p.add_argument("--store", required=True, help="SOMA experiment URI (local directory or s3://...)")
    p.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, config, logs)")
    p.add_argument("--module", default="pretrain", choices=("pretrain", "finetune"))
    p.add_argument("--resume", default=None, metavar="auto|CHECKPOINT", help="passed to the module")
    p.add_argument("--hostfile", type=Path, default=None, help="DeepSpeed hostfile ('HOST slots=N' lines)")
    p.add_argument("--include", default="", help="DeepSpeed resource filter, e.g. host1:0,1@host2")
    p.add_argument("--exclude", default="", help="DeepSpeed resource filter, e.g. host1:3")
    p.add_argument("--nodes", type=int, default=None, help="number of nodes (first N of the hostfile)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="ranks per node (default: all GPUs, 1 on CPU)")
    p.add_argument("--no-ssh", action="store_true", help="start only this node's ranks (run on every node)")
    p.add_argument("--node-rank", type=int, default=None, help="this node's rank, with --no-ssh")
    p.add_argument("--master-addr", default=None, help="address of node 0, with --no-ssh")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: cluster.master_port)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when torch sees a GPU, else cpu")
    p.add_argument("--dry-run", action="store_true", help="print the command as one shell line; start nothing")
    p.set_defaults(func=_cmd_launch)


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check torch, CUDA, flash-attn, DeepSpeed, the store, MLflow and disk")
    p.add_argument("--store", default=None, help="also check that this opens as a SOMA Experiment")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow URI to query (default: $MLFLOW_TRACKING_URI, else a throwaway SQLite file)")
    p.add_argument("--out", default=".", help="where checkpoints will go (free space is checked)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_doctor)


def _add_cluster(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="cluster files: SLURM batch script, DeepSpeed JSON")
    csub = p.add_subparsers(dest="cluster_command", metavar="CLUSTER_COMMAND")
    csub.required = True

    s = csub.add_parser("slurm", help="print an sbatch script (one deepspeed --no_ssh per node)")
    _add_config_args(s, default="base")
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--min-nodes", type=int, default=None,
                   help="let SLURM start (or requeue) the job on as few as this many nodes; it resumes on them")
    s.add_argument("--gpus-per-node", type=int, required=True)
    s.add_argument("--time", required=True, help="wall-clock limit, HH:MM:SS or D-HH:MM:SS")
    s.add_argument("--partition", default=None)
    s.add_argument("--cpus-per-task", type=int, default=None, help="default: 8 per GPU")
    s.add_argument("--store", required=True, help="SOMA experiment URI as seen from the compute nodes")
    s.add_argument("--out", required=True, help="run directory as seen from the compute nodes")
    s.add_argument("--tracking-uri", default=None, help="exported as MLFLOW_TRACKING_URI in the job")
    s.add_argument("--module", default="pretrain", choices=("pretrain", "finetune"))
    s.add_argument("--master-port", type=int, default=None, help="default: 10000 + job id mod 20000")
    s.set_defaults(func=_cmd_slurm)

    d = csub.add_parser("ds-config", help="print the DeepSpeed JSON for a config and world size")
    _add_config_args(d)
    d.add_argument("--world-size", type=int, required=True)
    d.add_argument("--device", required=True, choices=("cpu", "cuda"))
    d.set_defaults(func=_cmd_ds_config)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``launch``, ``doctor`` and ``cluster`` to the ``hiceller`` parser."""
    _add_launch(subparsers)
    _add_doctor(subparsers)
    _add_cluster(subparsers)


def _cmd_launch(args: argparse.Namespace) -> int:
    from cluster.launch import LaunchRequest, exec_launch, prepare_launch, shell_line

    req = LaunchRequest(
        config=args.config, store=args.store, out=args.out, overrides=tuple(args.overrides),
        module=args.module, resume=args.resume, hostfile=args.hostfile, include=args.include,
        exclude=args.exclude, nodes=args.nodes, gpus_per_node=args.gpus_per_node, no_ssh=args.no_ssh,
        node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port,
        device=args.device,
    )
    cmd, env = prepare_launch(req)
    line = shell_line(cmd, env)
    if args.dry_run:
        print(line)
        return 0
    print(f"hiceller launch: {line}", file=sys.stderr)
    exec_launch(cmd, env)
    return 0  # not reached: exec replaced this process


def _cmd_doctor(args: argparse.Namespace) -> int:
    from cluster.doctor import checks_to_json, format_check, run_checks

    checks = run_checks(store=args.store, tracking_uri=args.tracking_uri, out=args.out)
    if args.json:
        print(checks_to_json(checks))
    else:
        for c in checks:
            print(format_check(c))
    return 1 if any(c.status == "fail" for c in checks) else 0


def _cmd_slurm(args: argparse.Namespace) -> int:
    from cluster.slurm import SlurmJob, sbatch_script
    from hiceller.config import load_config

    cfg = load_config(args.config, args.overrides)
    job = SlurmJob(
        nodes=args.nodes, min_nodes=args.min_nodes, gpus_per_node=args.gpus_per_node, time=args.time, store=args.store, out=args.out,
        partition=args.partition, cpus_per_task=args.cpus_per_task, tracking_uri=args.tracking_uri,
        module=args.module, master_port=args.master_port,
    )
    sys.stdout.write(sbatch_script(job, cfg))
    return 0


def _cmd_ds_config(args: argparse.Namespace) -> int:
    from pretrain.ds_config import deepspeed_config, dumps_deepspeed_config
    from hiceller.config import load_config

    if args.world_size < 1:
        raise InputError(f"--world-size must be >= 1, got {args.world_size}")
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dumps_deepspeed_config(deepspeed_config(cfg, args.world_size, args.device)))
    return 0


def build_parser(prog: str = "python -m cluster") -> argparse.ArgumentParser:
    """A parser with only this package's subcommands (for ``python -m cluster``)."""
    parser = argparse.ArgumentParser(prog=prog, description="HiCeller cluster tools: launch, doctor, cluster.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m cluster``; errors print as one line, exit 2."""
    from hiceller.cli import run_handler

    return run_handler(build_parser().parse_args(argv))
