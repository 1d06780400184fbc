"""Celler-75 scale on this machine: thousands of datasets, millions of cells, hundreds of ranks.

Run: ``python bench/scale.py [--quick] [--out bench/out/scale]`` (one command; the full run fits in an
hour on 2 shared cores, --quick in a few minutes). Parts, each printed as it ends:

A. Many small files: the same 60k count cells as 20 files and as 1,000 files of 60 cells, one
   ``hiceller ingest --manifest --gene-list panel`` each (the files share one panel and say so),
   repetitions interleaved; plus the start-up of one ingest of one file. The registry's ``finished`` times of the 1,000-file ingest give the first and the last
   100 files' time.
B. A store of >= 5,000 datasets (long-tailed sizes, 10 to 50,000 cells, >= 2M cells; gene panels per
   study, 100 study-specific genes each): ``hiceller ingest --manifest --no-optimize``, then
   ``hiceller store optimize``. Ingest cells/s of the first and last decile of datasets, bytes per
   cell, fragments and files before/after optimize, ``hiceller info`` time before/after.
C. The same cells (same joinids, same order) as 80 datasets, ingested and optimized the same way.
D. CellStream on B (before and after optimize), C and the 200k store of bench/loader.py: start-up
   (constructor), time to the first batch, cells/s, peak RSS of the process; one subprocess per
   run, repetitions interleaved, medians.
E. The epoch layout of 40M cells on 512 ranks x 8 workers: per-rank time and peak memory
   (tracemalloc) of data_store/layout.py and of the whole-order method it replaced.
F. Debug pretraining on 2 ranks (DeepSpeed ZeRO-2, CPU) over the whole store B and over the 200k
   store: cells/s from metrics.jsonl, peak RSS of the process tree.

Ends with a table extrapolating each figure to Celler-75 (40M cells) and ONE JSON line (also
written to OUT/scale_results.json). Generated inputs and stores are kept under OUT and reused when
their spec matches (``--fresh`` rebuilds them); the .h5ad inputs of B and C are deleted once
ingested unless ``--keep-inputs``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import tracemalloc
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
VENV_BIN = ROOT / ".venv" / "bin"
HICELLER = [sys.executable, "-m", "hiceller"]
POLL_S = 0.05
MB = 1 << 20

__all__ = ["main"]


# ----------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class CorpusSpec:
    """A generated corpus: ``n_datasets`` files, long-tailed sizes, per-study gene panels."""

    n_datasets: int
    n_cells: int
    mean_nnz: int
    min_cells: int = 10
    max_cells: int = 50_000
    datasets_per_study: int = 50
    panel_genes: int = 3_000
    study_genes: int = 100
    """Genes of a study's panel that no other study has (the vocabulary grows over the ingest)."""
    core_genes: int = 20_000
    seed: int = 0

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def long_tail_sizes(spec: CorpusSpec) -> np.ndarray:
    """Dataset sizes: log-normal, clipped to [min, max], summing to ``n_cells``; the first dataset
    has the largest size and the second the smallest (both ends of the tail exist)."""
    rng = np.random.default_rng([spec.seed, 1])
    z = rng.normal(0.0, 1.8, spec.n_datasets - 2)
    target = spec.n_cells - spec.max_cells - spec.min_cells
    a, b = np.log(spec.min_cells) - 10, np.log(spec.max_cells)

    def sizes_at(centre: float) -> np.ndarray:
        return np.clip(np.exp(centre + z), spec.min_cells, spec.max_cells).round().astype(np.int64)

    for _ in range(60):  # bisection on the log-scale centre so that the clipped sizes sum to target
        mid = (a + b) / 2
        a, b = (mid, b) if sizes_at(mid).sum() < target else (a, mid)
    rest = sizes_at((a + b) / 2)
    rest[np.argmax(rest < spec.max_cells)] += target - rest.sum()  # rounding: a few cells on one dataset
    sizes = np.concatenate([[spec.max_cells, spec.min_cells], rest])
    if sizes.sum() != spec.n_cells or sizes.min() < spec.min_cells or sizes.max() > spec.max_cells:
        raise SystemExit(f"cannot draw {spec.n_datasets} sizes in [{spec.min_cells}, {spec.max_cells}] summing to {spec.n_cells}")
    return sizes


def gene_name(g: int, spec: CorpusSpec) -> str:
    if g < spec.core_genes:
        return f"GENE{g:05d}"
    s, j = divmod(g - spec.core_genes, spec.study_genes)
    return f"S{s:04d}_G{j:03d}"


def study_panel(study: int, spec: CorpusSpec) -> np.ndarray:
    """Global gene ids of one study's panel (sorted)."""
    rng = np.random.default_rng([spec.seed, 2, study])
    core = rng.choice(spec.core_genes, spec.panel_genes - spec.study_genes, replace=False)
    own = spec.core_genes + study * spec.study_genes + np.arange(spec.study_genes)
    return np.sort(np.concatenate([core, own]))


