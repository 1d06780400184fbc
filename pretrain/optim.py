"""The training loop's optimizer: AdamW, in the fastest implementation that runs on this machine.

- CPU: torch's AdamW (its for-each kernel), the optimizer the stored debug loss curve was made with.
- CUDA, ``train.optimizer = "auto"``: DeepSpeed's ``FusedAdam`` (AdamW mode: one multi-tensor kernel
  per step) where its op loads; it is compiled on first use, which needs ``nvcc`` and ``ninja``
  matching torch's CUDA. Where it does not build, torch's AdamW with ``fused=True`` (no build), and
  the reason is reported with the run, never swallowed.
- ``torch``: torch's AdamW (fused on CUDA); ``deepspeed_fused``: FusedAdam or an error saying why.
- ZeRO-Offload keeps optimizer states in host memory, where neither fused kernel runs: torch's AdamW.

Every choice is the same AdamW maths (decoupled weight decay, bias correction, betas 0.9 / 0.98).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from hiceller.config import RunConfig
from hiceller.errors import ConfigError

__all__ = ["OptimizerChoice", "make_optimizer", "param_groups", "fused_adam_unavailable_reason"]

_BETAS = (0.9, 0.98)
_EPS = 1e-8


@dataclass(frozen=True)
class OptimizerChoice:
    """The optimizer handed to DeepSpeed, and what it is (logged with the run)."""

    optimizer: torch.optim.Optimizer
    name: str
    """torch_adamw, torch_adamw_fused or deepspeed_fused_adam."""
    note: str = ""
    """Why a faster implementation was not taken ("" when none was passed over)."""


def param_groups(module: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """Decay on matrices only: no decay on biases, norms and other rank-1 parameters. A parameter
    with an ``lr_scale`` attribute (set by the module that owns it, e.g. the classifier's linear part)
    trains at ``lr * lr_scale``; the schedule scales every group alike, so the ratio holds."""
    groups: dict[tuple[bool, float], list] = {}
    for p in module.parameters():
        if p.requires_grad:
            groups.setdefault((p.ndim >= 2, float(getattr(p, "lr_scale", 1.0))), []).append(p)
    out = []
    for (decays, scale), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if scale != 1.0:
            if lr is None:
                raise ValueError("a parameter has an lr_scale: param_groups needs the base lr")
            group["lr"] = lr * scale
        out.append(group)
    return out


@functools.cache
def _fused_adam_class() -> tuple[type | None, str]:
    """``(FusedAdam, "")`` once its op has loaded (built on first use), or ``(None, why not)``."""
    try:
        from deepspeed.ops.adam import FusedAdam
        from deepspeed.ops.op_builder import FusedAdamBuilder

        builder = FusedAdamBuilder()
        if not builder.is_compatible():
            return None, "DeepSpeed's fused_adam op is not compatible here (no CUDA toolkit matching torch?)"
        builder.load(verbose=False)
    except Exception as e:  # a failed JIT build raises anything from RuntimeError to CalledProcessError
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"DeepSpeed's fused_adam op did not build ({type(e).__name__}: {first})"
    return FusedAdam, ""


def fused_adam_unavailable_reason() -> str:
    """Why DeepSpeed's FusedAdam cannot be used here ("" when it can); builds the op if needed."""
    if not torch.cuda.is_available():
        return "DeepSpeed's FusedAdam needs CUDA"
    return _fused_adam_class()[1]


def _torch_adamw(groups: list[dict], cfg: RunConfig, fused: bool) -> torch.optim.Optimizer:
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=_BETAS, eps=_EPS, **extra)


def make_optimizer(module: nn.Module, cfg: RunConfig, device: torch.device | str = "cpu") -> OptimizerChoice:
    """AdamW over ``module``'s parameters for a run on ``device`` (see the module docstring).

    Raises:
        ConfigError: ``train.optimizer = "deepspeed_fused"`` where FusedAdam cannot run.
    """
    groups = param_groups(module, cfg.train.weight_decay, cfg.train.lr)
    kind = cfg.train.optimizer
    on_gpu = torch.device(device).type == "cuda"
    if cfg.deepspeed.offload_optimizer:
        if kind == "deepspeed_fused":
            raise ConfigError("config key train.optimizer: deepspeed_fused cannot run with deepspeed.offload_optimizer "
                              "(optimizer states live in host memory)")
        return OptimizerChoice(_torch_adamw(groups, cfg, fused=False), "torch_adamw")
    if not on_gpu:
        if kind == "deepspeed_fused":
            raise ConfigError("config key train.optimizer: deepspeed_fused needs CUDA; use auto or torch")
        return OptimizerChoice(_torch_adamw(groups, cfg, fused=False), "torch_adamw")
    note = ""
    if kind in ("auto", "deepspeed_fused"):
        fused_adam, note = _fused_adam_class()
        if fused_adam is not None:
            opt = fused_adam(groups, lr=cfg.train.lr, betas=_BETAS, eps=_EPS, adam_w_mode=True)
            return OptimizerChoice(opt, "deepspeed_fused_adam")
        if kind == "deepspeed_fused":
            raise ConfigError(f"config key train.optimizer: deepspeed_fused cannot run: {note}; use auto or torch")
    return OptimizerChoice(_torch_adamw(groups, cfg, fused=True), "torch_adamw_fused", note)
