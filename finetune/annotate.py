"""Annotate an AnnData with a bundle: ``Annotator.load(bundle).annotate(adata)``.

The query's genes (symbols in any case, or ids from a var column) are mapped onto the bundle's
vocabulary; genes the model never saw are left out and the overlap is reported (too small an
overlap is an error). Cells are tokenized exactly as in training (per-cell rank bins, so counts and
log-normalised input give the same tokens) and run through the model in packed chunks, so memory
does not grow with the number of cells.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from data_store.batching import iter_token_budget_batches, pack
from data_store.gene_map import GeneMapping, map_genes
from data_store.tokenize import Tokenizer
from finetune.priors import DEFAULT_ADAPT_PRIORS, PriorShift, estimate_priors, reweight
from finetune.task import ClassifierTask
from hiceller.errors import InputError
from pretrain.layout import TrainedModel, load_bundle
from pretrain.model import CellerModel

__all__ = ["Annotator", "UNASSIGNED"]

UNASSIGNED = "Unassigned"
DEFAULT_MIN_OVERLAP = 0.25


class Annotator:
    """A loaded annotator: the encoder, the classifier and the tokenizer settings of a bundle."""

    def __init__(self, trained: TrainedModel, device: str | torch.device = "cpu"):
        self.trained = trained
        self.spec = spec = trained.spec
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda asked for, but torch sees no CUDA device")
        model = CellerModel(spec.model_cfg, n_genes=len(spec.vocab), n_bins=spec.n_bins)
        task = ClassifierTask(model, len(spec.labels), "ce", np.ones(len(spec.labels)), head=spec.head)
        missing, unexpected = task.load_state_dict(trained.state_dict, strict=False)
        if missing or unexpected:
            raise InputError(f"bundle {trained.source}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.task = task.to(self.device).eval()
        self.tokenizer = Tokenizer(n_bins=spec.n_bins, max_genes=spec.max_genes, seed=0)
        # Vocabulary ids the classifier reads: all, or the genes it was fine-tuned on (n_hvg, --query-genes).
        self._reads = None
        if spec.input_genes is not None:
            self._reads = np.isin(np.array(spec.vocab, dtype=object), np.array(spec.input_genes, dtype=object))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Annotator":
        return cls(load_bundle(Path(path)), device)

    @property
    def labels(self) -> list[str]:
        return self.spec.labels

    def gene_mapping(self, adata, gene_column: str | None = None) -> GeneMapping:
        if gene_column:
            if gene_column not in adata.var.columns:
                raise InputError(f"query var has no column {gene_column!r}")
            return map_genes(adata.var[gene_column].astype(str), self.spec.vocab, upper=False)
        return map_genes(adata.var_names, self.spec.vocab, upper=True)

    def iter_predictions(
        self,
        adata,
        *,
        batch_size: int = 256,
        gene_column: str | None = None,
        min_overlap: float = DEFAULT_MIN_OVERLAP,
        progress: Callable[[int], None] | None = None,
        token_budget: int | None = None,
    ) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
        """(rows, probabilities [n, C], embeddings [n, d]) per chunk of ``batch_size`` cells."""
        if adata.n_obs == 0:
            raise InputError("the query has zero cells")
        mapping = self.gene_mapping(adata, gene_column)
        if mapping.overlap < min_overlap:
            raise InputError(f"gene overlap too small: {mapping.describe()}; minimum {min_overlap:.0%} (--min-overlap)")
        self.last_mapping = mapping
        for a in range(0, adata.n_obs, batch_size):
            b = min(a + batch_size, adata.n_obs)
            x = adata.X[a:b]
            x = (sp.csr_matrix(x) if not sp.issparse(x) else x).tocoo()
            if x.data.size and (not np.all(np.isfinite(x.data)) or x.data.min() < 0):
                raise InputError(f"query X has NaN, infinite or negative values (cells {a}-{b})")
            # Map every stored entry's column through the vocabulary at once (a CSR column
            # selection x[:, cols] costs far more) and drop the genes the model never saw.
            ids = mapping.ids[x.col]
            ok = (ids >= 0) & (x.data != 0)
            if self._reads is not None:
                ok &= self._reads[np.maximum(ids, 0)]
            m = sp.coo_matrix((x.data[ok].astype(np.float32), (x.row[ok], ids[ok])), shape=(b - a, mapping.n_vocab))
            m.sum_duplicates()  # symbols that differ only in case name one vocabulary gene
            tok = self.tokenizer.tokenize(m.row, m.col, m.data, b - a, cell_keys=np.arange(a, b, dtype=np.uint64))
            probs, embs = self._predict(tok, token_budget)
            if progress:
                progress(b - a)
            yield slice(a, b), probs, embs

    @torch.no_grad()
    def _predict(self, tok, token_budget: int | None) -> tuple[np.ndarray, np.ndarray]:
        batches = [pack(tok)] if token_budget is None else list(iter_token_budget_batches(tok, token_budget))
        probs, embs = [], []
        for batch in batches:
            batch = batch.to(self.device)
            logits, emb = self.task.logits(batch.gene_ids, batch.values, batch.cu_seqlens, batch.max_seqlen)
            probs.append(torch.softmax(logits.float(), -1).cpu().numpy())
            embs.append(emb.float().cpu().numpy())
        return np.concatenate(probs), np.concatenate(embs)

    def predict_proba(self, adata, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [n, C] float32, embeddings [n, d] float32) of every cell, in order.

        ``kwargs`` go to :meth:`iter_predictions`."""
        n = adata.n_obs
        proba = np.zeros((n, len(self.labels)), dtype=np.float32)
        emb = np.zeros((n, self.task.model.embed_dim), dtype=np.float32)
        for rows, p, e in self.iter_predictions(adata, **kwargs):
            proba[rows] = p
            emb[rows] = e
        return proba, emb

    def adapt_priors(self, proba: np.ndarray) -> tuple[np.ndarray, PriorShift]:
        """The query's class priors by EM (finetune/priors.py) and the posteriors under them."""
        counts = np.asarray(self.spec.label_counts or [1] * len(self.labels), dtype=np.float64)
        shift = estimate_priors(proba, counts)
        return reweight(proba, shift.reference, shift.priors).astype(np.float32), shift

    def annotate(
        self,
        adata,
        *,
        batch_size: int = 256,
        min_confidence: float = 0.0,
        gene_column: str | None = None,
        min_overlap: float = DEFAULT_MIN_OVERLAP,
        progress: Callable[[int], None] | None = None,
        copy: bool = True,
        adapt_priors: bool = DEFAULT_ADAPT_PRIORS,
    ):
        """The annotated AnnData: obs celler_label / celler_confidence, obsm X_celler, uns celler.

        With ``adapt_priors`` the posteriors are re-weighted to the query's class mix estimated by
        EM (label shift, finetune/priors.py); the estimate is in ``uns["celler"]["priors"]``."""
        out = adata.copy() if copy else adata
        proba, emb = self.predict_proba(
            adata, batch_size=batch_size, gene_column=gene_column, min_overlap=min_overlap, progress=progress
        )
        info: dict = {}
        if adapt_priors:
            proba, shift = self.adapt_priors(proba)
            info["priors"] = {n: float(p) for n, p in zip(self.labels, shift.priors)}
            info["reference_priors"] = {n: float(p) for n, p in zip(self.labels, shift.reference)}
            info["prior_em_iterations"] = int(shift.n_iter)
        names = np.array(self.labels, dtype=object)
        top = proba.argmax(1)
        labels = names[top]
        conf = proba[np.arange(len(top)), top]
        labels[conf < min_confidence] = UNASSIGNED
        out.obs["celler_label"] = pd.Categorical(labels)
        out.obs["celler_confidence"] = conf
        out.obsm["X_celler"] = emb
        out.uns["celler"] = {
            "bundle": str(self.trained.source),
            "min_confidence": float(min_confidence),
            "gene_overlap": float(self.last_mapping.overlap),
            "vocab_coverage": float(self.last_mapping.vocab_coverage),
            "genes_matched": int(self.last_mapping.n_matched),
            "adapt_priors": bool(adapt_priors),
            **info,
        }
        return out
