"""Checkpoints of a run folder: DeepSpeed state + loader state + config + vocabulary, complete or not at all.

Layout::

    RUN/checkpoints/step_00000100/   DeepSpeed's files (model + optimizer shards, per rank)
                                     loader_rank{R}.json  each rank's CellStream states
                                     config.toml, vocab.json, meta.json (step, world size, ...)
                                     COMPLETE  written last, by rank 0, after every rank saved

A checkpoint without COMPLETE (a crash or a full disk while saving) is never resumed from, and the
next successful save removes it. ``--resume auto`` takes the newest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hiceller.errors import HicellerError

__all__ = [
    "CHECKPOINT_DIR",
    "COMPLETE",
    "tag_for",
    "checkpoint_root",
    "list_checkpoints",
    "latest_complete",
    "resolve_checkpoint",
    "write_json_atomic",
    "mark_complete",
    "prune",
]

CHECKPOINT_DIR = "checkpoints"
COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: Path, complete_only: bool = True) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    out = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")]
    if complete_only:
        out = [p for p in out if (p / COMPLETE).is_file()]
    return sorted(out, key=lambda p: p.name)


def latest_complete(run_dir: Path) -> Path | None:
    cps = list_checkpoints(run_dir)
    return cps[-1] if cps else None


def resolve_checkpoint(path: Path) -> Path:
    """A run folder (its newest complete checkpoint) or one checkpoint folder, checked complete."""
    path = Path(path)
    if not path.exists():
        raise HicellerError(f"checkpoint {path} does not exist")
    if (path / CHECKPOINT_DIR).is_dir() or not path.name.startswith("step_"):
        cp = latest_complete(path)
        if cp is None:
            raise HicellerError(f"{path} has no complete checkpoint (is it a pretraining run folder?)")
        return cp
    if not (path / COMPLETE).is_file():
        raise HicellerError(f"checkpoint {path} is incomplete (the run stopped while saving it); use an earlier one")
    return path


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def mark_complete(cp: Path, meta: dict[str, Any]) -> None:
    write_json_atomic(cp / "meta.json", meta)
    write_json_atomic(cp / COMPLETE, {"step": meta.get("step")})


def prune(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and incomplete ones older than
    the newest complete one (left by a crash while saving)."""
    complete = list_checkpoints(run_dir)
    removed = []
    for p in complete[:-keep_last] if keep_last else complete:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if complete:
        newest = complete[-1].name
        for p in list_checkpoints(run_dir, complete_only=False):
            if not (p / COMPLETE).is_file() and p.name < newest:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed
