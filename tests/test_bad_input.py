"""Bad input at every entry point: one table of cases, each run as a real ``hiceller`` process.

Every case must end with exit code 2 and exactly one non-empty stderr line that names the problem,
no traceback, and nothing written: the case's own folder (its working directory, which holds every
--out/--output/--store target) and the shared store / runs are byte-for-byte what they were before.
The expensive inputs (a tiny synthetic store, a 4-step pretraining run and a 1-epoch fine-tuning run
with its bundle) are built once for the module.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from _ds import hc
from _fixtures import gene_names, make_h5ad, tree_snapshot


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A 600-cell synthetic store, a 4-step pretraining run, a 1-epoch fine-tuning run on its
    largest tissue, and read-only bad inputs that several cases share."""
    base = tmp_path_factory.mktemp("bad_input")
    store, pre, ft, inp = base / "store", base / "pre", base / "ft", base / "inputs"
    hc("synth", "--store", store, "--cells", "600", "--genes", "500", "--tissues", "3", "--no-progress")
    info = json.loads(hc("info", "--store", store, "--json").stdout)
    tissue = max(info["cells_per_tissue"], key=info["cells_per_tissue"].get)
    hc("pretrain", "--store", store, "--out", pre, "--set", "train.steps=4", "--no-progress")
    hc(
        "finetune", "--store", store, "--pretrained", pre, "--tissue", tissue, "--out", ft,
        "--set", "finetune.epochs=1", "--set", "finetune.mining_rounds=0", "--no-progress",
    )
    inp.mkdir()
    import anndata as ad

    bundle = ft / "model"
    vocab = json.loads((bundle / "vocab.json").read_text())
    names = json.loads((bundle / "labels.json").read_text())["names"]
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(0.5, (20, len(vocab))).astype(np.float32))
    obs = pd.DataFrame({"cell_type": [names[i % len(names)] for i in range(20)]}, index=[f"q{i}" for i in range(20)])
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(vocab, dtype=object))).write_h5ad(inp / "query.h5ad")
    ad.AnnData(X=np.zeros((0, 3), np.float32), var=pd.DataFrame(index=pd.Index(vocab[:3], dtype=object))).write_h5ad(inp / "empty.h5ad")
    ad.AnnData(X=np.ones((4, 3), np.float32), var=pd.DataFrame(index=pd.Index(["CD3E", "MS4A1", "LYZ"], dtype=object))).write_h5ad(inp / "other_genes.h5ad")
    (inp / "notes.h5ad").write_text("cell,gene,count\nc1,CD3E,4\n")
    tampered = inp / "tampered"
    shutil.copytree(bundle, tampered)
    labels = json.loads((tampered / "labels.json").read_text())
    labels["names"][0] = "evil"
    (tampered / "labels.json").write_text(json.dumps(labels))
    (inp / "hosts_bad").write_text("node0 slots=2\nnode1 slots=two\n")
    (inp / "hosts2").write_text("node0 slots=2\nnode1 slots=2\n")
    return {"base": base, "store": store, "pre": pre, "ft": ft, "bundle": bundle, "in": inp, "tissue": Path(tissue)}


# --- per-case inputs, written into the case folder before the "before" snapshot -------------------

def _nan_h5ad(d: Path) -> None:
    make_h5ad(d / "in.h5ad", 30, gene_names(20), value_fn=lambda c, g: np.where(c == 3, np.nan, 1.0 + g))


def _neg_h5ad(d: Path) -> None:
    make_h5ad(d / "in.h5ad", 30, gene_names(20), value_fn=lambda c, g: -1.0 - g)


def _nolabel_h5ad(d: Path) -> None:
    make_h5ad(d / "in.h5ad", 30, gene_names(20), labels=None)


def _text_file(d: Path) -> None:
    (d / "in.h5ad").write_text("this is a text file, not HDF5\n")


def _plain_dir(d: Path) -> None:
    (d / "notastore").mkdir()
    (d / "notastore" / "readme.txt").write_text("nothing here\n")


