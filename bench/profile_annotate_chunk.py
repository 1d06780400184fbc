"""Packed vs padded forward of one annotation chunk, with a torch.profiler table of each.

Needs the real-cell bundle and query that ``python bench/annotate_speed.py --real`` builds
(``bench/out/annotate/bundle_real_debug_g1200`` and ``bench/out/annotate/real/*.h5ad``).

  python bench/profile_annotate_chunk.py [--bundle B] [--query Q] [--cells 256] [--reps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "bench/out/annotate/bundle_real_debug_g1200")
    ap.add_argument("--query", type=Path, default=ROOT / "bench/out/annotate/real/real_pbmcA_frozen_mudan.h5ad")
    ap.add_argument("--cells", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import anndata as ad
    import scipy.sparse as sp
    import torch
    from torch.profiler import profile

    from data_store.batching import pack, to_padded
    from finetune.annotate import Annotator

    torch.set_num_threads(a.threads)
    ann = Annotator.load(a.bundle)
    q = ad.read_h5ad(a.query)[: a.cells].to_memory()
    m = ann.gene_mapping(q, None)
    x = q.X.tocoo()
    ids = m.ids[x.col]
    ok = ids >= 0
    c = sp.coo_matrix((x.data[ok], (x.row[ok], ids[ok])), shape=(q.n_obs, m.n_vocab))
    c.sum_duplicates()
    tok = ann.tokenizer.tokenize(c.row, c.col, c.data, q.n_obs, cell_keys=np.arange(q.n_obs, dtype=np.uint64))
    b = pack(tok)
    p = to_padded(b)
    model = ann.task.model.eval()
    lengths = np.diff(b.cu_seqlens.numpy())
    print(f"{b.n_cells} cells, {b.n_tokens} tokens, longest {b.max_seqlen}, {len(set(lengths.tolist()))} distinct lengths, "
          f"padded/real tokens {b.n_cells * b.max_seqlen / b.n_tokens:.2f}")
    with torch.no_grad():
        for _ in range(a.reps):
            t0 = time.perf_counter()
            model(b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen)
            t1 = time.perf_counter()
            model.forward_padded(p.gene_ids, p.values, p.padding_mask)
            t2 = time.perf_counter()
            print(f"packed {t1 - t0:.3f} s   padded {t2 - t1:.3f} s")
        for name, fn in (("packed", lambda: model(b.gene_ids, b.values, b.cu_seqlens, b.max_seqlen)),
                         ("padded", lambda: model.forward_padded(p.gene_ids, p.values, p.padding_mask))):
            with profile() as pr:
                fn()
            print(f"\n{name}\n" + pr.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
