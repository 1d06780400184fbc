"""Everything HiCeller writes to disk, in one place: the names, and how each folder is written,
read, resolved and checked. Every other module calls this one instead of building paths itself.

    RUN/                               a pretraining run, or one round of a fine-tuning run
      config.toml  vocab.json          the run's config and its model's gene vocabulary
      metrics.jsonl  loss_curve.png    a JSON row per optimizer step, and its plot
      mlflow_run_id                    the MLflow run this folder logs into
      checkpoints/step_00000100/       DeepSpeed's shards, loader_rank{R}.json, the model files
                                       (config.toml, vocab.json; labels.json for a classifier),
                                       meta.json, and COMPLETE, written last by rank 0;
                                       universal/ once resumed on another number of ranks
    FINETUNE/                          a fine-tuning run
      split.parquet  summary.json      the cells' split; the best round and its metrics
      phase1/ round1/ ...              one RUN folder per round (+ val_* artifacts, hard_cells.parquet)
      model/                           the best round as a bundle
    BUNDLE/                            model.safetensors config.json vocab.json labels.json
                                       metrics.json [calibration.json] checksums.sha256 (write_bundle)

One record describes a trained model wherever it was read from: :class:`TrainedModel` = the weights
+ :class:`ModelSpec` (what the weights mean: architecture, bins, vocabulary, and for a classifier
its labels, the genes it reads and its head) + where it came from. A checkpoint stores the spec as
config.toml / vocab.json / labels.json beside DeepSpeed's files, a bundle as config.json /
vocab.json / labels.json beside safetensors; :func:`load_trained` reads any of them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data_store.tokenize import N_SPECIAL
from hiceller.config import ModelConfig, RunConfig, config_from_dict
from hiceller.errors import HicellerError, InputError
from pretrain.distributed import select_accelerator

__all__ = [
    "CONFIG", "VOCAB", "LABELS", "METRICS", "SUMMARY", "SPLIT", "BUNDLE_DIR", "CHECKPOINT_DIR", "COMPLETE",
    "BUNDLE_FILES", "CALIBRATION", "CHECKSUMS", "BUNDLE_FORMAT",
    "ModelSpec", "TrainedModel",
    "tag_for", "checkpoint_root", "list_checkpoints", "latest_complete", "resolve_checkpoint", "resolve_pretrained",
    "BEST", "write_best", "read_best", "clear_best",
    "write_json_atomic", "mark_complete", "prune", "write_run_files", "write_spec", "read_spec", "read_run_config",
    "round_name", "round_dir", "write_summary", "read_summary", "best_round_dir", "bundle_of", "run_folder_of",
    "write_bundle", "verify_bundle", "load_bundle", "load_trained", "consolidate", "UNIVERSAL", "universal_checkpoint",
]

CONFIG = "config.toml"
VOCAB = "vocab.json"
LABELS = "labels.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
SPLIT = "split.parquet"
BUNDLE_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
COMPLETE = "COMPLETE"
META = "meta.json"
UNIVERSAL = "universal"
"""DeepSpeed's universal form of a checkpoint (ds_to_universal), inside the checkpoint's folder."""
BEST = "best_checkpoint.json"
"""In a pretraining run folder: the checkpoint with the lowest validation loss (pretrain/validation.py)."""
BUNDLE_FILES = ("model.safetensors", "config.json", "vocab.json", "labels.json", "metrics.json")
CALIBRATION = "calibration.json"
"""Optional (bundles written before it have none): temperature, thresholds, novelty centroids."""
CHECKSUMS = "checksums.sha256"
BUNDLE_FORMAT = "hiceller-bundle/1"
HEADS = ("transformer", "linear", "joint")
WIDE_INPUTS = ("expression", "bins")


@dataclass(frozen=True)
class ModelSpec:
    """What a model's weights mean: everything needed to rebuild the module and feed it."""

    model_cfg: ModelConfig
    n_bins: int
    max_genes: int
    vocab: list[str]
    """Gene names; position = the vocabulary id the model was trained with."""
    labels: list[str] | None = None
    """Class names of a classifier (None: a pretrained encoder)."""
    label_counts: list[int] | None = None
    """Training cells per class (the priors the classifier learned under)."""
    input_genes: list[str] | None = None
    """The vocabulary genes the classifier reads (finetune.n_hvg / --query-genes); None = all."""
    head: str = "transformer"
    """The classifier kind (finetune.head)."""
    wide_input: str = "bins"
    """What a linear part reads (finetune.wide_input); models older than the option read bins."""
    hierarchy: dict[str, str] = field(default_factory=dict)

    @property
    def is_classifier(self) -> bool:
        return self.labels is not None


