"""`hiceller synth`: deterministic for a seed, long-tailed cell types per tissue, realistic depth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _fixtures import store_matrix, tree_snapshot
from data_store.store import CorpusStore
from data_store.synth import TISSUES, SynthSpec, SyntheticCorpus, synthesize
from hiceller.errors import InputError


def _synth(uri: Path, cells: int, seed: int = 0, genes: int = 2000, tissues: int = 3, diseases: int = 75) -> None:
    synthesize(str(uri), SynthSpec(n_cells=cells, n_genes=genes, n_tissues=tissues, n_diseases=diseases, seed=seed))


def test_same_seed_same_corpus_other_seed_other_corpus(tmp_path: Path) -> None:
    _synth(tmp_path / "a", 600, seed=7)
    _synth(tmp_path / "b", 600, seed=7)
    _synth(tmp_path / "c", 600, seed=8)
    a, b, c = (store_matrix(tmp_path / k) for k in "abc")
    assert a.vocab == b.vocab
    assert a.X.shape == b.X.shape and (a.X != b.X).nnz == 0
    assert a.obs.equals(b.obs)
    assert CorpusStore.open(tmp_path / "a").summary() == {**CorpusStore.open(tmp_path / "b").summary(), "store": str(tmp_path / "a")}
    # Another seed: other cells (compare a sample of rows both stores have).
    rows = np.arange(0, min(a.X.shape[0], c.X.shape[0]), 37)
    assert (a.X[rows] != c.X[rows]).nnz > 0
    assert a.x_entries == a.X.nnz  # no duplicated coordinates


def test_rerun_is_idempotent(tmp_path: Path) -> None:
    _synth(tmp_path / "s", 300)
    snap = tree_snapshot(tmp_path / "s")
    before = CorpusStore.open(tmp_path / "s").summary()
    _synth(tmp_path / "s", 300)
    assert CorpusStore.open(tmp_path / "s").summary() == before
    # Only the registry may be rewritten; no X or obs fragment is added.
    after = tree_snapshot(tmp_path / "s")
    assert {k for k in after if "/X/" in k or k.startswith("obs/")} == {k for k in snap if "/X/" in k or k.startswith("obs/")}


def test_depth_at_default_genes(tmp_path: Path) -> None:
    _synth(tmp_path / "s", 400, genes=20_000)
    content = store_matrix(tmp_path / "s")
    nnz = np.diff(content.X.indptr)
    assert len(nnz) == 400
    lo, med, hi = np.percentile(nnz, [5, 50, 95])
    assert 500 <= lo and 700 <= med <= 2500 and hi <= 3000, (lo, med, hi)
    values = content.X.data
    assert np.all(values == np.round(values)) and values.min() >= 1  # counts
    assert content.vocab[:3] == ["SYN00000", "SYN00001", "SYN00002"] and len(content.vocab) == 20_000


def test_long_tail_per_tissue_in_the_model() -> None:
    corpus = SyntheticCorpus(SynthSpec(n_cells=1_000_000))
    shares = []
    for t, props in enumerate(corpus.tissue_props):
        assert np.isclose(props.sum(), 1.0)
        assert len(props) >= 6, corpus.tissues[t]
        top = np.sort(props)[::-1]
        assert top[0] >= 0.4 and top[:3].sum() >= 0.65, corpus.tissues[t]  # a few types cover most cells
        assert top[-1] < 0.025, corpus.tissues[t]  # and the last ones are rare
        shares.append(props)
    flat = np.concatenate(shares)
    assert (flat < 0.01).mean() > 0.25  # many (tissue, type) pairs under 1% of their tissue
    # Corpus-wide (tissue share x type share): most cell types are under 0.1% of all cells.
    by_type: dict[str, float] = {}
    for t, props in enumerate(corpus.tissue_props):
        for ct, p in zip(corpus.tissue_types[t], props):
            name = corpus.type_names[ct]
            by_type[name] = by_type.get(name, 0.0) + corpus.tissue_share[t] * p
    small = sum(v < 0.001 for v in by_type.values())
    assert small > len(by_type) / 2
    # Shared lineages appear in many tissues, tissue-specific types in one.
    in_tissues = {n: sum(corpus.type_names.index(n) in ts for ts in corpus.tissue_types) for n in ("T cell", "macrophage")}
    assert all(v >= 10 for v in in_tissues.values()), in_tissues


def test_long_tail_in_the_written_cells(tmp_path: Path) -> None:
    _synth(tmp_path / "s", 3000, tissues=3)
    store = CorpusStore.open(tmp_path / "s")
    for rec in store.datasets.values():
        counts = np.array(sorted(rec.counts["cell_type"].values(), reverse=True))
        assert counts.sum() == rec.n_cells
        assert counts[0] / rec.n_cells >= 0.35, rec.dataset_id
        assert counts[-1] / rec.n_cells < 0.02, rec.dataset_id
    obs = store.obs(["cell_type", "dataset_id"])
    assert len(obs) == 3000 and obs["soma_joinid"].is_unique


def test_tissues_and_diseases_in_info(tmp_path: Path, in_process) -> None:
    rc, out, err = in_process("synth", "--no-progress", "--store", tmp_path / "s", "--cells", "1500", "--genes", "1000", "--tissues", "4", "--diseases", "6")
    assert rc == 0, err
    assert out.strip() == f"synthesized 1500 cells in 4 datasets into {tmp_path / 's'}"
    rc, out, err = in_process("info", "--store", tmp_path / "s", "--json")
    info = json.loads(out)
    assert info["cells"] == 1500 and info["genes"] == 1000 and info["datasets"] == 4
    assert list(info["cells_per_tissue"]) == sorted(TISSUES[:4], key=lambda t: -info["cells_per_tissue"][t])
    assert set(info["cells_per_tissue"]) == set(TISSUES[:4])
    diseases = set(info["cells_per_disease"])
    assert "normal" in diseases and diseases <= {"normal"} | {f"disease_{k:02d}" for k in range(1, 6)}
    assert len(diseases) >= 3
    assert next(iter(info["cells_per_disease"])) == "normal"  # most cells are normal tissue
    assert sum(info["cells_per_disease"].values()) == sum(info["cells_per_cell_type"].values()) == 1500
    assert info["donors"] == sum(2 + t % 7 for t in range(4))
    rc, out, err = in_process("synth", "--no-progress", "--store", tmp_path / "one", "--cells", "200", "--genes", "500", "--tissues", "2", "--diseases", "1")
    assert rc == 0, err
    assert set(CorpusStore.open(tmp_path / "one").summary()["cells_per_disease"]) == {"normal"}


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--cells", "0"], "--cells must be >= 1"),
        (["--cells", "10", "--genes", "100"], "--genes must be >= 200"),
        (["--cells", "10", "--tissues", str(len(TISSUES) + 1)], "--tissues must be in"),
        (["--cells", "10", "--diseases", "0"], "--diseases must be in"),
    ],
)
def test_bad_synth_arguments(tmp_path: Path, in_process, args: list[str], problem: str) -> None:
    rc, out, err = in_process("synth", "--no-progress", "--store", tmp_path / "s", *args)
    assert rc == 2 and out == "" and err.splitlines() == [f"hiceller synth: error: {problem}" + err.split(problem, 1)[1].rstrip("\n")]
    assert not (tmp_path / "s").exists()


def test_spec_validates_itself() -> None:
    with pytest.raises(InputError, match="--cells"):
        SynthSpec(n_cells=-5)
