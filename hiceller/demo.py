"""`make demo`: the whole HiCeller pipeline on generated data (plus ../shared/data when present).

Each stage runs the real CLI command, as a user would type it, and the command is printed first.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _run(cmd: list[str]) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t = time.time()
    rc = subprocess.call(cmd)
    if rc != 0:
        sys.exit(f"demo: stage failed (exit {rc}): {shlex.join(cmd)}")
    print(f"  ({time.time() - t:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hiceller.demo", description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--cells", type=int, default=30_000)
    ap.add_argument("--steps", type=int, default=100, help="pretraining steps (debug model, 2 CPU ranks)")
    args = ap.parse_args(argv)
    hc = [str(Path(sys.executable).with_name("hiceller"))]
    store = args.out / "store"
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _run(hc + ["synth", "--store", str(store), "--cells", str(args.cells), "--seed", "0"])
    files = sorted(args.shared.glob("*.h5ad")) if args.shared.is_dir() else []
    if files:
        _run(hc + ["ingest", "--store", str(store), "--skip-existing", *map(str, files)])
    else:
        print(f"\n{args.shared} not found: the real data sets are skipped")
    _run(hc + ["info", "--store", str(store)])
    run = args.out / "pretrain"
    _run(
        hc
        + ["launch", "--config", "debug", "--store", str(store), "--out", str(run), "--nodes", "1", "--gpus-per-node", "2"]
        + ["--set", f"train.steps={args.steps}", "--set", "deepspeed.zero_stage=2", "--resume", "auto"]
    )
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    print(f"  store:            {store}")
    print(f"  pretraining run:  {run} (loss curve: {run / 'loss_curve.png'})")
    print(f"  MLflow UI:        {hc[0]} ui --run {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
