"""Fixtures shared by every test module; the helpers themselves live in tests/_fixtures.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

# Paths only: importing tests/_fixtures here would load anndata and tiledbsoma into every session.
REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Every command logs to the workspace's MLflow store (pretrain/tracking.py): for the test session
# that is a folder of its own, never ./mlflow.db of the checkout (subprocesses inherit it).
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ["HICELLER_WORKSPACE"] = tempfile.mkdtemp(prefix="hiceller-test-workspace-")


@pytest.fixture(autouse=True)
def _mlflow_home_per_test() -> Iterator[None]:
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI (for subprocesses): a command run in
    this process would otherwise hand its store to every later test's subprocess."""
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository; the test is skipped when it is absent (a fresh clone)."""
    if not SHARED_DATA.is_dir() or not any(SHARED_DATA.glob("*.h5ad")):
        pytest.skip(f"shared data not found at {SHARED_DATA} (real .h5ad files live beside the project)")
    return SHARED_DATA


@pytest.fixture()
def in_process(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``run(*args) -> (exit code, stdout, stderr)`` through hiceller.cli.main in this process: the
    handler the console script runs, without paying for a Python start per call. Tests of what a
    real process prints (tracebacks, exit codes of a killed run) use _fixtures.run_hiceller."""
    from hiceller.cli import main

    def run(*args: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main([str(a) for a in args])
        cap = capsys.readouterr()
        return rc, cap.out, cap.err

    return run