def _copy_query(d: Path) -> None:
    """A query the case owns, for output == input (the shared query must stay untouched anyway)."""
    make_h5ad(d / "in.h5ad", 10, [f"SYN{i:05d}" for i in range(200)])


def _labelled_unknown_genes(d: Path) -> None:
    make_h5ad(d / "in.h5ad", 30, [f"NOT_A_GENE_{i}" for i in range(20)])


def _folder(d: Path) -> None:
    (d / "outdir").mkdir()


def _bad_toml(d: Path) -> None:
    (d / "cfg.toml").write_text("[model]\nd_model = 64\nn_layers = 2\nn_heads = [\n")


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    """Placeholders: {store} {pre} {ft} {bundle} {in} {tissue} (module fixtures), {d} (case folder)."""
    match: str
    """Substring the one stderr line must contain."""
    targets: tuple[str, ...] = ()
    """Paths (relative to the case folder) the command was told to create: must not exist after."""
    setup: Callable[[Path], None] | None = field(default=None, compare=False)


C = Case
CASES: list[Case] = [
    # ingest
    C("ingest-text-file", ("ingest", "--store", "s", "in.h5ad", "--no-progress"), "not a readable .h5ad file", ("s",), _text_file),
    C("ingest-nan", ("ingest", "--store", "s", "in.h5ad", "--no-progress"), "NaN or infinite values", ("s",), _nan_h5ad),
    C("ingest-negative", ("ingest", "--store", "s", "in.h5ad", "--no-progress"), "negative values", ("s",), _neg_h5ad),
    C("ingest-no-label-column", ("ingest", "--store", "s", "in.h5ad", "--no-progress"), "no label column 'cell_type'", ("s",), _nolabel_h5ad),
    C("ingest-missing-file", ("ingest", "--store", "s", "missing.h5ad", "--no-progress"), "missing.h5ad: file does not exist", ("s",)),
    # synth
    C("synth-zero-cells", ("synth", "--store", "s", "--cells", "0", "--no-progress"), "--cells must be >= 1", ("s",)),
    C("synth-too-few-genes", ("synth", "--store", "s", "--cells", "100", "--genes", "10", "--no-progress"), "--genes must be >= 200", ("s",)),
    C("synth-zero-tissues", ("synth", "--store", "s", "--cells", "100", "--tissues", "0", "--no-progress"), "--tissues must be in [1, 80]", ("s",)),
    # info
    C("info-plain-dir", ("info", "--store", "notastore"), "is not a TileDB-SOMA experiment", (), _plain_dir),
    C("info-missing-store", ("info", "--store", "nothere"), "does not exist", ("nothere",)),
    # pretrain
    C("pretrain-unknown-preset", ("pretrain", "--store", "{store}", "--out", "run", "--config", "huge", "--no-progress"), "unknown preset 'huge'", ("run",)),
    C("pretrain-unknown-key", ("pretrain", "--store", "{store}", "--out", "run", "--set", "model.foo=1", "--no-progress"), "model.foo: unknown key", ("run",)),
    C("pretrain-wrong-type", ("pretrain", "--store", "{store}", "--out", "run", "--set", "train.lr=fast", "--no-progress"), "train.lr: must be a number", ("run",)),
    C("pretrain-heads-not-dividing", ("pretrain", "--store", "{store}", "--out", "run", "--set", "model.n_heads=3", "--no-progress"), "not divisible by n_heads 3", ("run",)),
    C("pretrain-set-syntax", ("pretrain", "--store", "{store}", "--out", "run", "--set", "trainsteps", "--no-progress"), "expected section.key=value", ("run",)),
    C("pretrain-store-missing", ("pretrain", "--store", "nostore", "--out", "run", "--no-progress"), "store nostore does not exist", ("run", "nostore")),
    C("pretrain-resume-missing", ("pretrain", "--store", "{store}", "--out", "run", "--resume", "nockpt", "--no-progress"), "checkpoint nockpt does not exist", ("run",)),
    C("pretrain-broken-toml", ("pretrain", "--store", "{store}", "--out", "run", "--config", "cfg.toml", "--no-progress"), "cfg.toml: not valid TOML", ("run",), _bad_toml),
    # finetune
    C("finetune-unknown-tissue", ("finetune", "--store", "{store}", "--pretrained", "{pre}", "--tissue", "atlantis", "--out", "run", "--no-progress"), "tissue 'atlantis' is not in store", ("run",)),
    C("finetune-pretrained-missing", ("finetune", "--store", "{store}", "--pretrained", "nope", "--tissue", "{tissue}", "--out", "run", "--no-progress"), "--pretrained nope does not exist", ("run",)),
    C("finetune-bad-label-column", ("finetune", "--store", "{store}", "--pretrained", "{pre}", "--tissue", "{tissue}", "--label-column", "celltype", "--out", "run", "--no-progress"), "no label column 'celltype'", ("run",)),
    C("finetune-architecture-override", ("finetune", "--store", "{store}", "--pretrained", "{pre}", "--tissue", "{tissue}", "--out", "run", "--set", "model.d_model=128", "--no-progress"), "architecture comes from the pretrained model", ("run",)),
    C("finetune-unknown-holdout-donor", ("finetune", "--store", "{store}", "--pretrained", "{pre}", "--tissue", "{tissue}", "--holdout-donors", "nobody", "--out", "run", "--no-progress"), "held-out donors not found", ("run",)),
    C("finetune-h5ad-no-gene-overlap", ("finetune", "--h5ad", "in.h5ad", "--pretrained", "{pre}", "--out", "run", "--no-progress"), "are in the pretrained vocabulary", ("run",), _labelled_unknown_genes),
    C("finetune-out-not-writable", ("finetune", "--store", "{store}", "--pretrained", "{pre}", "--tissue", "{tissue}", "--out", "/proc/hiceller/run", "--no-progress"), "/proc is not writable"),
    C("finetune-zero-epochs", ("finetune", "--store", "{store}", "--pretrained", "{pre}", "--tissue", "{tissue}", "--out", "run", "--set", "finetune.epochs=0", "--no-progress"), "finetune.epochs: must be >= 1", ("run",)),
    # launch
    C("launch-node-rank-too-big", ("launch", "--store", "{store}", "--out", "run", "--hostfile", "{in}/hosts2", "--nodes", "2", "--no-ssh", "--node-rank", "2", "--master-addr", "node0"), "--node-rank 2 is outside 0..1", ("run",)),
    C("launch-zero-stage-7", ("launch", "--store", "{store}", "--out", "run", "--set", "deepspeed.zero_stage=7", "--device", "cpu"), "deepspeed.zero_stage: must be 0, 1, 2 or 3, got 7", ("run",)),
    C("launch-bad-hostfile-line", ("launch", "--store", "{store}", "--out", "run", "--hostfile", "{in}/hosts_bad"), "line 2: slots must be an integer", ("run",)),
    C("launch-missing-hostfile", ("launch", "--store", "{store}", "--out", "run", "--hostfile", "nohosts"), "hostfile nohosts does not exist", ("run",)),
    C("launch-fp16-on-cpu", ("launch", "--store", "{store}", "--out", "run", "--set", 'deepspeed.precision="fp16"', "--device", "cpu"), "fp16 needs CUDA", ("run",)),
    C("launch-zero-nodes", ("launch", "--store", "{store}", "--out", "run", "--nodes", "0", "--device", "cpu"), "--nodes must be >= 1", ("run",)),
    # export
    C("export-pretraining-checkpoint", ("export", "--checkpoint", "{pre}", "--out", "bundle", "--no-mlflow"), "fine-tune it first", ("bundle",)),
    C("export-missing-checkpoint", ("export", "--checkpoint", "nockpt", "--out", "bundle", "--no-mlflow"), "--checkpoint nockpt does not exist", ("bundle",)),
    C("export-out-not-writable", ("export", "--checkpoint", "{ft}", "--out", "/proc/hiceller/bundle", "--no-mlflow"), "/proc is not writable"),
    C("export-over-existing-bundle", ("export", "--checkpoint", "{ft}", "--out", "{bundle}", "--no-mlflow"), "already exists", ()),
    # annotate
    C("annotate-output-is-input", ("annotate", "--model", "{bundle}", "--input", "in.h5ad", "--output", "in.h5ad", "--no-progress"), "is the input file", (), _copy_query),
    C("annotate-output-is-folder", ("annotate", "--model", "{bundle}", "--input", "{in}/query.h5ad", "--output", "outdir", "--no-progress"), "is a folder; name a file", (), _folder),
    C("annotate-output-not-writable", ("annotate", "--model", "{bundle}", "--input", "{in}/query.h5ad", "--output", "/proc/hiceller/o.h5ad", "--no-progress"), "/proc is not writable"),
    C("annotate-plot-not-writable", ("annotate", "--model", "{bundle}", "--input", "{in}/query.h5ad", "--output", "o.h5ad", "--plot", "/proc/hiceller/umap.png", "--no-progress"), "/proc is not writable", ("o.h5ad",)),
    C("annotate-empty-query", ("annotate", "--model", "{bundle}", "--input", "{in}/empty.h5ad", "--output", "o.h5ad", "--no-progress"), "zero cells", ("o.h5ad",)),
    C("annotate-tampered-bundle", ("annotate", "--model", "{in}/tampered", "--input", "{in}/query.h5ad", "--output", "o.h5ad", "--no-progress"), "checksum mismatch for labels.json", ("o.h5ad",)),
    C("annotate-zero-gene-overlap", ("annotate", "--model", "{bundle}", "--input", "{in}/other_genes.h5ad", "--output", "o.h5ad", "--no-progress"), "gene overlap too small", ("o.h5ad",)),
    C("annotate-text-query", ("annotate", "--model", "{bundle}", "--input", "{in}/notes.h5ad", "--output", "o.h5ad", "--no-progress"), "not a readable .h5ad file", ("o.h5ad",)),
    C("annotate-pretraining-run", ("annotate", "--model", "{pre}", "--input", "{in}/query.h5ad", "--output", "o.h5ad", "--no-progress"), "checksums.sha256 is missing", ("o.h5ad",)),
    C("annotate-confidence-out-of-range", ("annotate", "--model", "{bundle}", "--input", "{in}/query.h5ad", "--output", "o.h5ad", "--min-confidence", "2", "--no-progress"), "--min-confidence must be in [0, 1]", ("o.h5ad",)),
    C("annotate-missing-gene-column", ("annotate", "--model", "{bundle}", "--input", "{in}/query.h5ad", "--output", "o.h5ad", "--gene-column", "symbol", "--no-progress"), "no column 'symbol'", ("o.h5ad",)),
    # embed
    C("embed-missing-file", ("embed", "--model", "{pre}", "--input", "missing.h5ad", "--output", "o.h5ad", "--no-progress"), "missing.h5ad: file does not exist", ("o.h5ad",)),
    C("embed-output-is-input", ("embed", "--model", "{pre}", "--input", "in.h5ad", "--output", "in.h5ad", "--no-progress"), "is the input file", (), _copy_query),
    C("embed-zero-gene-overlap", ("embed", "--model", "{pre}", "--input", "{in}/other_genes.h5ad", "--output", "o.h5ad", "--no-progress"), "gene overlap too small", ("o.h5ad",)),
    C("embed-missing-model", ("embed", "--model", "nomodel", "--input", "{in}/query.h5ad", "--output", "o.h5ad", "--no-progress"), "nomodel does not exist", ("o.h5ad",)),
    C("embed-empty-query", ("embed", "--model", "{bundle}", "--input", "{in}/empty.h5ad", "--output", "o.h5ad", "--no-progress"), "zero cells", ("o.h5ad",)),
    # evaluate
    C("evaluate-missing-label-column", ("evaluate", "--model", "{ft}", "--input", "{in}/query.h5ad", "--label-column", "truth", "--out", "ev"), "no label column 'truth'", ("ev",)),
    C("evaluate-missing-file", ("evaluate", "--model", "{ft}", "--input", "missing.h5ad", "--out", "ev"), "missing.h5ad: file does not exist", ("ev",)),
    C("evaluate-missing-model", ("evaluate", "--model", "nomodel", "--input", "{in}/query.h5ad", "--out", "ev"), "nomodel does not exist", ("ev",)),
    C("evaluate-out-not-writable", ("evaluate", "--model", "{ft}", "--input", "{in}/query.h5ad", "--out", "/proc/hiceller/ev"), "/proc is not writable"),
    C("ingest-store-not-writable", ("ingest", "--store", "/proc/hiceller/s", "in.h5ad", "--no-progress"), "/proc is not writable", (), _copy_query),
    C("evaluate-zero-batch-size", ("evaluate", "--model", "{ft}", "--input", "{in}/query.h5ad", "--batch-size", "0", "--out", "ev"), "--batch-size must be >= 1", ("ev",)),
]

