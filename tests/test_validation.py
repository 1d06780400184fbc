"""Validation while pretraining (pretrain/validation.py): the held-out split, the kNN probe, the best
checkpoint, and runs with real DeepSpeed processes, MLflow and a synthetic store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _ds import cleanup_shm, ds_env, free_port
from data_store.store import CorpusStore
from data_store.stream import stream_from_config
from hiceller.config import load_config
from hiceller.errors import ConfigError, HicellerError, InputError
from pretrain import layout
from pretrain.validation import hold_out, knn_probe

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("val") / "store"
    subprocess.run([str(BIN / "hiceller"), "synth", "--store", str(path), "--cells", "1500", "--genes", "1000",
                    "--tissues", "6", "--no-progress"], check=True, env=ds_env(), capture_output=True)
    return str(path)


def _epoch_joinids(cfg, store: str, world: int, selection: dict) -> list[np.ndarray]:
    """Every rank's joinids over one epoch (wrap: every selected cell is seen)."""
    out = []
    for rank in range(world):
        s = stream_from_config(cfg, store, rank=rank, world_size=world, remainder="wrap", **selection)
        out.append(np.concatenate([b.joinids.numpy() for b in s]))
    return out


def _ranges_cells(ranges) -> np.ndarray:
    return np.concatenate([np.arange(a, b) for a, b in ranges]) if ranges else np.zeros(0, dtype=np.int64)


def test_fraction_held_out_is_the_same_everywhere_and_never_trained_on(store):
    cfg = load_config("debug", ["validation.every=4", "validation.fraction=0.1", "data.block_size=32"])
    s = CorpusStore.open(store)
    held = hold_out(s, cfg)
    again = hold_out(CorpusStore.open(store), cfg)
    assert held.val == again.val and held.train == again.train  # a pure function of store and config
    val, train = _ranges_cells(held.val["ranges"]), _ranges_cells(held.train["ranges"])
    assert np.intersect1d(val, train).size == 0
    assert np.array_equal(np.sort(np.concatenate([val, train])), np.arange(s.n_cells))
    assert 0.03 < len(val) / s.n_cells < 0.2 and len(val) == held.n_val
    seen = np.concatenate(_epoch_joinids(cfg, store, 2, held.train))
    assert np.intersect1d(seen, val).size == 0
    assert np.array_equal(np.unique(seen), train)  # every training cell, none held out
    assert set(held.labeled) <= set(val)
    other = hold_out(s, load_config("debug", ["validation.every=4", "validation.fraction=0.1", "data.block_size=32", "train.seed=1"]))
    assert other.val != held.val  # the seed picks the blocks


def test_held_out_datasets_and_donors(store):
    s = CorpusStore.open(store)
    ids, starts, stops = s.complete_spans()
    cfg = load_config("debug", ["validation.every=4", f"validation.datasets=[\"{ids[1]}\"]"])
    held = hold_out(s, cfg)
    assert held.val["ranges"] == [(int(starts[1]), int(stops[1]))]
    seen = np.concatenate(_epoch_joinids(cfg, store, 1, held.train))
    assert not np.any((seen >= starts[1]) & (seen < stops[1])) and len(np.unique(seen)) == s.n_cells - (stops[1] - starts[1])

    obs = s.obs(column_names=["donor_id"])
    donor = str(obs["donor_id"].astype(str).value_counts().index[-1])
    cfg = load_config("debug", ["validation.every=4", f"validation.donors=[\"{donor}\"]"])
    held = hold_out(s, cfg)
    want = np.sort(obs["soma_joinid"].to_numpy()[obs["donor_id"].astype(str).to_numpy() == donor])
    assert held.n_val == len(want)
    seen = np.concatenate(_epoch_joinids(cfg, store, 1, held.train))
    assert np.intersect1d(seen, want).size == 0 and len(np.unique(seen)) == s.n_cells - len(want)

    with pytest.raises(InputError, match="not complete datasets"):
        hold_out(s, load_config("debug", ["validation.every=4", 'validation.datasets=["nope"]']))
    with pytest.raises(InputError, match="no cell of donor"):
        hold_out(s, load_config("debug", ["validation.every=4", 'validation.donors=["nobody"]']))
    with pytest.raises(ConfigError, match="not both"):
        load_config("debug", ['validation.datasets=["a"]', 'validation.donors=["b"]'])


