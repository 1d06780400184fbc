"""Annotate an AnnData with a bundle: ``Annotator.load(bundle).annotate(adata)``.

Refuse or abstain, never guess:

1. Genes. The query's genes (symbols in any case, or ids from a var column) are mapped onto the
   bundle's vocabulary. What decides is the overlap with the genes the classifier *reads* (the
   bundle's input genes, e.g. its 2,000 variable genes): below the bundle's minimum (default 50%)
   the query is refused with one line; below its warning level (80%) a warning is recorded. A bundle
   that reads every gene checks the share of the query's genes it knows (default minimum 25%).
2. Cells. Each cell is tokenized exactly as in training (per-cell rank bins, so counts and
   log-normalised input give the same tokens) and run through the model in packed chunks, so memory
   does not grow with the number of cells. Its probabilities are temperature-scaled (calibrated on
   the fine-tuning run's validation cells). It stays "Unassigned", with the reason in
   ``obs["celler_unassigned_reason"]``, when it expresses too few of the genes read
   (``few_genes``), when its embedding lies outside every training class (``far_from_training``)
   or when its confidence is below ``min_confidence`` (``low_confidence``, default from the bundle).
3. Label shift (optional): the query's class priors re-estimated by EM before labelling.

Bundles written before calibration existed annotate as they did (T = 1, no novelty check).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from data_store.batching import iter_token_budget_batches, pack
from data_store.gene_map import GeneMapping, map_genes
from data_store.tokenize import Tokenizer, log1p_normalize
from finetune.calibration import Calibration
from finetune.priors import DEFAULT_ADAPT_PRIORS, PriorShift, estimate_priors, reweight
from finetune.task import ClassifierTask
from hiceller.errors import InputError
from pretrain.layout import TrainedModel, load_bundle
from pretrain.model import CellerModel

__all__ = ["Annotator", "GeneCheck", "Predictions", "QueryReader", "UNASSIGNED"]

UNASSIGNED = "Unassigned"
DEFAULT_MIN_OVERLAP = 0.25
"""Least share of a query's genes an all-genes bundle must know (other identifiers, species)."""


@dataclass
class GeneCheck:
    """How much of what the model reads the query has, and whether that is enough."""

    mapping: GeneMapping
    n_read: int
    """Genes the classifier reads (its input genes, or its whole vocabulary)."""
    n_read_present: int
    """Of those, the genes the query has."""
    rule: str
    """"read" (share of the genes read) or "known" (share of the query's genes the model knows)."""
    overlap: float
    minimum: float
    warning: str | None = None

    def describe(self) -> str:
        if self.rule == "read":
            return f"{self.n_read_present} of the {self.n_read} genes the model reads ({self.overlap:.1%}) are in the query"
        return self.mapping.describe()


@dataclass
class Predictions:
    """Every cell's calibrated probabilities, embedding, genes read and novelty, in query order."""

    proba: np.ndarray
    emb: np.ndarray
    n_genes: np.ndarray
    """Genes read that the cell expresses."""
    novelty: np.ndarray
    """Distance to the nearest training class in units of its radius (> 1: unlike any)."""
    reasons: dict[str, int] = field(default_factory=dict)


