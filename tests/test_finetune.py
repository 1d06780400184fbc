"""Fine-tuning, export and annotation end to end: real DeepSpeed, MLflow, safetensors bundles."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from _ds import cleanup_shm, free_port, hc
from _ds import ds_env as _env
from data_store.synth import SynthSpec, SyntheticCorpus
from finetune.annotate import UNASSIGNED, Annotator
from hiceller.errors import InputError
from pretrain.layout import load_bundle, verify_bundle, write_bundle

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SPEC = SynthSpec(n_cells=1500, n_genes=1000, n_tissues=6, seed=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic store, a short pretraining run and a fine-tuning run on its largest tissue."""
    base = tmp_path_factory.mktemp("ft")
    store = base / "store"
    hc("synth", "--store", str(store), "--cells", str(SPEC.n_cells), "--genes", str(SPEC.n_genes), "--tissues", str(SPEC.n_tissues), "--no-progress")
    info = json.loads(hc("info", "--store", str(store), "--json").stdout)
    tissue = next(iter(info["cells_per_tissue"]))
    pre = base / "pre"
    hc("pretrain", "--store", str(store), "--out", str(pre), "--set", "train.steps=10", "--no-progress")
    ft = base / "ft"
    hc(
        "finetune", "--store", str(store), "--pretrained", str(pre), "--tissue", tissue, "--out", str(ft),
        "--set", "finetune.epochs=2", "--set", "finetune.mining_rounds=1", "--set", "finetune.mining_epochs=1", "--no-progress",
        "--set", "finetune.mining_lr_scale=0.25",
    )
    return {"base": base, "store": store, "pre": pre, "ft": ft, "tissue": tissue}


def query_h5ad(path: Path, tissue: str, n: int = 120, upper: bool = False, log: bool = False) -> Path:
    corpus = SyntheticCorpus(SPEC)
    m, obs = corpus.generate(corpus.tissues.index(tissue), n, 77)
    X = m.astype(np.float32)
    if log:
        lib = np.asarray(X.sum(1)).ravel()
        X = X.multiply(1e4 / np.maximum(lib, 1)[:, None]).tocsr()
        X.data = np.log1p(X.data).astype(np.float32)
    genes = [g if upper else g.lower() for g in corpus.genes]
    a = ad.AnnData(X=X, obs=obs.set_index("obs_id").assign(keep_me=1), var=pd.DataFrame(index=genes))
    a.write_h5ad(path)
    return path


