"""Tokenizer throughput on a realistic block, against the naive per-cell loop.

Run: ``python bench/tokenize_speed.py [--against REV]`` (``--help`` for sizes). Prints a side-by-side table
(median of ``--repeats`` runs, the two versions called alternately) and ends with ONE JSON line for CI logs. The naive version is the
obvious implementation (group by cell, then per cell ``np.lexsort`` + rank + sample in Python);
the script checks that both produce identical tokens before it reports any speed. ``--against REV``
adds the tokenizer of another git revision (its ``data_store/tokenize.py`` loaded as a module), to
measure a change side by side on the same block.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import numpy.typing as npt

from data_store.tokenize import CLS_ID, N_SPECIAL, TokenizedCells, Tokenizer, sampling_priority

__all__ = ["Block", "make_block", "naive_tokenize", "main"]


@dataclass(frozen=True)
class Block:
    """One loader block as the SOMA reader hands it over: shuffled COO plus joinids."""

    rows: npt.NDArray[np.int64]
    genes: npt.NDArray[np.int64]
    values: npt.NDArray[np.float32]
    n_cells: int
    keys: npt.NDArray[np.int64]


def make_block(n_cells: int, n_genes: int, mean_nnz: int, seed: int) -> Block:
    """Cells with lognormal depth (nnz spread around ``mean_nnz``) and NB counts, COO shuffled.

    Genes are drawn with skewed (gamma) popularity like real data, so some genes are in most
    cells; counts are mostly 1-3 with a heavy tail, so within-cell ties are the common case.
    """
    rng = np.random.default_rng(seed)
    nnz = np.clip(rng.lognormal(np.log(mean_nnz), 0.5, n_cells), 50, n_genes // 2).astype(np.int64)
    popularity = rng.gamma(0.5, 1.0, n_genes)
    popularity /= popularity.sum()
    rows_list, genes_list = [], []
    for lo in range(0, n_cells, 256):  # generation only: chunks keep memory small
        cells = np.arange(lo, min(lo + 256, n_cells))
        # Gumbel top-k = weighted sampling without replacement, vectorised over the chunk.
        score = np.log(popularity)[None, :] - np.log(-np.log(rng.random((cells.size, n_genes))))
        order = np.argsort(-score, axis=1)
        take = np.arange(n_genes)[None, :] < nnz[cells][:, None]
        rows_list.append(np.broadcast_to(cells[:, None], order.shape)[take])
        genes_list.append(order[take])
    rows = np.concatenate(rows_list).astype(np.int64)
    genes = np.concatenate(genes_list).astype(np.int64)
    mean = 0.5 + 20 * popularity[genes] * n_genes / 100
    values = (1 + rng.negative_binomial(0.8, 0.8 / (0.8 + mean))).astype(np.float32)
    perm = rng.permutation(rows.size)
    keys = rng.permutation(50 * n_cells)[:n_cells].astype(np.int64)
    return Block(rows[perm], genes[perm], values[perm], n_cells, keys)


def naive_tokenize(tk: Tokenizer, block: Block, epoch: int) -> TokenizedCells:
    """The same tokens, the obvious way: one ``np.lexsort`` and a few numpy calls per cell."""
    order = np.argsort(block.rows, kind="stable")
    bounds = np.searchsorted(block.rows[order], np.arange(block.n_cells + 1))
    gene_parts, value_parts, lengths = [], [], []
    for i in range(block.n_cells):
        sel = order[bounds[i] : bounds[i + 1]]
        g, v = block.genes[sel], block.values[sel]
        nz = v != 0
        g, v = g[nz], v[nz]
        o = np.lexsort((g, v))
        g, v = g[o], v[o]
        bins = 1 + np.searchsorted(v, v, side="left") * (tk.n_bins - 1) // max(v.size, 1)
        if v.size > tk.max_genes:
            prio = sampling_priority(tk.seed, epoch, np.full(v.size, block.keys[i]), g)
            kept = np.sort(np.lexsort((np.arange(v.size), prio))[: tk.max_genes])
            g, bins = g[kept], bins[kept]
        gene_parts += [np.array([CLS_ID]), g + N_SPECIAL]
        value_parts += [np.array([0]), bins]
        lengths.append(g.size + 1)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedCells(
        np.concatenate(gene_parts).astype(np.int32),
        np.concatenate(value_parts).astype(tk.value_dtype),
        offsets,
        block.n_cells,
    )


def tokenizer_at(rev: str) -> type:
    """``Tokenizer`` class of ``data_store/tokenize.py`` at git revision ``rev``."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "-C", str(root), "show", f"{rev}:data_store/tokenize.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "tokenize_at_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("tokenize_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.Tokenizer


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls (median: robust to a noisy shared machine)."""
    return median_seconds_interleaved([fn], repeats)[0]


def median_seconds_interleaved(fns: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each function, calls alternating so that load drift on a shared
    machine hits every contender alike and the speed ratio stays fair."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times):
            start = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def ordering_alternatives(block: Block, repeats: int) -> dict[str, float]:
    """Seconds for the group-by-cell-then-value step alone, by the candidate methods."""
    gene_bits = int(block.genes.max()).bit_length()
    vbits = block.values.view(np.uint32).astype(np.uint64)
    fkey = block.rows + block.values.astype(np.float64) / (float(block.values.max()) + 1.0)

    def packed_sort() -> object:
        key = (block.rows.view(np.uint64) << np.uint64(31 + gene_bits)) | (vbits << np.uint64(gene_bits))
        return np.sort(key | block.genes.view(np.uint64))

    packed, float_key = median_seconds_interleaved([packed_sort, lambda: np.argsort(fkey)], repeats)
    return {
        "packed_uint64_sort": packed,
        "float64_key_argsort": float_key,
        "lexsort_rows_values_genes": median_seconds(lambda: np.lexsort((block.genes, block.values, block.rows)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=4096)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--mean-nnz", type=int, default=1000)
    parser.add_argument("--max-genes", type=int, default=1200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1024 cells, 3 repeats (a few seconds)")
    parser.add_argument("--against", metavar="REV", help="also time the tokenizer of this git revision")
    args = parser.parse_args()
    if args.quick:
        args.cells, args.repeats = 1024, 3

    block = make_block(args.cells, args.genes, args.mean_nnz, seed=0)
    tk = Tokenizer(n_bins=51, max_genes=args.max_genes, seed=0)
    fast = lambda: tk.tokenize(block.rows, block.genes, block.values, block.n_cells, cell_keys=block.keys)  # noqa: E731
    naive = lambda: naive_tokenize(tk, block, 0)  # noqa: E731
    a, b = fast(), naive()
    if not (np.array_equal(a.offsets, b.offsets) and np.array_equal(a.gene_ids, b.gene_ids)
            and np.array_equal(a.values, b.values)):
        raise SystemExit("vectorised and naive tokenizers disagree; refusing to report speed")

    contenders = [fast, naive]
    if args.against:
        tk_rev = tokenizer_at(args.against)(n_bins=51, max_genes=args.max_genes, seed=0)
        at_rev = lambda: tk_rev.tokenize(block.rows, block.genes, block.values, block.n_cells, cell_keys=block.keys)  # noqa: E731
        c = at_rev()
        if not (np.array_equal(a.gene_ids, c.gene_ids) and np.array_equal(a.values, c.values)):
            raise SystemExit(f"the tokenizer at {args.against} gives other tokens; refusing to compare speed")
        contenders.append(at_rev)
    fast()  # the first call loads (or compiles) the compiled kernels: not part of the timing
    times = median_seconds_interleaved(contenders, args.repeats)
    t_fast, t_naive = times[:2]
    order = ordering_alternatives(block, args.repeats)
    nnz = np.bincount(block.rows, minlength=block.n_cells)
    result = {
        "bench": "tokenize_speed",
        "cells": block.n_cells,
        "nonzeros": int(block.rows.size),
        "cells_over_max_genes": int((nnz > args.max_genes).sum()),
        "tokens": a.n_tokens,
        "repeats": args.repeats,
        "vectorised_cells_per_s": round(block.n_cells / t_fast),
        "naive_cells_per_s": round(block.n_cells / t_naive),
        "speedup": round(t_naive / t_fast, 1),
        "ordering_step_s": {k: round(v, 4) for k, v in order.items()},
        **({"against": args.against, "against_cells_per_s": round(block.n_cells / times[2]),
            "speedup_over_against": round(times[2] / t_fast, 2)} if args.against else {}),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on the machine skews absolute rates
        "numpy": np.__version__,
        "machine": platform.machine(),
    }
    print(f"block: {block.n_cells} cells, {block.rows.size} non-zeros "
          f"({result['cells_over_max_genes']} cells over max_genes={args.max_genes}), {a.n_tokens} tokens")
    print(f"{'':12}{'seconds':>10}{'cells/s':>12}")
    print(f"{'this tree':12}{t_fast:10.4f}{result['vectorised_cells_per_s']:12d}")
    print(f"{'naive loop':12}{t_naive:10.4f}{result['naive_cells_per_s']:12d}")
    if args.against:
        print(f"{args.against[:12]:12}{times[2]:10.4f}{result['against_cells_per_s']:12d}")
    print(f"speedup: {result['speedup']}x; ordering step alone (s): {result['ordering_step_s']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