def dataset_cells(k: int, n: int, spec: CorpusSpec):
    """CSR (cells x panel positions, sorted rows) and obs of dataset ``k``: counts on a per-cell
    stride of the panel (distinct genes per cell), depth log-normal around ``mean_nnz``."""
    import scipy.sparse as sp

    rng = np.random.default_rng([spec.seed, 3, k])
    p = spec.panel_genes
    nnz = np.clip(rng.lognormal(np.log(spec.mean_nnz) - 0.18, 0.6, n), 20, min(p, 4 * spec.mean_nnz)).astype(np.int64)
    rows = np.repeat(np.arange(n), nnz)
    j = np.arange(nnz.sum()) - np.repeat(np.cumsum(nnz) - nnz, nnz)
    strides = np.array([7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67])  # coprime with 3000
    cols = (rng.integers(0, p, n)[rows] + j * rng.choice(strides, n)[rows]) % p
    order = np.lexsort((cols, rows))
    data = (1 + rng.geometric(0.35, rows.size)).astype(np.float32)
    X = sp.csr_matrix((data, cols[order], np.concatenate([[0], np.cumsum(nnz)])), shape=(n, p))
    types = np.array([f"type{t}" for t in range(20)])
    weights = 1.0 / np.arange(1, 21) ** 1.5
    obs = {
        "cell_type": types[rng.choice(20, n, p=weights / weights.sum())],
        "donor": np.array([f"study{k // spec.datasets_per_study}-donor{d}" for d in rng.integers(0, 4, n)]),
        "sample": np.full(n, f"sample{k}"),
    }
    return X, obs


def _write_h5ad(path: Path, X, obs: dict[str, np.ndarray], genes: list[str], cell_ids: np.ndarray) -> None:
    import anndata as ad
    import pandas as pd

    frame = pd.DataFrame(obs, index=pd.Index(cell_ids.astype(str)))
    frame["cell_type"] = frame["cell_type"].astype("category")
    ad.AnnData(X=X, obs=frame, var=pd.DataFrame(index=pd.Index(genes))).write_h5ad(path)


def _manifest(path: Path, rows: list[tuple[str, str, str, str]]) -> None:
    lines = ["path\tdataset_id\ttissue\tdisease\tlabel\tbatch"] + [f"{f}\t{d}\t{t}\t{s}\tcell_type\tdonor" for f, d, t, s in rows]
    path.write_text("\n".join(lines) + "\n")


def _study_meta(study: int) -> tuple[str, str]:
    from data_store.synth import TISSUES

    return TISSUES[study % len(TISSUES)], f"disease{study % 75}"