class QueryReader:
    """What annotation and embedding share: a trained model's spec, its tokenizer, the genes it reads,
    the gene-overlap check (module docstring, 1.) and the tokenized chunks of a query."""

    def __init__(self, trained: TrainedModel, device: str | torch.device = "cpu"):
        self.trained = trained
        self.spec = spec = trained.spec
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda asked for, but torch sees no CUDA device")
        self.tokenizer = Tokenizer(n_bins=spec.n_bins, max_genes=spec.max_genes, seed=0)
        self.calibration = Calibration.from_dict(trained.calibration or {})
        # Vocabulary ids the classifier reads: all, or the genes it was fine-tuned on (n_hvg, --query-genes).
        self._reads = None
        # Chunks also carry each token's log1p(counts per 10k) when a classifier's linear part reads it (Annotator).
        self.reads_expression = False
        if spec.input_genes is not None:
            self._reads = np.isin(np.array(spec.vocab, dtype=object), np.array(spec.input_genes, dtype=object))

    def gene_mapping(self, adata, gene_column: str | None = None) -> GeneMapping:
        if gene_column:
            if gene_column not in adata.var.columns:
                raise InputError(f"query var has no column {gene_column!r}")
            return map_genes(adata.var[gene_column].astype(str), self.spec.vocab, upper=False)
        return map_genes(adata.var_names, self.spec.vocab, upper=True)

    def check_genes(self, adata, gene_column: str | None = None, min_overlap: float | None = None) -> GeneCheck:
        """The gene overlap that decides (module docstring); InputError below the minimum."""
        mapping = self.gene_mapping(adata, gene_column)
        cal = self.calibration
        if self._reads is not None:
            present = np.zeros(len(self.spec.vocab), dtype=bool)
            present[mapping.ids[mapping.ids >= 0]] = True
            n_read, n_present = int(self._reads.sum()), int((present & self._reads).sum())
            check = GeneCheck(mapping, n_read, n_present, "read", n_present / max(n_read, 1),
                              cal.min_read_overlap if min_overlap is None else min_overlap)
            if check.overlap < cal.warn_read_overlap:
                check.warning = (f"only {check.describe()}: the missing ones read as not expressed; "
                                 "for this query, fine-tune with `hiceller finetune --query-genes QUERY.h5ad`")
        else:
            check = GeneCheck(mapping, len(self.spec.vocab), mapping.n_matched, "known", mapping.overlap,
                              DEFAULT_MIN_OVERLAP if min_overlap is None else min_overlap)
        if check.overlap < check.minimum:
            raise InputError(f"gene overlap too small: {check.describe()}; minimum {check.minimum:.0%} (--min-overlap)")
        return check

    def tokenized_chunks(self, adata, mapping: GeneMapping, batch_size: int, progress=None) -> Iterator[tuple]:
        """(rows, tokens, genes read per cell) per chunk of ``batch_size`` cells, tokenized as in training."""
        for a in range(0, adata.n_obs, batch_size):
            b = min(a + batch_size, adata.n_obs)
            x = adata.X[a:b]
            x = (sp.csr_matrix(x) if not sp.issparse(x) else x).tocoo()
            if x.data.size and (not np.all(np.isfinite(x.data)) or x.data.min() < 0):
                raise InputError(f"query X has NaN, infinite or negative values (cells {a}-{b})")
            data = x.data
            if self.reads_expression:
                # log1p(counts per 10k) over every gene of the cell, as for the training cells; a
                # chunk with non-integer values is log-expression (ingest's rule for a file).
                data = log1p_normalize(x.row, data, b - a, bool(np.any(data != np.floor(data))))
            # Map every stored entry's column through the vocabulary at once (a CSR column
            # selection x[:, cols] costs far more) and drop the genes the model never saw.
            ids = mapping.ids[x.col]
            ok = (ids >= 0) & (x.data != 0)
            if self._reads is not None:
                ok &= self._reads[np.maximum(ids, 0)]
            m = sp.coo_matrix((data[ok].astype(np.float32), (x.row[ok], ids[ok])), shape=(b - a, mapping.n_vocab))
            m.sum_duplicates()  # symbols that differ only in case name one vocabulary gene
            n_genes = np.bincount(m.row, minlength=b - a)
            tok = self.tokenizer.tokenize(m.row, m.col, m.data, b - a, cell_keys=np.arange(a, b, dtype=np.uint64),
                                          keep_values=self.reads_expression)
            yield slice(a, b), tok, n_genes
            if progress:
                progress(b - a)

    def checked_chunks(self, adata, batch_size: int, gene_column: str | None, min_overlap: float | None, progress=None):
        """:meth:`tokenized_chunks` of a query that passed :meth:`check_genes` (kept as ``last_check``)."""
        if adata.n_obs == 0:
            raise InputError("the query has zero cells")
        self.last_check = self.check_genes(adata, gene_column, min_overlap)
        self.last_mapping = self.last_check.mapping
        yield from self.tokenized_chunks(adata, self.last_mapping, batch_size, progress)


