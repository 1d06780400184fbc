"""Annotation speed on CPU: packed (the Annotator's path) vs padded, peak RSS vs cells, CellTypist.

What it does (everything under ``--out``, default ``bench/out/annotate``; nothing there is tracked):

1. Builds once a synthetic query ``.h5ad`` (``--cells``, 20k genes) from ``SyntheticCorpus`` chunks
   (80 tissues, chunk 0 of each, written block by block into a CSR .h5ad), plus the first
   ``--rss-small`` cells of it as a second file, and a labelled CellTypist training set (chunk 1
   of each tissue, cells of the bundle's classes only).
2. Writes randomly initialised ``debug`` (and ``base``) bundles with ``pretrain.layout.write_bundle``:
   vocabulary = the synthetic gene names, classes = the ``--classes`` most frequent cell types.
   Speed does not depend on training, so the weights are untrained (seeded init).
3. Packed vs padded, side by side (interleaved repetitions, medians): the same cells, read from the
   backed .h5ad and tokenized by the same ``Annotator.iter_predictions`` code; ``packed`` is the
   Annotator's own ``_predict`` (``pack`` -> ``CellerModel.forward`` with varlen attention), ``padded``
   replaces only ``_predict`` with ``to_padded`` -> ``CellerModel.forward_padded`` -> the same head.
   Predictions (argmax) and probabilities are compared on a sample before any timing.
   The base size is measured on ``--base-cells`` cells only and cells/s extrapolated.
4. Peak RSS: ``annotate`` (``iter_predictions`` over the backed .h5ad, as ``hiceller evaluate`` does)
   on ``--rss-small`` and ``--cells`` cells, each in its own subprocess; ``ru_maxrss`` of the child.
   The 100k child also gives end-to-end cells/s on the full query.
5. CellTypist: ``celltypist.train`` (SGD, all genes) on the log1p(10k)-normalised training set, then
   ``celltypist.annotate`` on ``--ct-cells`` query cells (log1p-normalised beforehand; the
   normalisation time is reported separately), side by side with the packed path on the same cells.

Usage: ``python bench/annotate_speed.py [--quick] [--cells 100000] [--base-cells 16] [--reps 3]``;
``--real [DATA_DIR]``: instead, packed vs padded on the real counts files of ../shared/data, each alone
and all stacked and shuffled (``mixed``), with randomly initialised debug bundles at max_genes 256 and 1200.
``--flops-only`` (with or without ``--real``): no timing; the tokens and forward FLOPs of both layouts over the
batches the Annotator runs, i.e. the most packing can gain on that query (debug and base architectures).
``--quick``: 5k cells, debug size only. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _rss import peak_rss_mib  # noqa: E402


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------- data
def build_query(path: Path, n_cells: int, n_genes: int, seed: int = 0) -> Path:
    """``n_cells`` synthetic cells (chunk 0 of each of 80 tissues) as a CSR .h5ad, written in blocks."""
    done = path.with_suffix(".done")
    if path.exists() and done.exists():
        return path
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    from data_store.synth import SynthSpec, SyntheticCorpus

    print(f"building {path} ({n_cells} cells, once, not timed)...", file=sys.stderr, flush=True)
    corpus = SyntheticCorpus(SynthSpec(n_cells=n_cells, n_genes=n_genes, seed=seed))
    n_t = corpus.spec.n_tissues
    per = [n_cells // n_t + (1 if t < n_cells % n_t else 0) for t in range(n_t)]
    obs_parts, tmp = [], path.with_suffix(".tmp.h5ad")
    ad.AnnData(var=pd.DataFrame(index=corpus.genes)).write_h5ad(tmp)
    with h5py.File(tmp, "a") as f:
        if "X" in f:
            del f["X"]
        x = None
        for t, n in enumerate(per):
            if n == 0:
                continue
            m, obs = corpus.generate(t, n, 0)
            m = m.astype(np.float32)
            obs_parts.append(obs[["obs_id", "cell_type", "tissue"]])
            if x is None:
                write_elem(f, "X", m)
                x = sparse_dataset(f["X"])
            else:
                x.append(m)
    obs = pd.concat(obs_parts, ignore_index=True)
    obs.index = obs.pop("obs_id").astype(str)
    with h5py.File(tmp, "a") as f:
        del f["obs"]
        write_elem(f, "obs", obs.astype("category"))
    os.replace(tmp, path)
    done.write_text("ok")
    return path


def head_h5ad(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` cells of ``src`` as ``dst``."""
    done = dst.with_suffix(".done")
    if dst.exists() and done.exists():
        return dst
    import anndata as ad

    a = ad.read_h5ad(src, backed="r")
    sub = a[:n].to_memory()
    sub.write_h5ad(dst)
    done.write_text("ok")
    return dst