ENTRY_POINTS = {"ingest", "synth", "info", "pretrain", "finetune", "launch", "export", "annotate", "evaluate", "embed"}


def test_failed_finetune_reruns_into_the_same_out(world: dict[str, Path], tmp_path: Path) -> None:
    """A fine-tuning refused after it created --out (the held-out donor does not exist) leaves it as it
    found it, so the corrected command runs into the same folder."""
    out = tmp_path / "run"
    out.mkdir()
    bad = hc("finetune", "--store", world["store"], "--pretrained", world["pre"], "--tissue", world["tissue"], "--out", out,
             "--holdout-donors", "nobody", "--no-progress", check=False)
    assert bad.returncode == 2 and out.is_dir() and not any(out.iterdir()), bad.stderr
    hc("finetune", "--store", world["store"], "--pretrained", world["pre"], "--tissue", world["tissue"], "--out", out,
       "--set", "finetune.epochs=1", "--set", "finetune.mining_rounds=0", "--no-progress")
    assert (out / "model" / "checksums.sha256").is_file()


def test_ui_on_a_busy_port_is_one_line(world: dict[str, Path]) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = hc("ui", "--run", world["pre"], "--port", str(port), check=False, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"hiceller ui: error: port {port} on 127.0.0.1 is in use; choose another with --port"]


