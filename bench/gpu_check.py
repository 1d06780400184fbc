"""The prepared GPU check: everything in HiCeller that only a GPU can check or measure, in one run.

Meant for the first GPU at hand (one H100 or H200, no network, about 10 minutes of wall clock, see
bench/README.md for how to get the code, the wheels and the data there). No flash-attn needed.

Parts, in this order, each in its own process with its own time limit (a part that crashes or hangs
is reported and the rest still run; parts that no longer fit in ``--budget-s`` are skipped, saying so):

1. ``env``: Python, torch, CUDA, the GPU, ``varlen_attn``'s signature, flash-attn, DeepSpeed, nvcc.
2. ``attention``: each GPU backend (torch_varlen; flash when installed) against per-cell SDPA in bf16
   on 64 packed cells of 50-1201 tokens: forward, q/k/v gradients, the dropout path, fwd+bwd ms; and
   the base model on both backends (hidden states and every parameter gradient).
3. ``fused_adam``: builds DeepSpeed's fused_adam op (the training runs use it if it built).
4. ``train:<variant>``: 50 bf16 ZeRO-2 steps of the base preset through the project's training loop on
   the real cells of ``--data`` at max_genes 1200: tokens/s, cells/s, MFU (pretrain/flops.py),
   peak memory, first and last loss. Variants: ``bf16`` (DeepSpeed bf16, the base preset), then
   ``bf16_autocast`` (train.autocast), ``bf16_compile`` (train.compile), ``bf16_sdpa`` (SDPA attention).
5. ``annotate``: cells/s of a base-size bundle on the largest file of ``--data``, packed (the
   Annotator's path) vs padded, fp32 (as shipped) and bf16.

Prints one JSON line (also written to ``--out/gpu_check.json``, every part's output in ``gpu_check.log``) and
exits 1 when a check failed. ``--cpu-dry-run``: the same parts with tiny sizes on CPU (what a test runs).

Usage: ``bench/gpu_check.sh [--data DIR] [--out DIR] [--budget-s 540] [--cpu-dry-run]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _gpu_parts import DRY, GPU, VARIANTS, run_part  # noqa: E402

# (part, variant, time limit in seconds on the GPU): what matters most runs first.
PLAN = [
    ("env", None, 90),
    ("attention", None, 150),
    ("fused_adam", None, 240),
    ("train", "bf16", 180),
    ("annotate", None, 150),
    ("train", "bf16_autocast", 150),
    ("train", "bf16_compile", 240),
    ("train", "bf16_sdpa", 150),
]
DRY_SKIP = {"bf16_compile": "cpu dry run: compiling takes minutes on CPU (measured in bench/RESULTS.md, GPU path)",
            "bf16_sdpa": "cpu dry run: every variant uses SDPA on CPU"}
MIN_PART_S = 45
MARKER = "GPU_CHECK_PART "
LOG = "gpu_check.log"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help=".h5ad files (default ../shared/data)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu_check", help="JSON result and part logs")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget for all parts (default 540)")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on CPU: checks that every part runs")
    p.add_argument("--part", choices=("env", "attention", "fused_adam", "train", "annotate"), help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=tuple(VARIANTS), default="bf16", help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _child(args: argparse.Namespace, part: str, variant: str | None, extra: list[str], limit: float) -> tuple[dict | None, str]:
    """Run one part in a child process: (its result, "") or (None, why it has none)."""
    name = part if variant is None else f"{part}_{variant}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--data", str(args.data), "--out", str(args.out)]
    if variant:
        cmd += ["--variant", variant]
    cmd += [f"--set={s}" for s in extra]
    if args.cpu_dry_run:
        cmd.append("--cpu-dry-run")
    # One log for all parts: the device tool brings back at most 8 files.
    with (args.out / LOG).open("a") as f:
        f.write(f"\n===== {name}: {' '.join(cmd)}\n")
        f.flush()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=limit, cwd=ROOT)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            f.write(out)
            return None, f"timed out after {limit:.0f} s (see {LOG})"
        f.write(proc.stdout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        tail = [line for line in proc.stdout.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return None, f"exit code {proc.returncode}: {tail[0][:300]} (see {LOG})"
    return json.loads(lines[-1][len(MARKER):]), ""


def _failures(report: dict) -> list[str]:
    """Checks that ran and failed (a part with no result is already listed by run_all)."""
    bad = []
    for backend in ("torch_varlen", "flash"):
        r = report.get("attention", {}).get(backend, {})
        if "ok" in r and not r["ok"]:
            bad.append(f"attention: {backend} does not match SDPA")
    for variant, r in report.get("train", {}).items():
        if "loss_last" in r and not (r["loss_last"] == r["loss_last"]):
            bad.append(f"train_{variant}: loss is NaN")
    for dtype in ("fp32", "bf16"):
        r = report.get("annotate", {}).get(dtype, {})
        if r.get("argmax_agree", 1.0) < (0.99 if dtype == "fp32" else 0.9):
            bad.append(f"annotate {dtype}: packed and padded predictions disagree ({r['argmax_agree']})")
    return bad


def run_all(args: argparse.Namespace) -> dict:
    """Every part of PLAN within the budget; the report that is printed as one JSON line."""
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / LOG).write_text("")
    # One folder for DeepSpeed's built ops, so the training runs load what the fused_adam part built
    # (outside --out, which should hold only what is worth bringing back).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(tempfile.gettempdir(), "hiceller-torch-extensions"))
    report: dict = {"dry_run": args.cpu_dry_run, "budget_s": args.budget_s, "data": str(args.data), "train": {},
                    "skipped": {}, "errors": {}, "part_s": {}}
    extra: list[str] = []
    for part, variant, limit in PLAN:
        name = part if variant is None else f"{part}_{variant}"
        left = args.budget_s - (time.perf_counter() - start)
        if args.cpu_dry_run and variant in DRY_SKIP:
            report["skipped"][name] = DRY_SKIP[variant]
            continue
        if left < MIN_PART_S:
            report["skipped"][name] = f"out of time budget ({left:.0f} s left of {args.budget_s:.0f})"
            continue
        t = time.perf_counter()
        result, why = _child(args, part, variant, extra, min(limit, left))
        report["part_s"][name] = round(time.perf_counter() - t, 1)
        if result is None:
            report["errors"][name] = why
            if part == "fused_adam":  # a half-built op could hold a lock the training runs would wait on
                extra = ['train.optimizer="torch"']
            continue
        if part == "fused_adam" and not result["ok"]:
            extra = ['train.optimizer="torch"']
        if part == "train":
            report["train"][variant] = result
        else:
            report[part] = result
    report["device"] = (report.get("env") or {}).get("gpu") or "cpu"
    failures = _failures(report)
    report["failures"] = failures
    report["ok"] = not failures and not report["errors"]
    report["wall_s"] = round(time.perf_counter() - start, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    sizes = DRY if args.cpu_dry_run else GPU
    if args.part:
        run_part(args.part, sizes, args)
        return 0
    if not args.data.is_dir() or not any(args.data.glob("*.h5ad")):
        print(f"gpu_check: no .h5ad files in {args.data} (pass --data DIR)", file=sys.stderr)
        return 2
    if not args.cpu_dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: torch sees no CUDA device (use --cpu-dry-run to check the script on CPU)", file=sys.stderr)
            return 2
    report = run_all(args)
    line = json.dumps(report, default=str)
    (args.out / "gpu_check.json").write_text(line + "\n")
    print(line, flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