def top_classes(h5ad: Path, k: int) -> tuple[list[str], list[int]]:
    import anndata as ad

    a = ad.read_h5ad(h5ad, backed="r")
    vc = a.obs["cell_type"].astype(str).value_counts()
    return [str(s) for s in vc.index[:k]], [int(c) for c in vc.values[:k]]


def build_train(path: Path, classes: list[str], n_genes: int, per_tissue: int, seed: int = 0):
    """Labelled CellTypist training set (chunk 1 of each tissue, only ``classes``), log1p(1e4)-normalised."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from data_store.synth import SynthSpec, SyntheticCorpus

    if path.exists():
        return ad.read_h5ad(path)
    corpus = SyntheticCorpus(SynthSpec(n_cells=per_tissue * 80, n_genes=n_genes, seed=seed))
    ms, obss = [], []
    for t in range(corpus.spec.n_tissues):
        m, obs = corpus.generate(t, per_tissue, 1)
        keep = obs["cell_type"].astype(str).isin(classes).to_numpy()
        ms.append(m[keep].astype(np.float32))
        obss.append(obs.loc[keep, ["obs_id", "cell_type"]])
    obs = pd.concat(obss, ignore_index=True)
    obs.index = obs.pop("obs_id").astype(str)
    a = ad.AnnData(X=sp.vstack(ms).tocsr(), obs=obs, var=pd.DataFrame(index=corpus.genes))
    lognorm(a)
    a.write_h5ad(path)
    return a


def lognorm(a) -> None:
    import scanpy as sc

    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)


def build_bundle(path: Path, preset: str, vocab: list[str], classes: list[str], counts: list[int], max_genes: int | None = None) -> Path:
    if (path / "checksums.sha256").exists():
        return path
    import torch

    from finetune.task import ClassifierTask
    from hiceller.config import load_config
    from pretrain.layout import ModelSpec, TrainedModel, write_bundle
    from pretrain.model import CellerModel

    cfg = load_config(preset)
    torch.manual_seed(0)
    model = CellerModel(cfg.model, n_genes=len(vocab), n_bins=cfg.data.n_bins)
    task = ClassifierTask(model, len(classes), "ce", np.ones(len(classes)))
    spec = ModelSpec(cfg.model, cfg.data.n_bins, max_genes or cfg.data.max_genes, vocab, labels=classes, label_counts=counts)
    write_bundle(path, TrainedModel(spec, task.state_dict(), path, {"note": "randomly initialised, for speed benchmarks only"}),
                 overwrite=True)
    return path


def build_real_queries(out: Path, data: Path, seed: int = 0) -> tuple[dict[str, Path], list[str]]:
    """Real query files from ``data`` (../shared/data): each counts file as it is, plus ``mixed``,
    all of them stacked (outer join on upper-cased symbols) and shuffled, as an atlas-style query
    whose cells come from several technologies. Returns ({name: path}, vocabulary)."""
    import anndata as ad
    import pandas as pd

    files = sorted(p for p in data.glob("*_counts*.h5ad"))
    if not files:
        raise SystemExit(f"--real: no *_counts*.h5ad in {data}")
    out.mkdir(parents=True, exist_ok=True)
    paths, parts = {}, []
    for f in files:
        name = f.name.split("_counts")[0]
        a = ad.read_h5ad(f)
        a.var_names = a.var_names.astype(str).str.upper()
        a = a[:, ~a.var_names.duplicated()].copy()
        a.obs = pd.DataFrame({"cell_type": pd.Categorical([str(c) for c in a.obs["cell_type"]])}, index=[f"{name}:{i}" for i in a.obs_names])
        paths[name] = out / f"real_{name}.h5ad"
        if not paths[name].exists():
            a.write_h5ad(paths[name])
        parts.append(a)
    mixed = ad.concat(parts, join="outer")
    mixed = mixed[np.random.default_rng(seed).permutation(mixed.n_obs)].copy()
    paths["mixed"] = out / "real_mixed.h5ad"
    if not paths["mixed"].exists():
        mixed.write_h5ad(paths["mixed"])
    return paths, sorted(mixed.var_names.astype(str))


def batch_lengths(ann, adata, batch_size: int) -> list[np.ndarray]:
    """Cell lengths (tokens incl. ``<cls>``) of each batch the Annotator would run, without running it."""
    from data_store.batching import pack

    got: list[np.ndarray] = []

    def record(tok, budget):
        b = pack(tok)
        got.append(b.seqlens.numpy().copy())
        return np.zeros((b.n_cells, len(ann.labels))), np.zeros((b.n_cells, ann.spec.model_cfg.d_model))

    ann._predict = record
    try:
        for _ in ann.iter_predictions(adata, batch_size=batch_size, min_overlap=0.0):
            pass
    finally:
        del ann._predict
    return got


def var_names(path: Path) -> list[str]:
    """The gene names of an .h5ad file (read backed: X stays on disk)."""
    import anndata as ad

    return ad.read_h5ad(path, backed="r").var_names.astype(str).tolist()


def layout_flops(args, log, paths: dict[str, Path], vocab: list[str], tag: str) -> dict:
    """Tokens and forward FLOPs, packed vs padded, on the queries ``paths`` (no model run): the ceiling of
    packed/padded for the debug and base architectures at max_genes 256 and 1200."""
    import anndata as ad

    from finetune.annotate import Annotator
    from hiceller.config import load_config

    cfgs = {s: load_config(s).model for s in ("debug", "base")}
    res: dict = {}
    for max_genes in (256, 1200):
        bundle = build_bundle(args.out / f"bundle_{tag}_debug_g{max_genes}", "debug", vocab, [f"class{i}" for i in range(20)],
                              [1] * 20, max_genes=max_genes)
        ann = Annotator.load(bundle)
        for name, path in paths.items():
            full = ad.read_h5ad(path, backed="r")
            adata = full[: min(args.speed_cells, full.n_obs)].to_memory()
            batches = batch_lengths(ann, adata, args.batch_size)
            real = sum(int(b.sum()) for b in batches)
            padded = sum(len(b) * int(b.max()) for b in batches)
            r = {"cells": adata.n_obs, "pad_overhead": padded / real, "median_length": float(np.median(np.concatenate(batches)))}
            for arch, cfg in cfgs.items():
                packed_f = sum(forward_flops(cfg, b) for b in batches)
                padded_f = sum(forward_flops(cfg, b, pad_to=int(b.max())) for b in batches)
                r[f"flop_ratio_{arch}"] = padded_f / packed_f
            res[f"{name}@{max_genes}"] = r
            log(f"{name} max_genes {max_genes}: {r['cells']} cells, median length {r['median_length']:.0f}, padded/real tokens "
                f"{r['pad_overhead']:.2f}, padded/packed FLOPs debug {r['flop_ratio_debug']:.2f}, base {r['flop_ratio_base']:.2f}")
    return res


def real_bench(args, log) -> dict:
    """Packed vs padded, debug architecture, on real cells (lengths vary) at max_genes 256 and 1200."""
    import anndata as ad

    paths, vocab = build_real_queries(args.out / "real", Path(args.real))
    res: dict = {}
    for max_genes in (256, 1200):
        bundle = build_bundle(args.out / f"bundle_real_debug_g{max_genes}", "debug", vocab, [f"class{i}" for i in range(20)],
                              [1] * 20, max_genes=max_genes)
        for name, path in paths.items():
            n = min(args.speed_cells, ad.read_h5ad(path, backed="r").n_obs)
            r = side_by_side(bundle, path, n, args.batch_size, args.reps, args.check)
            res[f"{name}@{max_genes}"] = r
            log(f"real {name} max_genes {max_genes}: {n} cells, packed {r['packed_cells_s']:.0f} cells/s, padded "
                f"{r['padded_cells_s']:.0f}, ratio {r['ratio']:.2f}x, padded/real tokens {r['pad_overhead']:.2f}, "
                f"padded/packed FLOPs {r['flop_ratio']:.2f}, "
                f"argmax agree {r['check_argmax_agree']:.3f}")
    return res


# ------------------------------------------------------------------------------------- padded path
def padded_annotator(ann):
    """A second Annotator on the same weights whose ``_predict`` runs ``forward_padded``."""
    import torch

    from data_store.batching import iter_token_budget_batches, pack, to_padded

    class PaddedAnnotator(type(ann)):
        def __init__(self, other):  # share weights, tokenizer and bundle
            self.__dict__.update(other.__dict__)

        @torch.no_grad()
        def _predict(self, tok, token_budget):
            batches = [pack(tok)] if token_budget is None else list(iter_token_budget_batches(tok, token_budget))
            probs, embs = [], []
            for b in batches:
                p = to_padded(b).to(self.device)
                out = self.task.model.forward_padded(p.gene_ids, p.values, p.padding_mask)
                logits = self.task.head(out.cell_emb)
                probs.append(torch.softmax(logits.float(), -1).cpu().numpy())
                embs.append(out.cell_emb.float().cpu().numpy())
            return np.concatenate(probs), np.concatenate(embs)

    return PaddedAnnotator(ann)


def forward_flops(cfg, lengths: np.ndarray, pad_to: int | None = None) -> float:
    """Forward matmul FLOPs of the encoder on cells of these lengths (``pretrain.flops``, /3 for
    forward only); with ``pad_to`` every cell counts as that long, as in the padded layout."""
    from pretrain.flops import model_flops_per_token, token_weighted_seqlen

    lengths = np.full(len(lengths), pad_to) if pad_to is not None else np.asarray(lengths)
    tokens = float(lengths.sum())
    return tokens * model_flops_per_token(cfg, token_weighted_seqlen(lengths.tolist()), 1) / 3


def run_preds(ann, adata, batch_size: int) -> tuple[float, np.ndarray, np.ndarray, dict]:
    """(seconds, probs, argmax, counts) over all cells of ``adata``; counts holds the real and padded
    tokens and the forward FLOPs of both layouts."""
    from data_store.batching import pack

    cfg = ann.spec.model_cfg
    counts = {"real": 0, "padded": 0, "flops_packed": 0.0, "flops_padded": 0.0}
    orig = ann._predict

    def counting(tok, budget):
        b = pack(tok)
        lengths = b.seqlens.numpy()
        counts["real"] += b.n_tokens
        counts["padded"] += b.n_cells * b.max_seqlen
        counts["flops_packed"] += forward_flops(cfg, lengths)
        counts["flops_padded"] += forward_flops(cfg, lengths, pad_to=b.max_seqlen)
        return orig(tok, budget)

    ann._predict = counting
    try:
        t0 = time.perf_counter()
        probs = [p for _, p, _ in ann.iter_predictions(adata, batch_size=batch_size, min_overlap=0.0)]
        dt = time.perf_counter() - t0
    finally:
        del ann._predict
    p = np.concatenate(probs)
    return dt, p, p.argmax(1), counts


def layout_figures(counts: dict) -> dict:
    """Tokens and forward FLOPs of both layouts; ``flop_ratio`` (padded / packed) is the most packing
    can gain with kernels whose cost is their FLOPs."""
    return {
        "tokens_real": counts["real"],
        "tokens_padded": counts["padded"],
        "pad_overhead": counts["padded"] / max(counts["real"], 1),
        "flops_packed": counts["flops_packed"],
        "flops_padded": counts["flops_padded"],
        "flop_ratio": counts["flops_padded"] / max(counts["flops_packed"], 1.0),
    }


def side_by_side(bundle: Path, h5ad: Path, n: int, batch_size: int, reps: int, check: int) -> dict:
    import anndata as ad

    from finetune.annotate import Annotator

    ann = Annotator.load(bundle)
    pad = padded_annotator(ann)
    full = ad.read_h5ad(h5ad, backed="r")
    adata = full[:n].to_memory()  # the same in-memory cells for both paths
    # Equality check on a sample, before timing.
    sample = adata[: min(check, n)].copy()
    _, p1, a1, _ = run_preds(ann, sample, batch_size)
    _, p2, a2, _ = run_preds(pad, sample, batch_size)
    agree = float((a1 == a2).mean())
    maxdiff = float(np.abs(p1 - p2).max())
    t_packed, t_padded = [], []
    counts: dict = {}
    for r in range(reps):  # interleaved: both paths see the same machine load
        order = [(ann, t_packed), (pad, t_padded)] if r % 2 == 0 else [(pad, t_padded), (ann, t_packed)]
        for a, ts in order:
            dt, _, _, counts = run_preds(a, adata, batch_size)
            ts.append(dt)
    mp, md = statistics.median(t_packed), statistics.median(t_padded)
    return {
        "cells": n,
        "batch_size": batch_size,
        "packed_cells_s": n / mp,
        "padded_cells_s": n / md,
        "ratio": md / mp,
        "packed_s": t_packed,
        "padded_s": t_padded,
        **layout_figures(counts),
        "check_cells": len(a1),
        "check_argmax_agree": agree,
        "check_max_abs_prob_diff": maxdiff,
    }


# ----------------------------------------------------------------------------------------- RSS child
def child(bundle: str, h5ad: str, batch_size: int) -> None:
    import anndata as ad

    from finetune.annotate import Annotator

    _threads(2)
    ann = Annotator.load(bundle)
    adata = ad.read_h5ad(h5ad, backed="r")
    rss0 = peak_rss_mib()
    t0 = time.perf_counter()
    n, top = 0, []
    for rows, probs, _ in ann.iter_predictions(adata, batch_size=batch_size):
        top.append(probs.argmax(1).astype(np.int16))
        n += probs.shape[0]
    dt = time.perf_counter() - t0
    print(json.dumps({"cells": n, "seconds": dt, "cells_s": n / dt, "peak_rss_mb": peak_rss_mib(),
                      "rss_after_load_mb": rss0}))


def rss_run(bundle: Path, h5ad: Path, batch_size: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(bundle), str(h5ad), "--batch-size", str(batch_size)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- CellTypist
def celltypist_run(train, h5ad: Path, n: int, out: Path, reps: int, max_iter: int) -> dict:
    import anndata as ad
    import celltypist

    model_path = out / f"celltypist_{train.n_obs}.pkl"
    t0 = time.perf_counter()
    if model_path.exists():
        model = celltypist.models.Model.load(str(model_path))
        train_s = None
    else:
        model = celltypist.train(train, labels="cell_type", feature_selection=False, n_jobs=2, use_SGD=True, max_iter=max_iter)
        train_s = time.perf_counter() - t0
        model.write(str(model_path))
    q = ad.read_h5ad(h5ad, backed="r")[:n].to_memory()
    t0 = time.perf_counter()
    lognorm(q)
    norm_s = time.perf_counter() - t0
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        res = celltypist.annotate(q, model=model)
        ts.append(time.perf_counter() - t0)
    truth = q.obs["cell_type"].astype(str).to_numpy()
    pred = res.predicted_labels["predicted_labels"].astype(str).to_numpy()
    known = np.isin(truth, model.cell_types)
    m = statistics.median(ts)
    return {
        "cells": n, "train_cells": train.n_obs, "train_s": train_s, "annotate_s": ts, "normalize_s": norm_s,
        "cells_s": n / m, "cells_s_with_normalize": n / (m + norm_s),
        "accuracy_known_classes": float((pred[known] == truth[known]).mean()) if known.any() else None,
    }


# ----------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--speed-cells", type=int, default=5_000, help="cells for the packed-vs-padded timing (debug)")
    ap.add_argument("--base-cells", type=int, default=16, help="cells for the base-size timing (extrapolated)")
    ap.add_argument("--rss-small", type=int, default=25_000)
    ap.add_argument("--ct-cells", type=int, default=10_000, help="query cells for CellTypist and the packed path beside it")
    ap.add_argument("--ct-max-iter", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--base-batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--check", type=int, default=256, help="cells whose predictions are compared packed vs padded")
    ap.add_argument("--no-base", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/annotate")
    ap.add_argument("--real", metavar="DATA_DIR", nargs="?", const=str(ROOT.parent / "shared" / "data"),
                    help="only packed vs padded on the real *_counts*.h5ad files of DATA_DIR (default ../shared/data)")
    ap.add_argument("--child", nargs=2, metavar=("BUNDLE", "H5AD"), help=argparse.SUPPRESS)
    ap.add_argument("--flops-only", action="store_true",
                    help="tokens and forward FLOPs of both layouts on --speed-cells cells of the query (or, with --real, the real ones); no timing")
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.batch_size)
        return
    if args.quick:
        args.cells, args.rss_small, args.speed_cells, args.ct_cells, args.no_base = 5_000, 1_250, 2_000, 2_000, True
    _threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    if args.flops_only:
        if args.real:
            paths, vocab = build_real_queries(args.out / "real", Path(args.real))
        else:
            query = build_query(args.out / f"query_{args.cells}.h5ad", args.cells, args.genes)
            paths, vocab = {"synthetic": query}, var_names(query)
        res = layout_flops(args, log, paths, vocab, "real" if args.real else "synth")
        (args.out / f"flops_{'real' if args.real else 'synthetic'}.json").write_text(json.dumps(res, indent=1, default=float))
        print(json.dumps({k: {m: round(v, 3) for m, v in r.items()} for k, r in res.items()}))
        return
    if args.real:
        res = real_bench(args, log)
        (args.out / "results_real.json").write_text(json.dumps(res, indent=1, default=float))
        print(json.dumps({k: {"packed_cells_s": round(v["packed_cells_s"], 1), "packed_over_padded": round(v["ratio"], 3),
                              "padded_over_real_tokens": round(v["pad_overhead"], 3), "padded_over_packed_flops": round(v["flop_ratio"], 3),
                              "argmax_agree": v["check_argmax_agree"]}
                          for k, v in res.items()}))
        return

    query = build_query(args.out / f"query_{args.cells}.h5ad", args.cells, args.genes)
    small = head_h5ad(query, args.out / f"query_{args.cells}_head{args.rss_small}.h5ad", args.rss_small)
    classes, counts = top_classes(query, args.classes)
    vocab = var_names(query)
    res: dict = {"cells": args.cells, "genes": args.genes, "classes": len(classes), "torch_threads": 2, "untrained_bundles": True}
    sizes = ["debug"] + ([] if args.no_base else ["base"])
    bundles = {s: build_bundle(args.out / f"bundle_{s}_{args.genes}", s, vocab, classes, counts) for s in sizes}

    log(f"debug packed vs padded on {args.speed_cells} cells x {args.reps} reps...")
    res["debug"] = side_by_side(bundles["debug"], query, min(args.speed_cells, args.cells), args.batch_size, args.reps, args.check)
    log(json.dumps(res["debug"]))
    if "base" in bundles:
        log(f"base packed vs padded on {args.base_cells} cells x {args.reps} reps (extrapolated cells/s)...")
        res["base"] = side_by_side(bundles["base"], query, args.base_cells, args.base_batch_size, args.reps, min(args.check, args.base_cells))
        log(json.dumps(res["base"]))

    log(f"peak RSS: {args.rss_small} and {args.cells} cells in subprocesses...")
    res["rss"] = {str(args.rss_small): rss_run(bundles["debug"], small, args.batch_size),
                  str(args.cells): rss_run(bundles["debug"], query, args.batch_size)}
    log(json.dumps(res["rss"]))

    log(f"CellTypist on {args.ct_cells} cells...")
    train = build_train(args.out / f"ct_train_{args.genes}_{args.classes}.h5ad", classes, args.genes, per_tissue=100 if args.quick else 200)
    ct = celltypist_run(train, query, min(args.ct_cells, args.cells), args.out, args.reps, args.ct_max_iter)
    # The packed path on the same cells, right after (same load).
    beside = side_by_side(bundles["debug"], query, min(args.ct_cells, args.cells), args.batch_size, 1, 16)
    ct["hiceller_debug_packed_cells_s_same_cells"] = beside["packed_cells_s"]
    res["celltypist"] = ct
    log(json.dumps(ct))

    d = res["debug"]
    summary = {
        "quick": args.quick,
        "debug_packed_cells_s": round(d["packed_cells_s"], 1),
        "debug_padded_cells_s": round(d["padded_cells_s"], 1),
        "debug_packed_over_padded": round(d["ratio"], 3),
        "debug_pad_overhead_tokens": round(d["pad_overhead"], 3),
        "debug_predictions_agree": d["check_argmax_agree"],
    }
    if "base" in res:
        b = res["base"]
        summary.update(base_packed_cells_s=round(b["packed_cells_s"], 3), base_padded_cells_s=round(b["padded_cells_s"], 3),
                       base_packed_over_padded=round(b["ratio"], 3), base_predictions_agree=b["check_argmax_agree"])
    summary.update(
        celltypist_cells_s=round(ct["cells_s"], 1),
        celltypist_cells_s_with_normalize=round(ct["cells_s_with_normalize"], 1),
        hiceller_debug_packed_cells_s_beside_celltypist=round(ct["hiceller_debug_packed_cells_s_same_cells"], 1),
        peak_rss_mb={k: round(v["peak_rss_mb"], 1) for k, v in res["rss"].items()},
        rss_ratio=round(res["rss"][str(args.cells)]["peak_rss_mb"] / res["rss"][str(args.rss_small)]["peak_rss_mb"], 3),
        debug_cells_s_full_query=round(res["rss"][str(args.cells)]["cells_s"], 1),
    )
    (args.out / f"results{'_quick' if args.quick else ''}.json").write_text(json.dumps({**res, "summary": summary}, indent=1, default=float))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
