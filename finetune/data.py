"""What a fine-tuning run trains and is judged on, prepared once as one typed record.

    labelled cells of the store (or of one .h5ad, ingested into RUN/store)
    -> their genes as pretrained-vocabulary ids (refused below --min-gene-overlap)
    -> restricted to the genes the query measures (--query-genes) and/or the most variable
       training genes (finetune.n_hvg; computed on rank 0, broadcast)
    -> each read gene's largest training expression, the linear part's scale (finetune.wide_input)
    -> only the cells of --diseases (and of --holdout-diseases), when given
    -> split: held-out donors and diseases = test, a class-stratified validation sample (finetune/splits.py)
    -> classes = the training split's labels, with their counts
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from data_store.gene_map import map_genes
from data_store.ingest import IngestOptions, ingest_files
from data_store.store import CorpusStore
from data_store.tokenize import N_SPECIAL
from finetune.genes import gene_max_expression, highly_variable_genes
from finetune.splits import Split, make_split
from hiceller.config import RunConfig
from hiceller.errors import InputError
from pretrain.distributed import DistInfo
from pretrain.layout import SPLIT

__all__ = ["FinetuneData", "prepare_data"]

IGNORE = -100


@dataclass
class FinetuneData:
    """The cells of a fine-tuning run, their labels and split, and the genes the classifier reads."""

    store_uri: str
    joinids: np.ndarray
    """soma_joinid of every selected cell (sorted); positions below index this array."""
    labels: np.ndarray
    """Label name per cell."""
    names: list[str]
    """The classes: the training split's labels, sorted."""
    counts: np.ndarray
    """Training cells per class."""
    split: Split
    gene_map: np.ndarray
    """Store gene id -> pretrained vocabulary id; -1 for a gene the classifier does not read."""
    input_genes: list[str] | None
    """Vocabulary genes the classifier reads; None = every gene it knows."""
    train_diseases: list[str] | None = None
    """Diseases (conditions) of the training split; kept in the bundle, so annotation can name the
    query cells of a disease the model never saw."""
    gene_scale: np.ndarray | None = None
    """Per token id, 1 / the gene's largest log1p(counts per 10k) in the training split (1 where
    unseen): the scale of a linear part that reads expression; None when nothing reads it."""

    def label_ids(self, idx: np.ndarray) -> np.ndarray:
        """Class ids of the cells at positions ``idx`` (-100 for a class absent from training)."""
        lookup = {n: i for i, n in enumerate(self.names)}
        return np.array([lookup.get(x, IGNORE) for x in self.labels[idx]], dtype=np.int64)


def _barrier(dist: DistInfo) -> None:
    if dist.world_size > 1:
        torch.distributed.barrier()


def _open_store(args, dist: DistInfo, out: Path) -> tuple[str, str]:
    """(store URI, its label column): the given store, or the --h5ad file ingested into RUN/store."""
    if args.h5ad is None:
        return args.store, args.label_column
    store_uri = str(out / "store")
    if dist.is_main:
        ingest_files(store_uri, [args.h5ad], IngestOptions(label_column=args.label_column, batch_column=args.batch_column, tissue=args.tissue))
    _barrier(dist)
    return store_uri, "cell_type"


def _select_cells(store: CorpusStore, tissue: str | None, label_column: str, diseases: list[str] | None) -> pd.DataFrame:
    if label_column != "cell_type":
        raise InputError(f"store obs has no label column {label_column!r}: store labels are in 'cell_type'")
    value_filter = None
    if tissue:
        tissues = store.summary()["cells_per_tissue"]
        if tissue not in tissues:
            raise InputError(f"tissue {tissue!r} is not in store {store.uri} (tissues: {', '.join(sorted(tissues)) or 'none'})")
        value_filter = f"tissue == {json.dumps(tissue)}"
    obs = store.obs(column_names=["cell_type", "donor_id", "dataset_id", "tissue", "disease"], value_filter=value_filter)
    labeled = {d.dataset_id for d in store.complete_datasets() if d.labeled}
    obs = obs[obs["dataset_id"].isin(labeled)].reset_index(drop=True)
    if obs.empty:
        raise InputError(f"store {store.uri} has no labelled cell" + (f" in tissue {tissue!r}" if tissue else ""))
    if diseases:
        there = set(obs["disease"].astype(str))
        missing = sorted(set(diseases) - there)
        if missing:
            raise InputError(f"--diseases / --holdout-diseases: {', '.join(missing)} not among the labelled cells' diseases "
                             f"({', '.join(sorted(there)[:20])})")
        obs = obs[obs["disease"].astype(str).isin(diseases)]
    return obs.sort_values("soma_joinid").reset_index(drop=True)


def _store_gene_map(store: CorpusStore, vocab: list[str], min_overlap: float, query_genes: set[str] | None) -> np.ndarray:
    """Store gene id -> pretrained vocabulary id, restricted to the query's genes when given."""
    store_vocab = list(store.vocabulary())
    mapping = map_genes(store_vocab, vocab, upper=False)  # the store's symbols are upper-cased at ingest
    if mapping.overlap < min_overlap:
        raise InputError(
            f"only {mapping.overlap:.1%} of the store's {len(store_vocab)} genes are in the pretrained vocabulary "
            f"({len(vocab)} genes); minimum {min_overlap:.0%} (--min-gene-overlap)"
        )
    if query_genes is None:
        return mapping.ids
    restricted = mapping.restricted(np.array([g.upper() in query_genes for g in store_vocab], dtype=bool))
    if restricted.n_matched == 0:
        raise InputError(f"--query-genes: none of the query's {len(query_genes)} genes is both in the training cells and in "
                         "the pretrained vocabulary")
    print(f"reading the {restricted.n_matched} genes shared by the query ({len(query_genes)} genes), the training cells "
          "and the pretrained vocabulary", flush=True)
    return restricted.ids