@dataclass
class TrainedModel:
    """One trained model: fp32 weights, their :class:`ModelSpec`, and where they came from."""

    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    source: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    """How it was made (loss, pretrained model, ...), kept in a bundle's config.json."""
    calibration: dict[str, Any] | None = None
    """A classifier's trust settings (finetune/calibration.py), kept in a bundle's calibration.json."""


# ------------------------------------------------------------------ checkpoints of a run folder
def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: Path, complete_only: bool = True) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    out = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")]
    if complete_only:
        out = [p for p in out if (p / COMPLETE).is_file()]
    return sorted(out, key=lambda p: p.name)


def latest_complete(run_dir: Path) -> Path | None:
    cps = list_checkpoints(run_dir)
    return cps[-1] if cps else None


def resolve_checkpoint(path: Path) -> Path:
    """A run folder (its newest complete checkpoint) or one checkpoint folder, checked complete."""
    path = Path(path)
    if not path.exists():
        raise HicellerError(f"checkpoint {path} does not exist")
    if (path / CHECKPOINT_DIR).is_dir() or not path.name.startswith("step_"):
        cp = latest_complete(path)
        if cp is None:
            raise HicellerError(f"{path} has no complete checkpoint (is it a pretraining run folder?)")
        return cp
    if not (path / COMPLETE).is_file():
        raise HicellerError(f"checkpoint {path} is incomplete (the run stopped while saving it); use an earlier one")
    return path


def write_best(run_dir: Path, step: int, val_loss: float) -> None:
    write_json_atomic(Path(run_dir) / BEST, {"step": int(step), "checkpoint": tag_for(step), "val_loss": float(val_loss)})


