"""kNN probe of pretrained ``<cls>`` embeddings: how well frozen cell embeddings separate cell types.

No fine-tuning: each reference and query cell of a transfer task (bench/quality_tasks.py) is run
through the pretrained encoder, tokenized as annotation tokenizes (per-cell rank bins of the genes
the model knows, at most ``--max-genes``, seed 0), and its ``<cls>`` hidden state is kept. Each
query cell takes the majority label of its k nearest reference cells (cosine), and the prediction is
read with the benchmark's one scoring rule (quality_tasks.score: macro-F1 over the query's classes,
rare-class F1 over those under 1% of the reference). The probe is deterministic; its spread is the
standard deviation of each figure over 200 bootstrap resamples of the query cells.

  python bench/cls_probe.py --pretrained bench/out/obj/P_masked bench/out/obj/P_generative --tasks baron pbmc
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quality_tasks import TASKS, make_task, score  # noqa: E402

from data_store.batching import pack  # noqa: E402
from data_store.gene_map import map_genes  # noqa: E402
from data_store.tokenize import Tokenizer  # noqa: E402
from pretrain.layout import load_trained  # noqa: E402
from pretrain.model import CellerModel  # noqa: E402

HEADLINE = ("accuracy", "macro_f1", "rare_class_f1")


def load_encoder(run: Path) -> tuple[CellerModel, list[str], int]:
    """The pretrained encoder of a run or checkpoint folder, its vocabulary and value bins."""
    trained = load_trained(run)
    spec = trained.spec
    model = CellerModel(spec.model_cfg, n_genes=len(spec.vocab), n_bins=spec.n_bins)
    model.load_state_dict({k.removeprefix("model."): v for k, v in trained.state_dict.items() if k.startswith("model.")})
    return model.eval(), spec.vocab, spec.n_bins


@torch.no_grad()
def embed(model: CellerModel, vocab: list[str], n_bins: int, adata, max_genes: int, chunk: int = 256) -> np.ndarray:
    """``<cls>`` embeddings ``[n_cells, d]`` of an AnnData (counts or log-expression: rank bins)."""
    ids = map_genes(adata.var_names, vocab, upper=True).ids
    tok = Tokenizer(n_bins=n_bins, max_genes=max_genes, seed=0)
    out = []
    for a in range(0, adata.n_obs, chunk):
        x = sp.csr_matrix(adata.X[a:a + chunk]).tocoo()
        keep = (ids[x.col] >= 0) & (x.data != 0)
        m = sp.coo_matrix((x.data[keep].astype(np.float32), (x.row[keep], ids[x.col[keep]])), shape=(x.shape[0], len(vocab)))
        m.sum_duplicates()
        b = pack(tok.tokenize(m.row, m.col, m.data, x.shape[0], cell_keys=np.arange(a, a + x.shape[0], dtype=np.uint64)))
        out.append(model(b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen).cell_emb.float().numpy())
    return np.concatenate(out)


def knn_predict(ref: np.ndarray, ref_labels: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Majority label of the k nearest reference cells by cosine similarity (ties: the nearest)."""
    unit = lambda e: e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)  # noqa: E731
    sim = unit(query) @ unit(ref).T
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    classes, codes = np.unique(ref_labels, return_inverse=True)
    votes = np.zeros((len(query), len(classes)))
    for j in range(k):  # earlier neighbours add a little more, so a tie goes to the nearer class
        np.add.at(votes, (np.arange(len(query)), codes[nearest[:, j]]), 1.0 + 1e-6 * (k - j))
    return classes[votes.argmax(1)]


def bootstrap_sd(truth: np.ndarray, pred: np.ndarray, train: np.ndarray, n: int = 200) -> dict[str, float | None]:
    rng = np.random.default_rng(0)
    draws = {h: [] for h in HEADLINE}
    for _ in range(n):
        i = rng.integers(0, len(truth), len(truth))
        r = score(truth[i], pred[i], train)
        for h in HEADLINE:
            if r[h] is not None:
                draws[h].append(r[h])
    return {h: round(float(np.std(v)), 4) if v else None for h, v in draws.items()}


def probe(run: Path, task: str, work: Path, k: int, max_genes: int) -> dict:
    import anndata as ad

    tr, te = make_task(task, work)
    ref, query = ad.read_h5ad(tr), ad.read_h5ad(te)
    model, vocab, n_bins = load_encoder(run)
    ref_labels = ref.obs.cell_type.astype(str).to_numpy()
    truth = query.obs.cell_type.astype(str).to_numpy()
    pred = knn_predict(embed(model, vocab, n_bins, ref, max_genes), ref_labels, embed(model, vocab, n_bins, query, max_genes), k)
    r = score(truth, pred, ref_labels)
    return {"run": str(run), "task": task, "k": k, **{h: r[h] for h in HEADLINE}, "sd": bootstrap_sd(truth, pred, ref_labels),
            "phantom": r["phantom"], "per_class_f1": r["per_class_f1"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained", type=Path, nargs="+", required=True, help="pretraining run or checkpoint folders")
    p.add_argument("--tasks", nargs="+", default=["baron", "pbmc"], choices=list(TASKS))
    p.add_argument("--work", type=Path, default=Path("bench/out/aq/runs"), help="where the task files are (made once)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--max-genes", type=int, default=512)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for task in a.tasks:
        for run in a.pretrained:
            row = probe(run, task, a.work, a.k, a.max_genes)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "per_class_f1"}), file=sys.stderr, flush=True)
    print(json.dumps({"bench": "cls_probe", "k": a.k, "max_genes": a.max_genes, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
