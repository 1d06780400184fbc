"""The README's walk-through, run command by command on tiny data, so the README cannot drift.

Every command of the README's "Walk-through" bash block runs as written, with only these changes,
all listed in ``SUBSTITUTIONS`` / ``SHRINK``: the input files it names are small generated .h5ad
files, the corpus is 1,500 synthetic cells, and runs are a few steps long. The Python snippet after
it runs too. A command the README adds later is run the same way (or fails here until it can be).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from _ds import cleanup_shm, ds_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SUBSTITUTIONS = {
    "../shared/data/baron_human_pancreas_came_counts.h5ad": "reference.h5ad",
    "--cells 30000": "--cells 1500 --genes 1000 --tissues 6",
}
# Appended to a command by its subcommand: a few steps instead of hundreds.
SHRINK = {
    "pretrain": ["--set", "train.steps=4", "--set", "train.checkpoint_every=2", "--no-progress"],
    "launch": ["--set", "train.steps=4", "--set", "train.checkpoint_every=2"],
    "finetune": ["--set", "finetune.epochs=1", "--set", "finetune.mining_epochs=1", "--no-progress"],
}


def readme_block(title: str, lang: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(title):]
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert match, f"README: no {lang} block after {title!r}"
    return match.group(1)


def walkthrough_commands() -> list[list[str]]:
    """The walk-through's commands: continuation lines joined, comments and `source` dropped."""
    joined = readme_block("## Walk-through", "bash").replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not line or line.startswith("source "):
            continue
        for old, new in SUBSTITUTIONS.items():
            line = line.replace(old, new)
        commands.append(shlex.split(line))
    return commands


def write_h5ad(path: Path, n: int, genes: list[str], labels: bool, seed: int, log: bool = False) -> None:
    """Counts (or log1p-normalised values) whose cell types show in a few marker genes each."""
    rng = np.random.default_rng(seed)
    types = np.array(["alpha", "beta", "delta"])
    y = rng.integers(0, 3, n)
    rate = np.full((3, len(genes)), 0.5)
    for c in range(3):
        rate[c, c * 10 : c * 10 + 10] = 6.0
    x = rng.poisson(rate[y]).astype(np.float32)
    if log:
        x = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
    obs = pd.DataFrame({"batch": [f"d{i % 2}" for i in range(n)]}, index=[f"c{i}" for i in range(n)])
    obs["cell_type"] = types[y] if labels else "unlabeled"
    ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)


# Files the README's commands read that come from the corpus once it exists: the held-out donor of
# the tissue the README fine-tunes on, with its labels, for `hiceller evaluate`.
FROM_CORPUS = {
    "labelled_query.h5ad": ["store", "export", "--store", "corpus", "--filter", 'tissue == "lung" and donor_id == "lung-donor1"'],
}


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    if cmd[0] == "hiceller":
        cmd = [str(BIN / "hiceller"), *cmd[1:]]
        cmd += SHRINK.get(cmd[1], [])
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"README command failed: {shlex.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def serve_ui(cmd: list[str], cwd: Path, env: dict) -> None:
    """`hiceller ui` serves until stopped: it must come up and answer on its port."""
    import urllib.request

    port = "5077"
    p = subprocess.Popen([str(BIN / "hiceller"), *cmd[1:], "--port", port], cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    assert r.status == 200
                    return
            except OSError:
                time.sleep(1)
        pytest.fail(f"`{shlex.join(cmd)}` did not answer on port {port}")
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=30)


@pytest.mark.slow
def test_readme_walkthrough_runs(tmp_path):
    genes = [f"GENE{i}" for i in range(40)] + ["INS", "GCG", "SST"]
    write_h5ad(tmp_path / "reference.h5ad", 300, genes, labels=True, seed=0)
    write_h5ad(tmp_path / "unlabeled.h5ad", 200, genes, labels=False, seed=1)
    write_h5ad(tmp_path / "labelled.h5ad", 300, genes, labels=True, seed=2)
    write_h5ad(tmp_path / "query.h5ad", 80, [g.lower() for g in genes], labels=False, seed=3, log=True)
    env = ds_env()
    commands = walkthrough_commands()
    assert len(commands) >= 12, commands
    try:
        for cmd in commands:
            for name, export in FROM_CORPUS.items():
                if name in cmd and not (tmp_path / name).exists():
                    run(["hiceller", *export, "--out", name], tmp_path, env)
            if cmd[:2] == ["hiceller", "ui"]:
                serve_ui(cmd, tmp_path, env)
            else:
                run(cmd, tmp_path, env)
        snippet = readme_block("From Python, CellTypist-style", "python")
        out = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    finally:
        cleanup_shm()
    annotated = ad.read_h5ad(tmp_path / "query_annotated.h5ad")
    assert {"celler_label", "celler_confidence"} <= set(annotated.obs) and "X_celler" in annotated.obsm