def test_knn_probe_scores_separable_and_random_labels():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 5
    labels = np.repeat(np.arange(4), 30)
    emb = centers[labels] + rng.normal(size=(120, 16))
    good = knn_probe(emb, labels, k=5)
    assert good == {"probe_accuracy": 1.0, "probe_macro_f1": 1.0}
    bad = knn_probe(rng.normal(size=(120, 16)), labels, k=5)
    assert bad["probe_macro_f1"] < 0.5 and bad["probe_accuracy"] < 0.5
    # leave-one-out: a cell is never its own neighbour (two cells per class, far apart classes)
    two = knn_probe(np.array([[0.0, 1], [0, 1.1], [1, 0], [1.1, 0]]), np.array([0, 0, 1, 1]), k=1)
    assert two["probe_accuracy"] == 1.0


def _fake_checkpoint(run: Path, step: int) -> Path:
    cp = layout.checkpoint_root(run) / layout.tag_for(step)
    cp.mkdir(parents=True)
    layout.mark_complete(cp, {"step": step})
    return cp


def test_best_checkpoint_survives_pruning_and_is_what_a_run_folder_means(tmp_path):
    run = tmp_path / "run"
    cps = [_fake_checkpoint(run, s) for s in (10, 20, 30, 40)]
    assert layout.resolve_pretrained(run) == cps[-1]  # no validation: the newest
    layout.write_best(run, 20, 1.5)
    assert layout.read_best(run) == {"step": 20, "checkpoint": "step_00000020", "val_loss": 1.5}
    layout.prune(run, keep_last=1)
    assert [p.name for p in layout.list_checkpoints(run)] == ["step_00000020", "step_00000040"]
    assert layout.resolve_pretrained(run) == cps[1]
    assert layout.resolve_pretrained(cps[-1]) == cps[-1]  # a named step wins
    assert layout.resolve_checkpoint(run) == cps[-1]  # resume still continues from the newest
    layout.write_best(run, 10, 1.0)  # pruned meanwhile
    with pytest.raises(HicellerError, match="best checkpoint step_00000010"):
        layout.resolve_pretrained(run)


def _pretrain(store: str, out: Path, *sets: str, nproc: int = 1, resume: bool = False, stop_after: int | None = None) -> list[dict]:
    args = ["--config", "debug", "--store", store, "--out", str(out), "--no-progress", *(f"--set={s}" for s in sets)]
    args += ["--resume", "auto"] if resume else []
    args += ["--stop-after-steps", str(stop_after)] if stop_after else []
    if nproc == 1:
        cmd = [sys.executable, "-m", "pretrain", *args]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), "--module", "pretrain", *args]
    try:
        proc = subprocess.run(cmd, env=ds_env(), capture_output=True, text=True, timeout=600, cwd=str(out.parent))
    finally:
        cleanup_shm()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


VAL = ("train.steps=12", "train.checkpoint_every=4", "train.keep_last=1", "validation.every=4",
       "validation.fraction=0.15", "validation.loss_cells=64", "validation.probe_cells=96")


