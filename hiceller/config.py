"""Typed run configuration: one dataclass tree, validated on construction, loaded from TOML presets.

Every section is a frozen dataclass whose ``__post_init__`` checks its own fields, so an impossible
value fails where it is made, with the key that is wrong in the message. A preset is a TOML file in
``configs/`` (``debug`` runs on a laptop CPU in seconds, ``base`` is the Celler-75 scale model);
``--set section.key=value`` overrides a single field, parsed as TOML so types stay checked.

This module imports no torch: ``cluster/`` turns configs into launcher files without a model.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hiceller.errors import ConfigError

__all__ = [
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "DeepSpeedConfig",
    "FinetuneConfig",
    "ClusterConfig",
    "ValidationConfig",
    "RunConfig",
    "PRESET_DIR",
    "load_config",
    "preset_names",
    "resolve_preset",
]

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key {key}: {msg}")


@dataclass(frozen=True)
class DataConfig:
    """How cells are read from the store and turned into tokens."""

    n_bins: int = 51
    """Expression bins per cell; bin 0 means zero, bins 1..n_bins-1 are per-cell quantiles."""
    max_genes: int = 1200
    """At most this many non-zero genes per cell (sampled, seeded); the <cls> token comes on top."""
    block_size: int = 256
    """Contiguous soma_joinids read together; the unit of the global shuffle."""
    buffer_blocks: int = 512
    """Blocks held in the shuffle buffer; memory ~ buffer_blocks x block_size x bytes per cell."""
    label_column: str = "cell_type"
    """obs column used as the label where labels are needed."""
    obs_filter: str = ""
    """Optional SOMA value filter on obs, e.g. 'tissue == "lung"'."""
    num_workers: int = 0
    """DataLoader worker processes per rank (spawned; the shuffle buffer is shared among them)."""

    def __post_init__(self) -> None:
        _check(2 <= self.n_bins <= 1024, "data.n_bins", f"must be in [2, 1024], got {self.n_bins}")
        _check(self.max_genes >= 1, "data.max_genes", f"must be >= 1, got {self.max_genes}")
        _check(self.block_size >= 1, "data.block_size", f"must be >= 1, got {self.block_size}")
        _check(self.buffer_blocks >= 1, "data.buffer_blocks", f"must be >= 1, got {self.buffer_blocks}")
        _check(bool(self.label_column), "data.label_column", "must not be empty")
        _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the Celler transformer."""

    d_model: int = 512
    """Width of the token embeddings and of every encoder block."""
    n_layers: int = 12
    """Number of pre-LayerNorm encoder blocks."""
    n_heads: int = 8
    """Attention heads; d_model must be divisible by it."""
    d_ff: int = 2048
    """Hidden width of the feed-forward block."""
    dropout: float = 0.2
    """Dropout in attention and feed-forward blocks (training only)."""
    attention: str = "auto"
    """Attention backend: auto (on CUDA in bf16/fp16: flash-attn when importable, else torch's own
    varlen_attn; SDPA on CPU and in fp32), flash, torch_varlen or sdpa. Weights are the same for all."""

    def __post_init__(self) -> None:
        _check(self.d_model >= 8, "model.d_model", f"must be >= 8, got {self.d_model}")
        _check(self.n_layers >= 1, "model.n_layers", f"must be >= 1, got {self.n_layers}")
        _check(self.n_heads >= 1, "model.n_heads", f"must be >= 1, got {self.n_heads}")
        _check(
            self.d_model % self.n_heads == 0,
            "model.n_heads",
            f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}",
        )
        _check(self.d_ff >= 1, "model.d_ff", f"must be >= 1, got {self.d_ff}")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(
            self.attention in ("auto", "flash", "torch_varlen", "sdpa"),
            "model.attention",
            f"must be auto, flash, torch_varlen or sdpa, got {self.attention!r}",
        )


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop shared by pretraining and fine-tuning."""

    steps: int = 100_000
    """Optimizer steps to run."""
    micro_batch_cells: int = 32
    """Cells per micro batch on one rank (packed varlen, no padding) when micro_batch_tokens is 0;
    always for fine-tuning."""
    micro_batch_tokens: int = 0
    """Pretraining micro batches of as many cells as fit this many tokens (0: micro_batch_cells cells),
    the same batch count on every rank (data_store/token_budget.py). At least data.max_genes + 1.
    A --set of one of the two batch sizes replaces the preset's other one."""
    grad_accum: int = 1
    """Micro batches accumulated per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of lr."""
    warmup_steps: int = 1000
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    mask_ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    """Shares of a cell's genes whose value is hidden (masked, or unknown in generative mode), one
    drawn per micro batch."""
    objective: str = "masked"
    """Pretraining attention pattern: masked (every gene sees its whole cell, hidden values
    included), generative (scGPT: known genes see known genes, each unknown gene the known genes and
    itself) or both (alternating per micro batch, as scGPT trains). pretrain/objective.py."""
    seed: int = 0
    """Seeds the model init, the data order and the masks."""
    checkpoint_every: int = 1000
    """Save a checkpoint every N optimizer steps (and at the end)."""
    keep_last: int = 3
    """Checkpoints kept on disk; older ones are deleted."""
    log_every: int = 10
    """Log metrics every N optimizer steps."""
    data_shards_per_rank: int = 1
    """Data-parallel shards each rank reads, alternating micro batch by micro batch. A run on R ranks
    with S shards and grad_accum A sees exactly the cells of a run on R*S ranks with A/S: used to
    check 1 vs 2 ranks, and to continue a run on fewer machines."""
    autocast: bool = False
    """Run forward passes under torch.autocast in bf16 over fp32 weights (DeepSpeed's torch_autocast)
    instead of DeepSpeed casting the model to bf16; needs deepspeed.precision = "bf16"."""
    compile: bool = False
    """torch.compile every encoder block (pretrain/parallelize.py); off unless measured to pay
    (bench/RESULTS.md, "GPU path")."""
    optimizer: str = "auto"
    """AdamW kernel: auto (on CUDA DeepSpeed's FusedAdam where its op builds, else torch's fused
    AdamW; torch's AdamW on CPU), torch (torch's AdamW, fused on CUDA) or deepspeed_fused."""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "train.steps", f"must be >= 1, got {self.steps}")
        _check(self.micro_batch_cells >= 1, "train.micro_batch_cells", f"must be >= 1, got {self.micro_batch_cells}")
        _check(self.micro_batch_tokens >= 0, "train.micro_batch_tokens", f"must be >= 0 (0 = off), got {self.micro_batch_tokens}")
        _check(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {self.grad_clip}")
        _check(len(self.mask_ratios) >= 1, "train.mask_ratios", "must not be empty")
        for r in self.mask_ratios:
            _check(0.0 < r < 1.0, "train.mask_ratios", f"each ratio must be in (0, 1), got {r}")
        _check(
            self.objective in ("masked", "generative", "both"),
            "train.objective",
            f"must be masked, generative or both, got {self.objective!r}",
        )
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        _check(self.keep_last >= 1, "train.keep_last", f"must be >= 1, got {self.keep_last}")
        _check(self.log_every >= 1, "train.log_every", f"must be >= 1, got {self.log_every}")
        _check(self.data_shards_per_rank >= 1, "train.data_shards_per_rank", f"must be >= 1, got {self.data_shards_per_rank}")
        _check(
            self.grad_accum % self.data_shards_per_rank == 0,
            "train.data_shards_per_rank",
            f"must divide grad_accum ({self.grad_accum}), got {self.data_shards_per_rank}",
        )
        _check(
            self.optimizer in ("auto", "torch", "deepspeed_fused"),
            "train.optimizer",
            f"must be auto, torch or deepspeed_fused, got {self.optimizer!r}",
        )


@dataclass(frozen=True)
class DeepSpeedConfig:
    """What the DeepSpeed engine is asked to do (turned into its JSON by cluster/)."""

    zero_stage: int = 2
    """ZeRO stage 0-3."""
    precision: str = "bf16"
    """fp32, bf16 or fp16 (fp16 only on GPUs)."""
    offload_optimizer: bool = False
    """ZeRO-Offload of optimizer states to CPU memory (stage >= 1)."""
    offload_params: bool = False
    """ZeRO-Infinity parameter offload to CPU memory (stage 3 only)."""
    activation_checkpointing: bool = False
    """Recompute encoder blocks in the backward pass to save memory."""

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check(
            self.precision in ("fp32", "bf16", "fp16"),
            "deepspeed.precision",
            f"must be fp32, bf16 or fp16, got {self.precision!r}",
        )
        _check(
            not self.offload_optimizer or self.zero_stage >= 1,
            "deepspeed.offload_optimizer",
            "needs zero_stage >= 1",
        )
        _check(not self.offload_params or self.zero_stage == 3, "deepspeed.offload_params", "needs zero_stage 3")


@dataclass(frozen=True)
class FinetuneConfig:
    """Tissue fine-tuning: the classifier objective and the hard-mining rounds."""

    loss: str = "ginf"
    """ce (cross-entropy) or ginf (Gaussian Inflation)."""
    ginf_mu: float = 0.0
    """Mean of the GInf noise (the published default, 0, leans slightly against rare classes; -1 makes
    GInf the logit-adjusted loss, for balanced error; finetune/ginf.py)."""
    ginf_sigma: float = 0.1
    """Standard deviation of the GInf noise."""
    epochs: int = 10
    """Passes over the training split in phase 1."""
    mining_rounds: int = 2
    """Hard-mining rounds after phase 1 (0 disables mining)."""
    mining_epochs: int = 3
    """Passes over the hard set + replay sample in each round."""
    mining_lr_scale: float = 1.0
    """Each mining round trains at ``train.lr`` times this (a fresh optimizer on a small hard set)."""
    mining_patience: int = 1
    """Rounds without a validation macro-F1 gain before mining stops."""
    hard_cap_per_class: int = 200
    """At most this many hard cells of one class enter a round."""
    replay_fraction: float = 0.5
    """Replay sample size as a fraction of the hard-set size."""
    margin_threshold: float = 0.2
    """A correctly called cell whose probability lead over the runner-up is below this is hard."""
    min_per_class: int = 5
    """A class with any hard cell brings at least this many of its hardest cells (at most the cap)."""
    val_fraction: float = 0.1
    """Validation share of the training cells when no donors are held out."""
    rare_class_threshold: float = 0.01
    """Classes under this share of training cells count as rare."""
    freeze_encoder: bool = False
    """Train only the classifier head."""
    n_hvg: int = 0
    """Genes the classifier reads: 0 = every gene of the vocabulary; N = the N most variable genes
    of the training cells (Seurat dispersion, finetune/genes.py), kept in the bundle for annotation."""
    n_hvg_max_fraction: float = 0.35
    """At most this share of the genes the training cells can be read on are kept as variable genes
    (with --query-genes: the genes shared with the query). Baron -> Xin, 858 shared genes: all of them
    gave macro-F1 .859 +- .041, 300 gave .954 +- .003; Wang (219 shared): 219 .824, 75 .820; with
    a whole transcriptome shared, 2,000 HVG stay under it (bench/RESULTS.md, issue 1/8)."""
    head: str = "joint"
    """Classifier: transformer (a Linear on the <cls> embedding), linear (logistic regression on the
    expression bins of the genes read) or joint (both summed, trained together; finetune/task.py).
    joint by default: ahead of the transformer head (Baron .874 vs .807, Xin .859 vs .778 macro-F1,
    same genes); against the linear part alone level on five of seven real tasks, ahead on Symphony
    PBMC, behind on PBMC 3pv1 (bench/RESULTS.md, issue 1/8)."""
    wide_lr_scale: float = 10.0
    """The linear part of a linear or joint head trains at train.lr times this: at 1 it was still
    far from fitting its training cells after 8 epochs (train loss 0.12 vs 0.002 at 10, Baron)."""
    wide_input: str = "bins"
    """What the linear part reads: bins (the encoder's value bins) or expression (log1p counts per 10k,
    scaled per gene by its largest training value: the logistic regression's input; finetune/task.py).
    With wide_l1=1e-4, expression against bins (macro-F1, 3 seeds): pbmc3k .915 vs .886, Symphony -> 5p
    .818 vs .803, -> 3pv1 .719 vs .729, and Baron's 3-cell T-cell class lost on 2 of 3 seeds, so bins
    stay the default (bench/RESULTS.md, issue 1/8)."""
    wide_l1: float = 0.0
    """L1 penalty on the linear part's weights (added to the loss as wide_l1 * sum |w|): the lasso of
    an L1 logistic regression; 0 turns it off."""
    wide_l1_class_power: float = 0.0
    """Weight each class's L1 penalty by (its share of the training cells / an even share) ** power, at
    most 1 (finetune/task.py l1_class_scale): 0 = the same penalty for every class, 1 = in proportion,
    so a class of a few cells keeps its weights. Measured with expression + L1 1e-4 (bench/RESULTS.md,
    issue 1/8): at 1 Baron h4 keeps its 3-cell class on 2 of 3 seeds, but Symphony -> 3pv1 falls
    (.664 vs .755); at 0.5 neither gains. Every such difference was one to three query cells."""

    def __post_init__(self) -> None:
        _check(self.loss in ("ce", "ginf"), "finetune.loss", f"must be ce or ginf, got {self.loss!r}")
        _check(self.ginf_sigma >= 0, "finetune.ginf_sigma", f"must be >= 0, got {self.ginf_sigma}")
        _check(self.epochs >= 1, "finetune.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.mining_rounds >= 0, "finetune.mining_rounds", f"must be >= 0, got {self.mining_rounds}")
        _check(self.mining_epochs >= 1, "finetune.mining_epochs", f"must be >= 1, got {self.mining_epochs}")
        _check(0 < self.mining_lr_scale <= 1, "finetune.mining_lr_scale", f"must be in (0, 1], got {self.mining_lr_scale}")
        _check(self.mining_patience >= 1, "finetune.mining_patience", f"must be >= 1, got {self.mining_patience}")
        _check(self.hard_cap_per_class >= 1, "finetune.hard_cap_per_class", f"must be >= 1, got {self.hard_cap_per_class}")
        _check(self.replay_fraction >= 0, "finetune.replay_fraction", f"must be >= 0, got {self.replay_fraction}")
        _check(0.0 <= self.margin_threshold <= 1.0, "finetune.margin_threshold", f"must be in [0, 1], got {self.margin_threshold}")
        _check(self.min_per_class >= 0, "finetune.min_per_class", f"must be >= 0, got {self.min_per_class}")
        _check(self.n_hvg >= 0, "finetune.n_hvg", f"must be >= 0 (0 = all genes), got {self.n_hvg}")
        _check(0.0 < self.n_hvg_max_fraction <= 1.0, "finetune.n_hvg_max_fraction", f"must be in (0, 1], got {self.n_hvg_max_fraction}")
        _check(self.head in ("transformer", "linear", "joint"), "finetune.head", f"must be transformer, linear or joint, got {self.head!r}")
        _check(self.wide_lr_scale > 0, "finetune.wide_lr_scale", f"must be > 0, got {self.wide_lr_scale}")
        _check(self.wide_input in ("expression", "bins"), "finetune.wide_input", f"must be expression or bins, got {self.wide_input!r}")
        _check(self.wide_l1 >= 0, "finetune.wide_l1", f"must be >= 0, got {self.wide_l1}")
        _check(0 <= self.wide_l1_class_power <= 1, "finetune.wide_l1_class_power", f"must be in [0, 1], got {self.wide_l1_class_power}")
        _check(0.0 < self.val_fraction < 1.0, "finetune.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        _check(
            0.0 < self.rare_class_threshold < 1.0,
            "finetune.rare_class_threshold",
            f"must be in (0, 1), got {self.rare_class_threshold}",
        )


@dataclass(frozen=True)
class ClusterConfig:
    """Settings written into the launch environment (.deepspeed_env); never hosts."""

    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for every rank, e.g. NCCL_IB_DISABLE = "0"."""
    master_port: int = 29500
    """Rendezvous port on the master node."""

    def __post_init__(self) -> None:
        _check(1 <= self.master_port <= 65535, "cluster.master_port", f"must be in [1, 65535], got {self.master_port}")
        for k, v in self.env.items():
            _check(isinstance(v, str), f"cluster.env.{k}", f"must be a string, got {type(v).__name__}")


@dataclass(frozen=True)
class ValidationConfig:
    """Held-out cells scored while pretraining (pretrain/validation.py): masked-expression loss and a
    kNN cell-type probe of the ``<cls>`` embeddings; the checkpoint with the lowest loss is the run's best."""

    every: int = 0
    """Validate every N optimizer steps and at every checkpoint; 0 turns validation off and holds
    nothing out (the training stream is then the whole store)."""
    fraction: float = 0.01
    """Share of the cells held out, as whole blocks of data.block_size cells picked by a seeded hash,
    when no datasets or donors are named."""
    datasets: tuple[str, ...] = ()
    """Hold out these whole datasets instead."""
    donors: tuple[str, ...] = ()
    """Hold out these donors (obs donor_id) instead; reads obs once at start-up."""
    loss_cells: int = 1024
    """Held-out cells the validation loss is computed on (a fixed set, fixed masks)."""
    probe_cells: int = 512
    """Labelled held-out cells of the kNN probe (a fixed set); 0 turns the probe off."""
    probe_k: int = 10
    """Neighbours of the leave-one-out kNN probe (cosine)."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, "validation.every", f"must be >= 0, got {self.every}")
        _check(0.0 < self.fraction <= 0.5, "validation.fraction", f"must be in (0, 0.5], got {self.fraction}")
        _check(not (self.datasets and self.donors), "validation.donors", "name datasets or donors to hold out, not both")
        _check(self.loss_cells >= 1, "validation.loss_cells", f"must be >= 1, got {self.loss_cells}")
        _check(self.probe_cells >= 0, "validation.probe_cells", f"must be >= 0, got {self.probe_cells}")
        _check(self.probe_k >= 1, "validation.probe_k", f"must be >= 1, got {self.probe_k}")


@dataclass(frozen=True)
class RunConfig:
    """The whole configuration of one run."""

    name: str = "run"
    """Preset or run name, recorded in MLflow."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        # Autocast keeps fp32 weights and needs no loss scaling in bf16; fp16 would need a scaler,
        # which DeepSpeed gives an autocast run only without ZeRO.
        _check(
            not self.train.autocast or self.deepspeed.precision == "bf16",
            "train.autocast",
            f"needs deepspeed.precision = \"bf16\", got {self.deepspeed.precision!r}",
        )
        # ZeRO-3 gathers parameters in module hooks, which a compiled block would trace.
        _check(
            not self.train.compile or self.deepspeed.zero_stage < 3,
            "train.compile",
            f"works with deepspeed.zero_stage 0-2, got {self.deepspeed.zero_stage}",
        )
        # The longest cell must fit a batch, or it could never be trained on.
        _check(
            self.train.micro_batch_tokens == 0 or self.train.micro_batch_tokens >= self.data.max_genes + 1,
            "train.micro_batch_tokens",
            f"must be >= data.max_genes + 1 = {self.data.max_genes + 1} (the longest cell), got {self.train.micro_batch_tokens}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``section.key -> value``, as logged to MLflow params."""
        out: dict[str, Any] = {"name": self.name}
        for sec in dataclasses.fields(self):
            value = getattr(self, sec.name)
            if dataclasses.is_dataclass(value):
                for k, v in dataclasses.asdict(value).items():
                    out[f"{sec.name}.{k}"] = v
        return out

    def to_toml(self) -> str:
        """A TOML text that load_config reads back to an equal config."""
        lines = [f"name = {_toml_value(self.name)}"]
        for sec in dataclasses.fields(self):
            value = getattr(self, sec.name)
            if not dataclasses.is_dataclass(value):
                continue
            lines.append(f"\n[{sec.name}]")
            nested = []
            for k, v in dataclasses.asdict(value).items():
                if sec.name == "train" and k == "micro_batch_cells" and self.train.micro_batch_tokens:
                    continue  # unused beside a token budget, and a file may set only one of them
                if isinstance(v, dict):
                    nested.append((k, v))
                else:
                    lines.append(f"{k} = {_toml_value(v)}")
            for k, v in nested:
                lines.append(f"\n[{sec.name}.{k}]")
                lines.extend(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
        return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # JSON string escapes are all valid in a TOML basic string.
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check a TOML value against a dataclass field type (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if tp is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(tp)
        _check(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        return tuple(_coerce(key, inner, x) for x in value)
    if origin is dict:
        _check(isinstance(value, dict), key, f"must be a table, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", str, v) for k, v in value.items()}
    raise TypeError(f"unsupported config type {tp!r} for {key}")


_BATCH_SIZES = ("micro_batch_cells", "micro_batch_tokens")


def _check_batch_size(train: Any, where: str) -> None:
    """Refuse a micro batch given both in cells and in tokens in one place (one file, or --set)."""
    if isinstance(train, dict) and _BATCH_SIZES[0] in train and train.get(_BATCH_SIZES[1]):
        raise ConfigError(f"config key train.micro_batch_tokens: {where} sets both train.micro_batch_cells and "
                          "train.micro_batch_tokens; set one (micro_batch_tokens = 0 batches by cells)")


def _build_section(cls: type, name: str, raw: Any) -> Any:
    _check(isinstance(raw, dict), name, f"must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in raw.items():
        _check(k in known, f"{name}.{k}", f"unknown key (known: {', '.join(sorted(known))})")
        kwargs[k] = _coerce(f"{name}.{k}", hints[k], v)
    return cls(**kwargs)


_SECTIONS = {f.name: f for f in dataclasses.fields(RunConfig) if f.name != "name"}


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from nested plain data, refusing unknown sections and keys."""
    hints = typing.get_type_hints(RunConfig)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "name":
            kwargs["name"] = _coerce("name", str, value)
            continue
        _check(key in _SECTIONS, key, f"unknown section (known: {', '.join(sorted(_SECTIONS))})")
        kwargs[key] = _build_section(hints[key], key, value)
    return RunConfig(**kwargs)


def override_keys(overrides: list[str]) -> set[str]:
    """The ``section.key`` names that ``--set`` overrides assign (syntax checked as in :func:`load_config`)."""
    return {".".join(_parse_override(o)[0]) for o in overrides}


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word is a string: --set data.label_column=celltype
    return parts, value


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def resolve_preset(name_or_path: str | Path) -> Path:
    """A preset name (``debug``) or a path to a TOML file."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        return p
    candidate = PRESET_DIR / f"{name_or_path}.toml"
    if not candidate.is_file():
        raise ConfigError(f"unknown preset {name_or_path!r} (known: {', '.join(preset_names())})")
    return candidate


def load_config(preset: str | Path = "debug", overrides: list[str] | None = None) -> RunConfig:
    """Load a preset (name or TOML path) and apply ``section.key=value`` overrides."""
    path = resolve_preset(preset)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: not valid TOML ({e})") from None
    _check_batch_size(raw.get("train"), f"config file {path}")
    set_keys = override_keys(overrides or [])
    given = [k for k in _BATCH_SIZES if f"train.{k}" in set_keys]
    if len(given) == 1 and isinstance(raw.get("train"), dict):
        # --set of one batch size replaces the preset's: a cell-batched run of a token-budget preset
        raw["train"].pop(_BATCH_SIZES[1 - _BATCH_SIZES.index(given[0])], None)
    override_train: dict[str, Any] = {}
    for item in overrides or []:
        parts, value = _parse_override(item)
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        node[parts[-1]] = value
        if parts[:-1] == ["train"]:
            override_train[parts[-1]] = value
    _check_batch_size(override_train, "--set")
    return config_from_dict(raw)
