"""`hiceller ingest --manifest files.tsv`: per-file dataset id, tissue, disease, label and batch
columns, and every bad row named in one error line with nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from _fixtures import count_value, gene_names, make_h5ad, run_hiceller, tree_snapshot
from data_store.store import CorpusStore


def _write(path: Path, rows: list[list[str]]) -> Path:
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    return path


def _files(tmp: Path) -> dict[str, Path]:
    d = tmp / "studies"
    d.mkdir()
    make_h5ad(d / "lung.h5ad", 9, gene_names(6), count_value, label_column="celltype", batches=None, extra_obs={"sample": list("aabbccdde")})
    make_h5ad(d / "liver.h5ad", 6, gene_names(6, start=3), count_value, seed=2)
    make_h5ad(d / "blood.h5ad", 4, gene_names(5), count_value, labels=None, seed=3)
    return {p.stem: p for p in d.iterdir()}


def test_manifest_gives_each_file_its_metadata(tmp_path: Path, in_process) -> None:
    files = _files(tmp_path)
    manifest = _write(
        tmp_path / "files.tsv",
        [
            ["path", "dataset_id", "tissue", "disease", "label", "batch"],
            ["# a comment line, then an empty one"],
            [],
            ["studies/lung.h5ad", "lung-2019", "lung", "copd", "celltype", "sample"],
            [str(files["liver"]), "", "liver", "", "", ""],  # empty cells take the flags
            ["studies/blood.h5ad", "", "", "normal", "none", "none"],
        ],
    )
    rc, out, err = in_process("ingest", "--no-progress", "--store", tmp_path / "s", "--manifest", manifest, "--disease", "fibrosis", "--tissue", "unknown")
    assert rc == 0, err
    assert out.splitlines()[:3] == [
        "ingested lung-2019: 9 cells, 6 genes (6 new), counts",
        "ingested liver: 6 cells, 6 genes (3 new), counts",
        "ingested blood: 4 cells, 5 genes (0 new), counts",
    ]
    store = CorpusStore.open(tmp_path / "s")
    obs = store.obs()
    by = {d: obs[obs["dataset_id"] == d] for d in ("lung-2019", "liver", "blood")}
    assert set(by["lung-2019"]["tissue"]) == {"lung"} and set(by["lung-2019"]["disease"]) == {"copd"}
    assert by["lung-2019"]["cell_type"].tolist() == ["T", "B", "NK"] * 3
    assert by["lung-2019"]["donor_id"].tolist() == list("aabbccdde")
    assert set(by["liver"]["disease"]) == {"fibrosis"} and by["liver"]["donor_id"].tolist() == ["d1", "d2"] * 3
    assert set(by["blood"]["cell_type"]) == {"unknown"} and set(by["blood"]["donor_id"]) == {"unknown"}
    assert set(by["blood"]["tissue"]) == {"unknown"} and not store.record("blood").labeled
    # Running it again skips every dataset (all complete from the same files).
    rc, out, _ = in_process("ingest", "--no-progress", "--store", tmp_path / "s", "--manifest", manifest)
    assert rc == 0 and "skipped 3 dataset(s)" in out and "nothing to ingest" in out


def _refused(tmp_path: Path, in_process, manifest: Path, *flags: str) -> str:
    uri = tmp_path / "s"
    rc, out, err = in_process("ingest", "--no-progress", "--store", uri, "--manifest", manifest, *flags)
    assert rc == 2 and out == "", (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hiceller ingest: error: ") and str(manifest) in lines[0], err
    assert tree_snapshot(uri) is None, "a store was written"
    return lines[0]


def test_every_bad_row_is_named(tmp_path: Path, in_process) -> None:
    files = _files(tmp_path)
    manifest = _write(
        tmp_path / "files.tsv",
        [
            ["path", "dataset_id", "tissue"],
            ["studies/lung.h5ad", "a", "lung"],  # line 2: fine
            ["studies/absent.h5ad", "", "lung"],  # 3: no such file
            ["", "x", "lung"],  # 4: empty path
            ["studies/liver.h5ad", "a", "liver"],  # 5: id of row 2
            ["studies/blood.h5ad", "lung"],  # 6: 2 fields
            ["studies/blood.h5ad", "a/b", "blood"],  # 7: not a member name
        ],
    )
    line = _refused(tmp_path, in_process, manifest)
    assert "5 bad rows" in line
    for expected in ("row 3: ", "absent.h5ad does not exist", "row 4: empty path", "row 5: dataset id 'a' is also on row 2", "row 6: 2 fields, the header has 3", "row 7: dataset id 'a/b' may not contain '/'"):
        assert expected in line, (expected, line)
    assert "row 2" not in line.replace("on row 2", "")
    assert files


def test_bad_files_are_named_by_row_after_the_rows_pass(tmp_path: Path, in_process) -> None:
    files = _files(tmp_path)
    manifest = _write(
        tmp_path / "files.tsv",
        [
            ["path", "label"],
            [str(files["lung"]), "cell_type"],  # 2: lung's labels are in 'celltype'
            [str(files["liver"]), ""],  # 3: fine
            [str(files["blood"]), ""],  # 4: blood has no labels and the row does not say 'none'
        ],
    )
    line = _refused(tmp_path, in_process, manifest)
    assert "2 bad rows" in line and "row 2: " in line and "row 4: " in line and "row 3" not in line
    assert line.count("obs has no label column 'cell_type'") == 2


@pytest.mark.parametrize(
    "header, problem",
    [
        (["file", "tissue"], "no 'path' column; unknown column 'file'"),
        (["path", "organ"], "unknown column 'organ'"),
        (["path", "path"], "column 'path' twice"),
    ],
)
def test_bad_header(tmp_path: Path, in_process, header: list[str], problem: str) -> None:
    _files(tmp_path)
    manifest = _write(tmp_path / "files.tsv", [header, ["studies/lung.h5ad", "x"]])
    assert problem in _refused(tmp_path, in_process, manifest)


def test_manifest_or_files_not_both(tmp_path: Path, in_process) -> None:
    files = _files(tmp_path)
    manifest = _write(tmp_path / "files.tsv", [["path"], ["studies/liver.h5ad"]])
    for args in (["--manifest", manifest, files["liver"]], [], ["--manifest", manifest, "--dataset-id", "x"]):
        rc, _out, err = in_process("ingest", "--no-progress", "--store", tmp_path / "s", *args)
        assert rc == 2 and len(err.splitlines()) == 1, err
    assert tree_snapshot(tmp_path / "s") is None
    assert "manifest does not exist" in _refused(tmp_path, in_process, tmp_path / "absent.tsv")


def test_cli_dataset_id_must_name_a_member(tmp_path: Path) -> None:
    make_h5ad(tmp_path / "a.h5ad", 3, gene_names(3))
    r = run_hiceller("ingest", "--no-progress", "--store", tmp_path / "s", "--dataset-id", "x/y", tmp_path / "a.h5ad")
    assert r.returncode == 2 and "may not contain '/'" in r.stderr and not (tmp_path / "s").exists()


def test_many_files_validated_in_parallel_name_every_bad_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From PARALLEL_VALIDATION_FILES files on, worker processes validate: the same refusals, the
    same store as one process."""
    import numpy as np

    import data_store.ingest as ingest

    rows = [["path", "tissue"]]
    for i in range(40):
        labels = None if i in (7, 31) else ("T", "B")  # two files without their label column
        make_h5ad(tmp_path / f"f{i}.h5ad", 6, gene_names(8, start=i % 3), count_value, seed=i, labels=labels, cell_prefix=f"f{i}-", extra_obs={"q": np.arange(6)})
        rows.append([f"f{i}.h5ad", f"t{i % 4}"])
    bad = _write(tmp_path / "bad.tsv", rows)
    assert ingest._validation_workers(40) == min(len(os.sched_getaffinity(0)), ingest.MAX_VALIDATION_WORKERS)
    with pytest.raises(ingest.InputError) as e:
        ingest.ingest_sources(str(tmp_path / "s"), *_sources(bad))
    assert "2 bad rows" in str(e.value) and "row 9: " in str(e.value) and "row 33: " in str(e.value)
    good = _write(tmp_path / "good.tsv", [r for i, r in enumerate(rows) if i - 1 not in (7, 31)])
    parallel = ingest.ingest_sources(str(tmp_path / "par"), *_sources(good))
    monkeypatch.setattr(ingest, "PARALLEL_VALIDATION_FILES", 10**6)
    serial = ingest.ingest_sources(str(tmp_path / "ser"), *_sources(good))
    assert [(r.dataset_id, r.start, r.stop, r.new_genes, r.extra_obs) for r in parallel.done] == [(r.dataset_id, r.start, r.stop, r.new_genes, r.extra_obs) for r in serial.done]
    from _fixtures import store_matrix

    a, b = store_matrix(tmp_path / "par"), store_matrix(tmp_path / "ser")
    assert a.obs.equals(b.obs) and a.vocab == b.vocab and (a.X != b.X).nnz == 0


