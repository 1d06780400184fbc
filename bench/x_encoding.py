"""Read speed and size of the store's X under other TileDB filter pipelines (an experiment for 2/7).

Copies X of a store (``hiceller synth`` by default, 20k cells x 20k genes) into sparse arrays that
differ only in their filters, then reads random contiguous 2048-cell row ranges from each, as
CellStream's reader does (``X.read(coords=(slice(a, b),)).tables()``, Arrow), interleaved over
repetitions. Prints cells/s and bytes/cell per encoding and one JSON line.

  python bench/x_encoding.py [--store DIR] [--cells 20000] [--reads 40] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

Z1 = {"_type": "ZstdFilter", "level": 1}
LZ4 = {"_type": "LZ4Filter"}
ENCODINGS = {
    # the store's own pipeline (data_store/store.py _X_PLATFORM)
    "dd+zstd1 (store)": ([{"_type": "DoubleDeltaFilter"}, Z1], [{"_type": "DeltaFilter"}, Z1], [Z1]),
    "dd+lz4": ([{"_type": "DoubleDeltaFilter"}, LZ4], [{"_type": "DeltaFilter"}, LZ4], [LZ4]),
    "dd, no compression": ([{"_type": "DoubleDeltaFilter"}], [{"_type": "DeltaFilter"}], []),
    "dd+bitwidth+zstd1, shuffled data": (
        [{"_type": "DoubleDeltaFilter"}, Z1],
        [{"_type": "DeltaFilter"}, {"_type": "BitWidthReductionFilter"}, Z1],
        [{"_type": "ByteShuffleFilter"}, Z1],
    ),
}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--reads", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/x_encoding")
    a = ap.parse_args()
    import pyarrow as pa
    import tiledbsoma as soma

    a.out.mkdir(parents=True, exist_ok=True)
    store = a.store or a.out / f"synth_{a.cells}"
    if not (store / "obs").exists():
        subprocess.run([str(Path(sys.executable).with_name("hiceller")), "synth", "--store", str(store), "--cells",
                        str(a.cells), "--no-progress"], check=True)
    src = soma.SparseNDArray.open(str(store / "ms" / "RNA" / "X" / "data"))
    n, g = src.non_empty_domain()[0][1] + 1, src.shape[1]
    arrays = {}
    for name, (d0, d1, data) in ENCODINGS.items():
        uri = a.out / ("x_" + "".join(c if c.isalnum() else "_" for c in name))
        if uri.exists():
            shutil.rmtree(uri)
        cfg = {"tiledb": {"create": {"capacity": 100_000, "dims": {"soma_dim_0": {"tile": 2048, "filters": d0},
                                                                    "soma_dim_1": {"tile": 1 << 24, "filters": d1}},
                                     "attrs": {"soma_data": {"filters": data}}}}}
        with soma.SparseNDArray.create(str(uri), type=pa.float32(), shape=(n, g), platform_config=cfg) as dst:
            for lo in range(0, n, 8192):
                t = src.read(coords=(slice(lo, min(lo + 8192, n) - 1),)).tables().concat()
                dst.write(t, platform_config={"tiledb": {"write": {"sort_coords": False}}})
        arrays[name] = uri
    rng = np.random.default_rng(0)
    starts = rng.integers(0, n - a.chunk, size=a.reads)
    times = {k: [] for k in arrays}
    nnz = {}
    for rep in range(a.reps):
        for name, uri in (list(arrays.items()) if rep % 2 == 0 else list(arrays.items())[::-1]):
            with soma.SparseNDArray.open(str(uri)) as x:
                t0 = time.perf_counter()
                total = 0
                for s in starts:
                    total += x.read(coords=(slice(int(s), int(s) + a.chunk - 1),)).tables().concat().num_rows
                times[name].append(time.perf_counter() - t0)
                nnz[name] = total
    assert len(set(nnz.values())) == 1, nnz
    res = {}
    cells = a.reads * a.chunk
    for name, uri in arrays.items():
        m = statistics.median(times[name])
        res[name] = {"cells_per_s": round(cells / m), "bytes_per_cell": round(du(uri) / n), "seconds": [round(t, 2) for t in times[name]]}
        print(f"{name:34s} {res[name]['cells_per_s']:8d} cells/s  {res[name]['bytes_per_cell']:6d} B/cell  {res[name]['seconds']}")
    print(json.dumps({"cells": int(n), "chunk": a.chunk, "reads": a.reads, "encodings": res}))


if __name__ == "__main__":
    main()
