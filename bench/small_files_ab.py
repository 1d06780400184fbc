"""Goal 2 of issue 2/8 side by side: the small-files ingest of bench/scale.py (part A) run by two
or more code trees in one run, interleaved, so that the machine's load hits every tree alike.

Run: ``python bench/small_files_ab.py --tree before=/path/to/old/checkout --tree after=. --reps 3``;
``--tree plain=. --tree gl=. --tree-flags 'gl=--gene-list panel'`` compares ingest flags on one tree.
Each tree runs ``python -m hiceller ingest`` with ``PYTHONPATH`` set to it, on part A's inputs (the
same 60k cells as 20 files and as 1,000 files of 60 cells, and one 60-cell file for the start-up;
made by ``python bench/scale.py --parts A`` under ``--out``). Prints medians of wall and CPU seconds
(the process and its validation workers) and ends with one JSON line.

``--per-file N`` instead times, per tree, the validation of N of the 60-cell files in one process
(CPU ms per file, after 20 files of warm-up; ``--gene-list NAME`` declares one): the fixed cost that the
1,000-file set pays 980 times more.
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
PER_FILE = """
import sys, time
from pathlib import Path
import data_store.ingest as ing
files = sorted(Path(sys.argv[1]).glob("*.h5ad"))[: 20 + int(sys.argv[2])]
opts = ing.IngestOptions(label_column="cell_type", batch_column="donor", tissue="lung", disease="normal", gene_list=sys.argv[3] or None)
for p in files[:20]:  # warm-up (and the first, full read of a declared gene list)
    ing._check_one(p, opts)
t0 = time.process_time()
for p in files[20:]:
    ing._check_one(p, opts)
print((time.process_time() - t0) / len(files[20:]) * 1e3)
"""


def per_file(trees: dict[str, str], folder: Path, n: int, reps: int, gene_list: str = "") -> dict[str, list[float]]:
    """CPU ms per file of validation, each tree in its own process, interleaved."""
    import subprocess

    out: dict[str, list[float]] = {t: [] for t in trees}
    for _ in range(reps):
        for tree, path in trees.items():
            env = dict(os.environ, PYTHONPATH=str(Path(path).resolve()))
            r = subprocess.run([sys.executable, "-c", PER_FILE, str(folder), str(n), gene_list], env=env, capture_output=True, text=True, check=True)
            out[tree].append(round(float(r.stdout.split()[-1]), 2))
            print(f"{tree}: {out[tree][-1]} ms per file", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a checkout to run (repeat)")
    ap.add_argument("--tree-flags", action="append", default=[], metavar="NAME=FLAGS",
                    help="extra ingest flags of one tree, e.g. 'gl=--gene-list panel' (the same path may run twice)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "scale" / "full", help="bench/scale.py's output folder")
    ap.add_argument("--per-file", type=int, metavar="N", help="time the validation of N small files per tree instead")
    ap.add_argument("--gene-list", default="", metavar="NAME", help="with --per-file: the files declare this gene list")
    args = ap.parse_args(argv)
    trees = dict(t.split("=", 1) for t in args.tree)
    tree_flags = {name: flags.split() for name, flags in (t.split("=", 1) for t in args.tree_flags)}
    small = args.out / "small"
    for folder in SETS.values():
        if not (small / folder / "files.tsv").is_file():
            raise SystemExit(f"{small / folder} is missing: run python bench/scale.py --parts A --out {args.out.parent} first")
    if args.per_file:
        runs = per_file(trees, small / "1000_files", args.per_file, args.reps, args.gene_list)
        print(json.dumps({t: {"ms_per_file_runs": v, "ms_per_file_median": statistics.median(v)} for t, v in runs.items()}))
        return 0
    wall = {t: {s: [] for s in SETS} for t in trees}
    cpu = {t: {s: [] for s in SETS} for t in trees}
    work = Path(tempfile.mkdtemp(prefix="small_files_ab_"))
    try:
        for rep in range(args.reps):
            for tree, path in trees.items():
                env = dict(os.environ, PYTHONPATH=str(Path(path).resolve()))
                for name, folder in SETS.items():
                    store = work / f"{tree}_{folder}"
                    flags = ([] if name == "start-up" else ["--no-optimize"]) + tree_flags.get(tree, [])
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
