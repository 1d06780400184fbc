"""Helpers for tests that start real DeepSpeed processes on CPU (gloo)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ds_env(dist_timeout: int = 60) -> dict[str, str]:
    """The environment of a CPU DeepSpeed run: CPU accelerator, one thread, bounded collectives."""
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    env["HICELLER_DIST_TIMEOUT"] = str(dist_timeout)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cleanup_shm(port: int | None = None) -> None:
    """Remove DeepSpeed's CPU all-reduce buffers (named after the run's master port)."""
    pattern = "deepspeed_allreduce_buffer_*" if port is None else f"deepspeed_allreduce_buffer_*_{port}_*"
    for p in Path("/dev/shm").glob(pattern):
        p.unlink(missing_ok=True)


def rows(out: Path) -> list[dict]:
    """metrics.jsonl rows of a run folder (a line being written is skipped)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    got = []
    for line in path.read_text().splitlines():
        try:
            got.append(json.loads(line))
        except ValueError:
            pass
    return got


def losses(rs: list[dict]) -> list[float]:
    return [r["loss"] for r in rs]


def complete_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if (p / "COMPLETE").is_file())
