"""The parts of bench/gpu_check.py; each runs in its own process and returns one dict.

Sizes come from :class:`Sizes`: the real ones for one H100/H200, or tiny ones for ``--cpu-dry-run``
(the same code on CPU, so the script is known to run before a GPU is at hand).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU dry run."""

    attn_cells: int
    attn_len: tuple[int, int]
    attn_heads: int
    attn_head_dim: int
    reps: int
    preset: str
    steps: int
    max_genes: int
    micro_batch_cells: int
    grad_accum: int
    steady_from: int
    """First step (0-based row) counted in tokens/s: compile and allocator warm-up come before it."""
    annotate_preset: str
    annotate_cells: int | None
    annotate_batch: int


GPU = Sizes(64, (50, 1201), 8, 64, 10, "base", 50, 1200, 32, 4, 10, "base", None, 256)
DRY = Sizes(6, (5, 40), 4, 16, 2, "debug", 3, 32, 4, 2, 1, "debug", 16, 8)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
"""Dense bf16 peak FLOP/s by GPU name (SXM data sheets; H200 is the H100's chip); PCIe parts are lower."""


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_ms(fn: Callable[[], Any], reps: int) -> float:
    """Median wall milliseconds of ``fn`` after one warm-up call, synchronising the GPU."""
    fn()
    _sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


