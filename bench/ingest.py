"""Ingest throughput and memory: `hiceller ingest` against `tiledbsoma.io.from_anndata`, same file.

Run: ``python bench/ingest.py --quick`` (about a minute) or ``python bench/ingest.py`` (full:
100k / 200k / 400k cells for ingest, from_anndata at 200k; 21 minutes with ``--repeats 3`` on 2
shared cores). ``--help`` for sizes.

The input is a synthetic .h5ad of N cells x 20k genes, ~1000 non-zero integer counts per cell
(log-normal depth, skewed gene popularity), written chunk by chunk with h5py so that the generator
stays at low memory whatever N. Each measured command runs in its own subprocess; its peak RSS is
the maximum over the run of the summed RSS of its whole process tree, polled with psutil every
50 ms, and never less than the kernel's max RSS of the process (``/usr/bin/time`` when present).

Prints a table and ends with ONE JSON line (for CI logs) including
``ingest_over_from_anndata_speed`` and ``from_anndata_over_ingest_peak_rss``.
``--profile N`` instead runs an in-process ingest of N cells and splits its time into
h5ad read, validation, vocabulary mapping + sort, and TileDB write.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
GOALS = {
    "speed": 5.0,  # ingest >= 5x faster than from_anndata
    "rss_ratio": 4.0,  # and >= 4x less peak memory
    "rss_gib": 2.0,  # ingest peak under 2 GiB
    "linearity": 1.10,  # largest size within 10% of proportional time
    "flatness": 1.20,  # peak RSS of the largest within 20% of the smallest
}
FROM_ANNDATA = """
import sys, anndata, tiledbsoma.io
a = anndata.read_h5ad(sys.argv[1])
tiledbsoma.io.from_anndata(sys.argv[2], a, measurement_name="RNA")
"""


# ----------------------------------------------------------------------------- input file


def write_h5ad(path: Path, n_cells: int, n_genes: int, mean_nnz: int, seed: int = 0, chunk: int = 2000) -> None:
    """A CSR .h5ad written chunk by chunk (peak memory ~ one chunk of the dense Bernoulli draw).

    Gene popularity is gamma-skewed like real data (a few genes in most cells, most genes rare);
    per-cell depth is log-normal around ``mean_nnz``; counts are 1 + geometric (mostly 1-3).
    """
    import anndata as ad
    import h5py
    import pandas as pd

    rng = np.random.default_rng(seed)
    pop = rng.gamma(0.6, 1.0, n_genes)
    pop = (pop / pop.mean()).astype(np.float32)  # mean 1: P(gene g in cell c) = depth_c / G * pop_g
    types = np.array([f"type_{k}" for k in range(20)])
    type_p = 1 / np.arange(1, 21) ** 1.5
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(types[rng.choice(20, n_cells, p=type_p / type_p.sum())]),
            "batch": pd.Categorical(np.array([f"donor_{k}" for k in range(8)])[rng.integers(0, 8, n_cells)]),
        },
        index=pd.Index([f"cell_{i}" for i in range(n_cells)], dtype=object),
    )
    var = pd.DataFrame(index=pd.Index([f"GENE{g:05d}" for g in range(n_genes)], dtype=object))
    tmp = path.with_suffix(".partial")
    ad.AnnData(obs=obs, var=var).write_h5ad(tmp)  # everything but X
    with h5py.File(tmp, "a") as f:
        if "X" in f:
            del f["X"]
        g = f.create_group("X")
        g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, n_genes)})
        kw = {"maxshape": (None,), "chunks": (1 << 18,)}
        # One index dtype for indices and indptr, as scipy makes them: int32 unless the non-zeros
        # could overflow it. (Mixed int32/int64 makes scipy convert the whole index array on
        # every row slice, which slowed from_anndata 300x in a first version of this script.)
        idx = np.int32 if n_cells * mean_nnz * 2 < 2**31 else np.int64
        data = g.create_dataset("data", shape=(0,), dtype=np.float32, **kw)
        indices = g.create_dataset("indices", shape=(0,), dtype=idx, **kw)
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        total = 0
        for a in range(0, n_cells, chunk):
            b = min(a + chunk, n_cells)
            depth = np.clip(rng.lognormal(np.log(mean_nnz), 0.35, b - a), 100, n_genes // 2).astype(np.float32)
            p = np.minimum(depth[:, None] / n_genes * pop[None, :], 1.0)
            rows, cols = np.nonzero(rng.random((b - a, n_genes), dtype=np.float32) < p)
            # Mostly 1-3, one in ten up to ~20 higher: integer counts with a tail.
            vals = (rng.geometric(0.55, rows.size) + (rng.random(rows.size) < 0.1) * rng.integers(0, 20, rows.size)).astype(np.float32)
            n = rows.size
            data.resize((total + n,))
            indices.resize((total + n,))
            data[total:] = vals
            indices[total:] = cols.astype(idx)
            indptr[a + 1 : b + 1] = total + np.cumsum(np.bincount(rows, minlength=b - a))
            total += n
        g.create_dataset("indptr", data=indptr.astype(idx))
    os.replace(tmp, path)


def ensure_h5ad(workdir: Path, n_cells: int, n_genes: int, mean_nnz: int) -> tuple[Path, float]:
    path = workdir / f"cells{n_cells}_genes{n_genes}_nnz{mean_nnz}.h5ad"
    if path.is_file():
        return path, 0.0
    t = time.perf_counter()
    write_h5ad(path, n_cells, n_genes, mean_nnz)
    return path, time.perf_counter() - t


# ----------------------------------------------------------------------------- measuring


@dataclass
class Run:
    seconds: float
    peak_rss: int
    """Bytes: max over the run of the process tree's summed RSS (and >= the kernel's max RSS)."""
    returncode: int
    output: str


def measure(cmd: list[str]) -> Run:
    """Run cmd, polling the RSS of its process tree; wall time from start to exit."""
    import psutil

    time_bin = Path("/usr/bin/time").exists()
    report = tempfile.NamedTemporaryFile(prefix="bench-time-", delete=False)
    report.close()
    full = ["/usr/bin/time", "-f", "%M", "-o", report.name, *cmd] if time_bin else cmd
    peak = 0
    stop = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(full, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def poll() -> None:
        nonlocal peak
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                peak = max(peak, rss)
            except psutil.NoSuchProcess:
                return
            stop.wait(0.05)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    if time_bin:
        try:
            kb = int(Path(report.name).read_text().strip().splitlines()[-1])
            peak = max(peak, kb * 1024)
        except (ValueError, IndexError):
            pass
    os.unlink(report.name)
    return Run(seconds, peak, proc.returncode, out)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_ingest(h5ad: Path, store: Path) -> Run:
    shutil.rmtree(store, ignore_errors=True)
    r = measure([sys.executable, "-m", "hiceller", "ingest", "--no-progress", "--store", str(store), str(h5ad)])
    if r.returncode != 0:
        raise SystemExit(f"hiceller ingest failed:\n{r.output}")
    return r


def run_from_anndata(h5ad: Path, store: Path) -> Run:
    shutil.rmtree(store, ignore_errors=True)
    r = measure([sys.executable, "-c", FROM_ANNDATA, str(h5ad), str(store)])
    if r.returncode != 0:
        raise SystemExit(f"from_anndata failed:\n{r.output}")
    return r


def run_synth(store: Path, n_cells: int, n_genes: int) -> Run:
    shutil.rmtree(store, ignore_errors=True)
    r = measure([sys.executable, "-m", "hiceller", "synth", "--no-progress", "--store", str(store), "--cells", str(n_cells), "--genes", str(n_genes)])
    if r.returncode != 0:
        raise SystemExit(f"hiceller synth failed:\n{r.output}")
    return r


def check_store(store: Path, h5ad: Path) -> None:
    """Refuse to report a speed for a store that does not hold the file: cells and non-zeros."""
    import h5py
    import tiledbsoma as soma

    with h5py.File(h5ad, "r") as f:
        n, nnz = int(f["X"].attrs["shape"][0]), int(f["X/data"].shape[0])
    with soma.Experiment.open(str(store)) as exp:
        x = exp.ms["RNA"].X["data"]
        got = x.nnz
        n_obs = exp.obs.count
    if (n_obs, got) != (n, nnz):
        raise SystemExit(f"{store}: {n_obs} cells / {got} non-zeros, expected {n} / {nnz}")


# ----------------------------------------------------------------------------- profile


def profile(workdir: Path, n_cells: int, n_genes: int, mean_nnz: int) -> dict:
    """Split one in-process ingest's time into its stages (wrapping the functions it calls)."""
    import data_store.ingest as ing
    import data_store.store as st

    h5ad, _ = ensure_h5ad(workdir, n_cells, n_genes, mean_nnz)
    spent: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t

        return wrapper

    def timed_iter(name, fn):
        def wrapper(*a, **k):
            it = fn(*a, **k)
            while True:
                t = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
                    return
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
                yield item

        return wrapper

    from data_store.h5ad_reader import H5adFile

    H5adFile.iter_csr_chunks = timed_iter("h5ad read (both passes)", H5adFile.iter_csr_chunks)  # type: ignore[method-assign]
    ing._check_chunk = timed("validate values", ing._check_chunk)
    st.CorpusStore.write_cells = timed("TileDB write (X + obs)", st.CorpusStore.write_cells)  # type: ignore[method-assign]
    ing._write_batch = timed("write pass total", ing._write_batch)
    ing.check_h5ad = timed("check pass total", ing.check_h5ad)
    store = workdir / "profile_store"
    shutil.rmtree(store, ignore_errors=True)
    t = time.perf_counter()
    ing.ingest_files(str(store), [h5ad], ing.IngestOptions())
    total = time.perf_counter() - t
    shutil.rmtree(store, ignore_errors=True)
    # Mapping + sort = write pass minus its reads and writes.
    write_reads = spent["h5ad read (both passes)"] - (spent["check pass total"] - spent["validate values"])
    spent["vocab map + sort (write pass)"] = spent["write pass total"] - spent["TileDB write (X + obs)"] - max(write_reads, 0)
    return {"cells": n_cells, "total_s": round(total, 2), **{k: round(v, 2) for k, v in spent.items()}}


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k + 20k cells, from_anndata at 20k (about a minute)")
    parser.add_argument("--sizes", help="comma-separated cell counts for ingest (default 100000,200000,400000)")
    parser.add_argument("--from-anndata-at", type=int, help="size at which from_anndata runs too (default 200000)")
    parser.add_argument("--synth-cells", type=int, help="cells for the synth rate (default 100000)")
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--mean-nnz", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1, help="hiceller ingest runs per size; medians are reported")
    parser.add_argument("--other-repeats", type=int, default=1, help="runs of from_anndata and of synth (medians)")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "ingest")
    parser.add_argument("--keep-inputs", action="store_true", help="keep the generated .h5ad files for the next run")
    parser.add_argument("--profile", type=int, metavar="N", help="only profile an in-process ingest of N cells")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.profile:
        result = {"bench": "ingest_profile", **profile(args.workdir, args.profile, args.genes, args.mean_nnz)}
        for k, v in result.items():
            print(f"{k:32} {v}")
        print(json.dumps(result))
        return
    sizes = [int(s) for s in (args.sizes or ("10000,20000" if args.quick else "100000,200000,400000")).split(",")]
    fa_at = args.from_anndata_at or (20_000 if args.quick else 200_000)
    synth_cells = args.synth_cells or (20_000 if args.quick else 100_000)
    if fa_at not in sizes:
        sizes = sorted({*sizes, fa_at})

    rows = []
    made = []
    gen_seconds = {}
    ours: dict[int, dict] = {}
    theirs: dict | None = None
    for n in sizes:
        h5ad, gen = ensure_h5ad(args.workdir, n, args.genes, args.mean_nnz)
        made.append(h5ad)
        gen_seconds[n] = round(gen, 1)
        store = args.workdir / f"store_{n}"
        runs = [run_ingest(h5ad, store) for _ in range(args.repeats)]
        check_store(store, h5ad)
        t = float(np.median([r.seconds for r in runs]))
        rss = int(np.median([r.peak_rss for r in runs]))
        ours[n] = {"seconds": round(t, 2), "cells_per_s": round(n / t), "peak_rss_mib": round(rss / 2**20), "bytes_per_cell": round(du(store) / n)}
        rows.append(("hiceller ingest", n, t, rss, du(store) / n))
        shutil.rmtree(store, ignore_errors=True)
        if n == fa_at:
            fstore = args.workdir / f"from_anndata_{n}"
            fruns = [run_from_anndata(h5ad, fstore) for _ in range(args.other_repeats)]
            check_store(fstore, h5ad)
            ft = float(np.median([r.seconds for r in fruns]))
            frss = int(np.median([r.peak_rss for r in fruns]))
            theirs = {"cells": n, "seconds": round(ft, 2), "cells_per_s": round(n / ft), "peak_rss_mib": round(frss / 2**20), "bytes_per_cell": round(du(fstore) / n)}
            rows.append(("tiledbsoma.io.from_anndata", n, ft, frss, du(fstore) / n))
            shutil.rmtree(fstore, ignore_errors=True)
        print(f"... {n} cells done", file=sys.stderr, flush=True)

    sstore = args.workdir / "synth_store"
    sruns = [run_synth(sstore, synth_cells, args.genes) for _ in range(args.other_repeats)]
    st = float(np.median([r.seconds for r in sruns]))
    srss = int(np.median([r.peak_rss for r in sruns]))
    rows.append(("hiceller synth", synth_cells, st, srss, du(sstore) / synth_cells))
    shutil.rmtree(sstore, ignore_errors=True)
    if not args.keep_inputs:
        for p in made:
            p.unlink(missing_ok=True)

    small, large = min(ours), max(ours)
    linearity = ours[large]["seconds"] / (large / small * ours[small]["seconds"])
    flatness = ours[large]["peak_rss_mib"] / ours[small]["peak_rss_mib"]
    speed = ours[fa_at]["cells_per_s"] / theirs["cells_per_s"]
    rss_ratio = theirs["peak_rss_mib"] / ours[fa_at]["peak_rss_mib"]
    rate = ours[large]["cells_per_s"]
    hours_40m = 40e6 / rate / 3600
    tb_40m = ours[large]["bytes_per_cell"] * 40e6 / 1e12
    max_rss_gib = max(v["peak_rss_mib"] for v in ours.values()) / 1024
    goals = {
        f"ingest >= {GOALS['speed']}x faster than from_anndata": speed >= GOALS["speed"],
        f"ingest >= {GOALS['rss_ratio']}x less peak memory": rss_ratio >= GOALS["rss_ratio"],
        f"ingest peak RSS < {GOALS['rss_gib']} GiB": max_rss_gib < GOALS["rss_gib"],
        f"time({large}) within 10% of {large // small}x time({small})": linearity <= GOALS["linearity"],
        f"peak RSS({large}) within 20% of RSS({small})": flatness <= GOALS["flatness"],
    }
    result = {
        "bench": "ingest",
        "mode": "quick" if args.quick else "full",
        "genes": args.genes,
        "mean_nnz_per_cell": args.mean_nnz,
        "repeats": {"ingest": args.repeats, "from_anndata_and_synth": args.other_repeats},
        "ingest": {str(k): v for k, v in ours.items()},
        "from_anndata": theirs,
        "synth": {"cells": synth_cells, "seconds": round(st, 2), "cells_per_s": round(synth_cells / st), "peak_rss_mib": round(srss / 2**20)},
        "ingest_over_from_anndata_speed": round(speed, 2),
        "from_anndata_over_ingest_peak_rss": round(rss_ratio, 2),
        "linearity": round(linearity, 3),
        "rss_flatness": round(flatness, 3),
        "extrapolated_40M_cells_hours": round(hours_40m, 2),
        "extrapolated_40M_cells_tb": round(tb_40m, 2),
        "goals_met": goals,
        "input_generation_s": gen_seconds,
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on the machine skews absolute rates
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    print(f"{'':28}{'cells':>9}{'seconds':>10}{'cells/s':>10}{'peak RSS MiB':>14}{'bytes/cell':>12}")
    for name, n, t, rss, bpc in rows:
        print(f"{name:28}{n:9d}{t:10.1f}{n / t:10.0f}{rss / 2**20:14.0f}{bpc:12.0f}")
    print(f"ingest / from_anndata at {fa_at}: {speed:.1f}x faster, {rss_ratio:.1f}x less peak memory")
    print(f"linearity time({large}) / ({large // small} x time({small})) = {linearity:.3f}; RSS({large}) / RSS({small}) = {flatness:.3f}")
    print(f"40M cells at {rate} cells/s: {hours_40m:.1f} h, {tb_40m:.2f} TB")
    if args.quick:
        print("goals (quick sizes are a smoke test: Python start-up dominates ours, from_anndata holds little; judge on the full run):")
    for k, v in goals.items():
        print(f"  [{'x' if v else ' '}] {k}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
