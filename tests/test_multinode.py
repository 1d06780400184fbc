"""Two nodes on one machine: two ``hiceller launch --no-ssh`` processes (node ranks 0 and 1), one
CPU rank each, one run folder (the shared disk), rendezvous on 127.0.0.1.

Checks that the per-node launch really makes a world of 2 that trains exactly like the single-node
2-process run, that losing a node ends the other one in bounded time (HICELLER_DIST_TIMEOUT), and
that ``--resume auto`` on both nodes continues from the last complete checkpoint to the losses of
an uninterrupted run.

Every process is started in its own session (process group) and killed with it in ``finally``;
every wait has a deadline.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from _ds import ds_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN_TIMEOUT = 480  # one run, start to finish (startup alone is ~30 s on a busy 2-core box)
FAIL_WITHIN = 120  # the surviving node must be gone this long after the other one is killed
DIST_TIMEOUT = 30
LONG_STEPS = 40


from _ds import GroupProc, complete_steps, losses, rows
from _ds import free_port as _free_port


def _env() -> dict[str, str]:
    return ds_env(dist_timeout=DIST_TIMEOUT)


@pytest.fixture()
def procs():
    """``start(cmd, log, port)``; every process group started is killed at teardown."""
    started: list[GroupProc] = []

    def start(cmd: list[str], log: Path, port: int) -> GroupProc:
        p = GroupProc(cmd, log, port, _env(), RUN_TIMEOUT)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            p.kill()


def launch_nodes(start, store: str, out: Path, sets: list[str], resume: bool = False) -> tuple[GroupProc, GroupProc]:
    """Node 1, then node 0, each ``hiceller launch --no-ssh`` with one CPU rank.

    Node 1 goes first and node 0 only once node 1's launcher has passed its checks: both "nodes"
    are this machine, so node 1's free-port check of 127.0.0.1:PORT would otherwise find node 0's
    rank 0 already listening there (on real nodes the master address is not local to node 1)."""
    port = _free_port()
    base = [str(BIN / "hiceller"), "launch", "--config", "debug", *[f"--set={s}" for s in sets], "--store", store,
            "--out", str(out), "--no-ssh", "--master-addr", "127.0.0.1", "--master-port", str(port), "--nodes", "2",
            "--gpus-per-node", "1", "--device", "cpu"]
    if resume:
        base += ["--resume", "auto"]
    tag = f"{out.name}-{time.monotonic_ns()}"
    node1 = start([*base, "--node-rank", "1"], out.parent / f"{tag}-node1.log", port)
    deadline = time.monotonic() + 120
    while "hiceller launch: " not in node1.text():
        if node1.proc.poll() is not None:
            pytest.fail(f"node 1 launcher exited with {node1.proc.returncode}\n{node1.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"node 1 launcher printed no command within 120 s\n{node1.tail()}")
        time.sleep(0.1)
    node0 = start([*base, "--node-rank", "0"], out.parent / f"{tag}-node0.log", port)
    return node0, node1


def single_node(start, store: str, out: Path, sets: list[str]) -> list[dict]:
    """The same config as 2 processes under one ``deepspeed --num_gpus 2`` (the reference)."""
    port = _free_port()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module", "pretrain",
           "--config", "debug", "--store", store, "--out", str(out), *[f"--set={s}" for s in sets], "--no-progress"]
    p = start(cmd, out.parent / f"{out.name}.log", port)
    assert p.wait() == 0, p.tail()
    return rows(out)


def assert_two_node_run(node0: GroupProc, node1: GroupProc) -> None:
    """Both launchers ended well, and they really were two nodes of one world of 2 ranks."""
    for name, p in (("node 0", node0), ("node 1", node1)):
        assert p.wait() == 0, f"{name}\n{p.tail()}"
    assert "2 rank(s)" in node0.text(), node0.tail()  # printed by rank 0 on node 0
    assert "node_rank=1" in node1.text() and "num_local_procs=1" in node1.text(), node1.tail()
    assert "pretraining stopped at step" not in node1.text(), node1.tail()  # rank 0 is not here


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("multinode") / "store"
    subprocess.run(
        [str(BIN / "hiceller"), "synth", "--store", str(path), "--cells", "1500", "--genes", "1000", "--tissues", "6",
         "--no-progress"],
        check=True, env=_env(), timeout=300, capture_output=True,
    )
    return str(path)


def test_two_nodes_train_like_one_node_with_two_ranks(store, tmp_path, procs):
    sets = ["train.steps=6"]
    out = tmp_path / "two_nodes"
    node0, node1 = launch_nodes(procs, store, out, sets)
    assert_two_node_run(node0, node1)
    got = rows(out)
    assert [r["step"] for r in got] == list(range(1, 7))
    assert complete_steps(out) == [6]

    ref = single_node(procs, store, tmp_path / "one_node", sets)
    assert [r["step"] for r in ref] == list(range(1, 7))
    assert losses(got) == pytest.approx(losses(ref), rel=1e-5)


def test_lost_node_ends_the_run_and_resume_auto_recovers(store, tmp_path, procs):
    sets = [f"train.steps={LONG_STEPS}", "train.checkpoint_every=2"]
    out = tmp_path / "run"
    node0, node1 = launch_nodes(procs, store, out, sets)

    # Wait for a complete checkpoint and a step after it, so the kill lands mid-run past a resume point.
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        done, got = complete_steps(out), rows(out)
        if done and got and got[-1]["step"] > done[-1]:
            break
        for name, p in (("node 0", node0), ("node 1", node1)):
            if p.proc.poll() is not None:
                pytest.fail(f"{name} ended (rc {p.proc.returncode}) before step 3\n{p.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no step after a checkpoint within {RUN_TIMEOUT} s\n{node0.tail()}")
        time.sleep(0.05)
    assert got[-1]["step"] < LONG_STEPS, "the run finished before the kill: raise LONG_STEPS"

    node1.kill()  # SIGKILL node 1's launcher and its rank: the node is gone
    t_kill = time.monotonic()
    try:
        rc = node0.proc.wait(timeout=FAIL_WITHIN)
    except subprocess.TimeoutExpired:
        pytest.fail(f"node 0 still running {FAIL_WITHIN} s after node 1 was killed\n{node0.tail()}")
    elapsed = time.monotonic() - t_kill
    assert rc != 0, node0.tail()
    assert elapsed < FAIL_WITHIN
    node0.kill()  # nothing may be left of node 0's group either

    k = complete_steps(out)[-1]
    assert 2 <= k < LONG_STEPS
    node0, node1 = launch_nodes(procs, store, out, sets, resume=True)
    assert_two_node_run(node0, node1)
    assert f"resumed from {out / 'checkpoints' / f'step_{k:08d}'} at step {k}" in node0.text(), node0.tail()
    got = rows(out)
    assert [r["step"] for r in got] == list(range(1, LONG_STEPS + 1))  # each step once: redone rows replaced

    ref = single_node(procs, store, tmp_path / "uninterrupted", sets)
    assert [r["step"] for r in ref] == list(range(1, LONG_STEPS + 1))
    assert losses(got)[k:] == pytest.approx(losses(ref)[k:], rel=1e-5)
    assert losses(got) == pytest.approx(losses(ref), rel=1e-5)
    print(f"node 0 exited {rc} {elapsed:.1f} s after node 1 was killed; resumed at step {k}")