def _sources(manifest: Path):
    from data_store.ingest import IngestOptions
    from data_store.manifest import manifest_sources, read_manifest

    sources, labels = manifest_sources(read_manifest(manifest), IngestOptions(), manifest)
    return sources, None, labels, manifest


# ----------------------------------------------------------------------------- declared gene lists


def _panel_files(tmp: Path, n_files: int, n_genes: int = 300) -> list[Path]:
    d = tmp / "panel"
    d.mkdir()
    return [make_h5ad(d / f"f{i:02d}.h5ad", 6, gene_names(n_genes), count_value, seed=i) and d / f"f{i:02d}.h5ad" for i in range(n_files)]


@pytest.mark.parametrize("n_files", [5, 40], ids=["in-process", "validation-workers"])
def test_gene_list_reads_one_files_names_and_stores_the_same(tmp_path: Path, in_process, monkeypatch, n_files: int) -> None:
    """Files that declare one gene_list: the first file's names are read in full, the others only
    sampled; the store holds exactly what an ingest without the declaration writes."""
    from _fixtures import store_matrix
    from data_store.h5ad_reader import H5adFile

    files = _panel_files(tmp_path, n_files)
    plain = _write(tmp_path / "plain.tsv", [["path"]] + [[str(f)] for f in files])
    declared = _write(tmp_path / "declared.tsv", [["path", "gene_list"]] + [[str(f), "panel"] for f in files])
    full_reads = []
    original = H5adFile.var_names_raw
    monkeypatch.setattr(H5adFile, "var_names_raw", lambda self: full_reads.append(self.path) or original(self))
    for name, manifest in (("plain", plain), ("declared", declared)):
        full_reads.clear()
        rc, _out, err = in_process("ingest", "--no-progress", "--store", tmp_path / name, "--manifest", manifest)
        assert rc == 0, err
        if n_files == 5:  # validated in this process (workers are forked and not counted)
            assert len(full_reads) == (n_files if name == "plain" else 1), full_reads
    a, b = store_matrix(tmp_path / "plain"), store_matrix(tmp_path / "declared")
    assert list(a.vocab) == list(b.vocab) == gene_names(300)
    assert (a.X != b.X).nnz == 0 and a.X.nnz > 0
    pd_a, pd_b = CorpusStore.open(tmp_path / "plain").obs(), CorpusStore.open(tmp_path / "declared").obs()
    assert pd_a.drop(columns="soma_joinid").equals(pd_b.drop(columns="soma_joinid"))


