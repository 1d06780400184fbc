"""``hiceller launch``: one run config -> run directory files -> a ``deepspeed`` launcher command.

Three placements, the same files:
- hostfile (ssh/pdsh): ``deepspeed --hostfile H [--include/--exclude S] [--num_nodes N]``;
- one node: ``deepspeed --num_nodes 1 --num_gpus G``;
- per node, no ssh (SLURM, Kubernetes, by hand): ``deepspeed --hostfile H --no_ssh --node_rank R
  --master_addr A``, started once on every node.

How environment settings reach the ranks (DeepSpeed 0.19, ``deepspeed/launcher/runner.py``):
the runner reads ``.deepspeed_env`` (name overridable by ``DS_ENV_FILE``, read when the runner
module is imported) from ``~`` and then ``.``, but only on its multi-node ssh path, where each
``KEY=VALUE`` line becomes an ``export`` in the remote command. On the single-node and
``--no_ssh`` paths the file is ignored and ranks inherit the launcher's own environment. So we
write ``RUN/.deepspeed_env``, point ``DS_ENV_FILE`` at its absolute path (``os.path.join(home,
absolute)`` is that path, so no stray ``~/.deepspeed_env`` is mixed in), and also put the same
variables into the launcher's environment: every path then gives the ranks the same settings.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import shlex
import shutil
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pretrain.ds_config import deepspeed_config, dumps_deepspeed_config, write_text_atomic
from cluster.hostfile import check_gpus_per_node, format_hostfile, read_hostfile, resolve_resources
from hiceller.config import RunConfig
from hiceller.errors import ConfigError, HicellerError, InputError

__all__ = [
    "MODULES",
    "Placement",
    "LaunchPlan",
    "build_launch_command",
    "module_args",
    "plan_placement",
    "launch_env",
    "deepspeed_env_text",
    "check_master_port",
    "check_visible_devices",
    "write_run_files",
    "shell_line",
    "find_deepspeed",
    "exec_launch",
    "master_address",
    "process_env",
    "LaunchRequest",
    "prepare_launch",
    "resolve_device",
    "resolve_store",
]

MODULES = ("pretrain", "finetune")
DS_ENV_NAME = ".deepspeed_env"
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# DeepSpeed wraps a value with other characters in double quotes inside a remote shell command, so
# these would be expanded or break the quoting there.
_ENV_UNSAFE = re.compile(r'["$`\\\n\r]')


@dataclass(frozen=True)
class Placement:
    """Where ranks run, as the ``deepspeed`` launcher is told."""

    hostfile: Path | None = None
    include: str = ""
    exclude: str = ""
    num_nodes: int | None = None
    num_gpus: int | None = None
    no_ssh: bool = False
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int = 29500


@dataclass(frozen=True)
class LaunchPlan:
    """A checked placement and what it adds up to."""

    placement: Placement
    world_size: int
    hosts: tuple[str, ...]
    """Hosts in rank order (labels only when generated)."""
    generated_hostfile: str | None = None
    """Hostfile text to write to RUN/hostfile (per-node mode without --hostfile)."""


def module_args(run_dir: Path, store: str, resume: str | None = None) -> list[str]:
    """Arguments of ``python -m pretrain`` / ``finetune`` after the launcher's own."""
    args = ["--config", str(run_dir / "config.toml"), "--store", store, "--out", str(run_dir)]
    return args + (["--resume", resume] if resume else [])


def build_launch_command(
    placement: Placement, *, module: str, run_dir: Path, store: str, resume: str | None = None
) -> list[str]:
    """The ``deepspeed`` argv (argv[0] is the bare name; the caller resolves the executable)."""
    if module not in MODULES:
        raise ConfigError(f"--module must be one of {', '.join(MODULES)}, got {module!r}")
    p = placement
    cmd = ["deepspeed"]
    if p.hostfile is not None:
        cmd += ["--hostfile", str(p.hostfile)]
    if p.include:
        cmd += ["--include", p.include]
    if p.exclude:
        cmd += ["--exclude", p.exclude]
    if p.num_nodes is not None:
        cmd += ["--num_nodes", str(p.num_nodes)]
    if p.num_gpus is not None:
        cmd += ["--num_gpus", str(p.num_gpus)]
    if p.no_ssh:
        cmd += ["--no_ssh", "--node_rank", str(p.node_rank)]
    if p.master_addr:
        cmd += ["--master_addr", p.master_addr]
    cmd += ["--master_port", str(p.master_port), "--module", module]
    return cmd + module_args(run_dir, store, resume)


def _placement_from_hostfile(
    hostfile: Path, include: str, exclude: str, nodes: int | None, gpus_per_node: int | None
) -> tuple[dict[str, list[int]], Path]:
    hf = read_hostfile(hostfile)
    if gpus_per_node is not None:
        check_gpus_per_node(hf, gpus_per_node)
    return resolve_resources(hf, include, exclude, nodes), hostfile.absolute()


