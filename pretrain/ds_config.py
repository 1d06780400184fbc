"""DeepSpeed JSON from the typed run config.

The JSON holds batch sizes, ZeRO, precision and clipping only. There is deliberately no
``optimizer`` or ``scheduler`` section: the trainer hands DeepSpeed a torch AdamW and steps its
own warm-up + cosine schedule, so the learning-rate curve is defined once, in ``pretrain/``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hiceller.config import DeepSpeedConfig, ModelConfig, RunConfig
from hiceller.errors import ConfigError
from hiceller.parallel_dims import BatchDims

__all__ = [
    "DEVICES",
    "deepspeed_config",
    "dumps_deepspeed_config",
    "precision_sections",
    "write_deepspeed_config",
    "write_text_atomic",
    "zero_section",
]

DEVICES = ("cpu", "cuda")

# Larger than any run, so DeepSpeed never prints its own step lines; MLflow has the metrics.
_STEPS_PER_PRINT = 2**31 - 1
# Bucket size (elements) for ZeRO 1/2 reduce and all-gather: DeepSpeed's own default, written out.
_ZERO12_BUCKET = 500_000_000


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise ConfigError(f"device must be cpu or cuda, got {device!r}")


def _offload(device: str) -> dict[str, Any]:
    # Pinned host memory speeds up host<->GPU copies; with no GPU there is nothing to pin.
    return {"device": "cpu", "pin_memory": device == "cuda"}


def zero_section(ds: DeepSpeedConfig, model: ModelConfig, device: str) -> dict[str, Any]:
    """The ``zero_optimization`` block for this stage and offload choice."""
    _check_device(device)
    stage = ds.zero_stage
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key deepspeed.zero_stage: must be 0, 1, 2 or 3, got {stage}")
    zero: dict[str, Any] = {"stage": stage}
    if stage == 0:
        return zero
    zero.update(overlap_comm=True, contiguous_gradients=True)
    if stage in (1, 2):
        zero.update(
            reduce_scatter=True,
            allgather_partitions=True,
            reduce_bucket_size=_ZERO12_BUCKET,
            allgather_bucket_size=_ZERO12_BUCKET,
        )
    else:
        # Buckets scaled to one layer's weights (the sizes HF Trainer's "auto" picks): small enough
        # to overlap with compute, large enough that norms and biases stay resident.
        hidden = model.d_model
        zero.update(
            reduce_bucket_size=hidden * hidden,
            stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
            stage3_param_persistence_threshold=10 * hidden,
            stage3_max_live_parameters=1_000_000_000,
            stage3_max_reuse_distance=1_000_000_000,
            # Export (finetune/export.py) needs whole weights, not partitions, at save time.
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = _offload(device)
    if ds.offload_params:
        zero["offload_param"] = _offload(device)
    return zero


def precision_sections(precision: str, device: str, autocast: bool = False) -> dict[str, Any]:
    """``bf16`` or ``fp16`` blocks (nothing for fp32); fp16 needs a GPU.

    ``autocast`` (bf16 only): a ``torch_autocast`` block instead of ``bf16``, so weights, gradients
    and optimizer stay fp32 and the forward pass runs under ``torch.autocast`` (Linear weights are
    still reduced across ranks in bf16, DeepSpeed's default for autocast).
    """
    _check_device(device)
    if autocast:
        if precision != "bf16":
            raise ConfigError(f"config key train.autocast: needs deepspeed.precision = \"bf16\", got {precision!r}")
        return {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    if precision == "fp32":
        return {}
    if precision == "bf16":
        return {"bf16": {"enabled": True}}
    if precision == "fp16":
        if device != "cuda":
            raise ConfigError(
                "config key deepspeed.precision: fp16 needs CUDA (no GPU here); use bf16 or fp32 on CPU"
            )
        # loss_scale 0 = dynamic loss scaling, starting at 2**16 and halving on overflow.
        return {
            "fp16": {
                "enabled": True,
                "loss_scale": 0,
                "initial_scale_power": 16,
                "loss_scale_window": 1000,
                "hysteresis": 2,
                "min_loss_scale": 1,
            }
        }
    raise ConfigError(f"config key deepspeed.precision: must be fp32, bf16 or fp16, got {precision!r}")


def deepspeed_config(cfg: RunConfig, world_size: int, device: str) -> dict[str, Any]:
    """The DeepSpeed JSON (as a dict) for ``cfg`` on ``world_size`` ranks of ``device``."""
    _check_device(device)
    dims = BatchDims.from_train(cfg.train, world_size)
    out: dict[str, Any] = {
        "train_batch_size": dims.global_batch,
        "train_micro_batch_size_per_gpu": dims.micro_batch,
        "gradient_accumulation_steps": dims.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero_section(cfg.deepspeed, cfg.model, device),
        "steps_per_print": _STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    out.update(precision_sections(cfg.deepspeed.precision, device, autocast=cfg.train.autocast))
    if cfg.deepspeed.offload_optimizer:
        # The optimizer is a client torch AdamW; DeepSpeed refuses it under offload unless told that
        # this is intended (its CPUAdam would be faster, but would change the optimizer maths).
        out["zero_force_ds_cpu_optimizer"] = False
    return out


def dumps_deepspeed_config(ds: dict[str, Any]) -> str:
    """The JSON text written to disk: sorted keys, two-space indent, trailing newline."""
    return json.dumps(ds, indent=2, sort_keys=True) + "\n"


def write_deepspeed_config(path: str | Path, cfg: RunConfig, world_size: int, device: str) -> Path:
    """Write the DeepSpeed JSON atomically (ranks on a shared disk may write the same file)."""
    text = dumps_deepspeed_config(deepspeed_config(cfg, world_size, device))
    return write_text_atomic(Path(path), text)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary file next to ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 minus umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

