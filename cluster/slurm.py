"""``hiceller cluster slurm``: an sbatch script that runs one ``deepspeed --no_ssh`` per node.

SLURM starts one task per node (``srun --ntasks-per-node=1``); each task runs DeepSpeed's
launcher with ``--no_ssh --node_rank $SLURM_NODEID``, which starts that node's GPU ranks.
DeepSpeed's runner needs a hostfile even with ``--no_ssh`` (without one it treats the job as a
single local node and rewrites the master address to 127.0.0.1), so the script writes one from
``$SLURM_JOB_NODELIST``. ``.deepspeed_env`` is not read on the ``--no_ssh`` path; the
``cluster.env`` settings are exported in the script and ``srun`` passes the environment on.

The run config is written into the script itself, so a requeued job runs exactly what was
submitted, and the job resumes from the latest checkpoint in the run directory. Node and rank
counts are read from SLURM when the job starts (``$SLURM_NNODES``, ``$SLURM_JOB_NODELIST``), never
fixed in the script: with ``min_nodes`` (``#SBATCH --nodes=MIN-MAX``) a job that starts or is
requeued on fewer nodes runs on those, and ``--resume auto`` continues the run on that world size.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from pretrain.ds_config import deepspeed_config
from cluster.launch import launch_env
from hiceller.config import RunConfig
from hiceller.errors import InputError

__all__ = ["SlurmJob", "validate_time", "sbatch_script", "CONFIG_EOF"]

_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<h>\d+):(?P<m>\d{2}):(?P<s>\d{2})$")
_PARTITION = re.compile(r"^[A-Za-z0-9_.,-]+$")
CONFIG_EOF = "HICELLER_CONFIG_EOF"


def validate_time(text: str) -> str:
    """Accept SLURM's ``HH:MM:SS`` or ``D-HH:MM:SS`` (minutes and seconds below 60)."""
    m = _TIME.match(text)
    if m is None:
        raise InputError(f"--time {text!r}: expected HH:MM:SS or D-HH:MM:SS")
    if int(m["m"]) >= 60 or int(m["s"]) >= 60:
        raise InputError(f"--time {text!r}: minutes and seconds must be below 60")
    if m["days"] is not None and int(m["h"]) >= 24:
        raise InputError(f"--time {text!r}: hours must be below 24 when days are given")
    if int(m["days"] or 0) == 0 and int(m["h"]) == 0 and int(m["m"]) == 0 and int(m["s"]) == 0:
        raise InputError(f"--time {text!r}: must be longer than zero")
    return text


