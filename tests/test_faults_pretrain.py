"""Fault injection on real 2-process pretraining (DeepSpeed launcher, CPU, gloo).

kill -9 of one rank, kill -9 while a checkpoint is being written, a damaged checkpoint and a full
disk: each must end in bounded time with a clear error, leave the complete checkpoints usable, and
``--resume auto`` must then continue to exactly the losses of an uninterrupted run.

Every process is started in its own session (process group) and killed with it in ``finally``;
every wait has a deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from _ds import ds_env

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 24
RUN_TIMEOUT = 420  # one launcher run, start to finish (startup alone is ~30 s on a busy 2-core box)
FAIL_WITHIN = 120  # a failing run must be gone this long after the fault
CKPT = "checkpoints"


from _ds import GroupProc, complete_steps, losses, rows
from _ds import free_port as _free_port


def _env() -> dict[str, str]:
    return ds_env(dist_timeout=30)


class Launch(GroupProc):
    """One ``deepspeed --num_gpus 2 --module pretrain`` run in its own process group, output to a log."""

    def __init__(self, store: str, out: Path, *sets: str, resume: bool = False, stop_after: int | None = None):
        self.out = out
        port = _free_port()
        args = ["--config", "debug", "--store", store, "--out", str(out), "--no-progress",
                f"--set=train.steps={STEPS}", "--set=train.checkpoint_every=2", *[f"--set={s}" for s in sets]]
        if resume:
            args += ["--resume", "auto"]
        if stop_after:
            args += ["--stop-after-steps", str(stop_after)]
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module", "pretrain", *args]
        super().__init__(cmd, out.parent / f"{out.name}-{time.monotonic_ns()}.log", port, _env(), RUN_TIMEOUT)

    def rank_pid(self, rank: int) -> int:
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if "pretrain" in cmd and f"--local_rank={rank}" in cmd:
                return p.pid
        raise AssertionError(f"rank {rank} process not found\n{self.tail()}")


@pytest.fixture()
def launches():
    """Start runs through ``start(...)``; all of them are killed (group-wide) at teardown."""
    started: list[Launch] = []

    def start(*args, **kw) -> Launch:
        run = Launch(*args, **kw)
        started.append(run)
        return run

    try:
        yield start
    finally:
        for run in started:
            run.kill()


def run_ok(start, *args, **kw) -> Launch:
    run = start(*args, **kw)
    rc = run.wait()
    assert rc == 0, run.tail()
    return run


def step_dirs(out: Path) -> list[Path]:
    root = out / CKPT
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def wait_for(run: Launch, cond, what: str, timeout: float = RUN_TIMEOUT, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if run.proc.poll() is not None:
            pytest.fail(f"run ended (rc {run.proc.returncode}) before {what}\n{run.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s\n{run.tail()}")
        time.sleep(every)


def assert_fails_fast(run: Launch, t_fault: float) -> int:
    try:
        rc = run.proc.wait(timeout=FAIL_WITHIN)
    except subprocess.TimeoutExpired:
        pytest.fail(f"launcher still running {FAIL_WITHIN} s after the fault\n{run.tail()}")
    assert rc != 0, run.tail()
    assert time.monotonic() - t_fault < FAIL_WITHIN
    return rc


def assert_resumed_exactly(run: Launch, out: Path, reference: list[dict], from_step: int | None) -> None:
    """The resumed run finished; metrics.jsonl has each step once; losses equal the reference's."""
    text = run.text()
    if from_step is None:
        assert "resumed from" not in text, run.tail()
    else:
        cp = out / CKPT / f"step_{from_step:08d}"
        assert f"resumed from {cp} at step {from_step}" in text, run.tail()
    got = rows(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    start = from_step or 0
    assert losses(got)[start:] == pytest.approx(losses(reference)[start:], rel=1e-5)
    assert losses(got) == pytest.approx(losses(reference), rel=1e-5)
    # Every checkpoint left is complete: incomplete ones were re-saved or pruned.
    assert step_dirs(out) and all((p / "COMPLETE").is_file() for p in step_dirs(out))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("faults") / "store"
    subprocess.run(
        [str(BIN / "hiceller"), "synth", "--store", str(path), "--cells", "1500", "--genes", "1000", "--tissues", "6",
         "--no-progress"],
        check=True, env=_env(), timeout=300, capture_output=True,
    )
    return str(path)


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The uninterrupted 2-process run every faulty one must end up equal to."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run = Launch(store, out)
    try:
        rc = run.wait()
        assert rc == 0, run.tail()
    finally:
        run.kill()
    got = rows(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    return out, got


def test_kill9_one_rank_fails_fast_and_resume_is_exact(store, reference, tmp_path, launches):
    out = tmp_path / "run"
    run = launches(store, out)
    # A complete checkpoint and a step after it, so the kill lands mid-run, past a resume point.
    wait_for(run, lambda: complete_steps(out) and rows(out) and rows(out)[-1]["step"] > complete_steps(out)[-1],
             "step after a complete checkpoint")
    os.kill(run.rank_pid(1), signal.SIGKILL)
    t_fault = time.monotonic()
    assert_fails_fast(run, t_fault)
    run.kill()  # nothing may be left of the group
    k = complete_steps(out)[-1]
    assert 2 <= k < STEPS
    resumed = launches(store, out, resume=True)
    assert resumed.wait() == 0, resumed.tail()
    assert_resumed_exactly(resumed, out, reference[1], k)


def _kill_while_saving(run: Launch, out: Path, which: str) -> Path | None:
    """Freeze the run (SIGSTOP to its group) the moment a step_* folder without COMPLETE exists;
    if it is still incomplete then, kill -9 rank 0 (which writes COMPLETE) and return that folder,
    else let the run go on and wait for the next save. None: the first save completed uncaught."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        if run.proc.poll() is not None:
            pytest.fail(f"run ended (rc {run.proc.returncode}) before a kill during a save\n{run.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no checkpoint being written within {RUN_TIMEOUT} s\n{run.tail()}")
        done = complete_steps(out)
        if which == "first" and done:
            return None
        pending = [p for p in step_dirs(out) if not (p / "COMPLETE").is_file()]
        if not pending or (which == "later" and len(done) < 2):
            time.sleep(0.005)
            continue
        run.signal_group(signal.SIGSTOP)
        try:
            if not (pending[-1] / "COMPLETE").is_file():
                os.kill(run.rank_pid(0), signal.SIGKILL)
                return pending[-1]
        finally:
            run.signal_group(signal.SIGCONT)


@pytest.mark.parametrize("which", ["later", "first"])
def test_kill9_while_writing_a_checkpoint(store, reference, tmp_path, launches, which):
    """kill -9 of rank 0 while a checkpoint is being written (checkpoint_every=1).

    ``later``: complete checkpoints exist, resume auto takes the newest of them. ``first``: the kill
    hits the first checkpoint, so resume auto has nothing complete and starts over (no refusal)."""
    for attempt in range(3):  # the first save is a single chance; a busy machine may let it slip
        out = tmp_path / f"run{attempt}"
        run = launches(store, out, "train.checkpoint_every=1")
        killed = _kill_while_saving(run, out, which)
        if killed is not None:
            break
        run.kill()
    else:
        pytest.fail("three runs saved their first checkpoint before it could be caught")
    assert_fails_fast(run, time.monotonic())
    run.kill()
    assert killed.is_dir() and not (killed / "COMPLETE").exists()
    done = complete_steps(out)
    assert all(s < int(killed.name[5:]) for s in done)
    assert bool(done) == (which == "later")
    resumed = launches(store, out, "train.checkpoint_every=1", resume=True)
    assert resumed.wait() == 0, resumed.tail()
    assert_resumed_exactly(resumed, out, reference[1], done[-1] if done else None)


def test_damaged_checkpoint_is_refused(store, reference, tmp_path, launches):
    """A truncated model file in the newest complete checkpoint: exit 2 with one line naming the
    file (no traceback, nothing loaded, nothing written into the checkpoints)."""
    ref_out, _ = reference
    out = tmp_path / "run"
    out.mkdir()
    # The run's own files, not its MLflow store (which points at the reference's artifact folder).
    shutil.copytree(ref_out / CKPT, out / CKPT)
    for name in ("config.toml", "vocab.json", "metrics.jsonl"):
        shutil.copy2(ref_out / name, out / name)
    newest = step_dirs(out)[-1]
    assert (newest / "COMPLETE").is_file()
    victim = newest / "mp_rank_00_model_states.pt"
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (out / CKPT).rglob("*") if p.is_file()}
    metrics_before = (out / "metrics.jsonl").read_text()

    run = launches(store, out, resume=True)
    rc = run.wait()
    text = run.text()
    assert rc == 2, run.tail()
    assert "Traceback" not in text, run.tail()
    errors = [line for line in text.splitlines() if line.startswith("hiceller pretrain: error:")]
    assert errors, run.tail()
    for line in errors:
        assert str(victim) in line and "damaged" in line, line
        assert "step_" in line.split("--resume", 1)[-1]  # points at the earlier complete checkpoint
    after = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (out / CKPT).rglob("*") if p.is_file()}
    assert after == before
    assert (out / "metrics.jsonl").read_text() == metrics_before


@pytest.fixture()
def small_disk(tmp_path):
    """A 24 MiB tmpfs (we run as root in CI containers); skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small tmpfs")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up ({proc.stderr.strip() or proc.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_full_disk_while_saving(store, reference, small_disk, launches):
    """Stop at step 2 (checkpoint), fill the disk, resume: the step-4 save fails with a clear error,
    step 2 stays complete; with space again, resume auto finishes exactly like the reference."""
    out = small_disk / "run"
    run_ok(launches, store, out, stop_after=2)
    assert complete_steps(out) == [2]
    step2 = {p.name: p.read_bytes() for p in (out / CKPT / "step_00000002").iterdir()}

    st = os.statvfs(small_disk)
    free = st.f_bavail * st.f_frsize
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, free - 300 * 1024)  # room for metrics rows, not for a checkpoint (~2.3 MiB)
    finally:
        os.close(fd)

    run = launches(store, out, resume=True)
    rc = run.wait()
    text = run.text()
    assert rc == 2, run.tail()
    assert "Traceback" not in text, run.tail()
    errors = [line for line in text.splitlines() if line.startswith("hiceller pretrain: error:")]
    assert errors, run.tail()
    for line in errors:
        assert "could not write checkpoint" in line and "step_00000004" in line, line
        assert "earlier checkpoints are intact" in line, line
    assert any("disk looks full" in line or "No space left" in line for line in errors), errors
    assert complete_steps(out) == [2]
    assert {p.name: p.read_bytes() for p in (out / CKPT / "step_00000002").iterdir()} == step2

    filler.unlink()
    resumed = launches(store, out, resume=True)
    assert resumed.wait() == 0, resumed.tail()
    assert_resumed_exactly(resumed, out, reference[1], 2)