def _placement_without_hostfile(
    n: int, g: int, no_ssh: bool, run_dir: Path | None
) -> tuple[dict[str, list[int]], Placement, str | None]:
    if n > 1 and not no_ssh:
        raise InputError(f"--nodes {n} needs --hostfile (ssh launch) or --no-ssh on every node")
    active = {f"node-{i}": list(range(g)) for i in range(n)}
    if not no_ssh:
        return active, Placement(num_nodes=n, num_gpus=g), None
    # DeepSpeed's runner needs a hostfile even with --no_ssh, but reads the names only as labels
    # that count ranks per node, so a generated one serves every node alike.
    if run_dir is None:
        raise InputError("--no-ssh without --hostfile needs a run directory for the generated hostfile")
    text = format_hostfile({h: len(s) for h, s in active.items()})
    return active, Placement((run_dir / "hostfile").absolute()), text


def _check_rank_and_master(no_ssh: bool, node_rank: int | None, master_addr: str | None, n_nodes: int) -> None:
    if not no_ssh:
        if node_rank is not None:
            raise InputError("--node-rank needs --no-ssh (with ssh the launcher numbers the nodes itself)")
        return
    if node_rank is None or master_addr is None:
        raise InputError("--no-ssh needs --node-rank and --master-addr")
    if not 0 <= node_rank < n_nodes:
        raise InputError(f"--node-rank {node_rank} is outside 0..{n_nodes - 1} for {n_nodes} node(s)")


def plan_placement(
    *,
    hostfile: Path | None = None,
    include: str = "",
    exclude: str = "",
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    no_ssh: bool = False,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int = 29500,
    default_gpus: int = 1,
    run_dir: Path | None = None,
) -> LaunchPlan:
    """Check the placement flags against each other and the hostfile; count nodes and ranks."""
    for flag, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    if not 1 <= master_port <= 65535:
        raise InputError(f"--master-port must be in 1..65535, got {master_port}")
    generated = None
    if hostfile is not None:
        active, hostfile = _placement_from_hostfile(hostfile, include, exclude, nodes, gpus_per_node)
        placement = Placement(hostfile, include, exclude, num_nodes=nodes)
    else:
        if include or exclude:
            raise InputError("--include/--exclude need --hostfile")
        active, placement, generated = _placement_without_hostfile(
            nodes or 1, gpus_per_node or default_gpus, no_ssh, run_dir
        )
    _check_rank_and_master(no_ssh, node_rank, master_addr, len(active))
    placement = dataclasses.replace(
        placement, no_ssh=no_ssh, node_rank=node_rank if no_ssh else None, master_addr=master_addr,
        master_port=master_port,
    )
    world = sum(len(s) for s in active.values())
    return LaunchPlan(placement, world, tuple(active), generated)


def master_address(plan: LaunchPlan) -> str:
    """The address rank 0 listens on, as far as it is known before launching."""
    p = plan.placement
    if p.master_addr:
        return p.master_addr
    if p.hostfile is None:
        return "127.0.0.1"  # DeepSpeed's single-node launch
    return plan.hosts[0]  # with ssh, DeepSpeed asks this host for its address


def check_master_port(addr: str, port: int, *, must_resolve: bool) -> bool:
    """Refuse a port already bound on ``addr`` when ``addr`` is this machine.

    Returns whether the address was local (and so checked). A name that does not resolve is an
    error only when ``must_resolve`` (per-node launch); with ssh, DeepSpeed asks the host itself.
    """
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if must_resolve:
            raise InputError(f"--master-addr {addr!r} does not resolve ({e.strerror})") from None
        return False
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR ignores TIME_WAIT leftovers of a finished run but not a live listener.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                return False
            if e.errno == errno.EADDRINUSE:
                raise InputError(
                    f"master port {port} on {addr} is already in use (another run?); pick another with "
                    f"--master-port or --set cluster.master_port=N"
                ) from None
            raise InputError(f"cannot bind master port {port} on {addr}: {e.strerror}") from None
    return True


def launch_env(cfg: RunConfig, device: str) -> dict[str, str]:
    """Variables every rank needs: ``cluster.env`` plus DS_ACCELERATOR=cpu on CPU."""
    env = dict(cfg.cluster.env)
    for key, value in env.items():
        if not _ENV_KEY.match(key):
            raise ConfigError(f"config key cluster.env.{key}: not a valid environment variable name")
        if _ENV_UNSAFE.search(value):
            raise ConfigError(
                f"config key cluster.env.{key}: value {value!r} has a quote, $, backtick, backslash or "
                "newline, which DeepSpeed's remote export line cannot carry"
            )
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    return env


def deepspeed_env_text(env: Mapping[str, str]) -> str:
    """``KEY=VALUE`` lines; DeepSpeed splits each line at the first '=' and allows nothing else."""
    return "".join(f"{k}={v}\n" for k, v in env.items())


def write_run_files(run_dir: Path, cfg: RunConfig, ds: dict, env: Mapping[str, str], hostfile_text: str | None) -> None:
    """RUN/config.toml, RUN/ds_config.json, RUN/.deepspeed_env (and RUN/hostfile when generated)."""
    write_text_atomic(run_dir / "config.toml", cfg.to_toml())
    write_text_atomic(run_dir / "ds_config.json", dumps_deepspeed_config(ds))
    write_text_atomic(run_dir / DS_ENV_NAME, deepspeed_env_text(env))
    if hostfile_text is not None:
        write_text_atomic(run_dir / "hostfile", hostfile_text)