@dataclass(frozen=True)
class SlurmJob:
    """What the sbatch script asks for and runs."""

    nodes: int
    gpus_per_node: int
    time: str
    store: str
    out: str
    partition: str | None = None
    cpus_per_task: int | None = None
    """Default: 8 per GPU."""
    tracking_uri: str | None = None
    module: str = "pretrain"
    master_port: int | None = None
    """Default: derived from the job id, so jobs sharing a node do not collide."""
    min_nodes: int | None = None
    """Fewest nodes SLURM may start (or requeue) the job on (None: exactly ``nodes``)."""

    def __post_init__(self) -> None:
        for flag, value in (("--nodes", self.nodes), ("--gpus-per-node", self.gpus_per_node)):
            if value < 1:
                raise InputError(f"{flag} must be >= 1, got {value}")
        if self.min_nodes is not None and not 1 <= self.min_nodes <= self.nodes:
            raise InputError(f"--min-nodes must be in 1..--nodes ({self.nodes}), got {self.min_nodes}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise InputError(f"--cpus-per-task must be >= 1, got {self.cpus_per_task}")
        if self.partition is not None and not _PARTITION.match(self.partition):
            raise InputError(f"--partition {self.partition!r}: not a SLURM partition name")
        if self.master_port is not None and not 1024 <= self.master_port <= 65535:
            raise InputError(f"--master-port must be in 1024..65535, got {self.master_port}")
        if not self.store or not self.out:
            raise InputError("--store and --out must not be empty")
        validate_time(self.time)


def _sbatch_header(job: SlurmJob, name: str) -> list[str]:
    cpus = job.cpus_per_task or 8 * job.gpus_per_node
    lines = [
        f"#SBATCH --job-name=hiceller-{name}",
        f"#SBATCH --nodes={job.nodes}" if job.min_nodes in (None, job.nodes) else f"#SBATCH --nodes={job.min_nodes}-{job.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={job.gpus_per_node}",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --time={job.time}",
    ]
    if job.partition:
        lines.append(f"#SBATCH --partition={job.partition}")
    # Relative to the submit directory: it exists before the job starts, the run directory may not.
    return lines + ["#SBATCH --output=hiceller-%x-%j.out"]


def _exports(job: SlurmJob, cfg: RunConfig) -> list[str]:
    lines = [f"export RUN_DIR={shlex.quote(job.out)}", f"export STORE={shlex.quote(job.store)}"]
    if job.tracking_uri:
        lines.append(f"export MLFLOW_TRACKING_URI={shlex.quote(job.tracking_uri)}")
    lines += [f"export {k}={shlex.quote(v)}" for k, v in launch_env(cfg, "cuda").items()]
    return lines


def _node_command(job: SlurmJob) -> str:
    """The per-node launcher line; $SLURM_NODEID and friends expand inside each srun task."""
    return " ".join([
        "deepspeed",
        '--hostfile "$RUN_DIR/hostfile"',
        '--no_ssh --node_rank "$SLURM_NODEID"',
        f'--num_nodes "$SLURM_NNODES" --num_gpus {job.gpus_per_node}',
        '--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"',
        f"--module {job.module}",
        '--config "$RUN_DIR/config.toml" --store "$STORE" --out "$RUN_DIR" --resume auto',
    ])


def _master_port(job: SlurmJob) -> str:
    if job.master_port is not None:
        return f"MASTER_PORT={job.master_port}"
    # 10000-29999: below Linux's ephemeral range, spread by job id.
    return "MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))"


def sbatch_script(job: SlurmJob, cfg: RunConfig) -> str:
    """The sbatch script text for ``job`` running ``cfg``."""
    # The same checks `hiceller launch` makes, on the GPUs the job will have.
    for nodes in {job.nodes, job.min_nodes or job.nodes}:
        deepspeed_config(cfg, nodes * job.gpus_per_node, "cuda")
    inner = _node_command(job)
    lines = [
        "#!/bin/bash",
        f"# hiceller: {job.nodes} node(s) x {job.gpus_per_node} GPU(s), one `deepspeed --no_ssh` per node.",
        "# Submit from an environment where hiceller and deepspeed are installed (sbatch passes it on).",
        *_sbatch_header(job, cfg.name),
        "",
        "set -euo pipefail",
        "",
        *_exports(job, cfg),
        'mkdir -p "$RUN_DIR"',
        "",
        "# The run config, frozen into the job so that a requeued job runs the same thing.",
        f"cat > \"$RUN_DIR/config.toml\" <<'{CONFIG_EOF}'",
        cfg.to_toml().rstrip("\n"),
        CONFIG_EOF,
        "",
        "# With --no_ssh DeepSpeed uses the hostfile to count ranks per node; node 0 is the master.",
        "# (No `scontrol ... | head` pipe: under pipefail, head closing early can kill the job with SIGPIPE.)",
        'NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        f"sed 's/$/ slots={job.gpus_per_node}/' <<< \"$NODES\" > \"$RUN_DIR/hostfile\"",
        'MASTER_ADDR=$(head -n1 <<< "$NODES")',
        _master_port(job),
        "export MASTER_ADDR MASTER_PORT",
        "",
        'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \\',
        f"    bash -c {shlex.quote(inner)}",
    ]
    return "\n".join(lines) + "\n"