def test_finetune_run_layout_and_mlflow(world):
    ft = world["ft"]
    summary = json.loads((ft / "summary.json").read_text())
    assert summary["round"] in (0, 1) and 0 <= summary["val"]["macro_f1"] <= 1
    for f in ("split.parquet", "model/model.safetensors", "phase1/val_confusion.png", "phase1/val_per_class_f1.csv"):
        assert (ft / f).is_file(), f
    assert (ft / "round1" / "hard_cells.parquet").is_file()
    hard = pd.read_parquet(ft / "round1" / "hard_cells.parquet")
    assert set(hard["role"]) <= {"hard", "replay"} and len(hard) > 0
    import mlflow

    client = mlflow.MlflowClient((ft / "mlflow_tracking_uri").read_text())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = [client.get_run((ft / "mlflow_run_id").read_text().strip())]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and {c.data.tags["mlflow.runName"] for c in children} == {"phase1", "round1"}
    assert "best_round" in parent[0].data.metrics and "val_macro_f1" in children[0].data.metrics
    # phase 1 trains at train.lr, a mining round at train.lr * mining_lr_scale (params and the logged schedule)
    lr = float(parent[0].data.params["train.lr"])
    child_lr = {c.data.tags["mlflow.runName"]: float(c.data.params["lr"]) for c in children}
    assert child_lr == pytest.approx({"phase1": lr, "round1": 0.25 * lr})
    for name, scale in (("phase1", 1.0), ("round1", 0.25)):
        seen = [json.loads(line)["lr"] for line in (ft / name / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
        assert seen and max(seen) <= scale * lr * (1 + 1e-6), name
    split = pd.read_parquet(ft / "split.parquet")
    assert set(split["split"]) >= {"train", "val"}
    # One MLflow home: the fine-tuning run is nested under the pretraining run it started from, in
    # an experiment MLflow 3 opens as model training; every round has its pictures.
    pre_run = (world["pre"] / "mlflow_run_id").read_text().strip()
    assert parent[0].data.tags["mlflow.parentRunId"] == pre_run
    assert client.get_experiment(parent[0].info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    for name in ("phase1", "round1"):
        for picture in ("loss_curve.png", "val_confusion.png", "val_per_class_f1.png"):
            assert (ft / name / picture).is_file(), (name, picture)
    assert (ft / "val_reliability.png").is_file()
    cal = json.loads((ft / "model" / "calibration.json").read_text())
    assert cal["temperature"] > 0 and 0 <= cal["min_confidence"] < 1 and len(cal["centroids"]) == len(json.loads((ft / "model" / "labels.json").read_text())["names"])


def test_export_equals_run_bundle_and_is_verified(world, tmp_path):
    out = tmp_path / "bundle"
    hc("export", "--checkpoint", str(world["ft"]), "--out", str(out), "--no-mlflow")
    a, b = load_bundle(out), load_bundle(world["ft"] / "model")
    assert a.spec.labels == b.spec.labels and a.spec.vocab == b.spec.vocab
    for k in b.state_dict:
        np.testing.assert_allclose(a.state_dict[k].numpy(), b.state_dict[k].numpy(), rtol=0, atol=1e-6)
    # refusing to overwrite; a pretraining checkpoint is not an annotator
    again = hc("export", "--checkpoint", str(world["ft"]), "--out", str(out), "--no-mlflow", check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
    pre = hc("export", "--checkpoint", str(world["pre"]), "--out", str(tmp_path / "x"), "--no-mlflow", check=False)
    assert pre.returncode == 2 and "fine-tune it first" in pre.stderr and not (tmp_path / "x").exists()


def test_annotate_round_trip_counts_and_logexpr(world, tmp_path):
    bundle = world["ft"] / "model"
    counts = query_h5ad(tmp_path / "q.h5ad", world["tissue"])
    logq = query_h5ad(tmp_path / "qlog.h5ad", world["tissue"], upper=True, log=True)
    out = tmp_path / "out.h5ad"
    proc = hc("annotate", "--model", str(bundle), "--input", str(counts), "--output", str(out), "--no-progress")
    assert "annotated 120 cells" in proc.stdout
    a = ad.read_h5ad(out)
    assert {"celler_label", "celler_confidence", "cell_type", "keep_me"} <= set(a.obs.columns)
    assert a.obsm["X_celler"].shape == (120, 64)
    assert ((a.obs["celler_confidence"] > 0) & (a.obs["celler_confidence"] <= 1)).all()
    # log-normalised input with upper-case symbols gives the same labels (rank bins are scale-free)
    b = Annotator.load(bundle).annotate(ad.read_h5ad(logq))
    assert list(b.obs["celler_label"].astype(str)) == list(a.obs["celler_label"].astype(str))
    np.testing.assert_allclose(b.obsm["X_celler"], a.obsm["X_celler"], atol=1e-4)
    c = Annotator.load(bundle).annotate(ad.read_h5ad(counts), min_confidence=1.0)
    kept = c.obs["celler_label"].astype(str) != UNASSIGNED  # only cells at confidence 1 (float32) keep a label
    assert (c.obs["celler_confidence"][kept] >= 1.0).all() and (c.obs["celler_unassigned_reason"][~kept] != "assigned").all()


def test_evaluate_json(world, tmp_path):
    q = query_h5ad(tmp_path / "q.h5ad", world["tissue"])
    proc = hc("evaluate", "--model", str(world["ft"]), "--input", str(q), "--json", "--out", str(tmp_path / "ev"))
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"accuracy", "macro_f1", "rare_class_f1", "per_class_f1"} <= set(rep)
    assert (tmp_path / "ev" / "confusion.png").is_file()


def test_pyfunc_matches_cli(world, tmp_path):
    import mlflow

    q = query_h5ad(tmp_path / "q.h5ad", world["tissue"], n=50)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tmp_path / "exported"
    hc("export", "--checkpoint", str(world["ft"]), "--out", str(exp), "--tracking-uri", uri, "--register", "celler-test")
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/celler-test/1")
    a = ad.read_h5ad(q)
    frame = pd.DataFrame(a.X.toarray(), columns=a.var_names, index=a.obs_names)
    pred = model.predict(frame)
    cli_out = tmp_path / "cli.h5ad"
    hc("annotate", "--model", "models:/celler-test/1", "--tracking-uri", uri, "--input", str(q), "--output", str(cli_out), "--no-progress")
    cli = ad.read_h5ad(cli_out)
    assert list(pred["label"]) == list(cli.obs["celler_label"].astype(str))
    np.testing.assert_allclose(pred["confidence"].to_numpy(), cli.obs["celler_confidence"].to_numpy(), atol=1e-6)


def test_tampered_or_broken_bundles_refused(world, tmp_path):
    src = world["ft"] / "model"
    t = tmp_path / "tampered"
    shutil.copytree(src, t)
    labels = json.loads((t / "labels.json").read_text())
    labels["names"][0] = "evil"
    (t / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(InputError, match="checksum mismatch for labels.json"):
        verify_bundle(t)
    m = tmp_path / "missing"
    shutil.copytree(src, m)
    (m / "vocab.json").unlink()
    with pytest.raises(InputError, match="vocab.json is missing"):
        load_bundle(m)
    g = tmp_path / "genes"  # consistent checksums, but input genes the vocabulary lacks
    b = load_bundle(src)
    write_bundle(g, b)
    config = json.loads((g / "config.json").read_text())
    config["tokenizer"]["input_genes"] = [b.spec.vocab[0], "NOT_A_GENE"]
    (g / "config.json").write_text(json.dumps(config))
    sums = (g / "checksums.sha256").read_text().splitlines()
    import hashlib

    digest = hashlib.sha256((g / "config.json").read_bytes()).hexdigest()
    (g / "checksums.sha256").write_text("\n".join(f"{digest}  config.json" if l.endswith("  config.json") else l for l in sums) + "\n")
    with pytest.raises(InputError, match="input_genes are not all genes of vocab.json"):
        load_bundle(g)
    q = query_h5ad(tmp_path / "q.h5ad", world["tissue"], n=20)
    proc = hc("annotate", "--model", str(t), "--input", str(q), "--output", str(tmp_path / "o.h5ad"), check=False)
    assert proc.returncode == 2 and "checksum mismatch" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.h5ad").exists()


def test_annotate_bad_input(world, tmp_path):
    bundle = str(world["ft"] / "model")
    q = query_h5ad(tmp_path / "q.h5ad", world["tissue"], n=20)
    same = hc("annotate", "--model", bundle, "--input", str(q), "--output", str(q), check=False)
    assert same.returncode == 2 and "is the input file" in same.stderr
    empty = tmp_path / "empty.h5ad"
    ad.AnnData(X=np.zeros((0, 3), np.float32), var=pd.DataFrame(index=["SYN00001", "SYN00002", "SYN00003"])).write_h5ad(empty)
    e = hc("annotate", "--model", bundle, "--input", str(empty), "--output", str(tmp_path / "e.h5ad"), check=False)
    assert e.returncode == 2 and "zero cells" in e.stderr
    other = tmp_path / "other.h5ad"
    ad.AnnData(X=np.ones((4, 3), np.float32), var=pd.DataFrame(index=["CD3E", "MS4A1", "LYZ"])).write_h5ad(other)
    o = hc("annotate", "--model", bundle, "--input", str(other), "--output", str(tmp_path / "o.h5ad"), check=False)
    assert o.returncode == 2 and "gene overlap too small" in o.stderr
    for p in (tmp_path / "e.h5ad", tmp_path / "o.h5ad"):
        assert not p.exists()


def test_finetune_bad_input(world, tmp_path):
    r = hc("finetune", "--store", str(world["store"]), "--pretrained", str(world["pre"]), "--tissue", "atlantis", "--out", str(tmp_path / "a"), check=False)
    assert r.returncode == 2 and "tissue 'atlantis' is not in store" in r.stderr and "tissues:" in r.stderr
    r = hc("finetune", "--store", str(world["store"]), "--pretrained", str(tmp_path / "nope"), "--out", str(tmp_path / "b"), check=False)
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = hc("finetune", "--store", str(world["store"]), "--pretrained", str(world["pre"]), "--out", str(tmp_path / "c"), "--label-column", "celltype", check=False)
    assert r.returncode == 2 and "label column" in r.stderr
    for d in ("a", "b", "c"):
        assert not (tmp_path / d).exists() or not any((tmp_path / d).iterdir())


@pytest.mark.faults
def test_killed_export_leaves_no_bundle(world, tmp_path):
    """SIGKILL at several moments of an export: afterwards the bundle either verifies or is absent."""
    for delay in (0.5, 1.5, 3.0, 5.0):
        out = tmp_path / f"b{delay}"
        proc = subprocess.Popen(
            [str(BIN / "hiceller"), "export", "--checkpoint", str(world["ft"]), "--out", str(out), "--no-mlflow"],
            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        if out.exists():
            verify_bundle(out)
        hc("export", "--checkpoint", str(world["ft"]), "--out", str(out), "--no-mlflow", "--force")
        verify_bundle(out)


@pytest.mark.slow
def test_export_zero1_and_zero3_identical(world, tmp_path):
    bundles = []
    for stage in (1, 3):
        ft = tmp_path / f"ft{stage}"
        hc(
            "finetune", "--store", str(world["store"]), "--pretrained", str(world["pre"]), "--tissue", world["tissue"], "--out", str(ft),
            "--set", "finetune.epochs=1", "--set", "finetune.mining_rounds=0", "--set", f"deepspeed.zero_stage={stage}", "--no-progress",
        )
        hc("export", "--checkpoint", str(ft / "phase1"), "--out", str(tmp_path / f"b{stage}"), "--no-mlflow")
        bundles.append(load_bundle(tmp_path / f"b{stage}"))
    a, b = bundles
    assert a.spec.labels == b.spec.labels
    for k in a.state_dict:
        np.testing.assert_allclose(a.state_dict[k].numpy(), b.state_dict[k].numpy(), rtol=1e-4, atol=1e-5)


def test_finetune_config_follows_pretrained_weights():
    """Architecture and bins come from the weights; max_genes may be raised; conflicts are refused."""
    from finetune.run import follow_pretrained as _follow_pretrained
    from hiceller.config import load_config
    from pretrain.layout import ModelSpec

    pre = ModelSpec(load_config("debug").model, n_bins=31, max_genes=256, vocab=["A"])
    cfg = _follow_pretrained(load_config("base"), pre, [])
    assert cfg.model == pre.model_cfg and (cfg.data.n_bins, cfg.data.max_genes) == (31, 256)
    cfg = _follow_pretrained(load_config("debug", ["data.max_genes=1024"]), pre, ["data.max_genes=1024"])
    assert cfg.data.max_genes == 1024 and cfg.data.n_bins == 31
    with pytest.raises(InputError, match="architecture comes from the pretrained model"):
        _follow_pretrained(load_config("debug", ["model.n_layers=4"]), pre, ["model.n_layers=4"])
    with pytest.raises(InputError, match="trained with 31 bins"):
        _follow_pretrained(load_config("debug", ["data.n_bins=51"]), pre, ["data.n_bins=51"])
    # an override equal to the pretrained value is harmless
    assert _follow_pretrained(load_config("debug", ["model.d_model=64"]), pre, ["model.d_model=64"]).model == pre.model_cfg


def test_gene_overlap_is_the_share_of_the_query_the_model_knows():
    """An HVG subset of a big vocabulary passes; other identifiers fail; both shares are reported."""
    from data_store.gene_map import map_genes

    vocab = [f"GENE{i}" for i in range(1000)]
    panel = map_genes([f"gene{i}" for i in range(0, 200, 2)], vocab)  # 100 known genes, any case
    assert (panel.n_matched, panel.overlap, panel.vocab_coverage) == (100, 1.0, 0.1)
    assert "100 of the query's 100 genes (100.0%)" in panel.describe() and "(10.0% of it)" in panel.describe()
    ensembl = map_genes([f"ENSG{i:011d}" for i in range(500)] + ["GENE1"], vocab)
    assert ensembl.n_matched == 1 and ensembl.overlap == pytest.approx(1 / 501)
    np.testing.assert_array_equal(ensembl.ids[-1:], [1])


def test_finetune_on_variable_genes(world, tmp_path):
    """finetune.n_hvg: the classifier reads only the most variable genes of its training split, in the
    run, in the exported bundle and at annotation."""
    import scipy.sparse as sp

    from data_store.store import CorpusStore
    from finetune.genes import highly_variable_genes

    ft = tmp_path / "hvg"
    hc(
        "finetune", "--store", str(world["store"]), "--pretrained", str(world["pre"]), "--tissue", world["tissue"], "--out", str(ft),
        "--set", "finetune.epochs=1", "--set", "finetune.mining_rounds=0", "--set", "finetune.n_hvg=100", "--no-progress",
        "--set", "finetune.wide_input=expression", "--set", "finetune.wide_l1=1e-4",
    )
    bundle = load_bundle(ft / "model")
    assert len(bundle.spec.input_genes) == 100 and set(bundle.spec.input_genes) <= set(bundle.spec.vocab)
    split = pd.read_parquet(ft / "split.parquet")
    store = CorpusStore.open(world["store"])
    vocab = list(store.vocabulary())
    known = set(bundle.spec.vocab)
    hv = highly_variable_genes(store, split.joinid[split.split == "train"].to_numpy(), 100,
                               candidates=np.array([i for i, g in enumerate(vocab) if g in known]))
    assert sorted(vocab[g] for g in hv) == sorted(bundle.spec.input_genes)
    exported = tmp_path / "exported"
    hc("export", "--checkpoint", str(ft), "--out", str(exported), "--no-mlflow")
    assert load_bundle(exported).spec.input_genes == bundle.spec.input_genes
    q = ad.read_h5ad(query_h5ad(tmp_path / "q.h5ad", world["tissue"], n=40))
    ann = Annotator.load(ft / "model")
    a = ann.annotate(q.copy())
    unread = ~q.var_names.str.upper().isin([g.upper() for g in bundle.spec.input_genes])
    X = q.X.toarray()
    # Change every gene the classifier does not read, keeping each cell's total (the library size
    # that the linear part's log1p-per-10k input is normalised by): nothing it reads changes.
    X[:, unread] = X[:, unread][:, ::-1]
    b = ann.annotate(ad.AnnData(X=sp.csr_matrix(X), obs=q.obs.copy(), var=q.var.copy()))
    np.testing.assert_allclose(b.obsm["X_celler"], a.obsm["X_celler"], atol=1e-5)
    assert list(b.obs["celler_label"]) == list(a.obs["celler_label"])
    assert bundle.spec.wide_input == "expression"
    # A query sequenced three times deeper, or given as log1p(counts per 10k), reads the same.
    for Xq in (q.X * 3, sp.csr_matrix(np.log1p(q.X.toarray() / q.X.toarray().sum(1, keepdims=True) * 1e4))):
        c = ann.annotate(ad.AnnData(X=sp.csr_matrix(Xq), obs=q.obs.copy(), var=q.var.copy()))
        np.testing.assert_allclose(c.obsm["X_celler"], a.obsm["X_celler"], atol=1e-5)
        np.testing.assert_allclose(c.obs["celler_confidence"], a.obs["celler_confidence"], atol=1e-4)
        assert list(c.obs["celler_label"]) == list(a.obs["celler_label"])


@pytest.mark.slow
def test_finetune_on_two_ranks(world, tmp_path):
    """`deepspeed --num_gpus 2 --module finetune`: the same split and variable genes as one rank, each rank
    training on its half, a mining round; rank 0 alone logs to MLflow and writes a bundle that annotates."""
    args = ["--store", str(world["store"]), "--pretrained", str(world["pre"]), "--tissue", world["tissue"], "--no-progress",
            "--set=finetune.epochs=2", "--set=finetune.mining_rounds=1", "--set=finetune.mining_epochs=1",
            "--set=finetune.n_hvg=100", "--set=finetune.mining_patience=5"]
    one, two = tmp_path / "one", tmp_path / "two"
    cmds = {
        one: [sys.executable, "-m", "finetune", "--out", str(one), *args],
        two: [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "finetune",
              "--out", str(two), *args],
    }
    for out, cmd in cmds.items():
        try:
            proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
        finally:
            cleanup_shm()
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Same split and the same genes, whatever the number of ranks.
    pd.testing.assert_frame_equal(pd.read_parquet(one / "split.parquet"), pd.read_parquet(two / "split.parquet"))
    b1, b2 = load_bundle(one / "model"), load_bundle(two / "model")
    assert b1.spec.input_genes == b2.spec.input_genes and b1.spec.labels == b2.spec.labels
    verify_bundle(two / "model")
    # Each rank reads its half of the training cells per epoch (micro batches of 16, the last one wrapped):
    # about half the optimizer steps of one rank, at twice the global batch.
    n_train = int((pd.read_parquet(one / "split.parquet")["split"] == "train").sum())
    steps = {out: len((out / "phase1" / "metrics.jsonl").read_text().splitlines()) for out in (one, two)}
    per_rank = math.ceil(n_train / 2)
    assert steps == {one: 2 * math.ceil(n_train / 16), two: 2 * math.ceil(per_rank / 16)}, (n_train, steps)
    # Round 1 ran on the hard set (chosen on every rank from the same predictions of all training cells;
    # were they to differ, the ranks' step counts would too and the run would hang).
    assert len(pd.read_parquet(two / "round1" / "hard_cells.parquet")) > 0
    assert len((two / "round1" / "metrics.jsonl").read_text().splitlines()) >= 1
    import mlflow

    client = mlflow.MlflowClient((two / "mlflow_tracking_uri").read_text())
    parent = (two / "mlflow_run_id").read_text().strip()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.mlflow.parentRunId = '{parent}'")
    assert client.get_run(parent).data.tags["mlflow.runName"] == "finetune-" + world["tissue"]
    assert sorted(r.data.tags.get("mlflow.runName") for r in runs) == ["phase1", "round1"]
    q = query_h5ad(tmp_path / "q.h5ad", world["tissue"], n=40)
    out = Annotator.load(two / "model").annotate(ad.read_h5ad(q))
    assert out.obsm["X_celler"].shape == (40, b2.spec.model_cfg.d_model) and out.obs["celler_label"].notna().all()


def test_finetune_on_query_genes_with_joint_head(world, tmp_path):
    """--query-genes: the classifier reads only genes the query measures (variable genes chosen among
    them); the joint head survives export; annotation re-estimates the query's priors on request."""
    q = ad.read_h5ad(query_h5ad(tmp_path / "q.h5ad", world["tissue"], n=40))
    few = q[:, :80].copy()
    few.write_h5ad(tmp_path / "few.h5ad")
    ft = tmp_path / "qg"
    hc(
        "finetune", "--store", str(world["store"]), "--pretrained", str(world["pre"]), "--tissue", world["tissue"], "--out", str(ft),
        "--query-genes", str(tmp_path / "few.h5ad"), "--set", "finetune.head=joint", "--set", "finetune.n_hvg=30",
        "--set", "finetune.epochs=1", "--set", "finetune.mining_rounds=0", "--no-progress",
    )
    bundle = load_bundle(ft / "model")
    assert bundle.spec.head == "joint" and bundle.state_dict["wide.weight"].shape == (len(bundle.spec.vocab) + 2, len(bundle.spec.labels))
    # n_hvg=30 capped at finetune.n_hvg_max_fraction (0.35) of the 80 shared genes: 28
    assert len(bundle.spec.input_genes) == 28 and set(bundle.spec.input_genes) <= {g.upper() for g in few.var_names}
    exported = tmp_path / "exported"
    hc("export", "--checkpoint", str(ft), "--out", str(exported), "--no-mlflow")
    assert load_bundle(exported).spec.head == "joint"
    out = Annotator.load(exported).annotate(few, adapt_priors=True)
    priors = out.uns["celler"]["priors"]
    assert set(priors) == set(bundle.spec.labels) and sum(priors.values()) == pytest.approx(1.0)
    cli = tmp_path / "cli.h5ad"
    hc("annotate", "--model", str(exported), "--input", str(tmp_path / "few.h5ad"), "--output", str(cli), "--adapt-priors", "--no-progress")
    assert list(ad.read_h5ad(cli).obs["celler_label"].astype(str)) == list(out.obs["celler_label"].astype(str))
    # a gene list sharing nothing with the training cells: one line, exit 2, nothing written
    (tmp_path / "none.txt").write_text("NOT_A_GENE\nALSO_NOT\n")
    bad = hc("finetune", "--store", str(world["store"]), "--pretrained", str(world["pre"]), "--out", str(tmp_path / "bad"),
             "--query-genes", str(tmp_path / "none.txt"), "--no-progress", check=False)
    assert bad.returncode == 2 and "none of the query's 2 genes" in bad.stderr
    missing = hc("finetune", "--store", str(world["store"]), "--pretrained", str(world["pre"]), "--out", str(tmp_path / "bad2"),
                 "--query-genes", str(tmp_path / "nope.h5ad"), "--no-progress", check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and not (tmp_path / "bad2").exists()