def process_env(run_dir: Path, env: Mapping[str, str]) -> dict[str, str]:
    """What the launcher process gets on top of ours: the rank variables and DS_ENV_FILE."""
    return {**env, "DS_ENV_FILE": str((run_dir / DS_ENV_NAME).absolute())}


def shell_line(cmd: list[str], env: Mapping[str, str]) -> str:
    """One copy-pasteable shell line: ``K=V ... deepspeed ...``."""
    assigns = [f"{k}={shlex.quote(v)}" for k, v in env.items()]
    return " ".join(assigns + [shlex.quote(c) for c in cmd])


def find_deepspeed() -> str:
    """The ``deepspeed`` script of this environment (next to the interpreter), else on PATH."""
    local = Path(sys.executable).parent / "deepspeed"
    if local.is_file():
        return str(local)
    found = shutil.which("deepspeed")
    if found is None:
        raise HicellerError("the deepspeed launcher is not installed here (pip install hiceller)")
    return found


def exec_launch(cmd: list[str], extra_env: Mapping[str, str]) -> None:
    """Replace this process with the launcher, so signals reach it directly."""
    exe = find_deepspeed()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(exe, cmd, {**os.environ, **extra_env})



@dataclass(frozen=True)
class LaunchRequest:
    """Everything ``hiceller launch`` is asked, before any of it is checked."""

    config: str
    store: str
    out: Path
    overrides: tuple[str, ...] = ()
    module: str = "pretrain"
    resume: str | None = None
    hostfile: Path | None = None
    include: str = ""
    exclude: str = ""
    nodes: int | None = None
    gpus_per_node: int | None = None
    no_ssh: bool = False
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    device: str = "auto"
    """auto (CUDA when torch sees a GPU), cpu or cuda."""


def resolve_device(device: str) -> str:
    """``auto`` -> what this machine has; ``cuda`` without a GPU is an error."""
    from cluster.doctor import detect_device

    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, got {device!r}")
    return detect_device() if device == "auto" else device


def resolve_store(store: str) -> str:
    """A URI (``s3://...``) as given; a local path made absolute and required to exist."""
    if "://" in store:
        return store
    p = Path(store)
    if not p.exists():
        raise InputError(f"store {store} does not exist (create it with hiceller ingest)")
    return str(p.absolute())


def _default_gpus(req: LaunchRequest, device: str) -> int:
    if req.hostfile is not None or req.gpus_per_node is not None or device == "cpu":
        return 1
    from cluster.doctor import cuda_device_count

    return max(cuda_device_count(), 1)


def check_visible_devices(num_gpus: int, visible: str | None) -> None:
    """Refuse a CUDA_VISIBLE_DEVICES that DeepSpeed's single-node launch would silently override.

    Given --num_gpus, DeepSpeed's runner drops CUDA_VISIBLE_DEVICES and uses GPUs 0..G-1, so
    ``CUDA_VISIBLE_DEVICES=2,3`` would train on GPUs 0 and 1 (a cgroup-limited 0,1,... is fine).
    """
    if not visible:
        return
    ids = [x.strip() for x in visible.split(",") if x.strip()]
    if ids[:num_gpus] != [str(i) for i in range(num_gpus)] or len(ids) < num_gpus:
        raise InputError(
            f"CUDA_VISIBLE_DEVICES={visible} but DeepSpeed's launcher would use GPUs 0-{num_gpus - 1}; "
            f"unset it, or pass a hostfile ('localhost slots=N') with --include localhost:{','.join(ids)}"
        )


def prepare_launch(req: LaunchRequest) -> tuple[list[str], dict[str, str]]:
    """Check everything, write the run directory, return (deepspeed argv, extra environment)."""
    from hiceller.config import load_config

    cfg = load_config(req.config, list(req.overrides))
    if req.module not in MODULES:
        raise ConfigError(f"--module must be one of {', '.join(MODULES)}, got {req.module!r}")
    device = resolve_device(req.device)
    store = resolve_store(req.store)
    run_dir = req.out.absolute()
    plan = plan_placement(
        hostfile=req.hostfile, include=req.include, exclude=req.exclude, nodes=req.nodes,
        gpus_per_node=req.gpus_per_node, no_ssh=req.no_ssh, node_rank=req.node_rank,
        master_addr=req.master_addr, master_port=req.master_port or cfg.cluster.master_port,
        default_gpus=_default_gpus(req, device), run_dir=run_dir,
    )
    if device == "cuda" and plan.placement.num_gpus is not None:
        check_visible_devices(plan.placement.num_gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    ds = deepspeed_config(cfg, plan.world_size, device)
    env = launch_env(cfg, device)
    check_master_port(master_address(plan), plan.placement.master_port, must_resolve=req.no_ssh)
    write_run_files(run_dir, cfg, ds, env, plan.generated_hostfile)
    cmd = build_launch_command(plan.placement, module=req.module, run_dir=run_dir, store=store, resume=req.resume)
    return cmd, process_env(run_dir, env)