def _split(cfg: RunConfig, obs: pd.DataFrame, holdout: list[str] | None, holdout_diseases: list[str] | None) -> Split:
    labels = obs["cell_type"].astype(str).to_numpy()
    donors = obs["donor_id"].astype(str).to_numpy()
    has_donors = not np.all(donors == "unknown")
    if holdout and not has_donors:
        raise InputError("--holdout-donors given, but the cells have no donor ids")
    try:
        return make_split(labels, donors=donors if has_donors else None, holdout_donors=holdout if has_donors else None,
                          val_fraction=cfg.finetune.val_fraction, seed=cfg.train.seed,
                          diseases=obs["disease"].astype(str).to_numpy(), holdout_diseases=holdout_diseases)
    except ValueError as e:  # unknown donors or diseases, every cell held out
        flags = " / ".join(f for f, v in (("--holdout-donors", holdout), ("--holdout-diseases", holdout_diseases)) if v)
        raise InputError(f"{flags}: {e}") from None


def _variable_genes(cfg: RunConfig, dist: DistInfo, store: CorpusStore, train_joinids: np.ndarray, gene_map: np.ndarray) -> np.ndarray:
    """``gene_map`` kept on the ``finetune.n_hvg`` most variable training genes only: read and
    computed once, on rank 0, and sent to the other ranks (it is a pass over every training cell)."""
    hv = [None]
    candidates = np.flatnonzero(gene_map >= 0)
    n_top = min(cfg.finetune.n_hvg, max(1, int(cfg.finetune.n_hvg_max_fraction * len(candidates))))
    if dist.is_main:
        cap = f" (finetune.n_hvg_max_fraction of {len(candidates)} genes)" if n_top < cfg.finetune.n_hvg else ""
        print(f"selecting the {n_top} most variable genes{cap} over {len(train_joinids)} training cells", flush=True)
        hv = [highly_variable_genes(store, train_joinids, n_top, candidates=candidates)]
    if dist.world_size > 1:
        torch.distributed.broadcast_object_list(hv, src=0)
    kept = np.full_like(gene_map, -1)
    kept[hv[0]] = gene_map[hv[0]]
    return kept


def _gene_scale(dist: DistInfo, store: CorpusStore, train_joinids: np.ndarray, gene_map: np.ndarray, n_vocab: int) -> np.ndarray:
    """:attr:`FinetuneData.gene_scale`: one pass over the training cells on rank 0, sent to the others."""
    top = [None]
    if dist.is_main:
        top = [gene_max_expression(store, train_joinids)]
    if dist.world_size > 1:
        torch.distributed.broadcast_object_list(top, src=0)
    read = np.flatnonzero(gene_map[: len(top[0])] >= 0)
    top_token = np.zeros(n_vocab + N_SPECIAL, dtype=np.float32)
    np.maximum.at(top_token, N_SPECIAL + gene_map[read], top[0][read])  # case variants share a vocabulary id
    return np.where(top_token > 0, 1.0 / np.maximum(top_token, 1e-12), 1.0).astype(np.float32)


def prepare_data(args, cfg: RunConfig, vocab: list[str], dist: DistInfo, out: Path, query_genes: set[str] | None) -> FinetuneData:
    """The run's :class:`FinetuneData` (every rank computes the same; rank 0 writes RUN/split.parquet).

    With ``--h5ad``, a refusal after the file was ingested removes RUN/store again, so the same
    command can be re-run into the same ``--out``."""
    store_uri, label_column = _open_store(args, dist, out)
    try:
        store = CorpusStore.open(store_uri)
        wanted = sorted(set(args.diseases) | set(args.holdout_diseases or [])) if args.diseases else None
        obs = _select_cells(store, args.tissue, label_column, wanted)
        gene_map = _store_gene_map(store, vocab, args.min_gene_overlap, query_genes)
        split = _split(cfg, obs, args.holdout_donors, args.holdout_diseases)
    except InputError:
        if args.h5ad is not None and dist.is_main:
            shutil.rmtree(store_uri, ignore_errors=True)
        raise
    joinids = obs["soma_joinid"].to_numpy()
    labels = obs["cell_type"].astype(str).to_numpy()
    if cfg.finetune.n_hvg:
        gene_map = _variable_genes(cfg, dist, store, joinids[split.train_idx], gene_map)
    input_genes = [vocab[i] for i in np.unique(gene_map[gene_map >= 0])] if (cfg.finetune.n_hvg or query_genes) else None
    names = sorted(set(labels[split.train_idx]))
    counts = np.array([(labels[split.train_idx] == n).sum() for n in names])
    if dist.is_main:
        split.save(out / SPLIT, joinids=joinids)
        for note in split.notes:
            print(f"warning: {note}", file=sys.stderr)
    train_diseases = sorted(set(obs["disease"].astype(str).to_numpy()[split.train_idx]))
    f = cfg.finetune
    scale = None
    if f.head != "transformer" and f.wide_input == "expression":
        scale = _gene_scale(dist, store, joinids[split.train_idx], gene_map, len(vocab))
    return FinetuneData(store_uri, joinids, labels, names, counts, split, gene_map, input_genes, train_diseases, scale)