def test_pretraining_validates_logs_and_keeps_the_best_checkpoint(store, tmp_path, in_process):
    import mlflow

    run = tmp_path / "run"
    rows = _pretrain(store, run, *VAL)
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [4, 8, 12]
    assert all(0 <= r["probe_accuracy"] <= 1 and 0 <= r["probe_macro_f1"] <= 1 for r in val)
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    best = layout.read_best(run)
    assert best["val_loss"] == pytest.approx(min(r["val_loss"] for r in val))
    names = [p.name for p in layout.list_checkpoints(run)]
    assert best["checkpoint"] in names and names[-1] == "step_00000012"  # keep_last 1, and the best
    # MLflow: the figures beside the training loss, the best checkpoint tagged
    client = mlflow.MlflowClient((run / "mlflow_tracking_uri").read_text())
    run_id = (run / "mlflow_run_id").read_text()
    for name in ("val_loss", "probe_accuracy", "probe_macro_f1"):
        assert [m.step for m in client.get_metric_history(run_id, name)] == [4, 8, 12], name
    assert client.get_run(run_id).data.tags["best_checkpoint"] == str(layout.checkpoint_root(run) / best["checkpoint"])
    assert layout.load_trained(run).source == layout.checkpoint_root(run) / best["checkpoint"]

    # `hiceller embed` from the run folder: the best checkpoint; chunking changes nothing
    q = tmp_path / "q.h5ad"
    rc, _, err = in_process("store", "export", "--store", store, "--filter", "soma_joinid < 40", "--out", q)
    assert rc == 0, err
    import anndata as ad

    rc, out, err = in_process("embed", "--model", run, "--input", q, "--output", tmp_path / "e.h5ad", "--no-progress")
    assert rc == 0, err
    rc, _, err = in_process("embed", "--model", run, "--input", q, "--output", tmp_path / "e7.h5ad", "--batch-size", "7", "--no-progress")
    assert rc == 0, err
    e, e7 = ad.read_h5ad(tmp_path / "e.h5ad"), ad.read_h5ad(tmp_path / "e7.h5ad")
    assert e.obsm["X_celler"].shape == (40, 64) and np.isfinite(e.obsm["X_celler"]).all()
    np.testing.assert_allclose(e7.obsm["X_celler"], e.obsm["X_celler"], rtol=1e-4, atol=1e-5)
    assert e.uns["celler_embed"]["model"].endswith(best["checkpoint"])
    if best["checkpoint"] != "step_00000012":
        rc, _, err = in_process("embed", "--model", layout.checkpoint_root(run) / "step_00000012", "--input", q,
                                "--output", tmp_path / "e12.h5ad", "--no-progress")
        assert rc == 0, err
        assert not np.allclose(ad.read_h5ad(tmp_path / "e12.h5ad").obsm["X_celler"], e.obsm["X_celler"])


@pytest.mark.slow
def test_validation_on_two_ranks_zero3_resumes_exactly(store, tmp_path):
    """Every rank takes part in validation (ZeRO-3 gathers parameters in each forward pass): no hang;
    a run stopped and resumed logs the training and validation figures of the uninterrupted run; and
    one rank reading the same cells (two data shards) gets the same validation figures."""
    sets = ("train.steps=8", *VAL[1:], "deepspeed.zero_stage=3")
    full = _pretrain(store, tmp_path / "full", *sets, nproc=2)
    one = _pretrain(store, tmp_path / "one", *sets, "train.grad_accum=2", "train.data_shards_per_rank=2")
    for key in ("val_loss", "probe_accuracy", "probe_macro_f1"):
        assert [r[key] for r in one if key in r] == pytest.approx([r[key] for r in full if key in r], rel=1e-4), key
    part = tmp_path / "part"
    _pretrain(store, part, *sets, nproc=2, stop_after=4)
    resumed = _pretrain(store, part, *sets, nproc=2, resume=True)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["step"] for r in full if "val_loss" in r] == [4, 8]
    for key in ("loss", "val_loss", "probe_accuracy", "probe_macro_f1"):
        got = {r["step"]: r[key] for r in resumed if key in r}
        want = {r["step"]: r[key] for r in full if key in r}
        assert list(got) == list(want), key
        assert list(got.values()) == pytest.approx(list(want.values()), rel=1e-5, abs=1e-6), key
    best, want = layout.read_best(part), layout.read_best(tmp_path / "full")
    assert best["step"] == want["step"] and best["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