def write_corpus(spec: CorpusSpec, out: Path, n_files: int | None = None) -> Path:
    """Write the corpus as one file per dataset, or (``n_files``) as that many files of consecutive
    datasets concatenated (same cells, same order). Returns the manifest."""
    sizes = long_tail_sizes(spec)
    groups = np.array_split(np.arange(spec.n_datasets), n_files or spec.n_datasets)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    start = 0
    for gi, group in enumerate(groups):
        mats, obs_parts, genes = [], [], np.unique(np.concatenate([study_panel(int(k) // spec.datasets_per_study, spec) for k in group]))
        for k in group:
            X, obs = dataset_cells(int(k), int(sizes[k]), spec)
            panel = study_panel(int(k) // spec.datasets_per_study, spec)
            X.indices = np.searchsorted(genes, panel[X.indices]).astype(np.int32)  # panel -> file columns
            X._shape = (X.shape[0], len(genes))
            mats.append(X)
            obs_parts.append(obs)
        import scipy.sparse as sp

        X = sp.vstack(mats, format="csr") if len(mats) > 1 else mats[0]
        obs = {c: np.concatenate([o[c] for o in obs_parts]) for c in obs_parts[0]}
        n = X.shape[0]
        name = f"d{int(group[0]):05d}" if n_files is None else f"g{gi:03d}"
        _write_h5ad(out / f"{name}.h5ad", X, obs, [gene_name(int(g), spec) for g in genes], np.arange(start, start + n))
        tissue, disease = _study_meta(int(group[0]) // spec.datasets_per_study)
        rows.append((f"{name}.h5ad", name, tissue, disease))
        start += n
    manifest = out / "files.tsv"
    _manifest(manifest, rows)
    return manifest


# ----------------------------------------------------------------------------- processes
def run_watched(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 3600) -> dict[str, Any]:
    """Run ``cmd``; wall time, exit code, output and the peak RSS of its process tree."""
    import resource

    import psutil

    import tempfile

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Output to files, not pipes: a command printing more than a pipe holds (`info --json` of
    # thousands of datasets) would block while nobody reads the pipe.
    out_f, err_f = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out_f, stderr=err_f, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None and time.perf_counter() - t0 < timeout:
        rss = 0
        for p in [ps, *ps.children(recursive=True)]:
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                pass
        peak = max(peak, rss)
        time.sleep(POLL_S)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out_f.seek(0)
    err_f.seek(0)
    out, err = out_f.read(), err_f.read()
    out_f.close()
    err_f.close()
    # CPU seconds of the process and the workers it waited for: less sensitive than wall time to
    # what else runs on this shared machine.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "cpu_s": cpu, "peak_rss_mb": peak / MB, "stdout": out, "stderr": err}


def _checked(r: dict[str, Any], what: str) -> dict[str, Any]:
    if r["rc"] != 0:
        raise SystemExit(f"{what} failed (exit {r['rc']}):\n{r['stderr'][-3000:]}")
    return r


def ingest(store: Path, manifest: Path, *flags: str) -> dict[str, Any]:
    shutil.rmtree(store, ignore_errors=True)
    return _checked(run_watched([*HICELLER, "ingest", "--no-progress", "--store", str(store), "--manifest", str(manifest), *flags]), f"ingest {manifest}")


def _spec_file(path: Path) -> Path:
    return path.parent / f".{path.name}.spec"


def _cached(path: Path, key: str) -> bool:
    return path.exists() and _spec_file(path).exists() and _spec_file(path).read_text() == key


def _mark(path: Path, key: str) -> None:
    _spec_file(path).write_text(key)


# ----------------------------------------------------------------------------- A: small files
def registry_times(store: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """(cells, finished time) per dataset in joinid order, and when the first reservation was made."""
    from data_store.store import CorpusStore

    recs = sorted(CorpusStore.open(store).complete_datasets(), key=lambda r: r.start)
    return np.array([r.n_cells for r in recs]), np.array([r.finished for r in recs]), min(r.created for r in recs)


def _time_at(done: np.ndarray, finished: np.ndarray, t0: float, k: float) -> float:
    """When ``k`` datasets were complete. A batch marks its datasets complete together, so the
    points are batch ends (datasets done, time), and a batch's datasets are spread over its span."""
    ends = np.flatnonzero(np.diff(finished, append=np.inf) != 0)  # last dataset of each batch
    xs = np.concatenate([[0], ends + 1])
    ts = np.concatenate([[t0], finished[ends]])
    return float(np.interp(k, xs, ts))


def part_small_files(out: Path, reps: int, n_cells: int, mean_nnz: int) -> dict[str, Any]:
    spec = CorpusSpec(n_datasets=1, n_cells=n_cells, mean_nnz=mean_nnz, panel_genes=20_000, study_genes=0, core_genes=20_000, datasets_per_study=10**9)
    sets = {"20 files": 20, "1000 files": n_cells // 60}
    manifests = {}
    for name, n_files in sets.items():
        d = out / "small" / name.replace(" ", "_")
        key = spec.key() + f"|{n_files}"
        if not _cached(d, key):
            shutil.rmtree(d, ignore_errors=True)
            manifests[name] = _write_split(spec, d, n_files)
            _mark(d, key)
        manifests[name] = d / "files.tsv"
    one = out / "small" / "one_file"
    if not _cached(one, spec.key()):
        shutil.rmtree(one, ignore_errors=True)
        _write_split(CorpusSpec(n_datasets=1, n_cells=60, mean_nnz=mean_nnz, panel_genes=20_000, study_genes=0, core_genes=20_000), one, 1)
        _mark(one, spec.key())
    runs: dict[str, list[float]] = {k: [] for k in [*sets, "start-up (1 file of 60 cells)"]}
    cpu: dict[str, list[float]] = {k: [] for k in sets}
    first_last = []
    for rep in range(reps):  # interleaved: a burst of outside load hits both alike
        for name in sets:
            # The files share one 20k-gene panel and say so (--gene-list): only the first file's names are read.
            r = ingest(out / "small" / f"store_{name.replace(' ', '_')}", manifests[name], "--no-optimize", "--gene-list", "panel")
            runs[name].append(r["wall_s"])
            cpu[name].append(r["cpu_s"])
            if name == "1000 files":
                first_last.append(_first_last_100(out / "small" / "store_1000_files"))
        r = ingest(out / "small" / "store_one", one / "files.tsv", "--gene-list", "panel")
        runs["start-up (1 file of 60 cells)"].append(r["wall_s"])
        print(f"[A rep {rep + 1}/{reps}] " + ", ".join(f"{k}: {v[-1]:.1f} s" for k, v in runs.items()), flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    t20, t1000, start = med["20 files"], med["1000 files"], med["start-up (1 file of 60 cells)"]
    ratio_fl = statistics.median(x["last_over_first"] for x in first_last)
    return {
        "cells": n_cells,
        "mean_nnz": mean_nnz,
        "seconds_runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "seconds_median": {k: round(v, 1) for k, v in med.items()},
        "t1000_over_t20": round(t1000 / t20, 2),
        "t1000_over_t20_runs": [round(a / b, 2) for a, b in zip(runs["1000 files"], runs["20 files"])],
        "cpu_s_median": {k: round(statistics.median(v), 1) for k, v in cpu.items()},
        "cpu1000_over_cpu20": round(statistics.median(cpu["1000 files"]) / statistics.median(cpu["20 files"]), 2),
        "per_file_overhead_ms": round((t1000 - t20) / (sets["1000 files"] - 20) * 1000, 1),
        "first_last_100": first_last,
        "last100_over_first100": round(ratio_fl, 2),
        "goal_1000_within_1.5x_of_20": t1000 <= 1.5 * t20,
        "goal_1000_within_half_of_20_plus_startup": t1000 <= 0.5 * (t20 - start) + start,
        "goal_last100_within_30pct": ratio_fl <= 1.3,
    }


def _write_split(spec: CorpusSpec, d: Path, n_files: int) -> Path:
    """``spec.n_cells`` cells of one shared 20k-gene panel, split into ``n_files`` equal files."""
    import scipy.sparse as sp

    X, obs = dataset_cells(0, spec.n_cells, spec)
    genes = [gene_name(g, spec) for g in range(spec.panel_genes)]
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, idx in enumerate(np.array_split(np.arange(spec.n_cells), n_files)):
        part = sp.csr_matrix(X[idx[0] : idx[-1] + 1])
        _write_h5ad(d / f"f{i:05d}.h5ad", part, {c: v[idx] for c, v in obs.items()}, genes, idx)
        rows.append((f"f{i:05d}.h5ad", f"f{i:05d}", "lung", "normal"))
    _manifest(d / "files.tsv", rows)
    return d / "files.tsv"


def _first_last_100(store: Path) -> dict[str, float]:
    cells, finished, t0 = registry_times(store)
    n = len(cells)
    first = _time_at(cells, finished, t0, 100) - t0
    last = _time_at(cells, finished, t0, n) - _time_at(cells, finished, t0, n - 100)
    return {"first_100_s": round(first, 2), "last_100_s": round(last, 2), "last_over_first": round(last / first, 2)}


# ----------------------------------------------------------------------------- B, C: big stores
def du_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def info_seconds(store: Path, reps: int = 3) -> dict[str, float]:
    """``hiceller info --json`` wall time (a process: start-up included) and the in-process
    CorpusStore.open + summary time, medians."""
    cli = [_checked(run_watched([*HICELLER, "info", "--json", "--store", str(store)]), "info")["wall_s"] for _ in range(reps)]
    inproc = []
    for _ in range(reps):
        from data_store.store import CorpusStore

        t = time.perf_counter()
        CorpusStore.open(store).summary()
        inproc.append(time.perf_counter() - t)
    return {"cli_s": round(statistics.median(cli), 2), "open_and_summary_s": round(statistics.median(inproc), 3)}


def decile_rates(store: Path) -> dict[str, float]:
    """Ingest cells/s of the first and the last tenth of the datasets (write phase, registry times)."""
    cells, finished, t0 = registry_times(store)
    n = len(cells)
    tenth = n // 10
    if tenth == 0:
        return {"write_phase_s": round(float(finished.max() - t0), 1)}
    first_s = _time_at(cells, finished, t0, tenth) - t0
    last_s = _time_at(cells, finished, t0, n) - _time_at(cells, finished, t0, n - tenth)
    first, last = cells[:tenth].sum() / first_s, cells[n - tenth :].sum() / last_s
    # Per file too: the tail is mostly small datasets, so cells/s alone mixes size and position.
    return {
        "first_decile_cells_per_s": round(float(first)),
        "last_decile_cells_per_s": round(float(last)),
        "first_decile_files_per_s": round(tenth / first_s, 1),
        "last_decile_files_per_s": round(tenth / last_s, 1),
        "write_phase_s": round(float(finished.max() - t0), 1),
    }


def build_store(spec: CorpusSpec, out: Path, name: str, n_files: int | None, keep_inputs: bool) -> dict[str, Any]:
    """Generate the inputs, ingest them (no automatic optimize), measure, optimize, measure. Each
    step's result is kept, so an interrupted run resumes at the step it was in."""
    store, inputs = out / f"store_{name}", out / f"inputs_{name}"
    key = spec.key() + f"|{n_files}"
    result_file, ingest_file = out / f"{name}_build.json", out / f"{name}_ingest.json"
    if _cached(store, key) and result_file.exists():
        print(f"[{name}] reusing {store}", flush=True)
        return json.loads(result_file.read_text())
    if not (_cached(store, key) and ingest_file.exists()):
        gen_s = None
        if not _cached(inputs, key):
            shutil.rmtree(inputs, ignore_errors=True)
            t = time.perf_counter()
            write_corpus(spec, inputs, n_files)
            gen_s = round(time.perf_counter() - t, 1)
            _mark(inputs, key)
        print(f"[{name}] {len(list(inputs.glob('*.h5ad')))} files (generated in {gen_s} s); ingesting...", flush=True)
        r = ingest(store, inputs / "files.tsv", "--no-optimize")
        ingest_file.write_text(json.dumps({k: r[k] for k in ("wall_s", "cpu_s", "peak_rss_mb")} | {"generate_s": gen_s, "input_bytes": du_bytes(inputs)}))
        _mark(store, key)
    raw_copy = out / f"store_{name}_raw"  # the un-optimized store, for CellStream before optimize
    shutil.rmtree(raw_copy, ignore_errors=True)
    ing = json.loads(ingest_file.read_text())
    res = _measure_build(store, ing, raw_copy) | {"generate_s": ing["generate_s"], "input_bytes": ing["input_bytes"]}
    if not keep_inputs:
        shutil.rmtree(inputs, ignore_errors=True)
    result_file.write_text(json.dumps(res))
    return res


def _measure_build(store: Path, r: dict[str, Any], raw_copy: Path) -> dict[str, Any]:
    from data_store.optimize import optimize_store
    from data_store.store import CorpusStore

    s = CorpusStore.open(store)
    cells, nnz = s.n_cells, _nnz(store)
    res: dict[str, Any] = {
        "datasets": len(s.complete_datasets()),
        "cells": cells,
        "nnz": nnz,
        "ingest_s": round(r["wall_s"], 1),
        "ingest_cpu_s": round(r["cpu_s"], 1),
        "ingest_cells_per_s": round(cells / r["wall_s"]),
        "ingest_peak_rss_mb": round(r["peak_rss_mb"]),
        **decile_rates(store),
        "info_before": info_seconds(store),
        "bytes_before_optimize": du_bytes(store),
    }
    shutil.copytree(store, raw_copy)
    rep = optimize_store(str(store))
    res.update(
        optimize_s=round(rep.seconds, 1),
        fragments_before=rep.fragments_before,
        fragments_after=rep.fragments_after,
        files_before=rep.files_before,
        files_after=rep.files_after,
        arrays=rep.arrays,
        info_after=info_seconds(store),
        bytes=du_bytes(store),
    )
    res["bytes_per_cell"] = round(res["bytes"] / cells, 1)
    res["bytes_per_nnz"] = round(res["bytes"] / nnz, 2)
    print(f"[build] {json.dumps(res)}", flush=True)
    return res


def _nnz(store: Path) -> int:
    import tiledbsoma as soma

    with soma.SparseNDArray.open(str(store / "ms" / "RNA" / "X" / "data")) as x:
        return int(x.nnz)


# ----------------------------------------------------------------------------- D: CellStream
@dataclass(frozen=True)
class StreamRun:
    store: str
    windows: int
    """Shuffle windows timed (each one read, tokenized and handed out whole)."""
    block_size: int = 256
    buffer_blocks: int = 128
    workers: int = 0
    max_genes: int = 1200


def stream_child(run: StreamRun) -> dict[str, Any]:
    """In a fresh process: the pretraining stream (whole store, no labels) as one rank would.
    Start-up = the constructor; first batch = constructor + reading the first window; cells/s over
    the next ``windows`` whole windows (the first window's remaining batches are handed out first,
    untimed, so every timed window is read inside the timed part)."""
    import torch

    torch.set_num_threads(1)
    from data_store.stream import CellStream
    from data_store.tokenize import Tokenizer

    t0 = time.perf_counter()
    stream = CellStream(run.store, batch_cells=256, tokenizer=Tokenizer(max_genes=run.max_genes, seed=0), seed=0,
                        block_size=run.block_size, buffer_blocks=run.buffer_blocks, world_size=1, rank=0)
    startup = time.perf_counter() - t0
    window = stream.layout_for(num_workers=max(1, run.workers)).window_batches * 256
    it = iter(stream.dataloader(num_workers=run.workers))
    got = next(it).n_cells
    first = time.perf_counter() - t0
    while got < window:
        got += next(it).n_cells
    cells, t1 = 0, time.perf_counter()
    while cells < run.windows * window:
        cells += next(it).n_cells
    return {"startup_s": startup, "first_batch_s": first, "cells_per_s": cells / (time.perf_counter() - t1), "cells": cells, "window_cells": window}


def measure_stream(run: StreamRun) -> dict[str, Any]:
    r = _checked(run_watched([sys.executable, str(Path(__file__).resolve()), "--child-stream", json.dumps(asdict(run))]), f"stream {run.store}")
    res = json.loads([ln for ln in r["stdout"].splitlines() if ln.startswith("{")][-1])
    res["peak_rss_mb"] = r["peak_rss_mb"]
    return res


def part_stream(stores: dict[str, str], reps: int, buffer_blocks: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in stores}
    for rep in range(reps):
        for name, store in stores.items():
            r = measure_stream(StreamRun(store=store, windows=2, buffer_blocks=buffer_blocks))
            runs[name].append(r)
            print(f"[D rep {rep + 1}/{reps}] {name}: start-up {r['startup_s']:.2f} s, first batch {r['first_batch_s']:.1f} s, "
                  f"{r['cells_per_s']:,.0f} cells/s, peak RSS {r['peak_rss_mb']:,.0f} MB", flush=True)
    out = {}
    for name, rs in runs.items():
        out[name] = {k: round(statistics.median(r[k] for r in rs), 3 if k == "startup_s" else 1) for k in ("startup_s", "first_batch_s", "cells_per_s", "peak_rss_mb")}
        out[name]["cells_per_s_runs"] = [round(r["cells_per_s"]) for r in rs]
        out[name]["startup_s_runs"] = [round(r["startup_s"], 3) for r in rs]
    return out


# ----------------------------------------------------------------------------- E: layout at 40M x 512
def _old_layout(n: int, rank: int, world: int, batch: int, block: int, seed: int, epoch: int) -> np.ndarray:
    """The method the stream used before data_store/layout.py: the whole epoch order, then a slice."""
    import math

    perm = np.random.default_rng([seed, epoch]).permutation(math.ceil(n / block))
    starts = perm * block
    lens = np.minimum(block, n - starts)
    offs = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    order = np.arange(int(lens.sum()), dtype=np.int64) + offs
    per_rank = n // world
    need = (per_rank // batch) * batch
    return order[rank * per_rank : rank * per_rank + need].copy()


def _traced(fn: Callable[[], Any]) -> tuple[float, float]:
    tracemalloc.start()
    t = time.perf_counter()
    try:
        fn()
        return time.perf_counter() - t, tracemalloc.get_traced_memory()[1] / MB
    finally:
        tracemalloc.stop()


def part_layout(n: int = 40_000_000, world: int = 512, workers: int = 8, batch: int = 32) -> dict[str, Any]:
    from data_store.layout import rank_layout
    from data_store.stream import CellSelection

    def new(rank: int):
        return rank_layout(n, rank=rank, world_size=world, batch_cells=batch, block_size=256, buffer_blocks=512,
                           num_workers=workers, shuffle=True, seed=0, epoch=1, remainder="drop")

    ranks = [0, world // 2, world - 1]
    new_runs = [_traced(lambda r=r: new(r)) for r in ranks]
    old_runs = [_traced(lambda r=r: _old_layout(n, r, world, batch, 256, 0, 1)) for r in ranks[:1]]
    lay = new(world - 1)
    sel_s, sel_mb = _traced(lambda: CellSelection(ranges=[(a, a + 4000) for a in range(0, n, 4000)]).take(lay.order))
    return {
        "cells": n, "ranks": world, "workers": workers, "batch_cells": batch,
        "batches_per_rank": lay.n_batches, "windows_per_rank": len(lay.windows()),
        "busy_workers": sum(1 for w in range(workers) if len(lay.worker_windows(w, workers))),
        "rank_layout_s": round(max(t for t, _ in new_runs), 3),
        "rank_layout_peak_mb": round(max(m for _, m in new_runs), 1),
        "old_whole_order_s": round(old_runs[0][0], 2),
        "old_whole_order_peak_mb": round(old_runs[0][1]),
        "selection_of_10k_datasets_take_s": round(sel_s, 3),
        "selection_of_10k_datasets_peak_mb": round(sel_mb, 1),
    }


# ----------------------------------------------------------------------------- F: 2-rank pretraining
def part_pretrain(stores: dict[str, str], out: Path, steps: int) -> dict[str, Any]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    res = {}
    for name, store in stores.items():
        run_dir = out / "pretrain" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--module", "pretrain", "--config", "debug", "--store", store,
               "--set", f"train.steps={steps}", "--set", f"train.checkpoint_every={steps}", "--no-progress", "--out", str(run_dir)]
        r = run_watched(cmd, env=env)
        for f in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
            try:
                os.remove(f)
            except OSError:
                pass
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()] if (run_dir / "metrics.jsonl").exists() else []
        cps = [row["cells_per_s"] for row in rows if "cells_per_s" in row]
        res[name] = {"rc": r["rc"], "wall_s": round(r["wall_s"], 1), "peak_rss_mb_tree": round(r["peak_rss_mb"]),
                     "cells_per_s_median": round(statistics.median(cps[1:] or cps), 1) if cps else None}
        if r["rc"] != 0:
            res[name]["stderr_tail"] = r["stderr"][-1500:]
        print(f"[F] {name}: {res[name]}", flush=True)
    return res


# ----------------------------------------------------------------------------- extrapolation
CELLER75_CELLS = 40_000_000
CELLER75_NNZ_PER_CELL = 1_000
"""Assumed mean non-zeros per Celler-75 cell (10x-like depth; real cells have 200-5000)."""
CELLER75_DATASETS = 10_000


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.1f} s"


def extrapolate(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, measured here, at Celler-75, what the extrapolation rests on)."""
    rows: list[tuple[str, str, str, str]] = []
    big = r.get("big")
    nnz_40m = CELLER75_CELLS * CELLER75_NNZ_PER_CELL
    if big:
        nnz_rate = big["nnz"] / big["ingest_s"]
        rows.append(("ingest, one process", f"{big['ingest_cells_per_s']:,} cells/s ({nnz_rate / 1e6:.1f}M non-zeros/s, {big['nnz'] / big['cells']:.0f} per cell); "
                     f"first/last decile {big['first_decile_files_per_s']}/{big['last_decile_files_per_s']} files/s",
                     f"{_hours(nnz_40m / nnz_rate)} for 40M cells x {CELLER75_NNZ_PER_CELL:,} non-zeros",
                     "cost per non-zero flat over the run (first vs last decile); files ingest independently, so N processes on N stores-to-merge or nodes divide it"))
        rows.append(("store size", f"{big['bytes_per_cell']:.0f} B/cell, {big['bytes_per_nnz']:.2f} B/non-zero",
                     f"{big['bytes_per_nnz'] * nnz_40m / 1e9:.0f} GB", "bytes per non-zero constant (zstd on delta-coded coordinates)"))
        rows.append(("fragments (all arrays)", f"{big['fragments_before']:,} after ingest -> {big['fragments_after']} after optimize ({big['arrays']} arrays)",
                     f"{big['arrays']} + one per new set of obs columns", "optimize merges every array to one fragment; extra_obs DataFrames are one per set of other obs columns, not per dataset"))
        opt_rate = big["nnz"] / max(big["optimize_s"], 1e-9)
        rows.append(("optimize (full)", f"{big['optimize_s']} s ({opt_rate / 1e6:.1f}M non-zeros/s)", f"{_hours(nnz_40m / opt_rate)} once; after each ingest only what it wrote",
                     "consolidation rewrites X: time per non-zero constant"))
        rows.append(("hiceller info", f"{big['info_after']['cli_s']} s CLI, {big['info_after']['open_and_summary_s']} s open + summary ({big['datasets']:,} datasets)",
                     f"~{big['info_after']['open_and_summary_s'] * CELLER75_DATASETS / big['datasets']:.2f} s at {CELLER75_DATASETS:,} datasets + Python start-up",
                     "registry rows read once: linear in datasets, independent of cells"))
    st = r.get("stream", {})
    b, l = st.get("5000 datasets (optimized)"), st.get("200k store (bench/loader.py)")
    if b and l:
        rows.append(("CellStream start-up / first batch", f"{b['startup_s']} s / {b['first_batch_s']} s (200k store: {l['startup_s']} s / {l['first_batch_s']} s)",
                     f"~{b['startup_s'] * CELLER75_DATASETS / max(big['datasets'] if big else 1, 1):.1f} s + layout {r.get('layout', {}).get('rank_layout_s', '?')} s per rank",
                     "registry read (linear in datasets), whole-store selection as ranges (no obs read), per-rank layout (E); first batch = one window, set by buffer_blocks"))
        rows.append(("CellStream cells/s, peak RSS (1 process)", f"{b['cells_per_s']:,.0f} cells/s, {b['peak_rss_mb']:,.0f} MB (200k: {l['cells_per_s']:,.0f}, {l['peak_rss_mb']:,.0f} MB)",
                     "same per process", "per-cell read + tokenize cost; memory bound by the buffer, not the store"))
    lay = r.get("layout")
    if lay:
        rows.append(("epoch layout per rank (40M x 512 x 8)", f"{lay['rank_layout_s']} s, {lay['rank_layout_peak_mb']} MB ({lay['busy_workers']}/8 workers busy); whole-order method {lay['old_whole_order_s']} s, {lay['old_whole_order_peak_mb']} MB",
                     "as measured", "computed at full size, no data read"))
    pt = r.get("pretrain", {})
    pb, pl = pt.get("5000 datasets"), pt.get("200k store")
    if pb and pl:
        rows.append(("debug pretraining, 2 CPU ranks", f"{pb['cells_per_s_median']} cells/s, {pb['peak_rss_mb_tree']:,} MB tree (200k store: {pl['cells_per_s_median']}, {pl['peak_rss_mb_tree']:,} MB)",
                     "model-bound: store size does not enter", "the loader is not the bottleneck on CPU; on GPUs see the CellStream row (8 workers per rank)"))
    return rows


def goals(r: dict[str, Any]) -> dict[str, Any]:
    g: dict[str, Any] = {}
    if "small" in r:
        g["2_1000_files_within_1.5x_of_20_files"] = r["small"]["goal_1000_within_1.5x_of_20"]
        g["2_1000_files_at_most_half_of_20_files_plus_startup"] = r["small"]["goal_1000_within_half_of_20_plus_startup"]
        g["2_last_100_within_30pct_of_first_100"] = r["small"]["goal_last100_within_30pct"]
    st = r.get("stream", {})
    b, c = st.get("5000 datasets (optimized)"), st.get("80 datasets (optimized)")
    if b and c:
        g["3_startup_within_10pct_of_80_datasets"] = b["startup_s"] <= 1.1 * c["startup_s"]
        g["3_cells_per_s_within_10pct_of_80_datasets"] = b["cells_per_s"] >= 0.9 * c["cells_per_s"]
        g["3_startup_ratio"] = round(b["startup_s"] / c["startup_s"], 2)
        g["3_cells_per_s_ratio"] = round(b["cells_per_s"] / c["cells_per_s"], 2)
    lay = r.get("layout")
    if lay:
        g["5_layout_under_1GB_and_30s_per_rank"] = lay["rank_layout_peak_mb"] < 1024 and lay["rank_layout_s"] < 30
    if "big" in r:
        g["6_store_of_5000_datasets_2M_cells"] = r["big"]["datasets"] >= 5000 and r["big"]["cells"] >= 2_000_000
    return g


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: checks the machinery in a few minutes")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "scale")
    ap.add_argument("--reps", type=int, help="repetitions of A and D (default 3, --quick 1)")
    ap.add_argument("--parts", default="A,B,C,D,E,F", help="comma list of parts to run")
    ap.add_argument("--fresh", action="store_true", help="rebuild inputs and stores even when their spec matches")
    ap.add_argument("--keep-inputs", action="store_true", help="keep the .h5ad files of B and C")
    ap.add_argument("--child-stream", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_stream:
        print(json.dumps(stream_child(StreamRun(**json.loads(args.child_stream)))), flush=True)
        os._exit(0)  # skip TileDB teardown: the result is out
    parts = set(args.parts.split(","))
    reps = args.reps or (1 if args.quick else 3)
    out = args.out / ("quick" if args.quick else "full")
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    spec = CorpusSpec(300, 60_000, 150, max_cells=10_000) if args.quick else CorpusSpec(5_000, 2_000_000, 250)
    r: dict[str, Any] = {"spec": asdict(spec), "reps": reps}
    previous = out / "scale_results.json"
    if previous.exists():  # a run of some parts keeps the figures of the others
        old = json.loads(previous.read_text())
        if old.get("spec") == r["spec"]:
            r = {**old, **r}
    if "A" in parts:
        r["small"] = part_small_files(out, reps, 12_000 if args.quick else 60_000, 300 if args.quick else 800)
        print(f"[A] {json.dumps(r['small'])}", flush=True)
    if "B" in parts or "D" in parts or "F" in parts:
        r["big"] = build_store(spec, out, "big", None, args.keep_inputs)
    if "C" in parts or "D" in parts:
        r["80"] = build_store(spec, out, "80", 8 if args.quick else 80, args.keep_inputs)
    loader_store = _loader_store(25_000 if args.quick else 200_000) if parts & {"D", "F"} else None
    if "D" in parts:
        r["stream"] = part_stream({
            "5000 datasets (optimized)": str(out / "store_big"),
            "5000 datasets (before optimize)": str(out / "store_big_raw"),
            "80 datasets (optimized)": str(out / "store_80"),
            "200k store (bench/loader.py)": str(loader_store),
        }, reps, 16 if args.quick else 128)
    if "E" in parts:
        r["layout"] = part_layout()
        print(f"[E] {json.dumps(r['layout'])}", flush=True)
    if "F" in parts:
        r["pretrain"] = part_pretrain({"5000 datasets": str(out / "store_big"), "200k store": str(loader_store)}, out, 10 if args.quick else 30)
    r["goals"] = goals(r)
    r.setdefault("seconds_by_run", []).append({"parts": sorted(parts), "seconds": round(time.perf_counter() - t_all)})
    table = extrapolate(r)
    print("\n| figure | measured here | at Celler-75 (40M cells) | rests on |\n|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    r["extrapolation"] = table
    (out / "scale_results.json").write_text(json.dumps(r, indent=1, default=str))
    print(json.dumps({k: v for k, v in r.items() if k != "extrapolation"}, default=str))
    return 0


def _loader_store(n_cells: int) -> Path:
    """The synthetic store bench/loader.py measures (built by it, or here the same way)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from loader import ensure_store

    return Path(ensure_store(ROOT / "bench" / "out" / f"store_{n_cells}", n_cells))


if __name__ == "__main__":  # CellStream workers use spawn: keep this guard
    sys.exit(main())
