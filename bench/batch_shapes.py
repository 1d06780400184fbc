"""Micro-batch shapes of fixed-cell vs token-budget batches, and what the token budget costs to set up.

No model: over one epoch of a store (default ``bench/out/real_store``, the files of ../shared/data as
``bench/train.py --real`` ingests them), the tokens and cells of every micro batch the stream yields
with ``--cells`` cells vs ``--tokens`` tokens per batch (1 rank); then the time to count the cells'
tokens from X (``cell_token_lengths``, median of 3), and the time every rank spends cutting every
rank's windows (``token_budget_layout``) at corpus scale, on the store's lengths resampled (``--scale
4000000x64 40000000x512``). Ends with one JSON line.

Usage: ``python bench/batch_shapes.py [--store DIR] [--max-genes 1200] [--cells 32] [--tokens 32768] [--scale NxR ...]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _summary(tokens: np.ndarray, cells: np.ndarray, n_cells: int) -> dict:
    return {"batches": len(tokens), "tokens_min_median_max": [int(tokens.min()), int(np.median(tokens)), int(tokens.max())],
            "tokens_max_over_min": float(tokens.max() / tokens.min()), "tokens_p1_p99": np.percentile(tokens, [1, 99]).tolist(),
            "smallest_3": np.sort(tokens)[:3].tolist(), "cells_min_median_max": [int(cells.min()), int(np.median(cells)), int(cells.max())],
            "cells_used": int(cells.sum()), "cells": n_cells}


def main(argv: list[str] | None = None) -> int:
    from data_store.stream import CellStream
    from data_store.token_budget import cell_token_lengths, token_budget_layout
    from data_store.tokenize import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=str(ROOT / "bench" / "out" / "real_store"))
    ap.add_argument("--max-genes", type=int, default=1200)
    ap.add_argument("--cells", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--scale", nargs="*", default=["4000000x64", "40000000x512"])
    a = ap.parse_args(argv)

    common = dict(tokenizer=Tokenizer(max_genes=a.max_genes, seed=0), seed=0, rank=0, world_size=1, block_size=256, buffer_blocks=512)
    budget = CellStream(a.store, batch_tokens=a.tokens, **common)
    fixed = CellStream(a.store, batch_cells=a.cells, **common)
    out: dict = {}
    for name, stream in (("cells", fixed), ("tokens", budget)):
        tokens, cells = zip(*[(b.n_tokens, b.n_cells) for b in stream])
        out[name] = _summary(np.array(tokens), np.array(cells), stream.n_cells)
        print(f"{name:6s}: {out[name]}", flush=True)

    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        lengths = cell_token_lengths(a.store, budget.joinids, a.max_genes)
        times.append(time.perf_counter() - t0)
    out["lengths_s"] = statistics.median(times)
    print(f"token counts of {len(lengths)} cells from X: {out['lengths_s']:.2f} s "
          f"({len(lengths) / out['lengths_s']:.0f} cells/s)", flush=True)

    out["scale"] = {}
    for spec in a.scale:
        n, world = map(int, spec.split("x"))
        resampled = np.random.default_rng(0).choice(lengths, size=n).astype(np.int32)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            lay = token_budget_layout(resampled, rank=world - 1, world_size=world, batch_tokens=a.tokens, block_size=256,
                                      buffer_blocks=512, num_workers=1, shuffle=True, seed=0, epoch=0)
            times.append(time.perf_counter() - t0)
        used = sum(int(e[-1]) for e in lay.batch_ends)
        out["scale"][spec] = {"s": statistics.median(times), "batches_per_rank": lay.n_batches, "rank_cells_used": used,
                              "rank_cells": len(lay.order)}
        print(f"{n} cells x {world} ranks: cuts in {out['scale'][spec]['s']:.2f} s, {lay.n_batches} batches per rank, "
              f"{used}/{len(lay.order)} of the last rank's cells used", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
