"""``hiceller doctor``: is this machine ready to train? One line per check, with the fix.

``--json`` also names the attention backend runs will use here (``attention_backend``).

Each check imports what it probes inside the check (torch, deepspeed, tiledbsoma, mlflow), so a
broken library shows up as a failed line instead of a crash, and importing this module is cheap.
Libraries that print banners on stdout (DeepSpeed's logger does) are sent to stderr while the
checks run, so ``--json`` output stays one parseable object.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "Check",
    "run_checks",
    "format_check",
    "checks_to_json",
    "detect_device",
    "cuda_device_count",
    "check_store",
    "check_tracking",
    "check_disk",
    "check_attention",
]

GPU_EXTRA_FIX = "pip install 'hiceller[gpu]'"
_GIB = 1024**3
# Free space under which checkpoints are likely to fail (fail) or to crowd the disk (warn).
_DISK_FAIL_GIB = 1.0
_DISK_WARN_GIB = 20.0


@dataclass(frozen=True)
class Check:
    """The outcome of one check."""

    status: str
    """ok, warn or fail."""
    name: str
    detail: str
    fix: str = ""
    value: str = ""
    """The machine-readable answer where a check has one (the attention check: the backend name)."""


def format_check(c: Check) -> str:
    """``ok    torch         2.13.0  [fix: ...]``."""
    line = f"{c.status:<5} {c.name:<13} {c.detail}"
    return f"{line}  [fix: {c.fix}]" if c.fix else line


def checks_to_json(checks: list[Check]) -> str:
    """One JSON object: overall ok, the attention backend runs will use, and the list of checks."""
    ok = not any(c.status == "fail" for c in checks)
    backend = next((c.value for c in checks if c.name == "attention" and c.value), None)
    return json.dumps({"ok": ok, "attention_backend": backend, "checks": [asdict(c) for c in checks]}, indent=2)


def detect_device() -> str:
    """``cuda`` when torch sees a GPU, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cuda_device_count() -> int:
    """GPUs torch can see on this node (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_python() -> list[Check]:
    ok = sys.version_info >= (3, 11)
    return [Check("ok" if ok else "fail", "python", platform.python_version(), "" if ok else "use Python >= 3.11")]


def check_torch() -> list[Check]:
    try:
        import torch
    except ImportError as e:
        return [Check("fail", "torch", f"not importable ({e})", "pip install hiceller")]
    out = [Check("ok", "torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})")]
    if not torch.cuda.is_available():
        out.append(Check("warn", "cuda", "no CUDA device: DeepSpeed runs on CPU with gloo (tests, not pretraining)"))
        return out
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
    out.append(Check("ok", "cuda", f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}"))
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    bf16 = "bf16 ok" if torch.cuda.is_bf16_supported() else "no bf16 (use fp16)"
    out.append(Check("ok", "gpus", f"{len(names)} x {', '.join(sorted(set(names)))}; {bf16}"))
    return out


def _kernel_matches_sdpa(backend: str) -> float:
    """Max abs difference between a GPU attention backend and per-cell SDPA on a tiny packed input."""
    import torch

    from pretrain.attention import varlen_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    lens = [3, 5, 1]
    q, k, v = (torch.randn(sum(lens), 2, 32, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    cu = torch.tensor([0, 3, 8, 9], device="cuda", dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, max(lens), backend=backend)
    ref = varlen_attention(q, k, v, cu, max(lens), backend="sdpa")
    return (out.float() - ref.float()).abs().max().item()


def _torch_varlen_usable() -> bool:
    import torch

    from pretrain.attention import backend_unusable_reason

    q = torch.empty((0, 1, 64), device="cuda", dtype=torch.bfloat16)
    return not backend_unusable_reason("torch_varlen", q)


def check_flash_attn() -> list[Check]:
    try:
        import flash_attn
    except ImportError as e:
        import torch

        if torch.cuda.is_available() and _torch_varlen_usable():
            return [Check("ok", "flash-attn", "not installed; not needed: torch's own varlen_attn runs instead (no build)")]
        detail = "not installed: attention falls back to torch SDPA"
        if "No module named" not in str(e):
            detail = f"installed but not importable ({e}): attention falls back to torch SDPA"
        return [Check("warn", "flash-attn", detail, GPU_EXTRA_FIX)]
    import torch

    if not torch.cuda.is_available():
        return [Check("ok", "flash-attn", f"{flash_attn.__version__} importable; not run (no CUDA)")]
    diff = _kernel_matches_sdpa("flash")
    if diff > 2e-2:
        return [Check("fail", "flash-attn", f"{flash_attn.__version__} differs from SDPA by {diff:.3g}",
                      "pip install --force-reinstall --no-build-isolation flash-attn")]
    return [Check("ok", "flash-attn", f"{flash_attn.__version__} varlen matches SDPA (max diff {diff:.1e})")]


def check_attention() -> list[Check]:
    """The backend ``model.attention = "auto"`` picks for a base-preset run (bf16, head size 64) on
    this machine, checked against SDPA where it is a GPU kernel; ``value`` is the backend name."""
    import torch

    from hiceller.config import load_config
    from pretrain.attention import backend_unusable_reason, resolve_backend_for

    cfg = load_config("base")
    head_dim = cfg.model.d_model // cfg.model.n_heads
    if not torch.cuda.is_available():
        return [Check("ok", "attention", "sdpa (no CUDA device); on a GPU with a CUDA build of torch >= 2.10, auto "
                                         "picks flash-attn if installed, else torch_varlen (no build)", value="sdpa")]
    device = torch.device("cuda", torch.cuda.current_device())
    backend = resolve_backend_for("auto", device, torch.bfloat16, head_dim)
    if backend == "sdpa":
        why = backend_unusable_reason("torch_varlen", torch.empty((0, 1, head_dim), device=device, dtype=torch.bfloat16))
        return [Check("warn", "attention", f"sdpa for bf16 runs: no packed kernel runs here ({why}); SDPA per cell is slower",
                      "use torch >= 2.10 on an Ampere or newer GPU, or pip install 'hiceller[gpu]'", value="sdpa")]
    diff = _kernel_matches_sdpa(backend)
    if diff > 2e-2:
        return [Check("fail", "attention", f"{backend} differs from SDPA by {diff:.3g}",
                      "set model.attention = \"sdpa\" and report the torch/GPU versions", value=backend)]
    what = "torch.nn.attention.varlen, no build" if backend == "torch_varlen" else "flash-attn package"
    return [Check("ok", "attention", f"{backend} ({what}) for bf16/fp16 runs, matches SDPA (max diff {diff:.1e}); "
                                     "fp32 runs use sdpa", value=backend)]


def check_deepspeed() -> list[Check]:
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.ops.op_builder.builder import probe_is_compatible
    except ImportError as e:
        return [Check("fail", "deepspeed", f"not importable ({e})", "pip install hiceller")]
    import torch

    acc = get_accelerator()
    name = acc.device_name()
    out = [Check("ok", "deepspeed", f"{deepspeed.__version__}, accelerator {name}")]
    if torch.cuda.is_available() and name != "cuda":
        out[0] = Check("fail", "deepspeed", f"{deepspeed.__version__} picked accelerator {name} on a CUDA machine",
                       "unset DS_ACCELERATOR")
    results = {}
    for op in ("CPUAdamBuilder", "FusedAdamBuilder"):
        builder = acc.create_op_builder(op)
        results[op.removesuffix("Builder")] = builder is not None and probe_is_compatible(builder)
    detail = ", ".join(f"{op} {'compatible' if ok else 'NOT compatible'}" for op, ok in results.items())
    if all(results.values()):
        out.append(Check("ok", "deepspeed-ops", detail))
    else:
        out.append(Check("warn", "deepspeed-ops", detail + " (ZeRO-Offload and fused Adam unavailable)",
                         "pip install ninja and a CUDA toolkit matching torch, then rerun ds_report"))
    return out


def check_store(store: str) -> list[Check]:
    """The store opens as a SOMA Experiment."""
    try:
        import tiledbsoma
    except ImportError as e:
        return [Check("fail", "store", f"tiledbsoma not importable ({e})", "pip install hiceller")]
    try:
        with tiledbsoma.Experiment.open(store) as exp:
            n_obs = exp.obs.count if "obs" in exp else None
    except Exception as e:  # tiledbsoma raises several types; every one means "cannot use it"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return [Check("fail", "store", f"{store} does not open as a SOMA Experiment ({reason})",
                      "create it with: hiceller ingest --store <STORE> <files.h5ad>")]
    if n_obs is None:
        return [Check("warn", "store", f"{store}: SOMA Experiment without obs (nothing ingested yet)",
                      "hiceller ingest --store <STORE> <files.h5ad>")]
    return [Check("ok", "store", f"{store}: SOMA Experiment, {n_obs} cells")]


def check_tiledbsoma() -> list[Check]:
    try:
        import tiledbsoma
    except ImportError as e:
        return [Check("fail", "tiledbsoma", f"not importable ({e})", "pip install hiceller")]
    return [Check("ok", "tiledbsoma", tiledbsoma.__version__)]


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _search_experiments(uri: str) -> int:
    from mlflow.tracking import MlflowClient

    # MLflow retries HTTP for minutes by default; a doctor should answer in seconds.
    with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10"):
        return len(MlflowClient(tracking_uri=uri).search_experiments(max_results=5))


def check_tracking(tracking_uri: str | None) -> list[Check]:
    """MLflow imports and answers search_experiments at the URI (default: a throwaway SQLite file)."""
    try:
        import mlflow
    except ImportError as e:
        return [Check("fail", "mlflow", f"not importable ({e})", "pip install hiceller")]
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    try:
        if uri:
            n = _search_experiments(uri)
            return [Check("ok", "mlflow", f"{mlflow.__version__}, {uri} answers ({n} experiment(s) seen)")]
        with tempfile.TemporaryDirectory(prefix="hiceller-doctor-") as tmp:
            _search_experiments(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        return [Check("ok", "mlflow", f"{mlflow.__version__}, local SQLite tracking works")]
    except Exception as e:  # any failure to answer means runs would not be logged
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return [Check("fail", "mlflow", f"{uri or 'local SQLite'} does not answer ({reason})",
                      "check --tracking-uri / MLFLOW_TRACKING_URI, or start `hiceller ui`")]


def _existing_parent(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_disk(out: str | Path) -> list[Check]:
    """Free space (and write permission) where checkpoints go."""
    where = _existing_parent(Path(out))
    if not os.access(where, os.W_OK):
        return [Check("fail", "disk", f"{where} is not writable", f"choose a writable --out (was {out})")]
    free = shutil.disk_usage(where).free / _GIB
    detail = f"{free:.1f} GiB free at {where}"
    if free < _DISK_FAIL_GIB:
        return [Check("fail", "disk", detail, "free space or choose another --out for checkpoints")]
    if free < _DISK_WARN_GIB:
        return [Check("warn", "disk", detail + " (a few checkpoints of the base model need more)",
                      "free space or choose another --out")]
    return [Check("ok", "disk", detail)]


def _guarded(name: str, fn: Callable[[], list[Check]]) -> list[Check]:
    """Run one check; a check that itself crashes is reported as a failed line."""
    try:
        return fn()
    except Exception as e:
        return [Check("fail", name, f"check crashed: {type(e).__name__}: {e}")]


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send fd 1 (Python and C writers, e.g. DeepSpeed's stdout logger) to stderr for a while."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_checks(store: str | None = None, tracking_uri: str | None = None, out: str | Path = ".") -> list[Check]:
    """Every check, in order; library output goes to stderr while they run."""
    steps: list[tuple[str, Callable[[], list[Check]]]] = [
        ("python", check_python),
        ("torch", check_torch),
        ("flash-attn", check_flash_attn),
        ("attention", check_attention),
        ("deepspeed", check_deepspeed),
        ("tiledbsoma", check_tiledbsoma),
    ]
    if store:
        steps.append(("store", lambda: check_store(store)))
    steps += [("mlflow", lambda: check_tracking(tracking_uri)), ("disk", lambda: check_disk(out))]
    results: list[Check] = []
    with _stdout_to_stderr():
        for name, fn in steps:
            results.extend(_guarded(name, fn))
    return results
