"""CPU speed of the ways to run SDPA over packed cells; the measurement behind pretrain/attention.py.

Strategies, all exact (checked against each other before timing):

- ``varlen``: ``pretrain.attention.varlen_attention(backend="sdpa")``, the shipped path (one SDPA
  call per cell on 4-D views);
- ``padded``: scatter to ``[B, H, Lmax, Dh]``, ``padded_attention`` with a key padding mask, gather;
- ``bucketed``: cells sorted by length, split into ``--buckets`` groups, each padded to its own max;
- ``nested``: nested jagged tensors (``layout=torch.jagged``) straight into SDPA (``--nested``;
  very slow on CPU, so off by default).

Usage: ``python bench/attention_speed.py [--cells 32] [--min-len 200] [--max-len 1200]
[--d-models 64,256,512] [--mode train|forward] [--reps 3] [--threads N] [--nested]``. Prints one
line per width, then one JSON line with every timing (wall and process-CPU ms, best of ``--reps``
after one warm-up) and wall tokens/s.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch
from torch import Tensor

from pretrain.attention import padded_attention, varlen_attention

__all__ = ["main"]

Attention = Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor]


def _batch(n_cells: int, min_len: int, max_len: int, d_model: int, gen: torch.Generator):
    """Random packed q, k, v (``n_heads = max(4, d_model // 64)``) and cell boundaries."""
    n_heads = max(4, d_model // 64)
    lengths = torch.randint(min_len, max_len + 1, (n_cells,), generator=gen) + 1  # + <cls>
    cu = torch.zeros(n_cells + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    shape = (int(cu[-1]), n_heads, d_model // n_heads)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    return q, k, v, cu, int(lengths.max()), n_heads


def _pad_index(lengths: Tensor) -> tuple[Tensor, Tensor]:
    """(cell, position) of every packed token of cells with these lengths."""
    cell = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    pos = torch.arange(int(lengths.sum())) - (lengths.cumsum(0) - lengths)[cell]
    return cell, pos


def _pad_attend(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor) -> Tensor:
    """Pad the given (contiguous-in-order) cells to their max length, attend, unpad."""
    cell, pos = _pad_index(lengths)
    width = int(lengths.max())

    def scatter(x: Tensor) -> Tensor:
        out = x.new_zeros(len(lengths), width, *x.shape[1:])
        out[cell, pos] = x
        return out.transpose(1, 2)

    pad = torch.arange(width)[None, :] >= lengths[:, None]
    return padded_attention(scatter(q), scatter(k), scatter(v), pad).transpose(1, 2)[cell, pos]


def padded(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_seqlen: int) -> Tensor:
    return _pad_attend(q, k, v, cu.diff().long())


def bucketed(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_seqlen: int, n_buckets: int = 4) -> Tensor:
    lengths, starts = cu.diff().long(), cu[:-1].long()
    outs, tokens = [], []
    for group in torch.argsort(lengths).chunk(n_buckets):
        cell, pos = _pad_index(lengths[group])
        tok = starts[group][cell] + pos  # packed index of each token of the bucket
        outs.append(_pad_attend(q[tok], k[tok], v[tok], lengths[group]))
        tokens.append(tok)
    return torch.empty_like(q).index_copy(0, torch.cat(tokens), torch.cat(outs))


def nested(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_seqlen: int) -> Tensor:
    offsets = cu.long()
    nq, nk, nv = (torch.nested.nested_tensor_from_jagged(x, offsets, max_seqlen=max_seqlen).transpose(1, 2)
                  for x in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(nq, nk, nv).transpose(1, 2).values()


def varlen(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_seqlen: int) -> Tensor:
    return varlen_attention(q, k, v, cu, max_seqlen, backend="sdpa")


def _time(fn: Attention, args: tuple, train: bool, reps: int) -> tuple[float, float]:
    """Best (wall, process CPU) seconds of ``reps`` runs; training = forward + backward of a sum.

    CPU time is reported because on a shared machine wall time mostly measures the neighbours;
    with ``--threads 1`` it is the work the strategy does, free of contention.
    """
    best_wall = best_cpu = float("inf")
    for i in range(reps + 1):  # the first run warms up allocator and kernels; not counted
        leaves = [a.detach().requires_grad_(train) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        wall, cpu = time.perf_counter(), time.process_time()
        if train:
            fn(*leaves).sum().backward()
        else:
            with torch.no_grad():
                fn(*leaves)
        if i > 0:
            best_wall = min(best_wall, time.perf_counter() - wall)
            best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=200)
    parser.add_argument("--max-len", type=int, default=1200)
    parser.add_argument("--d-models", default="64,256,512")
    parser.add_argument("--mode", choices=("train", "forward"), default="train")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--buckets", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--nested", action="store_true", help="also time nested jagged SDPA (slow on CPU)")
    parser.add_argument("--quick", action="store_true", help="d_model 64 only, 2 repetitions")
    args = parser.parse_args()
    if args.quick:
        args.d_models, args.reps = "64", 2
    if args.threads:
        torch.set_num_threads(args.threads)

    strategies: dict[str, Attention] = {
        "varlen": varlen,
        "padded": padded,
        "bucketed": lambda *a: bucketed(*a, n_buckets=args.buckets),
    }
    if args.nested:
        strategies["nested"] = nested
    gen = torch.Generator().manual_seed(0)
    results = []
    for d_model in (int(x) for x in args.d_models.split(",")):
        batch = _batch(args.cells, args.min_len, args.max_len, d_model, gen)
        q, k, v, cu, max_seqlen, n_heads = batch
        reference = varlen(q, k, v, cu, max_seqlen)
        row: dict[str, object] = {"d_model": d_model, "n_heads": n_heads, "tokens": int(cu[-1])}
        for name, fn in strategies.items():
            torch.testing.assert_close(fn(q, k, v, cu, max_seqlen), reference, atol=1e-5, rtol=1e-5)
            wall, cpu = _time(fn, (q, k, v, cu, max_seqlen), args.mode == "train", args.reps)
            row[f"{name}_ms"] = round(wall * 1e3, 1)
            row[f"{name}_cpu_ms"] = round(cpu * 1e3, 1)
            row[f"{name}_tokens_per_s"] = round(int(cu[-1]) / wall)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        results.append(row)
    summary = {"bench": "attention_speed", "mode": args.mode, "cells": args.cells, "min_len": args.min_len,
               "max_len": args.max_len, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "results": results}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
