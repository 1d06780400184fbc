"""Process-group set-up shared by pretraining and fine-tuning.

Started by the ``deepspeed`` launcher, a process finds RANK / WORLD_SIZE / MASTER_* in its
environment. Started directly (``hiceller pretrain``), it is a world of one on a free local port.
On a machine without CUDA, DeepSpeed's CPU accelerator and gloo are used; that choice has to be
made before deepspeed is imported, which is why this module sets DS_ACCELERATOR first.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

__all__ = ["DistInfo", "setup_distributed", "select_accelerator", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 300


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_accelerator() -> str:
    """'cuda' or 'cpu'; on CPU tell DeepSpeed so before it is imported."""
    if torch.cuda.is_available():
        return "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return "cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(timeout_s: int | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU).

    The timeout bounds how long a rank waits in a collective for a peer that died: the survivor of
    a kill -9 exits with an error instead of hanging (HICELLER_DIST_TIMEOUT, seconds)."""
    kind = select_accelerator()
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    timeout = int(timeout_s or os.environ.get("HICELLER_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(timeout=timedelta(seconds=timeout), verbose=False)
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)