def test_output_piped_to_head_is_no_traceback(world: dict[str, Path]) -> None:
    """`hiceller info | head -0`: the reader is gone before the first line; no traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "hiceller", "info", "--store", str(world["store"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 141) and "Traceback" not in err, err


def test_table_covers_every_entry_point():
    assert {c.argv[0] for c in CASES} == ENTRY_POINTS
    assert len({c.id for c in CASES}) == len(CASES) >= 24


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "case"
    d.mkdir()
    if case.setup is not None:
        case.setup(d)
    subs = {k: str(v) for k, v in world.items()} | {"d": str(d)}
    argv = [a.format(**subs) for a in case.argv]
    shared = {k: tree_snapshot(world[k]) for k in ("store", "pre", "ft", "in")}
    before = tree_snapshot(d)

    proc = hc(*argv, cwd=d, check=False, timeout=120)

    shown = f"argv: {argv}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, shown
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, shown
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"want exactly one stderr line\n{shown}"
    assert lines[0].startswith(f"hiceller {case.argv[0]}: error: "), shown
    assert case.match in lines[0], f"{case.match!r} not in the error line\n{shown}"
    for t in case.targets:
        assert not (d / t).exists(), f"{t} was left behind\n{shown}"
    assert tree_snapshot(d) == before, f"files were written in the case folder\n{shown}"
    for k, snap in shared.items():
        assert tree_snapshot(world[k]) == snap, f"the shared {k} was changed\n{shown}"