def test_a_file_unlike_its_declared_gene_list_is_refused(tmp_path: Path, in_process) -> None:
    """Gene count and sampled names (the first, the last, positions drawn from the dataset id) are
    checked against the list's first file; every such row is named and nothing is written."""
    from data_store.ingest import _sample_positions

    d = tmp_path / "panel"
    d.mkdir()
    genes = gene_names(300)
    make_h5ad(d / "first.h5ad", 6, genes, count_value)
    make_h5ad(d / "longer.h5ad", 6, genes + ["EXTRA"], count_value)
    swapped = [genes[1], genes[0], *genes[2:]]  # position 0 is always compared
    make_h5ad(d / "swapped.h5ad", 6, swapped, count_value)
    renamed = list(genes)
    pos = int(_sample_positions(300, "renamed")[10])
    renamed[pos] = "NOT_IN_THE_LIST"
    make_h5ad(d / "renamed.h5ad", 6, renamed, count_value)
    make_h5ad(d / "other_list.h5ad", 6, gene_names(50), count_value)
    manifest = _write(
        tmp_path / "files.tsv",
        [["path", "gene_list"], ["panel/first.h5ad", "p"], ["panel/longer.h5ad", "p"], ["panel/swapped.h5ad", "p"],
         ["panel/renamed.h5ad", "p"], ["panel/other_list.h5ad", "q"]],
    )
    line = _refused(tmp_path, in_process, manifest)
    assert "3 bad rows" in line, line
    assert "row 3: " in line and "declares gene list 'p' of 300 genes but has 301" in line
    assert "row 4: " in line and f"gene 0 is {genes[1]!r}, not {genes[0]!r}" in line
    assert "row 5: " in line and f"gene {pos} is 'NOT_IN_THE_LIST', not {genes[pos]!r}" in line
    assert "row 2" not in line and "row 6" not in line


def test_gene_list_not_with_gene_column(tmp_path: Path, in_process) -> None:
    files = _panel_files(tmp_path, 1)
    manifest = _write(tmp_path / "files.tsv", [["path", "gene_list"], [str(files[0]), "p"]])
    assert "cannot be combined with --gene-column" in _refused(tmp_path, in_process, manifest, "--gene-column", "ids")
    rc, _out, err = in_process("ingest", "--no-progress", "--store", tmp_path / "s", "--gene-list", "p", "--gene-column", "ids", files[0])
    assert rc == 2 and "cannot be combined with --gene-column" in err and len(err.splitlines()) == 1
    assert tree_snapshot(tmp_path / "s") is None


def test_declared_gene_lists_held_are_bounded(tmp_path: Path) -> None:
    """A process keeps the names of at most as many declared lists as it keeps validated gene lists."""
    import data_store.ingest as ing

    ing._DECLARED.clear()
    n = ing._GENE_LISTS.size + 4
    for i in range(n):
        make_h5ad(tmp_path / f"f{i}.h5ad", 3, gene_names(5, start=10 * i), count_value, seed=i)
        c = ing._check_one(tmp_path / f"f{i}.h5ad", ing.IngestOptions(gene_list=f"list{i}"))
        assert not isinstance(c, str), c
    assert len(ing._DECLARED) == ing._GENE_LISTS.size
    assert f"list{n - 1}" in ing._DECLARED and "list0" not in ing._DECLARED
