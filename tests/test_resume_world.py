"""Resuming pretraining on another number of ranks (DeepSpeed universal checkpoints + the loaders'
epoch continued on the new world): 2 -> 1, 1 -> 2 and 2 -> 3 ranks, over ZeRO 3 (fp32), 1 and 2 (bf16).

Each case runs the old world uninterrupted past the end of the first epoch, with a checkpoint at
step ``stop``; a copy of its run folder as it was at that checkpoint is resumed on the new world
with ``--resume auto`` and nothing else changed but the ranks (and grad_accum where it keeps the
global batch). Every micro batch's cells are recorded (tests/_cells_seen.py): over the first epoch
the old world's steps up to ``stop`` and the new world's steps after it see every cell exactly once.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _ds import cleanup_shm, ds_env, free_port, losses, rows

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
N_CELLS = 256
"""With 16 cells per micro batch: 8 steps of 2 x 16 cells per epoch, no cell dropped."""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("resume-world") / "store"
    subprocess.run([sys.executable, "-m", "hiceller", "synth", "--store", str(path), "--cells", str(N_CELLS), "--genes", "300",
                    "--tissues", "3", "--no-progress"], check=True, env=ds_env(), capture_output=True)
    return str(path)


def pretrain(store: str, out: Path, nproc: int, *sets: str, resume: bool = False) -> str:
    """The run on ``nproc`` processes (one per rank, the environment the deepspeed launcher gives
    them); every micro batch's cells recorded under ``out``/../seen-``out.name``; returns rank 0's log."""
    seen = out.parent / f"seen-{out.name}"
    seen.mkdir(exist_ok=True)
    args = ["--config", "debug", "--store", store, "--out", str(out), "--no-progress", "--set=train.keep_last=50",
            *[f"--set={s}" for s in sets], *(["--resume", "auto"] if resume else [])]
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {**ds_env(), "HICELLER_SEEN_DIR": str(seen), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_SIZE": str(nproc), "CROSS_RANK": "0", "CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        log = out.parent / f"{out.name}-rank{rank}.log"
        with open(log, "w") as f:
            procs.append((subprocess.Popen([sys.executable, str(ROOT / "tests" / "_cells_seen.py"), *args], env=env,
                                           stdout=f, stderr=subprocess.STDOUT, cwd=str(out.parent)), log))
    try:
        codes = [p.wait(timeout=600) for p, _ in procs]
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
        cleanup_shm(port)
    text = procs[0][1].read_text()
    assert codes == [0] * nproc, "".join(log.read_text()[-3000:] for _, log in procs)
    return text


def seen(out: Path, up_to: int | None = None, after: int = 0) -> list[tuple[int, int]]:
    """(epoch, joinid) of every cell trained on in steps ``after < step <= up_to``, all ranks."""
    got = []
    for f in sorted((out.parent / f"seen-{out.name}").glob("rank*.txt")):
        for line in f.read_text().splitlines():
            step, epoch, *jids = map(int, line.split())
            if step > after and (up_to is None or step <= up_to):
                got += [(epoch, j) for j in jids]
    return got


def resume_case(store: str, tmp_path: Path, old: tuple[int, list[str]], new: tuple[int, list[str]], stop: int, steps: int,
                common: list[str]) -> tuple[list[dict], list[dict], list[tuple[int, int]]]:
    """(uninterrupted rows, resumed rows, first-epoch cells of the resumed run in order of steps)."""
    full, part = tmp_path / "full", tmp_path / "part"
    sets = [f"train.steps={steps}", f"train.checkpoint_every={stop}", *common]
    pretrain(store, full, old[0], *sets, *old[1])
    # The run folder as a run stopped (or killed) after its checkpoint at `stop` leaves it.
    shutil.copytree(full, part)
    for cp in (part / "checkpoints").glob("step_*"):
        if int(cp.name[5:]) > stop:
            shutil.rmtree(cp)
    log = pretrain(store, part, new[0], *sets, *new[1], resume=True)
    assert f"(saved on {old[0]} rank(s)) at step {stop} on {new[0]} rank(s)" in log
    assert (part / "checkpoints" / f"step_{stop:08d}" / "universal").is_dir()
    ref, got = rows(full), rows(part)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in ref], rel=1e-9)  # the schedule goes on
    # Over the first epoch, before and after the resume, every cell once; the next epoch began.
    first = [(e, j) for e, j in seen(full, up_to=stop) + seen(part, after=stop) if e == 0]
    assert sorted(j for e, j in seen(full) if e == 0) == list(range(N_CELLS))  # what the uninterrupted run saw
    assert sorted(j for _, j in first) == list(range(N_CELLS))
    assert any(e == 1 for e, _ in seen(part, after=stop))
    return ref, got, first


def test_two_to_one_rank_zero3_fp32_continues_exactly(store, tmp_path):
    """2 ranks -> 1 rank reading both ranks' shards (train.data_shards_per_rank=2): the same cells
    and masks as the uninterrupted run, so the re-partitioned optimizer state must give its losses."""
    ref, got, _ = resume_case(store, tmp_path, (2, []), (1, ["train.grad_accum=2", "train.data_shards_per_rank=2"]),
                              stop=3, steps=10, common=["deepspeed.zero_stage=3", 'deepspeed.precision="fp32"'])
    assert losses(got) == pytest.approx(losses(ref), rel=1e-4)


def _close_to(ref: list[dict], got: list[dict], stop: int, rel: float) -> None:
    """After the resume the data differ (the rest of the epoch is dealt anew over the new ranks): the
    loss follows the uninterrupted curve within ``rel`` on average, and never jumps away from it."""
    assert losses(got)[:stop] == losses(ref)[:stop]
    a, b = losses(ref)[stop:], losses(got)[stop:]
    assert sum(b) / len(b) == pytest.approx(sum(a) / len(a), rel=rel)
    assert all(y == pytest.approx(x, rel=3 * rel) for x, y in zip(a, b))


def test_one_to_two_ranks_zero1_bf16(store, tmp_path):
    ref, got, _ = resume_case(store, tmp_path, (1, ["train.grad_accum=2"]), (2, []), stop=3, steps=10,
                              common=["deepspeed.zero_stage=1", 'deepspeed.precision="bf16"'])
    _close_to(ref, got, 3, rel=0.05)


def test_two_to_three_ranks_zero2_bf16(store, tmp_path):
    """3 ranks: not a multiple of 2; the 192 cells left after step 2 make 4 batches on each."""
    ref, got, _ = resume_case(store, tmp_path, (2, []), (3, []), stop=2, steps=10,
                              common=["deepspeed.zero_stage=2", 'deepspeed.precision="bf16"'])
    _close_to(ref, got, 2, rel=0.05)
