"""Checkpoint rotation (train.keep_last) killed with SIGKILL at any point of a prune.

A real process runs pretrain.layout.prune over a run folder of complete checkpoints and is killed
after a delay that grows from 0 until the prune finishes first; after every kill, every checkpoint
still marked COMPLETE has all its files, and the next prune (what the next save runs) leaves exactly
the newest ``keep_last``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from pretrain import layout

FILES = 60  # per checkpoint, so a prune takes long enough to be caught half-way
CHILD = """
import sys
from pathlib import Path
from pretrain import layout
print("ready", flush=True)
sys.stdin.readline()
layout.prune(Path(sys.argv[1]), int(sys.argv[2]))
print("done", flush=True)
"""


def _run_folder(run: Path, steps: list[int]) -> None:
    for step in steps:
        cp = layout.checkpoint_root(run) / layout.tag_for(step)
        cp.mkdir(parents=True)
        for i in range(FILES):
            (cp / f"shard_{i:03d}.pt").write_bytes(b"x" * 4096)
        (cp / layout.COMPLETE).write_text("")


def _whole(cp: Path) -> bool:
    return len(list(cp.glob("shard_*.pt"))) == FILES


def test_prune_killed_at_any_point_leaves_only_whole_checkpoints(tmp_path: Path, repo_root: Path) -> None:
    keep_last, steps = 2, [100, 200, 300, 400, 500, 600]
    caught = 0
    for attempt in range(60):
        run = tmp_path / f"run{attempt}"
        _run_folder(run, steps)
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(run), str(keep_last)], cwd=repo_root,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        child.stdin.write("go\n")
        child.stdin.flush()
        time.sleep(attempt * 0.0005)
        child.send_signal(signal.SIGKILL)
        rc = child.wait(timeout=30)
        complete = layout.list_checkpoints(run)
        for cp in complete:
            assert _whole(cp), f"{cp.name} is marked COMPLETE with files missing (attempt {attempt})"
        assert [int(cp.name[5:]) for cp in complete][-keep_last:] == steps[-keep_last:]
        layout.prune(run, keep_last)  # the next save's prune
        left = sorted(p.name for p in layout.checkpoint_root(run).iterdir())
        assert left == [layout.tag_for(s) for s in steps[-keep_last:]], left
        if rc == -signal.SIGKILL and len(complete) > keep_last:
            caught += 1  # killed while the prune had work left
        if rc == 0 or caught >= 3:
            break
    assert caught >= 1, "no kill landed inside a prune"
