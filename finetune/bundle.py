"""Annotator bundles: a folder a biologist can be handed, loaded without pickle.

    BUNDLE/model.safetensors   encoder + classifier weights (fp32)
    BUNDLE/config.json         model sizes and tokenizer settings
    BUNDLE/vocab.json          gene names, position = vocabulary id the model was trained with
    BUNDLE/labels.json         class names, training counts, hierarchy when given
    BUNDLE/metrics.json        validation / test metrics of the fine-tuning run
    BUNDLE/checksums.sha256    sha256 of every other file

A bundle is written to a temporary sibling folder and renamed into place, so a killed export
leaves no partial bundle. Loading checks every checksum, the vocabulary against the embedding
size and the labels against the classifier before any weight is used: a mismatch is an error,
never a partial load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hiceller.config import ModelConfig
from hiceller.errors import InputError

__all__ = ["BUNDLE_FILES", "Bundle", "write_bundle", "load_bundle", "verify_bundle"]

BUNDLE_FILES = ("model.safetensors", "config.json", "vocab.json", "labels.json", "metrics.json")
CHECKSUMS = "checksums.sha256"
FORMAT = "hiceller-bundle/1"


@dataclass
class Bundle:
    path: Path
    model_cfg: ModelConfig
    n_bins: int
    max_genes: int
    vocab: list[str]
    labels: list[str]
    label_counts: list[int]
    hierarchy: dict[str, str]
    metrics: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    input_genes: list[str] | None = None
    """The vocabulary genes the classifier reads (fine-tuned with ``finetune.n_hvg``); None = all."""

    @property
    def head(self) -> str:
        """The classifier kind (``finetune.head``); bundles written before it existed are ``transformer``."""
        return str(self.config.get("head", "transformer"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_bundle(
    out: Path,
    state_dict: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    n_bins: int,
    max_genes: int,
    vocab: list[str],
    labels: list[str],
    label_counts: list[int],
    metrics: dict[str, Any],
    hierarchy: dict[str, str] | None = None,
    extra_config: dict[str, Any] | None = None,
    overwrite: bool = False,
    input_genes: list[str] | None = None,
) -> Path:
    """Write a bundle atomically (temporary folder + rename).

    ``input_genes``: the subset of ``vocab`` the classifier reads (config.json, tokenizer section);
    annotation drops every other gene before tokenizing, as fine-tuning did."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"bundle {out} already exists (remove it or choose another --out)")
    if len(labels) != len(label_counts):
        raise ValueError("labels and label_counts differ in length")
    if input_genes is not None and not set(input_genes) <= set(vocab):
        raise ValueError("input_genes must be genes of vocab")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        config = {
            "format": FORMAT,
            "model": asdict(model_cfg),
            "n_genes": len(vocab),
            "n_classes": len(labels),
            "tokenizer": {"n_bins": n_bins, "max_genes": max_genes,
                          **({"input_genes": list(input_genes)} if input_genes is not None else {})},
            **(extra_config or {}),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "vocab.json").write_text(json.dumps(list(vocab)))
        (tmp / "labels.json").write_text(
            json.dumps({"names": list(labels), "train_counts": [int(c) for c in label_counts], "hierarchy": hierarchy or {}}, indent=1)
        )
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
        lines = [f"{_sha256(tmp / name)}  {name}" for name in BUNDLE_FILES]
        (tmp / CHECKSUMS).write_text("\n".join(lines) + "\n")
        for name in (*BUNDLE_FILES, CHECKSUMS):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
    for name in BUNDLE_FILES:
        f = path / name
        if not f.is_file():
            raise InputError(f"bundle {path}: {name} is missing")
        if name not in expected:
            raise InputError(f"bundle {path}: {name} has no checksum")
        if _sha256(f) != expected[name]:
            raise InputError(f"bundle {path}: checksum mismatch for {name} (the file was changed or damaged)")


def load_bundle(path: Path) -> Bundle:
    """Verify and load a bundle (safetensors only; no pickle is ever read)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    verify_bundle(path)
    try:
        config = json.loads((path / "config.json").read_text())
        vocab = json.loads((path / "vocab.json").read_text())
        labels = json.loads((path / "labels.json").read_text())
        metrics = json.loads((path / "metrics.json").read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"bundle {path}: a JSON file does not parse ({e})") from None
    if config.get("format") != FORMAT:
        raise InputError(f"bundle {path}: format {config.get('format')!r}, expected {FORMAT!r}")
    try:
        state = load_file(str(path / "model.safetensors"))
    except SafetensorError as e:
        raise InputError(f"bundle {path}: model.safetensors cannot be read ({e})") from None
    model_cfg = ModelConfig(**config["model"])
    names = labels["names"]
    emb = state.get("model.gene_encoder.embedding.weight")
    if emb is None:
        raise InputError(f"bundle {path}: model.safetensors has no gene embedding (not a Celler annotator)")
    from data_store.tokenize import N_SPECIAL

    if emb.shape[0] != len(vocab) + N_SPECIAL or config.get("n_genes") != len(vocab):
        raise InputError(
            f"bundle {path}: vocabulary of {len(vocab)} genes does not match the model's embedding ({emb.shape[0] - N_SPECIAL} genes)"
        )
    input_genes = config["tokenizer"].get("input_genes")
    if input_genes is not None and (not isinstance(input_genes, list) or not set(input_genes) <= set(vocab)):
        raise InputError(f"bundle {path}: config.json's tokenizer.input_genes are not all genes of vocab.json")
    kind = config.get("head", "transformer")
    wide = state.get("wide.weight")
    want_wide = kind in ("linear", "joint")
    if kind not in ("transformer", "linear", "joint") or want_wide != (wide is not None) or (
        wide is not None and tuple(wide.shape) != (emb.shape[0], len(names))
    ):
        got = None if wide is None else tuple(wide.shape)
        raise InputError(f"bundle {path}: classifier kind {kind!r} does not match its weights (wide part {got})")
    head = state.get("head.weight")
    if head is None or head.shape[0] != len(names) or config.get("n_classes") != len(names):
        got = None if head is None else head.shape[0]
        raise InputError(f"bundle {path}: {len(names)} labels but the classifier has {got} outputs")
    return Bundle(
        path=path,
        model_cfg=model_cfg,
        n_bins=int(config["tokenizer"]["n_bins"]),
        max_genes=int(config["tokenizer"]["max_genes"]),
        vocab=vocab,
        labels=names,
        label_counts=labels.get("train_counts", []),
        hierarchy=labels.get("hierarchy", {}),
        metrics=metrics,
        state_dict=state,
        config=config,
        input_genes=input_genes,
    )
