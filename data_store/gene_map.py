"""Genes of a source (a store's vocabulary, a query's var_names) as ids of a model's vocabulary.

The one place where gene names become model positions: pretraining maps the store's genes onto the
vocabulary its model was built with (a store that gained genes since keeps working), fine-tuning
maps a store onto the pretrained vocabulary, annotation and embedding map a query. Symbols are
compared upper-cased by default (the store upper-cases at ingest; users hand in any case); genes
the model does not know map to -1 and are dropped by every reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

__all__ = ["GeneMapping", "map_genes"]


@dataclass
class GeneMapping:
    """Source gene (by position) -> model vocabulary id, -1 where the model does not know it."""

    ids: np.ndarray
    n_query: int
    n_matched: int
    n_vocab: int

    @property
    def overlap(self) -> float:
        """Share of the source's genes that the model knows: near 0 means other identifiers (Ensembl ids
        for a symbol vocabulary, another species). A source with few genes (an HVG subset, a targeted
        panel) is fine as long as the model knows them."""
        return self.n_matched / max(self.n_query, 1)

    @property
    def vocab_coverage(self) -> float:
        """Share of the model's vocabulary present in the source (a vocabulary pooled over a whole
        corpus is much larger than any one query)."""
        return self.n_matched / max(self.n_vocab, 1)

    def describe(self) -> str:
        return (f"{self.n_matched} of the query's {self.n_query} genes ({self.overlap:.1%}) are in the model's vocabulary "
                f"of {self.n_vocab} ({self.vocab_coverage:.1%} of it)")

    def restricted(self, keep: np.ndarray) -> GeneMapping:
        """The same mapping with every source gene outside the boolean mask ``keep`` unmapped."""
        ids = np.where(keep, self.ids, -1)
        return GeneMapping(ids, self.n_query, int(np.unique(ids[ids >= 0]).size), self.n_vocab)


def map_genes(names: Iterable[str], vocab: Iterable[str], upper: bool = True) -> GeneMapping:
    """Map ``names`` onto ``vocab`` (positions = ids); ``upper`` compares upper-cased names."""
    vocab = list(vocab)
    index = {g: i for i, g in enumerate(vocab)}
    keys = [str(n).upper() if upper else str(n) for n in names]
    ids = np.array([index.get(k, -1) for k in keys], dtype=np.int64)
    return GeneMapping(ids=ids, n_query=len(keys), n_matched=int(np.unique(ids[ids >= 0]).size), n_vocab=len(vocab))
