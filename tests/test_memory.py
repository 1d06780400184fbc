"""Memory over long runs (hiceller/memory.py): the allocator setting every command applies, and a
slope guard on real cells of varying length (bench/soak.py measures the long version)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _ds import cleanup_shm, ds_env, hc

PROBE = "from hiceller.memory import tune_malloc; print(tune_malloc())"


def _probe(**env: str) -> str:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "HICELLER_MALLOC"} | env
    return subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_tune_malloc_sets_the_threshold_unless_told_not_to() -> None:
    assert _probe() == "mmap_threshold"
    assert _probe(HICELLER_MALLOC="system") == "system"
    assert _probe(MALLOC_MMAP_THRESHOLD_="65536") == "system", "a threshold the user exported wins"


def _slope_mb_per_1k(metrics: Path, skip: int) -> float:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = np.array([r["step"] for r in rows if r["step"] > skip], float)
    rss = np.array([r["memory_mb"] for r in rows if r["step"] > skip], float)
    return float(np.polyfit(steps, rss, 1)[0] * 1000)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_pretraining_rss_slope_on_real_cells(shared_data: Path, tmp_path: Path) -> None:
    """Debug pretraining, one rank, 32 cells per micro batch, on a 5k-cell synthetic corpus plus every
    real file of ../shared/data (cells of 98 to 4,807 genes; on Baron alone both settings stayed flat
    over 500 steps, so the mix of lengths is what the guard needs): after 200 steps of warm-up the RSS slope stays under 200 MB per 1,000 steps with
    HiCeller's setting; the C library's defaults, run beside it as the control, climb at several
    times that (bench/RESULTS.md: 622 MB per 1,000 steps over 600 steps)."""
    store = tmp_path / "store"  # bench/annotate_quality.py's pretraining store: synthetic + every real file
    hc("synth", "--store", store, "--cells", "5000", "--genes", "2000", "--seed", "0", "--no-progress")
    hc("ingest", "--store", store, *sorted(shared_data.glob("*.h5ad")), "--no-progress", timeout=1200)
    slopes = {}
    for variant, env in {"hiceller": {}, "system": {"HICELLER_MALLOC": "system"}}.items():
        out = tmp_path / variant
        cmd = [str(Path(sys.executable).parent / "hiceller"), "pretrain", "--config", "debug", "--store", str(store),
               "--out", str(out), "--no-progress", "--set", "train.steps=500", "--set", "train.micro_batch_cells=32",
               "--set", "train.warmup_steps=50", "--set", "train.checkpoint_every=500"]
        proc = subprocess.run(cmd, env=ds_env(60) | env, capture_output=True, text=True, timeout=1200)
        cleanup_shm()
        assert proc.returncode == 0, proc.stderr[-3000:]
        slopes[variant] = _slope_mb_per_1k(out / "metrics.jsonl", skip=200)
    assert slopes["hiceller"] < 200, slopes
    assert slopes["system"] > 2 * max(slopes["hiceller"], 50), f"the control did not grow: {slopes}"
