"""CPU training throughput of the Celler model on packed (varlen) vs padded batches of the same cells.

What it measures: forward + backward + AdamW step of ``CellerModel`` (plain torch, no DeepSpeed)
on batches streamed by ``CellStream`` from a small synthetic store, in two layouts:

- ``packed``: ``model.forward`` over ``[T]`` tokens with ``cu_seqlens`` and the shipped
  ``pretraining_loss``;
- ``padded``: ``to_padded`` of the very same batches, ``model.forward_padded`` and a padded copy of
  the same loss (same heads, same masked tokens, same targets).

Both layouts see the same cells in the same order and the same masks (drawn once on the packed
layout with a fixed seed, then scattered into the padded layout). Each (size, layout) run is its own
subprocess, so peak RSS is that layout's own; runs alternate packed/padded and the figures are
medians over ``--reps`` repetitions. tokens/s counts real tokens only (``<cls>`` + genes, no pads).

Also prints the model FLOPs per token (``pretrain.flops.model_flops_per_token``) of the debug and
base presets at the measured token-weighted cell length, to turn a GPU tokens/s into MFU.

Usage: ``python bench/train.py [--quick] [--store DIR] [--sizes debug,base] [--reps N]
[--debug-steps N] [--base-steps N] [--base-cells N]
[--threads N] [--zero]``; a size may carry overrides, e.g.
``debug:data.max_genes=1200`` (the debug model on base-length, variable-length cells). Builds ``bench/out/train_store`` (3000 cells, 20000 genes, 10 tissues)
with ``hiceller synth`` when no ``--store`` is given and it does not exist yet. Ends with one JSON
line (``packed_over_padded_tokens_per_s``, ``packed_tokens_per_s``, per-size details).
``--batching`` instead compares fixed-cell micro batches (``--batch-cells``, default 16) with
token-budget ones (``--batch-tokens``, default 12288) of the same packed layout: per step wall time
and activation memory (bytes of the tensors autograd saves for backward, counted by a
``saved_tensors_hooks``: the part of a step's memory that grows with its tokens), their max/min
over the timed steps, and tokens/s; e.g. ``python bench/train.py --real --batching --sizes
debug:data.max_genes=1200 --reps 5 --debug-steps 20``.
``--zero`` also runs the real CLI for 30 steps on 1 rank (``python -m pretrain``) and on 2 ranks
(``deepspeed --num_gpus 2 --module pretrain``, ZeRO-2 on the CPU accelerator) and reads cells/s
from ``metrics.jsonl``.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from _rss import peak_rss_mib  # noqa: E402
VENV_BIN = ROOT / ".venv" / "bin"
DEFAULT_STORE = ROOT / "bench" / "out" / "train_store"

__all__ = ["main"]


# ----------------------------------------------------------------------------- worker (one layout)
def _padded_loss(model, gene_ids, values, padding_mask, mask):
    """``pretraining_loss`` on the padded layout: same heads, masked (non-pad) tokens only."""
    import torch.nn.functional as F

    from pretrain.model import MASK_VALUE

    inputs = values.masked_fill(mask, MASK_VALUE)
    out = model.forward_padded(gene_ids, inputs, padding_mask)
    rows, cols = mask.nonzero(as_tuple=True)
    target = values[rows, cols].float()
    pred_value = model.value_head(out.hidden[rows, cols]).float()
    pred_expr = model.expr_head(out.cell_emb[rows], model.embed_genes(gene_ids[rows, cols])).float()
    denom = max(rows.numel(), 1)
    mse_value = F.mse_loss(pred_value, target, reduction="sum") / denom
    mse_expr = F.mse_loss(pred_expr, target, reduction="sum") / denom
    return mse_value + mse_expr


def _load_batches(store: str, cfg, batch_cells: int, n_batches: int, batch_tokens: int = 0):
    """The first ``n_batches`` packed batches of the stream (seed 0; ``batch_cells`` cells each, or
    with ``batch_tokens`` as many as fit that budget), with one mask each."""
    import torch

    from data_store.stream import CellStream
    from data_store.tokenize import Tokenizer
    from pretrain.objective import draw_mask, pick_mask_ratio

    tok = Tokenizer(n_bins=cfg.data.n_bins, max_genes=cfg.data.max_genes, seed=0)
    stream = CellStream(
        store, batch_cells=None if batch_tokens else batch_cells, batch_tokens=batch_tokens or None, tokenizer=tok, seed=0,
        block_size=cfg.data.block_size, buffer_blocks=cfg.data.buffer_blocks,
        rank=0, world_size=1,
    )
    gen = torch.Generator().manual_seed(1234)
    batches = []
    while len(batches) < n_batches:
        for b in stream:
            ratio = pick_mask_ratio(cfg.train.mask_ratios, gen)
            batches.append((b, draw_mask(b.cu_seqlens, b.n_tokens, ratio, gen)))
            if len(batches) == n_batches:
                break
        stream.set_epoch(stream.epoch + 1)
    return batches, stream.n_genes


def worker(args: argparse.Namespace) -> dict:
    import torch

    from data_store.batching import _scatter_rows, to_padded
    from hiceller.config import load_config
    from pretrain.model import CellerModel
    from pretrain.objective import pretraining_loss

    torch.set_num_threads(args.threads)
    name, *over = args.size.split(":")  # "debug:data.max_genes=1200" = preset + --set overrides
    cfg = load_config(name, ["model.attention=\"sdpa\"", *over])
    n_total = args.warmup + args.steps
    batches, n_genes = _load_batches(args.store, cfg, args.batch_cells, n_total, args.batch_tokens)
    torch.manual_seed(0)
    model = CellerModel(cfg.model, n_genes=n_genes, n_bins=cfg.data.n_bins).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)

    steps = []
    for b, mask in batches:
        if args.layout == "packed":
            inputs = (b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen, mask)
        else:
            p = to_padded(b)
            inputs = (p.gene_ids, p.values, p.padding_mask, _scatter_rows(mask, p.padding_mask, 0))
        steps.append((b.n_tokens, b.n_cells, int(b.max_seqlen) * b.n_cells, inputs))
    del batches

    rss_before = peak_rss_mib()
    times, saved = [], []
    for i, (_, _, _, inputs) in enumerate(steps):
        t0 = time.perf_counter()
        with _SavedBytes(args.count_saved) as counter:
            if args.layout == "packed":
                loss, _ = pretraining_loss(model, *inputs)
            else:
                loss = _padded_loss(model, *inputs)
        saved.append(counter.bytes)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    timed = slice(args.warmup, None)
    wall = sum(times[timed])
    tokens = sum(s[0] for s in steps[timed])
    cells = sum(s[1] for s in steps[timed])
    slots = sum(s[2] for s in steps[timed])
    lengths = [int(n) for s in steps for n in s[3][2].diff().tolist()] if args.layout == "packed" else []
    return {
        "layout": args.layout,
        "size": args.size,
        "steps": args.steps,
        "batch_cells": args.batch_cells,
        "wall_s": wall,
        "tokens": tokens,
        "cells": cells,
        "padded_slots": slots,
        "tokens_per_s": tokens / wall,
        "cells_per_s": cells / wall,
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_steps_mib": rss_before,
        "lengths": lengths,
        "batch_tokens": args.batch_tokens,
        "step_s": times[timed],
        "step_tokens": [s[0] for s in steps[timed]],
        "step_cells": [s[1] for s in steps[timed]],
        "step_saved_mib": [b / 2**20 for b in saved[timed]],
    }


class _SavedBytes:
    """Bytes of the distinct tensor storages autograd saves for backward inside the block (the
    activation memory a step holds at its peak); counts nothing when ``on`` is False."""

    def __init__(self, on: bool):
        self.on, self.bytes, self._seen = on, 0, set()

    def _pack(self, t):
        st = t.untyped_storage()
        if st.data_ptr() not in self._seen:
            self._seen.add(st.data_ptr())
            self.bytes += st.nbytes()
        return t

    def __enter__(self):
        if self.on:
            import torch

            self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.on:
            self._ctx.__exit__(*exc)


# ----------------------------------------------------------------------------- orchestration
def _run_worker(store: str, size: str, layout: str, steps: int, warmup: int, batch_cells: int, threads: int,
                batch_tokens: int = 0, count_saved: bool = False) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", "--store", store, "--size", size, "--layout", layout,
        "--steps", str(steps), "--warmup", str(warmup), "--batch-cells", str(batch_cells), "--threads", str(threads),
        "--batch-tokens", str(batch_tokens), *(["--count-saved"] if count_saved else []),
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-3000:])
        out.check_returncode()
    return json.loads(out.stdout.strip().splitlines()[-1])


REAL_STORE = ROOT / "bench" / "out" / "real_store"
SHARED_DATA = ROOT.parent / "shared" / "data"


def ensure_store(store: str | None, real: bool = False) -> str:
    """The store to read: ``--store``; with ``--real`` the files of ../shared/data ingested as they
    are (real cells of several technologies, 98..4807 non-zero genes); else a synthetic one."""
    if store:
        return store
    if real:
        files = sorted(SHARED_DATA.glob("*.h5ad"))
        if not files:
            raise SystemExit(f"--real: no .h5ad in {SHARED_DATA}")
        if not (REAL_STORE / "obs").exists():
            subprocess.run([str(VENV_BIN / "hiceller"), "ingest", "--store", str(REAL_STORE), "--skip-existing",
                            "--no-progress", *map(str, files)], check=True)
        return str(REAL_STORE)
    if not (DEFAULT_STORE / "obs").exists():
        DEFAULT_STORE.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(VENV_BIN / "hiceller"), "synth", "--store", str(DEFAULT_STORE), "--cells", "3000",
             "--genes", "20000", "--tissues", "10", "--no-progress"], check=True,
        )
    return str(DEFAULT_STORE)


def bench_size(store: str, size: str, reps: int, steps: int, warmup: int, batch_cells: int, threads: int) -> dict:
    runs: dict[str, list[dict]] = {"packed": [], "padded": []}
    for r in range(reps):
        order = ("packed", "padded") if r % 2 == 0 else ("padded", "packed")  # alternate who goes first
        for layout in order:
            res = _run_worker(store, size, layout, steps, warmup, batch_cells, threads)
            runs[layout].append(res)
            print(f"  {size} rep {r} {layout:6s}: {res['tokens_per_s']:9.0f} tok/s {res['cells_per_s']:7.2f} cells/s "
                  f"peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
    summary = {}
    for layout, rs in runs.items():
        summary[layout] = {
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
            "cells_per_s": statistics.median(x["cells_per_s"] for x in rs),
            "peak_rss_mib": statistics.median(x["peak_rss_mib"] for x in rs),
            "all_tokens_per_s": [round(x["tokens_per_s"], 1) for x in rs],
        }
    p0 = runs["packed"][0]
    lengths = p0["lengths"]
    from pretrain.flops import token_weighted_seqlen
    summary["token_weighted_seqlen"] = token_weighted_seqlen(lengths)
    summary["mean_cell_tokens"] = sum(lengths) / len(lengths)
    summary["pad_fraction"] = 1 - p0["tokens"] / p0["padded_slots"]
    ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["packed"], runs["padded"])]
    summary["packed_over_padded_tokens_per_s"] = summary["packed"]["tokens_per_s"] / summary["padded"]["tokens_per_s"]
    summary["per_rep_ratio"] = [round(x, 3) for x in ratios]
    summary.update(batch_cells=batch_cells, steps=steps, warmup=warmup, reps=reps, threads=threads)
    return summary


def bench_batching(store: str, size: str, reps: int, steps: int, warmup: int, batch_cells: int, batch_tokens: int,
                   threads: int) -> dict:
    """Fixed-cell vs token-budget micro batches (packed layout, same model and stream seed), runs alternating."""
    runs: dict[str, list[dict]] = {"cells": [], "tokens": []}
    for r in range(reps):
        for mode in (("cells", "tokens") if r % 2 == 0 else ("tokens", "cells")):
            res = _run_worker(store, size, "packed", steps, warmup, batch_cells, threads,
                              batch_tokens if mode == "tokens" else 0, count_saved=True)
            res["step_s_spread"] = max(res["step_s"]) / min(res["step_s"])
            res["saved_spread"] = max(res["step_saved_mib"]) / min(res["step_saved_mib"])
            runs[mode].append(res)
            print(f"  {size} rep {r} {mode:6s}: {res['tokens_per_s']:8.0f} tok/s, step time max/min "
                  f"{res['step_s_spread']:.2f}, activations max/min {res['saved_spread']:.2f} "
                  f"({min(res['step_saved_mib']):.0f}..{max(res['step_saved_mib']):.0f} MiB), tokens/step "
                  f"{min(res['step_tokens'])}..{max(res['step_tokens'])}", flush=True)
    med = statistics.median
    out = {}
    for mode, rs in runs.items():
        out[mode] = {
            "tokens_per_s": med(x["tokens_per_s"] for x in rs),
            "cells_per_s": med(x["cells_per_s"] for x in rs),
            "step_s_max_over_min": med(x["step_s_spread"] for x in rs),
            "activation_mib_max_over_min": med(x["saved_spread"] for x in rs),
            "activation_mib_max": med(max(x["step_saved_mib"]) for x in rs),
            "step_s_max": med(max(x["step_s"]) for x in rs),
            "tokens_per_step": [min(rs[0]["step_tokens"]), med(rs[0]["step_tokens"]), max(rs[0]["step_tokens"])],
            "cells_per_step": [min(rs[0]["step_cells"]), med(rs[0]["step_cells"]), max(rs[0]["step_cells"])],
            "peak_rss_mib": med(x["peak_rss_mib"] for x in rs),
            "all_tokens_per_s": [round(x["tokens_per_s"], 1) for x in rs],
        }
    out["tokens_over_cells_tokens_per_s"] = out["tokens"]["tokens_per_s"] / out["cells"]["tokens_per_s"]
    out.update(batch_cells=batch_cells, batch_tokens=batch_tokens, steps=steps, warmup=warmup, reps=reps, threads=threads)
    return out


def flops_table(lengths_by_size: dict[str, float]) -> dict:
    from hiceller.config import load_config
    from pretrain.flops import PEAK_FLOPS, model_flops_per_token

    out = {}
    for size in ("debug", "base"):
        cfg = load_config(size)
        L = lengths_by_size.get(size) or (cfg.data.max_genes + 1)
        f = model_flops_per_token(cfg.model, L, 20000)
        # tokens/s one H100 needs for 45% bf16 MFU at this cell length
        out[size] = {"seqlen": round(L, 1), "flops_per_token": f,
                     "h100_tokens_per_s_for_45pct_mfu": 0.45 * PEAK_FLOPS["H100-bf16"] / f}
    return out


def zero_bench(store: str, steps: int = 30) -> dict:
    """cells/s of the real CLI: 1 rank (python -m pretrain) vs 2 ranks ZeRO-2 (deepspeed launcher)."""
    out_root = ROOT / "bench" / "out" / "zero_runs"
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir(parents=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    common = ["--config", "debug", "--store", store, "--set", f"train.steps={steps}", "--no-progress"]
    res = {}
    for name, launcher in (("1rank", [str(VENV_BIN / "python"), "-m", "pretrain"]),
                           ("2rank_zero2", [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--module", "pretrain"])):
        run_dir = out_root / name
        t0 = time.perf_counter()
        p = subprocess.run([*launcher, *common, "--out", str(run_dir)], cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        for f in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
            try:
                os.remove(f)
            except OSError:
                pass
        rows = []
        mpath = run_dir / "metrics.jsonl"
        if mpath.exists():
            rows = [json.loads(x) for x in mpath.read_text().splitlines() if x.strip()]
        cps = [r["cells_per_s"] for r in rows if "cells_per_s" in r]
        res[name] = {"rc": p.returncode, "wall_s": round(wall, 1),
                     "cells_per_s_median": statistics.median(cps[1:] or cps) if cps else None,
                     "cells_per_s_all": cps}
        if p.returncode != 0:
            res[name]["stderr_tail"] = p.stderr[-1500:]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="debug size only, 3 reps (about a minute)")
    ap.add_argument("--store", default=None)
    ap.add_argument("--real", action="store_true", help="read the real cells of ../shared/data (bench/out/real_store)")
    ap.add_argument("--sizes", default=None, help="comma list of presets (default debug,base; --quick: debug)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--zero", action="store_true", help="also 1-rank vs 2-rank ZeRO-2 CLI runs (debug, 30 steps)")
    ap.add_argument("--batching", action="store_true", help="fixed-cell vs token-budget micro batches instead")
    ap.add_argument("--batch-tokens", type=int, default=12288, help="token budget of --batching")
    ap.add_argument("--debug-steps", type=int, default=15)
    ap.add_argument("--base-steps", type=int, default=1)
    ap.add_argument("--base-cells", type=int, default=2, help="cells per micro batch at base size on CPU")
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", default="debug", help=argparse.SUPPRESS)
    ap.add_argument("--layout", default="packed", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--batch-cells", type=int, default=16, help="cells per fixed micro batch of --batching")
    ap.add_argument("--count-saved", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    store = ensure_store(args.store, args.real)
    sizes = (args.sizes or ("debug" if args.quick else "debug,base")).split(",")
    reps = args.reps or (3 if args.quick else 5)
    from hiceller.config import load_config

    if args.batching:
        res = {}
        for size in sizes:
            print(f"{size}: {reps} reps x {args.debug_steps} steps (+2 warm-up), {args.batch_cells} cells vs "
                  f"{args.batch_tokens} tokens per micro batch, {args.threads} threads", flush=True)
            res[size] = bench_batching(store, size, reps, args.debug_steps, 2, args.batch_cells, args.batch_tokens, args.threads)
            r = res[size]
            print(f"{'batches':8s} {'tokens/s':>9s} {'step s max/min':>15s} {'activations max/min':>20s} {'tokens/step':>20s}")
            for mode in ("cells", "tokens"):
                x = r[mode]
                print(f"{mode:8s} {x['tokens_per_s']:9.0f} {x['step_s_max_over_min']:15.2f} "
                      f"{x['activation_mib_max_over_min']:20.2f} {str(x['tokens_per_step']):>20s}")
            print(f"token-budget / fixed-cell tokens/s = {r['tokens_over_cells_tokens_per_s']:.2f}x")
        print(json.dumps({"batching": res}))
        return 0

    results = {}
    for size in sizes:
        name, *over = size.split(":")
        cfg = load_config(name, over)
        if name == "debug":
            steps, warmup, cells = (8, 2, cfg.train.micro_batch_cells) if args.quick else (args.debug_steps, 2, cfg.train.micro_batch_cells)
        else:
            steps, warmup, cells = args.base_steps, 1, args.base_cells
        print(f"{size}: {reps} reps x {steps} steps (+{warmup} warm-up) of {cells} cells, {args.threads} threads", flush=True)
        results[size] = bench_size(store, size, max(1, reps if name == "debug" else min(reps, 2)), steps, warmup, cells, args.threads)

    flops = flops_table({s: r["token_weighted_seqlen"] for s, r in results.items()})
    for s, r in results.items():
        if ":" in s:  # FLOPs of an overridden preset at its own measured length
            name, *over = s.split(":")
            from pretrain.flops import model_flops_per_token
            flops[s] = {"seqlen": round(r["token_weighted_seqlen"], 1),
                        "flops_per_token": model_flops_per_token(load_config(name, over).model, r["token_weighted_seqlen"], 20000)}
    print()
    print(f"{'size':6s} {'layout':7s} {'tokens/s':>10s} {'cells/s':>9s} {'peak RSS MiB':>13s}")
    for size, r in results.items():
        for layout in ("packed", "padded"):
            x = r[layout]
            print(f"{size:6s} {layout:7s} {x['tokens_per_s']:10.0f} {x['cells_per_s']:9.2f} {x['peak_rss_mib']:13.0f}")
        print(f"{size:6s} packed/padded tokens/s = {r['packed_over_padded_tokens_per_s']:.2f}x "
              f"(per rep {r['per_rep_ratio']}; pad fraction {r['pad_fraction']:.2f}, mean cell {r['mean_cell_tokens']:.0f} tokens)")
    for size, f in flops.items():
        need = f.get("h100_tokens_per_s_for_45pct_mfu")
        print(f"model FLOPs/token {size}: {f['flops_per_token']:.3e} at L={f['seqlen']}"
              + (f" (H100 bf16 45% MFU needs {need:.3e} tokens/s)" if need else ""))
    summary = {
        "packed_over_padded_tokens_per_s": results[sizes[0]]["packed_over_padded_tokens_per_s"],
        "packed_tokens_per_s": results[sizes[0]]["packed"]["tokens_per_s"],
        "padded_tokens_per_s": results[sizes[0]]["padded"]["tokens_per_s"],
        "headline_size": sizes[0],
        "sizes": results,
        "flops_per_token": flops,
    }
    if args.zero:
        summary["zero"] = zero_bench(store)
        for k, v in summary["zero"].items():
            print(f"CLI {k}: rc {v['rc']} median cells/s {v['cells_per_s_median']} (wall {v['wall_s']} s)")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
