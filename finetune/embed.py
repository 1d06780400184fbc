"""`hiceller embed`: ``<cls>`` cell embeddings of a query from a pretrained model, no fine-tuning.

The model is a pretraining run folder (its best checkpoint by validation loss, else its newest),
one checkpoint folder, or the encoder of an annotator bundle. The query is read exactly as
`hiceller annotate` reads it (finetune/annotate.py ``QueryReader``: the same gene matching and
overlap check, the same tokens, chunks of ``batch_size`` cells) and the embeddings go to
``obsm["X_celler"]``, the key annotation uses, so reference mapping and integration tools
(scanpy's neighbors / ingest, scib) take them as they are. From a bundle they equal what
`hiceller annotate` writes there.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from finetune.annotate import QueryReader
from hiceller.errors import InputError
from pretrain.layout import TrainedModel
from pretrain.model import CellerModel

__all__ = ["Embedder"]


class Embedder(QueryReader):
    """The encoder of a trained model, for ``<cls>`` embeddings of query cells."""

    def __init__(self, trained: TrainedModel, device: str | torch.device = "cpu"):
        super().__init__(trained, device)
        spec = self.spec
        model = CellerModel(spec.model_cfg, n_genes=len(spec.vocab), n_bins=spec.n_bins)
        encoder = {k.removeprefix("model."): v for k, v in trained.state_dict.items() if k.startswith("model.")}
        missing, unexpected = model.load_state_dict(encoder, strict=False)
        if missing or unexpected:
            raise InputError(f"{trained.source}: weights do not match a Celler encoder (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def embed(self, adata, *, batch_size: int = 256, gene_column: str | None = None, min_overlap: float | None = None,
              progress: Callable[[int], None] | None = None) -> np.ndarray:
        """float32 ``[n_cells, d_model]``: every cell's ``<cls>`` embedding, in query order."""
        from data_store.batching import pack

        out = np.zeros((adata.n_obs, self.model.embed_dim), dtype=np.float32)
        for rows, tok, _ in self.checked_chunks(adata, batch_size, gene_column, min_overlap, progress):
            b = pack(tok).to(self.device)
            out[rows] = self.model(b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen).cell_emb.float().cpu().numpy()
        return out