class Annotator(QueryReader):
    """A loaded annotator: the encoder, the classifier, the tokenizer settings and trust settings of a bundle."""

    def __init__(self, trained: TrainedModel, device: str | torch.device = "cpu"):
        super().__init__(trained, device)
        spec = self.spec
        model = CellerModel(spec.model_cfg, n_genes=len(spec.vocab), n_bins=spec.n_bins)
        task = ClassifierTask(model, len(spec.labels), "ce", np.ones(len(spec.labels)), head=spec.head, wide_input=spec.wide_input)
        missing, unexpected = task.load_state_dict(trained.state_dict, strict=False)
        if missing or unexpected:
            raise InputError(f"bundle {trained.source}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.task = task.to(self.device).eval()
        self.reads_expression = task.reads_expression

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Annotator":
        return cls(load_bundle(Path(path)), device)

    @property
    def labels(self) -> list[str]:
        return self.spec.labels

    def _chunks(self, adata, batch_size: int, gene_column, min_overlap, progress, token_budget) -> Iterator[tuple]:
        """(rows, logits, embeddings, genes read per cell) per chunk of ``batch_size`` cells."""
        for rows, tok, n_genes in self.checked_chunks(adata, batch_size, gene_column, min_overlap, progress):
            logits, embs = self._predict(tok, token_budget)
            yield rows, logits, embs, n_genes

    def iter_predictions(
        self,
        adata,
        *,
        batch_size: int = 256,
        gene_column: str | None = None,
        min_overlap: float | None = None,
        progress: Callable[[int], None] | None = None,
        token_budget: int | None = None,
    ) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
        """(rows, calibrated probabilities [n, C], embeddings [n, d]) per chunk of ``batch_size`` cells."""
        for rows, logits, embs, _ in self._chunks(adata, batch_size, gene_column, min_overlap, progress, token_budget):
            yield rows, self.calibration.probabilities(logits).astype(np.float32), embs

    @torch.no_grad()
    def _predict(self, tok, token_budget: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(logits, embeddings) of a tokenized chunk."""
        batches = [pack(tok)] if token_budget is None else list(iter_token_budget_batches(tok, token_budget))
        logits, embs = [], []
        for batch in batches:
            batch = batch.to(self.device)
            z, emb = self.task.logits(batch.gene_ids, batch.values, batch.cu_seqlens, batch.max_seqlen, batch.expr)
            logits.append(z.float().cpu().numpy())
            embs.append(emb.float().cpu().numpy())
        return np.concatenate(logits), np.concatenate(embs)

    def predict(self, adata, *, batch_size: int = 256, gene_column: str | None = None, min_overlap: float | None = None,
                progress: Callable[[int], None] | None = None, token_budget: int | None = None) -> Predictions:
        """:class:`Predictions` of every cell (arguments as :meth:`iter_predictions`)."""
        n = adata.n_obs
        proba = np.zeros((n, len(self.labels)), dtype=np.float32)
        emb = np.zeros((n, self.task.model.embed_dim), dtype=np.float32)
        n_genes = np.zeros(n, dtype=np.int64)
        for rows, logits, e, g in self._chunks(adata, batch_size, gene_column, min_overlap, progress, token_budget):
            proba[rows], emb[rows], n_genes[rows] = self.calibration.probabilities(logits), e, g
        return Predictions(proba, emb, n_genes, self.calibration.novelty(emb))

    def predict_proba(self, adata, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated probabilities [n, C], embeddings [n, d]) of every cell, in order."""
        p = self.predict(adata, **kwargs)
        return p.proba, p.emb

    def adapt_priors(self, proba: np.ndarray) -> tuple[np.ndarray, PriorShift]:
        """The query's class priors by EM (finetune/priors.py) and the posteriors under them."""
        counts = np.asarray(self.spec.label_counts or [1] * len(self.labels), dtype=np.float64)
        shift = estimate_priors(proba, counts)
        return reweight(proba, shift.reference, shift.priors).astype(np.float32), shift

    def unassigned_reasons(self, pred: Predictions, confidence: np.ndarray, min_confidence: float) -> np.ndarray:
        """Per cell, "assigned" or why it is not; the most basic reason wins (genes, novelty, confidence)."""
        reason = np.full(len(confidence), "assigned", dtype=object)
        reason[confidence < min_confidence] = "low_confidence"
        reason[pred.novelty > 1.0] = "far_from_training"
        reason[pred.n_genes < self.calibration.min_genes] = "few_genes"
        return reason

    def annotate(
        self,
        adata,
        *,
        batch_size: int = 256,
        min_confidence: float | None = None,
        gene_column: str | None = None,
        min_overlap: float | None = None,
        progress: Callable[[int], None] | None = None,
        copy: bool = True,
        adapt_priors: bool = DEFAULT_ADAPT_PRIORS,
        probabilities: bool = False,
    ):
        """The annotated AnnData: obs celler_label / celler_confidence / celler_unassigned_reason /
        celler_novelty, obsm X_celler (and celler_probabilities), uns celler.

        ``min_confidence`` None takes the bundle's (chosen on validation). With ``adapt_priors`` the
        posteriors are re-weighted to the query's class mix estimated by EM (label shift,
        finetune/priors.py); the estimate is in ``uns["celler"]["priors"]``."""
        out = adata.copy() if copy else adata
        pred = self.predict(adata, batch_size=batch_size, gene_column=gene_column, min_overlap=min_overlap, progress=progress)
        info: dict = {}
        proba = pred.proba
        if adapt_priors:
            proba, shift = self.adapt_priors(proba)
            info["priors"] = {n: float(p) for n, p in zip(self.labels, shift.priors)}
            info["reference_priors"] = {n: float(p) for n, p in zip(self.labels, shift.reference)}
            info["prior_em_iterations"] = int(shift.n_iter)
        threshold = self.calibration.min_confidence if min_confidence is None else min_confidence
        top = proba.argmax(1)
        conf = proba[np.arange(len(top)), top]
        reason = self.unassigned_reasons(pred, conf, threshold)
        labels = np.array(self.labels, dtype=object)[top]
        labels[reason != "assigned"] = UNASSIGNED
        out.obs["celler_label"] = pd.Categorical(labels)
        out.obs["celler_confidence"] = conf
        out.obs["celler_unassigned_reason"] = pd.Categorical(reason)
        out.obs["celler_novelty"] = pred.novelty.astype(np.float32)
        out.obsm["X_celler"] = pred.emb
        if probabilities:
            out.obsm["celler_probabilities"] = proba
        out.uns["celler"] = self._uns(threshold, adapt_priors, reason, probabilities) | info
        return out

    def _uns(self, threshold: float, adapt_priors: bool, reason: np.ndarray, probabilities: bool) -> dict:
        check, cal = self.last_check, self.calibration
        uns = {
            "bundle": str(self.trained.source),
            "classes": list(self.labels),
            "min_confidence": float(threshold),
            "temperature": float(cal.temperature),
            "gene_overlap_rule": check.rule,
            "gene_overlap": float(check.overlap),
            "genes_read": int(check.n_read),
            "genes_read_in_query": int(check.n_read_present),
            "query_genes_known": float(check.mapping.overlap),
            "vocab_coverage": float(check.mapping.vocab_coverage),
            "genes_matched": int(check.mapping.n_matched),
            "adapt_priors": bool(adapt_priors),
            "unassigned": {r: int((reason == r).sum()) for r in np.unique(reason) if r != "assigned"},
        }
        if check.warning:
            uns["warning"] = check.warning
        if probabilities:
            uns["probability_columns"] = list(self.labels)
        return uns
