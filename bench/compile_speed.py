"""Does ``train.compile`` pay? Eager vs compiled encoder blocks (pretrain/parallelize.py), same batches.

Forward + backward of ``CellerModel`` (train mode, the preset's dropout) on ``--batches`` packed
batches of ``--cells`` random cells of 20..``--max-len`` tokens, every batch another length mix
(as in training). Reports the first compiled call (compile time), the steady-state median of the
rest for both, and how many graphs torch.compile made. On CPU the attention is the per-cell SDPA
loop, which reads cell lengths on the host and so splits every block's graph; on a GPU with a
flash kernel it does not (bench/gpu_check.sh measures that case in training).

Usage: ``python bench/compile_speed.py [--preset debug] [--batches 12] [--cells 16] [--max-len 257]
[--threads 1]``. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hiceller.config import load_config  # noqa: E402
from pretrain.model import N_SPECIAL, CellerModel  # noqa: E402
from pretrain.parallelize import apply_compile  # noqa: E402


def _batches(n: int, cells: int, max_len: int, n_genes: int, device: torch.device) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        lengths = torch.randint(20, max_len + 1, (cells,), generator=g)
        cu = torch.zeros(cells + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        t = int(cu[-1])
        ids = torch.randint(N_SPECIAL, n_genes + N_SPECIAL, (t,), generator=g)
        vals = torch.randint(0, 51, (t,), generator=g)
        out.append((ids.to(device), vals.to(device), cu.to(device), int(lengths.max())))
    return out


def _step_times(model: CellerModel, batches: list[tuple]) -> list[float]:
    times = []
    for b in batches:
        t = time.perf_counter()
        model(*b).hidden.float().square().mean().backward()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="debug")
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--cells", type=int, default=16)
    p.add_argument("--max-len", type=int, default=257)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.batches < 3:
        print("compile_speed: --batches must be >= 3 (one to compile, the rest timed)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(args.preset)
    n_genes = 2000
    batches = _batches(args.batches, args.cells, args.max_len, n_genes, device)
    res = {"preset": args.preset, "device": device.type, "threads": args.threads, "batches": args.batches,
           "cells": args.cells, "max_len": args.max_len, "torch": torch.__version__}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = CellerModel(cfg.model, n_genes=n_genes, n_bins=cfg.data.n_bins).to(device)
        if name == "compiled":
            torch._dynamo.reset()
            apply_compile(model)
        times = _step_times(model, batches)
        res[name] = {"first_s": round(times[0], 3), "steady_median_ms": round(1e3 * statistics.median(times[1:]), 1)}
    from torch._dynamo.utils import counters

    res["compiled"]["graph_breaks"] = sum(counters["graph_break"].values())
    res["compiled"]["frames_compiled"] = counters["stats"]["unique_graphs"]
    res["compiled_over_eager"] = round(res["compiled"]["steady_median_ms"] / res["eager"]["steady_median_ms"], 2)
    print(f"{args.preset} on {device.type}: eager {res['eager']['steady_median_ms']} ms/step, compiled "
          f"{res['compiled']['steady_median_ms']} ms/step after a {res['compiled']['first_s']} s first call",
          file=sys.stderr)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