# ------------------------------------------------------------------------------------------- env
def part_env(sizes: Sizes, args) -> dict:
    """Versions and what this machine offers: the GPU, varlen_attn, flash-attn, DeepSpeed, nvcc."""
    import inspect

    import torch

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if torch.cuda.is_available() else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if torch.cuda.is_available() else None,
        "torch_flash_kernels": torch.backends.cuda.is_flash_attention_available(),
        "nvcc": shutil.which("nvcc"),
        "torch_extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR"),
    }
    try:
        from torch.nn.attention.varlen import varlen_attn

        out["varlen_attn"] = str(inspect.signature(varlen_attn))
    except ImportError as e:
        out["varlen_attn"] = f"missing ({e})"
    for name in ("flash_attn", "deepspeed", "numba", "numpy", "scipy", "pandas", "h5py", "safetensors", "pydantic"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception as e:  # any import failure is a finding, not a crash
            out[name] = f"not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return out


# ------------------------------------------------------------------------------------- attention
def _packed(sizes: Sizes, device, dtype, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    lo, hi = sizes.attn_len
    lengths = torch.randint(lo, hi + 1, (sizes.attn_cells,), generator=g)
    cu = torch.zeros(sizes.attn_cells + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    shape = (int(cu[-1]), sizes.attn_heads, sizes.attn_head_dim)
    q, k, v = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    return q, k, v, cu.to(device), int(lengths.max())


def _fwd_bwd(backend: str, q, k, v, cu, max_len, upstream, dropout_p: float = 0.0):
    from pretrain.attention import varlen_attention

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = varlen_attention(*leaves, cu, max_len, dropout_p=dropout_p, backend=backend)
    (out.float() * upstream).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _compare_kernel(backend: str, sizes: Sizes, q, k, v, cu, max_len) -> dict:
    import torch

    upstream = torch.randn(q.shape, device=q.device, generator=torch.Generator(q.device).manual_seed(1))
    got = _fwd_bwd(backend, q, k, v, cu, max_len, upstream)
    ref = _fwd_bwd("sdpa", q, k, v, cu, max_len, upstream)
    r = {
        "out_max_abs_diff": (got[0].float() - ref[0].float()).abs().max().item(),
        "rel_err": {n: round(_rel(a, b), 5) for n, a, b in zip(("out", "dq", "dk", "dv"), got, ref)},
        "fwd_bwd_ms": _median_ms(lambda: _fwd_bwd(backend, q, k, v, cu, max_len, upstream), sizes.reps),
    }
    r["ok"] = r["out_max_abs_diff"] < 2e-2 and max(r["rel_err"].values()) < 2e-2
    dropped = _fwd_bwd(backend, q, k, v, cu, max_len, upstream, dropout_p=0.2)
    # Inverted dropout is unbiased: the mean over draws approaches the dropout-free output.
    mean = sum(_fwd_bwd(backend, q, k, v, cu, max_len, upstream, dropout_p=0.2)[0].float() for _ in range(20)) / 20
    r["dropout"] = {
        "grads_finite": all(bool(torch.isfinite(t).all()) for t in dropped[1:]),
        "mean_of_20_rel_err": round(_rel(mean, ref[0]), 4),
        "fwd_bwd_ms": _median_ms(lambda: _fwd_bwd(backend, q, k, v, cu, max_len, upstream, dropout_p=0.2), sizes.reps),
    }
    r["ok"] = r["ok"] and r["dropout"]["grads_finite"] and r["dropout"]["mean_of_20_rel_err"] < 0.25
    return r


def _compare_models(backend: str) -> dict:
    """The base model in bf16, ``backend`` vs SDPA on the same weights: hidden states and gradients."""
    import dataclasses

    import torch

    from hiceller.config import load_config
    from pretrain.model import N_SPECIAL, CellerModel

    cfg = dataclasses.replace(load_config("base").model, dropout=0.0)
    dev = _device()
    torch.manual_seed(0)
    ref = CellerModel(dataclasses.replace(cfg, attention="sdpa"), n_genes=2000, n_bins=51).to(dev, torch.bfloat16)
    other = CellerModel(dataclasses.replace(cfg, attention=backend), n_genes=2000, n_bins=51).to(dev, torch.bfloat16)
    other.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 1202, (16,), generator=g)
    cu = torch.zeros(17, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    n = int(cu[-1])
    ids = torch.randint(N_SPECIAL, 2000 + N_SPECIAL, (n,), generator=g).to(dev)
    vals = torch.randint(0, 51, (n,), generator=g).to(dev)
    upstream = torch.randn(n, cfg.d_model, generator=g).to(dev)
    res = []
    for m in (ref, other):
        hidden = m(ids, vals, cu.to(dev), int(lengths.max())).hidden
        (hidden.float() * upstream).sum().backward()
        res.append((hidden.detach(), {k: p.grad for k, p in m.named_parameters() if p.grad is not None and p.grad.any()}))
    worst = max(_rel(res[1][1][k], g0) for k, g0 in res[0][1].items())
    out = {"hidden_rel_err": round(_rel(res[1][0], res[0][0]), 5), "worst_grad_rel_err": round(worst, 5)}
    out["ok"] = out["hidden_rel_err"] < 3e-2 and out["worst_grad_rel_err"] < 5e-2
    return out


def part_attention(sizes: Sizes, args) -> dict:
    """Each GPU backend against per-cell SDPA: forward, q/k/v gradients, dropout path, speed; and
    the whole base model on both backends."""
    import torch

    from pretrain.attention import backend_unusable_reason, resolve_backend

    dev = _device()
    q, k, v, cu, max_len = _packed(sizes, dev, torch.bfloat16)
    out: dict[str, Any] = {
        "tokens": q.shape[0], "cells": sizes.attn_cells, "heads": sizes.attn_heads, "head_dim": sizes.attn_head_dim,
        "dtype": "bf16", "auto": resolve_backend("auto", q),
    }
    upstream = torch.randn(q.shape, device=dev)
    out["sdpa"] = {"fwd_bwd_ms": _median_ms(lambda: _fwd_bwd("sdpa", q, k, v, cu, max_len, upstream), sizes.reps)}
    for backend in ("torch_varlen", "flash"):
        why = backend_unusable_reason(backend, q)
        if why:
            out[backend] = {"skipped": why}
            continue
        out[backend] = _compare_kernel(backend, sizes, q, k, v, cu, max_len)
        out[backend]["model"] = _compare_models(backend)
        out[backend]["ok"] = out[backend]["ok"] and out[backend]["model"]["ok"]
        out[backend]["speedup_vs_sdpa"] = round(out["sdpa"]["fwd_bwd_ms"] / out[backend]["fwd_bwd_ms"], 2)
    return out


# ------------------------------------------------------------------------------------ fused adam
def part_fused_adam(sizes: Sizes, args) -> dict:
    """Build (or load) DeepSpeed's fused_adam op once, so the training runs find it built."""
    from pretrain.optim import fused_adam_unavailable_reason

    t = time.perf_counter()
    why = fused_adam_unavailable_reason()
    return {"ok": not why, "note": why, "seconds": round(time.perf_counter() - t, 1)}


# ----------------------------------------------------------------------------------------- train
VARIANTS: dict[str, list[str]] = {
    "bf16": [],
    "bf16_autocast": ["train.autocast=true"],
    "bf16_compile": ["train.compile=true"],
    "bf16_sdpa": ['model.attention="sdpa"'],
}
"""Training runs: the base preset's DeepSpeed bf16, bf16 autocast, compiled blocks, and SDPA attention."""


def data_files(data: Path) -> list[Path]:
    files = sorted(Path(data).glob("*.h5ad"))
    if not files:
        raise FileNotFoundError(f"no .h5ad files in {data}")
    return files


def part_train(sizes: Sizes, args) -> dict:
    """``sizes.steps`` ZeRO-2 bf16 steps through the project's training loop on real cells."""
    from pretrain.distributed import setup_distributed

    dist = setup_distributed()
    import torch

    from _h5ad_cells import H5adCells, ShuffledCells
    from data_store.tokenize import Tokenizer
    from hiceller.config import load_config
    from pretrain.flops import mfu, model_flops_per_token, token_weighted_seqlen
    from pretrain.layout import ModelSpec
    from pretrain.loop import train
    from pretrain.model import CellerModel, count_parameters
    from pretrain.task import PretrainTask
    from pretrain.tracking import Tracker

    overrides = [
        f"train.steps={sizes.steps}", f"train.micro_batch_cells={sizes.micro_batch_cells}",
        f"train.grad_accum={sizes.grad_accum}", f"data.max_genes={sizes.max_genes}", "train.warmup_steps=5",
        "train.log_every=10", "train.checkpoint_every=100000", "deepspeed.zero_stage=2", 'deepspeed.precision="bf16"',
        *VARIANTS[args.variant], *args.set,
    ]
    cfg = load_config(sizes.preset, overrides)
    cells = H5adCells(data_files(args.data))
    stream = ShuffledCells(cells, Tokenizer(n_bins=cfg.data.n_bins, max_genes=cfg.data.max_genes, seed=cfg.train.seed),
                           batch_cells=cfg.train.micro_batch_cells, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = CellerModel(cfg.model, n_genes=len(cells.vocab), n_bins=cfg.data.n_bins)
    task = PretrainTask(model, cfg.train.mask_ratios)
    run_dir = Path(tempfile.mkdtemp(prefix=f"gpu-check-{args.variant}-"))
    t = time.perf_counter()
    spec = ModelSpec(cfg.model, cfg.data.n_bins, cfg.data.max_genes, list(cells.vocab))
    result = train(cfg, task, [stream], run_dir, dist, Tracker(run_dir, enabled=False), spec=spec, progress=False)
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(run_dir, ignore_errors=True)
    steady = rows[sizes.steady_from:]
    tok_s = statistics.median(r["tokens_per_s"] for r in steady)
    lengths = stream.tokens(0).lengths.tolist()
    fpt = model_flops_per_token(cfg.model, token_weighted_seqlen(lengths), len(cells.vocab))
    peak = peak_flops(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    return {
        "setup": result.setup, "preset": sizes.preset, "steps": len(rows), "cells": cells.n_cells,
        "max_genes": cfg.data.max_genes, "cells_per_step": cfg.train.micro_batch_cells * cfg.train.grad_accum,
        "token_weighted_len": round(token_weighted_seqlen(lengths), 1), "parameters": count_parameters(model),
        "tokens_per_s": round(tok_s), "tokens_per_s_range": [round(min(r["tokens_per_s"] for r in steady)),
                                                             round(max(r["tokens_per_s"] for r in steady))],
        "cells_per_s": round(statistics.median(r["cells_per_s"] for r in steady), 1),
        "flops_per_token": fpt, "mfu": round(mfu(tok_s, fpt, peak), 4) if peak else None,
        "peak_memory_gib": round(max(r["memory_mb"] for r in rows) / 1024, 2),
        "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"], "wall_s": round(wall, 1),
    }


# -------------------------------------------------------------------------------------- annotate
def _padded_annotator(ann):
    """The same Annotator (weights, tokenizer) whose ``_predict`` runs ``forward_padded``."""
    import torch

    from data_store.batching import pack, to_padded

    class PaddedAnnotator(type(ann)):
        def __init__(self, other):
            self.__dict__.update(other.__dict__)

        @torch.no_grad()
        def _predict(self, tok, token_budget):
            p = to_padded(pack(tok)).to(self.device)
            out = self.task.model.forward_padded(p.gene_ids, p.values, p.padding_mask)
            logits = self.task.head(out.cell_emb)
            return logits.float().cpu().numpy(), out.cell_emb.float().cpu().numpy()

    return PaddedAnnotator(ann)


def _timed_pass(ann, query, batch: int) -> tuple[float, float, np.ndarray]:
    """(end-to-end seconds, seconds inside the model, argmax) over every cell of the query."""
    inner = ann._predict
    spent = [0.0]

    def timed(tok, budget):
        t = time.perf_counter()
        r = inner(tok, budget)  # returns host arrays: the GPU work is done when it returns
        spent[0] += time.perf_counter() - t
        return r

    ann._predict = timed
    try:
        t = time.perf_counter()
        top = [p.argmax(1) for _, p, _ in ann.iter_predictions(query, batch_size=batch, min_overlap=0.0)]
        return time.perf_counter() - t, spent[0], np.concatenate(top)
    finally:
        del ann._predict


def part_annotate(sizes: Sizes, args) -> dict:
    """cells/s of a base-size bundle (debug size in the dry run) (random weights: speed does not depend on training), packed
    (the Annotator's own path) vs padded (forward_padded), in fp32 as shipped and cast to bf16."""
    import torch

    from _h5ad_cells import as_query, read_h5ad
    from finetune.annotate import Annotator
    from finetune.task import ClassifierTask
    from hiceller.config import load_config
    from pretrain.attention import resolve_backend_for
    from pretrain.layout import ModelSpec, TrainedModel, write_bundle
    from pretrain.model import CellerModel

    path = max(data_files(args.data), key=lambda p: read_h5ad(p).n_cells)
    m = read_h5ad(path)
    query = as_query(m, sizes.annotate_cells)
    cfg = load_config(sizes.annotate_preset)
    vocab = sorted({g.upper() for g in m.genes})
    classes = [f"type_{i}" for i in range(14)]
    torch.manual_seed(0)
    task = ClassifierTask(CellerModel(cfg.model, n_genes=len(vocab), n_bins=cfg.data.n_bins), len(classes), "ce",
                          np.ones(len(classes)))
    bundle = Path(tempfile.mkdtemp(prefix="gpu-check-bundle-")) / "bundle"
    spec = ModelSpec(cfg.model, cfg.data.n_bins, sizes.max_genes, vocab, labels=classes, label_counts=[1] * len(classes))
    write_bundle(bundle, TrainedModel(spec, task.state_dict(), bundle, {"note": "random weights, speed only"}))
    dev = _device()
    packed = Annotator.load(bundle, device=dev)
    padded = _padded_annotator(packed)
    out: dict[str, Any] = {"query": path.name, "preset": sizes.annotate_preset, "cells": query.n_obs,
                           "max_genes": sizes.max_genes, "batch": sizes.annotate_batch}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        packed.task.to(dtype)  # padded shares the task
        _timed_pass(packed, as_query(m, 2 * sizes.annotate_batch), sizes.annotate_batch)  # warm-up
        _timed_pass(padded, as_query(m, 2 * sizes.annotate_batch), sizes.annotate_batch)
        runs: dict[str, list] = {"packed": [], "padded": []}
        for _ in range(2):  # interleaved, so drift hits both layouts alike
            for layout, ann in (("packed", packed), ("padded", padded)):
                runs[layout].append(_timed_pass(ann, query, sizes.annotate_batch))
        r: dict[str, Any] = {"attention_backend": resolve_backend_for("auto", dev, dtype, cfg.model.d_model // cfg.model.n_heads)}
        for layout, rs in runs.items():
            r[f"{layout}_cells_s"] = round(query.n_obs / min(x[0] for x in rs), 1)
            r[f"{layout}_model_cells_s"] = round(query.n_obs / min(x[1] for x in rs), 1)
        r["packed_over_padded_model"] = round(r["packed_model_cells_s"] / r["padded_model_cells_s"], 2)
        r["argmax_agree"] = round(float((runs["packed"][0][2] == runs["padded"][0][2]).mean()), 4)
        out[name] = r
    shutil.rmtree(bundle.parent, ignore_errors=True)
    return out


PARTS: dict[str, Callable[[Sizes, Any], dict]] = {
    "env": part_env,
    "attention": part_attention,
    "fused_adam": part_fused_adam,
    "train": part_train,
    "annotate": part_annotate,
}


def run_part(name: str, sizes: Sizes, args) -> None:
    """Run one part and print its result as the last stdout line, behind a marker."""
    sys.path.insert(0, str(ROOT / "bench"))
    result = PARTS[name](sizes, args)
    print("GPU_CHECK_PART " + json.dumps(result, default=str), flush=True)
