"""bench/gpu_check.sh: its h5py-only data path, its refusals, and a whole --cpu-dry-run (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _ds import cleanup_shm, ds_env

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture()
def h5ads(tmp_path) -> Path:
    """Two small counts files whose gene sets overlap, one symbol differing only in case."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    folder = tmp_path / "data"
    folder.mkdir()
    for i, (n, genes) in enumerate([(30, [f"G{j}" for j in range(40)]), (20, [f"g{j}" for j in range(30, 70)])]):
        x = sp.random(n, len(genes), density=0.3, format="csr", random_state=i, dtype=np.float32)
        x.data = np.ceil(x.data * 9)
        ad.AnnData(X=x, var=pd.DataFrame(index=genes)).write_h5ad(folder / f"f{i}.h5ad")
    return folder


def test_h5ad_cells_give_the_tokens_of_the_projects_tokenizer(h5ads) -> None:
    import anndata as ad

    from _h5ad_cells import H5adCells, ShuffledCells, as_query, read_h5ad
    from data_store.tokenize import Tokenizer

    files = sorted(h5ads.glob("*.h5ad"))
    cells = H5adCells(files)
    assert cells.vocab == sorted({f"G{j}" for j in range(70)}) and cells.n_cells == 50
    # Cell 30 is the second file's first cell: its genes, by symbol, with its counts.
    a = ad.read_h5ad(files[1])
    row = a.X[0].tocoo()
    want = {(f"G{int(a.var_names[c][1:])}", v) for c, v in zip(row.col, row.data)}
    got = {(cells.vocab[c], v) for r, c, v in zip(cells.rows, cells.cols, cells.vals) if r == 30}
    assert got == want

    tok = Tokenizer(n_bins=51, max_genes=8, seed=0)
    stream = ShuffledCells(cells, tok, batch_cells=16, seed=0)
    batches = list(stream.dataloader())
    assert len(batches) == len(stream) == 3 and all(b.n_cells == 16 for b in batches)
    assert all(int(b.seqlens.max()) <= 9 for b in batches)  # <cls> + max_genes
    # Resuming from a saved position gives the remaining batches of the epoch.
    again = ShuffledCells(cells, tok, batch_cells=16, seed=0)
    it = iter(again.dataloader())
    next(it)
    state = again.state_dict()
    resumed = ShuffledCells(cells, tok, batch_cells=16, seed=0)
    resumed.load_state_dict(state)
    rest = list(resumed.dataloader())
    assert [b.gene_ids.tolist() for b in rest] == [b.gene_ids.tolist() for b in batches[1:]]

    q = as_query(read_h5ad(files[0]), max_cells=10)
    assert q.n_obs == 10 and q.X.shape == (10, 40) and list(q.var_names[:2]) == ["G0", "G1"]
    assert (q.X != ad.read_h5ad(files[0]).X[:10]).nnz == 0


def test_read_h5ad_refuses_dense_x(tmp_path) -> None:
    import anndata as ad
    import pandas as pd

    from _h5ad_cells import read_h5ad

    ad.AnnData(X=np.ones((3, 2), np.float32), var=pd.DataFrame(index=["A", "B"])).write_h5ad(tmp_path / "d.h5ad")
    with pytest.raises(ValueError, match="X must be a CSR matrix"):
        read_h5ad(tmp_path / "d.h5ad")


def _gpu_check(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**ds_env(), "PYTHON": sys.executable, "HICELLER_WHEELS": "/nonexistent"}
    return subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_check_refuses_missing_data_and_a_machine_without_cuda(tmp_path, h5ads) -> None:
    r = _gpu_check("--cpu-dry-run", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.strip() == f"gpu_check: no .h5ad files in {tmp_path / 'none'} (pass --data DIR)"
    r = _gpu_check("--data", str(h5ads), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "torch sees no CUDA device" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_cpu_dry_run_reports_every_part(tmp_path, h5ads) -> None:
    """Every part runs (tiny sizes, CPU) and the JSON line has the keys the GPU run will fill."""
    out = tmp_path / "out"
    try:
        r = _gpu_check("--cpu-dry-run", "--data", str(h5ads), "--out", str(out), timeout=600)
    finally:
        cleanup_shm()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report == json.loads((out / "gpu_check.json").read_text())
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.log"]  # fits the device tool's 8 files
    assert report["ok"] and report["dry_run"] and report["device"] == "cpu" and not report["errors"]
    assert {"env", "attention", "fused_adam", "train", "annotate", "skipped", "failures", "part_s", "wall_s"} <= report.keys()
    assert {"torch", "varlen_attn", "gpu", "deepspeed", "flash_attn"} <= report["env"].keys()
    att = report["attention"]
    assert att["auto"] == "sdpa" and "fwd_bwd_ms" in att["sdpa"]
    assert "skipped" in att["torch_varlen"] and "skipped" in att["flash"]  # no CUDA here
    assert report["fused_adam"]["ok"] is False
    assert set(report["train"]) == {"bf16", "bf16_autocast"}
    assert set(report["skipped"]) == {"train_bf16_compile", "train_bf16_sdpa"}
    for variant, run in report["train"].items():
        assert {"setup", "tokens_per_s", "cells_per_s", "mfu", "flops_per_token", "peak_memory_gib", "loss_first",
                "loss_last", "steps"} <= run.keys()
        assert run["steps"] == 3 and run["tokens_per_s"] > 0 and run["loss_last"] == run["loss_last"]
        assert run["setup"]["attention_backend"] == "sdpa" and run["setup"]["autocast"] == (variant == "bf16_autocast")
    for dtype in ("fp32", "bf16"):
        ann = report["annotate"][dtype]
        assert {"packed_cells_s", "padded_cells_s", "packed_model_cells_s", "padded_model_cells_s",
                "attention_backend"} <= ann.keys()
        assert ann["argmax_agree"] >= 0.9