def read_best(run_dir: Path) -> dict[str, Any] | None:
    """The run's best checkpoint record (step, checkpoint, val_loss), or None when it has none."""
    path = Path(run_dir) / BEST
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text())
        return {"step": int(best["step"]), "checkpoint": str(best["checkpoint"]), "val_loss": float(best["val_loss"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HicellerError(f"{path} is unreadable ({type(e).__name__}); remove it to use the newest checkpoint") from None


def clear_best(run_dir: Path) -> None:
    (Path(run_dir) / BEST).unlink(missing_ok=True)


def resolve_pretrained(path: Path) -> Path:
    """The checkpoint a model is loaded from: in a run folder the best one by validation loss when
    validation ran (else the newest complete one); a checkpoint folder as named."""
    path = Path(path)
    best = read_best(path) if (path / CHECKPOINT_DIR).is_dir() else None
    if best is not None:
        cp = checkpoint_root(path) / best["checkpoint"]
        if not (cp / COMPLETE).is_file():
            raise HicellerError(f"{path}: its best checkpoint {best['checkpoint']} ({BEST}) is missing or incomplete; "
                                "name a checkpoint folder instead")
        return cp
    return resolve_checkpoint(path)


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def mark_complete(cp: Path, meta: dict[str, Any]) -> None:
    write_json_atomic(cp / META, meta)
    write_json_atomic(cp / COMPLETE, {"step": meta.get("step")})


def read_meta(cp: Path) -> dict[str, Any]:
    return json.loads((cp / META).read_text())


def prune(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (and the run's best, see
    :func:`read_best`), and incomplete ones older than the newest complete one (left by a crash while saving)."""
    complete = list_checkpoints(run_dir)
    best = read_best(run_dir)
    removed = []
    for p in complete[:-keep_last] if keep_last else complete:
        if best is not None and p.name == best["checkpoint"]:
            continue  # the best by validation loss stays, whatever its age
        _remove_checkpoint(p)
        removed.append(p)
    if complete:
        newest = complete[-1].name
        for p in list_checkpoints(run_dir, complete_only=False):
            if not (p / COMPLETE).is_file() and p.name < newest:
                _remove_checkpoint(p)
                removed.append(p)
    return removed


def _remove_checkpoint(cp: Path) -> None:
    """The COMPLETE marker first: a kill -9 half-way leaves an incomplete folder (never loaded, removed
    by the next prune), not a "complete" checkpoint with files missing."""
    (cp / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(cp, ignore_errors=True)


# ------------------------------------------------------------------ the model files beside weights
def write_run_files(run_dir: Path, cfg: RunConfig, vocab: list[str]) -> None:
    """config.toml and vocab.json at the top of a run folder (what the run was started with)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG).write_text(cfg.to_toml())
    (run_dir / VOCAB).write_text(json.dumps(list(vocab)))


def write_spec(cp: Path, cfg: RunConfig, spec: ModelSpec) -> None:
    """The run config, vocabulary and (for a classifier) labels into checkpoint folder ``cp``."""
    (cp / CONFIG).write_text(cfg.to_toml())
    (cp / VOCAB).write_text(json.dumps(list(spec.vocab)))
    if spec.is_classifier:
        labels: dict[str, Any] = {"names": spec.labels, "train_counts": [int(c) for c in spec.label_counts or []]}
        if spec.input_genes is not None:
            labels["input_genes"] = list(spec.input_genes)
        labels["wide_input"] = spec.wide_input
        (cp / LABELS).write_text(json.dumps(labels))


def read_run_config(folder: Path) -> RunConfig:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise HicellerError(f"checkpoint {folder} has no {CONFIG} (not written by HiCeller)")
    return config_from_dict(tomllib.loads(path.read_text()))


def read_spec(cp: Path) -> tuple[ModelSpec, RunConfig]:
    """The spec and run config of a checkpoint folder (checkpoints of every HiCeller version)."""
    cfg = read_run_config(cp)
    spec = ModelSpec(cfg.model, cfg.data.n_bins, cfg.data.max_genes, json.loads((cp / VOCAB).read_text()))
    if (cp / LABELS).is_file():
        lab = json.loads((cp / LABELS).read_text())
        spec = replace(spec, labels=lab["names"], label_counts=lab["train_counts"], input_genes=lab.get("input_genes"),
                       head=cfg.finetune.head, wide_input=lab.get("wide_input", "bins"))
    return spec, cfg


def consolidate(cp: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 state dict of a complete checkpoint folder, whatever its ZeRO stage (DeepSpeed's own
    zero-to-fp32 for stages 1-3; stage 0 keeps whole module weights in mp_rank_00_model_states.pt)."""
    select_accelerator()
    import deepspeed  # noqa: F401  (sets up the accelerator before zero_to_fp32 imports it)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        if zero_stage > 0 and any(cp.glob("*optim_states.pt")):
            # zero_to_fp32 prints its progress; the caller reports what matters.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                sd = get_fp32_state_dict_from_zero_checkpoint(str(cp.parent), tag=cp.name)
        else:
            sd = torch.load(cp / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    except (OSError, RuntimeError, KeyError, ValueError, EOFError) as e:
        raise HicellerError(f"checkpoint {cp} cannot be consolidated ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    # Checkpoints written before GInf's buffer became non-persistent carry it: it is not a weight.
    return {k: v.float() for k, v in sd.items() if not k.startswith("ginf.")}


def universal_checkpoint(cp: Path) -> Path:
    """The universal form of complete checkpoint folder ``cp``: DeepSpeed's own ds_to_universal, which
    re-partitions model and optimizer state for any number of ranks (ZeRO 1-3, fp32 and bf16).
    Converted once, into ``cp/universal``, atomically (a temporary sibling renamed into place);
    loaded with ``{"checkpoint": {"load_universal": true}}`` as tag ``universal`` of ``cp``."""
    out = cp / UNIVERSAL
    if out.is_dir():
        return out
    select_accelerator()
    import deepspeed  # noqa: F401  (sets up the accelerator before ds_to_universal imports it)
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = Path(tempfile.mkdtemp(prefix=f".{UNIVERSAL}.partial-", dir=cp))
    # Worker counts of 1 convert in this process: no process pool forked from a training rank.
    # inject_missing_state: checkpoints saved before the loop recorded universal_checkpoint_info.
    args = argparse.Namespace(input_folder=str(cp), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal(args)
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):
            raise
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise HicellerError(f"checkpoint {cp} could not be converted to a universal checkpoint ({type(e).__name__}: {detail})") from None
    return out


# ------------------------------------------------------------------ fine-tuning runs
def round_name(rnd: int) -> str:
    """Round 0 is phase 1; mining rounds count from 1."""
    return "phase1" if rnd == 0 else f"round{rnd}"


def round_dir(run_dir: Path, rnd: int) -> Path:
    return Path(run_dir) / round_name(rnd)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    (Path(run_dir) / SUMMARY).write_text(json.dumps(summary, indent=1, default=float))


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


def best_round_dir(path: Path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint-bearing folder, metrics) of a fine-tuning run (its best round), a round folder
    or a checkpoint folder."""
    path = Path(path)
    summary = read_summary(path)
    if summary is not None:
        return round_dir(path, int(summary.get("round", 0))), summary
    metrics = read_summary(path.parent) or {}
    if (path / "val_metrics.json").is_file():
        metrics = {"val": json.loads((path / "val_metrics.json").read_text())}
    return path, metrics


def run_folder_of(path: Path) -> Path | None:
    """The run folder a checkpoint folder belongs to (None for anything else, e.g. a bundle)."""
    path = Path(path)
    return path.parent.parent if path.parent.name == CHECKPOINT_DIR else None


def bundle_of(path: Path) -> Path:
    """A fine-tuning run folder's bundle, or ``path`` itself."""
    path = Path(path)
    return path / BUNDLE_DIR if (path / BUNDLE_DIR / CHECKSUMS).is_file() else path


# ------------------------------------------------------------------ bundles
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _bundle_config(model: TrainedModel) -> dict[str, Any]:
    spec = model.spec
    tokenizer: dict[str, Any] = {"n_bins": spec.n_bins, "max_genes": spec.max_genes}
    if spec.input_genes is not None:
        tokenizer["input_genes"] = list(spec.input_genes)
    return {"format": BUNDLE_FORMAT, "model": asdict(spec.model_cfg), "n_genes": len(spec.vocab),
            "n_classes": len(spec.labels or []), "tokenizer": tokenizer, "head": spec.head, "wide_input": spec.wide_input,
            **model.provenance}


def write_bundle(out: Path, model: TrainedModel, overwrite: bool = False) -> Path:
    """Write a classifier as a bundle, atomically: a temporary sibling folder renamed into place, so
    a killed export leaves no partial bundle."""
    out, spec = Path(out), model.spec
    if out.exists() and not overwrite:
        raise InputError(f"bundle {out} already exists (remove it or choose another --out)")
    if not spec.is_classifier or len(spec.labels) != len(spec.label_counts or []):
        raise ValueError("a bundle needs a classifier: labels and label_counts of equal length")
    if spec.input_genes is not None and not set(spec.input_genes) <= set(spec.vocab):
        raise ValueError("input_genes must be genes of vocab")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in model.state_dict.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": BUNDLE_FORMAT})
        (tmp / "config.json").write_text(json.dumps(_bundle_config(model), indent=2))
        (tmp / VOCAB).write_text(json.dumps(list(spec.vocab)))
        labels = {"names": list(spec.labels), "train_counts": [int(c) for c in spec.label_counts], "hierarchy": spec.hierarchy}
        (tmp / LABELS).write_text(json.dumps(labels, indent=1))
        (tmp / "metrics.json").write_text(json.dumps(model.metrics, indent=1, default=float))
        files = BUNDLE_FILES
        if model.calibration is not None:
            (tmp / CALIBRATION).write_text(json.dumps(model.calibration))
            files = (*BUNDLE_FILES, CALIBRATION)
        (tmp / CHECKSUMS).write_text("".join(f"{_sha256(tmp / name)}  {name}\n" for name in files))
        _share_like_umask(tmp, (*files, CHECKSUMS))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _share_like_umask(folder: Path, names: tuple[str, ...]) -> None:
    """fsync every file, then give the folder and files the modes the user's umask asks for
    (mkdtemp makes 0700 and safetensors 0600: a bundle on a lab share must be readable by the lab)."""
    mask = os.umask(0)
    os.umask(mask)
    for name in names:
        with open(folder / name, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(folder / name, 0o666 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


def verify_bundle(path: Path) -> None:
    """Every file present and matching its checksum, else InputError naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"bundle {path} does not exist or is not a folder")
    sums = path / CHECKSUMS
    if not sums.is_file():
        raise InputError(f"bundle {path}: {CHECKSUMS} is missing (not a HiCeller bundle, or a partial one)")
    expected = {}
    for line in sums.read_text().splitlines():
        if line.strip():
            digest, _, name = line.partition("  ")
            expected[name.strip()] = digest.strip()
    if (path / CALIBRATION).is_file() and CALIBRATION not in expected:
        raise InputError(f"bundle {path}: {CALIBRATION} has no checksum (added after the bundle was written)")
    for name in (*BUNDLE_FILES, *([CALIBRATION] if CALIBRATION in expected else [])):
        f = path / name
        if not f.is_file():
            raise InputError(f"bundle {path}: {name} is missing")
        if name not in expected:
            raise InputError(f"bundle {path}: {name} has no checksum")
        if _sha256(f) != expected[name]:
            raise InputError(f"bundle {path}: checksum mismatch for {name} (the file was changed or damaged)")


def _read_bundle_files(path: Path) -> tuple[dict, list, dict, dict, dict[str, torch.Tensor]]:
    try:
        config, vocab, labels, metrics = (json.loads((path / n).read_text()) for n in ("config.json", VOCAB, LABELS, "metrics.json"))
    except json.JSONDecodeError as e:
        raise InputError(f"bundle {path}: a JSON file does not parse ({e})") from None
    if config.get("format") != BUNDLE_FORMAT:
        raise InputError(f"bundle {path}: format {config.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    try:
        state = load_file(str(path / "model.safetensors"))
    except SafetensorError as e:
        raise InputError(f"bundle {path}: model.safetensors cannot be read ({e})") from None
    return config, vocab, labels, metrics, state


def _check_bundle_weights(path: Path, spec: ModelSpec, config: dict, state: dict[str, torch.Tensor]) -> None:
    """The vocabulary against the embedding, the labels against the classifier, the head kind against
    its weights: a mismatch is an error before any weight is used, never a partial load."""
    emb = state.get("model.gene_encoder.embedding.weight")
    if emb is None:
        raise InputError(f"bundle {path}: model.safetensors has no gene embedding (not a Celler annotator)")
    if emb.shape[0] != len(spec.vocab) + N_SPECIAL or config.get("n_genes") != len(spec.vocab):
        raise InputError(f"bundle {path}: vocabulary of {len(spec.vocab)} genes does not match the model's embedding "
                         f"({emb.shape[0] - N_SPECIAL} genes)")
    if spec.input_genes is not None and (not isinstance(spec.input_genes, list) or not set(spec.input_genes) <= set(spec.vocab)):
        raise InputError(f"bundle {path}: config.json's tokenizer.input_genes are not all genes of vocab.json")
    wide = state.get("wide.weight")
    if spec.head not in HEADS or (spec.head != "transformer") != (wide is not None) or (
        wide is not None and tuple(wide.shape) != (emb.shape[0], len(spec.labels))
    ):
        got = None if wide is None else tuple(wide.shape)
        raise InputError(f"bundle {path}: classifier kind {spec.head!r} does not match its weights (wide part {got})")
    scale = state.get("wide.gene_scale")
    if wide is not None and (spec.wide_input not in WIDE_INPUTS or (spec.wide_input == "expression") != (scale is not None) or (
        scale is not None and tuple(scale.shape) != (emb.shape[0],)
    )):
        raise InputError(f"bundle {path}: linear part reading {spec.wide_input!r} does not match its weights")
    head = state.get("head.weight")
    if head is None or head.shape[0] != len(spec.labels) or config.get("n_classes") != len(spec.labels):
        got = None if head is None else head.shape[0]
        raise InputError(f"bundle {path}: {len(spec.labels)} labels but the classifier has {got} outputs")


def load_bundle(path: Path) -> TrainedModel:
    """Verify and load a bundle (safetensors only; no pickle is ever read)."""
    path = Path(path)
    verify_bundle(path)
    config, vocab, labels, metrics, state = _read_bundle_files(path)
    spec = ModelSpec(
        model_cfg=ModelConfig(**config["model"]),
        n_bins=int(config["tokenizer"]["n_bins"]),
        max_genes=int(config["tokenizer"]["max_genes"]),
        vocab=vocab,
        labels=labels["names"],
        label_counts=labels.get("train_counts", []),
        input_genes=config["tokenizer"].get("input_genes"),
        head=str(config.get("head", "transformer")),  # bundles older than finetune.head: transformer
        wide_input=str(config.get("wide_input", "bins")),  # bundles older than finetune.wide_input: bins
        hierarchy=labels.get("hierarchy", {}),
    )
    _check_bundle_weights(path, spec, config, state)
    known = {"format", "model", "n_genes", "n_classes", "tokenizer", "head", "wide_input"}
    calibration = None
    if (path / CALIBRATION).is_file():
        try:
            calibration = json.loads((path / CALIBRATION).read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"bundle {path}: {CALIBRATION} does not parse ({e})") from None
    return TrainedModel(spec, state, path, metrics, {k: v for k, v in config.items() if k not in known}, calibration)


def load_trained(path: Path) -> TrainedModel:
    """A bundle, a run folder (its best checkpoint by validation loss, else its newest complete one)
    or a checkpoint folder."""
    path = Path(path)
    if (path / CHECKSUMS).is_file():
        return load_bundle(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    cp = resolve_pretrained(path)
    spec, cfg = read_spec(cp)
    return TrainedModel(spec, consolidate(cp, cfg.deepspeed.zero_stage), cp)
