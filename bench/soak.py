"""Memory over long runs: RSS of pretraining, of the stream alone and of fine-tuning, step by step.

Each (mode, variant) is its own process, so a variant's allocator settings (environment variables
read when the C library starts) apply to it alone:

- ``pretrain``: ``hiceller pretrain --config debug`` on ``--store`` (one rank, micro batches of 32
  cells); RSS is ``metrics.jsonl``'s ``memory_mb`` (the rank's process RSS, every step).
- ``stream``: the same CellStream (``stream_from_config`` of the same config) iterated without a model;
  RSS sampled every ``--every`` batches.
- ``finetune``: ``hiceller finetune`` of ``--store``'s ``--tissue`` (GInf, no mining) for as many
  epochs as it takes to reach ``--steps`` steps; RSS from the round's ``metrics.jsonl``.

Variants (``--variants``; each adds environment to the child):

- ``default``: nothing set (what a user gets without HiCeller's setting);
- ``hiceller``: HiCeller's own process start-up (``hiceller/memory.py``), i.e. the fix under test;
  the other variants run with ``HICELLER_MALLOC=system`` so it is off;
- ``mmap``: ``MALLOC_MMAP_THRESHOLD_=131072`` (a fixed threshold: large buffers always mmapped);
- ``arena2``: ``MALLOC_ARENA_MAX=2``;
- ``mmap1m``: ``MALLOC_MMAP_THRESHOLD_=1048576`` (a fixed threshold of 1 MiB).

Per run one JSON line: RSS at the first sample, after the warm-up (``--warmup`` of the steps), at the
end, the slope per 1,000 steps after warm-up (least squares) and the growth after warm-up in %.
Usage: ``python bench/soak.py --store bench/out/aq/S --modes pretrain stream --steps 1500
--variants default hiceller``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "default": {"HICELLER_MALLOC": "system"},
    "hiceller": {},
    "mmap": {"HICELLER_MALLOC": "system", "MALLOC_MMAP_THRESHOLD_": "131072"},
    "arena2": {"HICELLER_MALLOC": "system", "MALLOC_ARENA_MAX": "2"},
    "mmap1m": {"HICELLER_MALLOC": "system", "MALLOC_MMAP_THRESHOLD_": "1048576"},
}


def summarise(steps: np.ndarray, rss: np.ndarray, warmup: float) -> dict:
    after = steps >= steps.max() * warmup
    s, r = steps[after], rss[after]
    slope = float(np.polyfit(s, r, 1)[0] * 1000) if len(s) > 2 else float("nan")
    return {
        "samples": int(len(steps)),
        "rss_first_mb": round(float(rss[0]), 1),
        "rss_after_warmup_mb": round(float(r[0]), 1),
        "rss_end_mb": round(float(rss[-1]), 1),
        "rss_max_mb": round(float(rss.max()), 1),
        "slope_mb_per_1k_steps": round(slope, 1),
        "growth_after_warmup_pct": round(100 * (float(r[-1]) / float(r[0]) - 1), 1),
    }


EXTRA: dict = {}
"""Per run, beside the RSS series: median cells/s and disk use (filled by the runners)."""


def _metrics(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    EXTRA["cells_per_s_median"] = round(float(np.median([r["cells_per_s"] for r in rows])), 1)
    return np.array([r["step"] for r in rows], float), np.array([r["memory_mb"] for r in rows], float)


def _disk(work: Path, steps: int) -> None:
    """Bytes the run leaves that grow with steps (metrics.jsonl, the MLflow store, logs) per 1,000
    steps, and the checkpoints kept (bounded by train.keep_last)."""
    files = [p for p in work.rglob("*") if p.is_file()]
    ckpt = sum(p.stat().st_size for p in files if "checkpoints" in p.parts)
    rest = sum(p.stat().st_size for p in files if "checkpoints" not in p.parts)
    metrics = sum(p.stat().st_size for p in files if p.name == "metrics.jsonl")
    EXTRA.update(disk_kb_per_1k_steps=round(rest / 1024 / steps * 1000, 1),
                 metrics_jsonl_kb_per_1k_steps=round(metrics / 1024 / steps * 1000, 1),
                 checkpoints_kept_mb=round(ckpt / 2**20, 1))


def _hc(args: list[str], env: dict, cwd: Path) -> None:
    cmd = [sys.executable, "-m", "hiceller", *args, "--no-progress"]
    subprocess.run(cmd, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def run_pretrain(a, env: dict, work: Path) -> tuple[np.ndarray, np.ndarray]:
    out = work / "pre"
    _hc(["pretrain", "--config", "debug", "--store", str(a.store), "--out", str(out), "--set", f"train.steps={a.steps}",
         "--set", "train.micro_batch_cells=32", "--set", "train.warmup_steps=50", "--set", f"train.checkpoint_every={a.steps}",
         "--set", "train.keep_last=1"], env, work)
    return _metrics(out / "metrics.jsonl")


def run_finetune(a, env: dict, work: Path) -> tuple[np.ndarray, np.ndarray]:
    out = work / "ft"
    _hc(["finetune", "--store", str(a.store), "--pretrained", str(a.pretrained), "--tissue", a.tissue, "--out", str(out),
         "--set", f"finetune.epochs={a.finetune_epochs}", "--set", "finetune.mining_rounds=0", "--set", "train.micro_batch_cells=32",
         ], env, work)
    return _metrics(next(out.glob("phase1/metrics.jsonl")))


def child_stream(a) -> None:
    """In the child: iterate the pretraining stream of the debug config, print (batch, RSS) pairs."""
    import psutil

    from data_store.stream import stream_from_config
    from hiceller.config import load_config

    cfg = load_config("debug", ["train.micro_batch_cells=32"])
    stream = stream_from_config(cfg, str(a.store), rank=0, world_size=1)
    loader = stream.dataloader(cfg.data.num_workers)
    proc, n = psutil.Process(), 0
    while n < a.steps:
        for _batch in loader:
            n += 1
            if n % a.every == 0 or n == 1:
                print(json.dumps({"step": n, "memory_mb": proc.memory_info().rss / 2**20}), flush=True)
            if n >= a.steps:
                break
        stream.set_epoch(stream.epoch + 1)


def run_stream(a, env: dict, work: Path) -> tuple[np.ndarray, np.ndarray]:
    cmd = [sys.executable, __file__, "--child-stream", "--store", str(a.store), "--steps", str(a.steps), "--every", str(a.every)]
    out = subprocess.run(cmd, env=env, cwd=work, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return np.array([r["step"] for r in rows], float), np.array([r["memory_mb"] for r in rows], float)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--modes", nargs="+", default=["pretrain", "stream"], choices=["pretrain", "stream", "finetune"])
    p.add_argument("--variants", nargs="+", default=["default", "hiceller"], choices=sorted(VARIANTS))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--every", type=int, default=25, help="stream mode: RSS every N batches")
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of the steps before the slope is fitted")
    p.add_argument("--pretrained", type=Path, default=None, help="finetune mode: pretraining run folder")
    p.add_argument("--tissue", default=None, help="finetune mode: tissue of --store")
    p.add_argument("--finetune-epochs", type=int, default=20)
    p.add_argument("--keep", type=Path, default=None, help="copy every run's RSS series here (JSON per run)")
    p.add_argument("--child-stream", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.store = a.store.resolve()
    a.pretrained = a.pretrained.resolve() if a.pretrained else None
    if a.child_stream:
        return child_stream(a)
    runners = {"pretrain": run_pretrain, "stream": run_stream, "finetune": run_finetune}
    for mode in a.modes:
        for variant in a.variants:
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "HICELLER_MALLOC"}
            env |= VARIANTS[variant] | {"PYTHONPATH": str(REPO)}
            work = Path(tempfile.mkdtemp(prefix=f"soak-{mode}-{variant}-"))
            t0 = time.time()
            EXTRA.clear()
            try:
                steps, rss = runners[mode](a, env, work)
                if mode != "stream":
                    _disk(work, int(steps.max()))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            row = {"bench": "soak", "mode": mode, "variant": variant, "steps": a.steps, "seconds": round(time.time() - t0, 1),
                   **summarise(steps, rss, a.warmup), **EXTRA}
            if a.keep:
                a.keep.mkdir(parents=True, exist_ok=True)
                (a.keep / f"{mode}_{variant}.json").write_text(json.dumps({"step": steps.tolist(), "rss_mb": rss.tolist()}))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
