"""Helpers for tests that start real DeepSpeed processes on CPU (gloo)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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


def hc(*args: str | Path, cwd: Path | None = None, check: bool = True, timeout: int = 600, dist_timeout: int = 60):
    """``hiceller ARGS`` with the CPU DeepSpeed environment; output captured, shm buffers removed after."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "hiceller"), *map(str, args)],
        env=ds_env(dist_timeout), cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )
    cleanup_shm()
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


class GroupProc:
    """A command in its own process group, stdout and stderr to a log file; ``kill`` takes the group."""

    def __init__(self, cmd: list[str], log: Path, port: int | None, env: dict[str, str], timeout: float):
        self.log, self.port, self.timeout = log, port, timeout
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, env=env, cwd=str(log.parent), stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 4000) -> str:
        return f"--- {self.log} ---\n" + self.text()[-n:]

    def wait(self, timeout: float | None = None) -> int:
        timeout = self.timeout if timeout is None else timeout
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.log.name}: did not end within {timeout:.0f} s\n{self.tail()}")

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL whatever is left of the process group (the launcher and every rank)."""
        self.signal_group(signal.SIGKILL)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        if self.port is not None:
            cleanup_shm(self.port)
