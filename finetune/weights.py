"""Weights from where training left them: a ZeRO checkpoint of any stage, or a bundle.

A DeepSpeed checkpoint is consolidated to fp32 with DeepSpeed's own zero-to-fp32 code (stages
1-3; stage 0 keeps whole fp32/bf16 module weights in ``mp_rank_00_model_states.pt``). These files
are the project's own training output; a bundle from elsewhere is read with safetensors only.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch

from hiceller.config import ModelConfig, config_from_dict
from hiceller.errors import HicellerError, InputError
from pretrain import checkpoint as ckpt

__all__ = ["TrainedWeights", "load_checkpoint_weights", "load_pretrained", "consolidate"]


@dataclass
class TrainedWeights:
    """Full fp32 state dict (keys ``model.*``, maybe ``head.*``) and what is needed to rebuild it."""

    state_dict: dict[str, torch.Tensor]
    model_cfg: ModelConfig
    n_bins: int
    max_genes: int
    vocab: list[str]
    source: Path
    labels: list[str] | None = None
    label_counts: list[int] | None = None
    input_genes: list[str] | None = None
    """Genes a fine-tuned classifier reads (``finetune.n_hvg``); None = all of ``vocab``."""
    head: str = "transformer"
    """The classifier kind of a fine-tuned model (``finetune.head``)."""


def consolidate(cp: Path) -> dict[str, torch.Tensor]:
    """fp32 state dict of a complete checkpoint folder, whatever its ZeRO stage."""
    from pretrain.distributed import select_accelerator

    select_accelerator()
    import deepspeed  # noqa: F401  (sets up the accelerator before zero_to_fp32 imports it)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cp = ckpt.resolve_checkpoint(cp)
    try:
        has_zero = any(cp.glob("*optim_states.pt")) and _zero_stage(cp) > 0
        if has_zero:
            import contextlib
            import io

            # zero_to_fp32 prints its progress; the caller reports what matters.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                sd = get_fp32_state_dict_from_zero_checkpoint(str(cp.parent), tag=cp.name)
        else:
            sd = torch.load(cp / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    except (OSError, RuntimeError, KeyError, ValueError, EOFError) as e:
        raise HicellerError(f"checkpoint {cp} cannot be consolidated ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return {k: v.float() for k, v in sd.items()}


def _zero_stage(cp: Path) -> int:
    cfg = _run_config(cp)
    return cfg.deepspeed.zero_stage


def _run_config(cp: Path):
    path = cp / "config.toml"
    if not path.is_file():
        raise HicellerError(f"checkpoint {cp} has no config.toml (not written by HiCeller)")
    return config_from_dict(tomllib.loads(path.read_text()))


def load_checkpoint_weights(path: Path) -> TrainedWeights:
    """Weights of a run folder (its newest complete checkpoint) or of one checkpoint folder."""
    cp = ckpt.resolve_checkpoint(Path(path))
    cfg = _run_config(cp)
    vocab = json.loads((cp / "vocab.json").read_text())
    labels = counts = input_genes = None
    if (cp / "labels.json").is_file():
        lab = json.loads((cp / "labels.json").read_text())
        labels, counts, input_genes = lab["names"], lab["train_counts"], lab.get("input_genes")
    return TrainedWeights(
        state_dict=consolidate(cp),
        model_cfg=cfg.model,
        n_bins=cfg.data.n_bins,
        max_genes=cfg.data.max_genes,
        vocab=vocab,
        source=cp,
        labels=labels,
        label_counts=counts,
        input_genes=input_genes,
        head=cfg.finetune.head,
    )


def load_pretrained(path: Path) -> TrainedWeights:
    """A pretraining (or fine-tuning) run folder, a checkpoint folder, or a bundle."""
    path = Path(path)
    if (path / "checksums.sha256").is_file():
        from finetune.bundle import load_bundle

        b = load_bundle(path)
        return TrainedWeights(
            state_dict=b.state_dict,
            model_cfg=b.model_cfg,
            n_bins=b.n_bins,
            max_genes=b.max_genes,
            vocab=b.vocab,
            source=path,
            labels=b.labels,
            label_counts=b.label_counts,
            input_genes=b.input_genes,
            head=b.head,
        )
    if not path.exists():
        raise InputError(f"--pretrained {path} does not exist")
    return load_checkpoint_weights(path)
