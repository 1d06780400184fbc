"""Goal 2 of issue 2/8 side by side: the small-files ingest of bench/scale.py (part A) run by two
or more code trees in one run, interleaved, so that the machine's load hits every tree alike.

Run: ``python bench/small_files_ab.py --tree before=/path/to/old/checkout --tree after=. --reps 3``.
Each tree runs ``python -m hiceller ingest`` with ``PYTHONPATH`` set to it, on part A's inputs (the
same 60k cells as 20 files and as 1,000 files of 60 cells, and one 60-cell file for the start-up;
made by ``python bench/scale.py --parts A`` under ``--out``). Prints medians of wall and CPU seconds
(the process and its validation workers) and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import run_watched  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETS = {"20 files": "20_files", "1000 files": "1000_files", "start-up": "one_file"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a checkout to run (repeat)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "scale" / "full", help="bench/scale.py's output folder")
    args = ap.parse_args(argv)
    trees = dict(t.split("=", 1) for t in args.tree)
    small = args.out / "small"
    for folder in SETS.values():
        if not (small / folder / "files.tsv").is_file():
            raise SystemExit(f"{small / folder} is missing: run python bench/scale.py --parts A --out {args.out.parent} first")
    wall = {t: {s: [] for s in SETS} for t in trees}
    cpu = {t: {s: [] for s in SETS} for t in trees}
    work = Path(tempfile.mkdtemp(prefix="small_files_ab_"))
    try:
        for rep in range(args.reps):
            for tree, path in trees.items():
                env = dict(os.environ, PYTHONPATH=str(Path(path).resolve()))
                for name, folder in SETS.items():
                    store = work / f"{tree}_{folder}"
                    flags = [] if name == "start-up" else ["--no-optimize"]
                    cmd = [sys.executable, "-m", "hiceller", "ingest", "--no-progress", "--store", str(store), "--manifest", str(small / folder / "files.tsv"), *flags]
                    r = run_watched(cmd, env=env)
                    if r["rc"] != 0:
                        raise SystemExit(f"{tree}: {name} failed:\n{r['stderr'][-2000:]}")
                    shutil.rmtree(store, ignore_errors=True)
                    wall[tree][name].append(round(r["wall_s"], 1))
                    cpu[tree][name].append(round(r["cpu_s"], 1))
                    print(f"[rep {rep + 1}/{args.reps}] {tree} {name}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {}
    for tree in trees:
        w = {s: statistics.median(v) for s, v in wall[tree].items()}
        c = {s: statistics.median(v) for s, v in cpu[tree].items()}
        out[tree] = {
            "wall_runs": wall[tree],
            "cpu_runs": cpu[tree],
            "wall_median": w,
            "cpu_median": c,
            "t1000_over_t20": round(w["1000 files"] / w["20 files"], 2),
            "t1000_over_t20_runs": [round(a / b, 2) for a, b in zip(wall[tree]["1000 files"], wall[tree]["20 files"])],
            "cpu1000_over_cpu20": round(c["1000 files"] / c["20 files"], 2),
            "goal_1000_within_1.5x_of_20_plus_startup": w["1000 files"] <= 1.5 * w["20 files"] + w["start-up"],
        }
        print(f"{tree}: 20 files {w['20 files']:.1f} s, 1000 files {w['1000 files']:.1f} s ({out[tree]['t1000_over_t20']}x wall, "
              f"{out[tree]['cpu1000_over_cpu20']}x CPU), start-up {w['start-up']:.1f} s")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
