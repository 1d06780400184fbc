"""The MLflow UI as a user sees it: `hiceller ui` served, pages rendered by headless Chromium.

A pretraining run and a fine-tuning run nested under it (with a round child and a picture) are logged
through HiCeller's own Tracker into one SQLite store; `hiceller ui` serves that store, and Chromium
renders the runs page and the fine-tuning run's page after their JavaScript ran. The test checks the
rendered DOM (run names, the nesting, the metric, the artifact) and keeps PNG screenshots of both
pages (in the test's tmp folder, or in $HICELLER_SCREENSHOTS when set). It skips with the reason when
no Chromium / Chrome is installed (`apt-get install chromium`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pretrain.tracking import Tracker

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


@pytest.fixture(scope="module")
def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"no headless browser found (looked for {', '.join(BROWSERS)}; apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _render(browser: str, url: str, png: Path, tmp: Path) -> str:
    """The page's DOM after its scripts ran, and a screenshot of it at ``png``."""
    base = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            f"--user-data-dir={tmp / 'profile'}", "--window-size=1400,900", "--virtual-time-budget=20000"]
    subprocess.run(base + [f"--screenshot={png}", url], capture_output=True, timeout=120, check=True)
    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120, check=True)
    png.with_suffix(".html").write_text(dom.stdout)
    return dom.stdout


def _log_runs(tmp: Path, uri: str) -> dict[str, str]:
    """A pretraining run, a fine-tuning run under it and a round under that, as the commands log them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre = Tracker(tmp / "pre", True, uri, run_name="pre-browser")
    pre.log_params({"model.d_model": 64})
    for step in range(1, 6):
        pre.log_metrics({"train/loss": 2.0 / step}, step)
    pre.finish()
    ft = Tracker(tmp / "ft", True, uri, run_name="ft-browser", parent_run_id=pre.run_id)
    ft.log_metrics({"test/macro_f1": 0.875}, 0)
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot(np.arange(5), 1 / (1 + np.arange(5)))
    fig.savefig(tmp / "loss_curve.png")
    plt.close(fig)
    ft.log_artifact(tmp / "loss_curve.png", "plots")
    rnd = ft.child(tmp / "ft" / "round1", "round1-browser", "mlflow_run_id")
    rnd.log_metrics({"val/macro_f1": 0.8}, 0)
    rnd.finish()
    ft.finish()
    return {"pre": pre.run_id, "ft": ft.run_id, "experiment": ft.experiment_id}


def test_runs_page_and_run_page_render(browser: str, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ids = _log_runs(tmp_path, uri)
    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "hiceller", "ui", "--tracking-uri", uri, "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        printed = ui.stdout.readline()  # "MLflow UI of URI on URL (Ctrl-C to stop)"
        url = printed.split(" on ", 1)[1].split()[0]
        assert url == f"http://127.0.0.1:{port}/#/experiments/{ids['experiment']}/runs?workflowType=machine_learning", printed
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                assert ui.poll() is None, ui.stdout.read()
                assert time.monotonic() < deadline, "hiceller ui did not answer within 120 s"
                time.sleep(0.5)
        shots = Path(os.environ.get("HICELLER_SCREENSHOTS") or tmp_path)
        shots.mkdir(parents=True, exist_ok=True)
        base = f"http://127.0.0.1:{port}/#/experiments/{ids['experiment']}"
        view = "?workflowType=machine_learning"  # MLflow 3's model-training view (hiceller ui prints it)

        runs_dom = _render(browser, url, shots / "ui_runs.png", tmp_path)
        # the pretraining run on top, the fine-tuning run and its round nested (collapsed) under it
        assert "pre-browser" in runs_dom and "<strong>3</strong> matching runs" in runs_dom, "runs page without the runs"
        run_dom = _render(browser, f"{base}/runs/{ids['ft']}{view}", shots / "ui_run.png", tmp_path)
        assert "ft-browser" in run_dom
        assert "pre-browser" in run_dom, "the run page does not link the parent (pretraining) run"
        assert "test/macro_f1" in run_dom

        from PIL import Image

        for png in ("ui_runs.png", "ui_run.png"):
            pixels = np.asarray(Image.open(shots / png).convert("L"), dtype=np.float32)
            assert pixels.shape == (900, 1400), png
            assert pixels.std() > 5, f"{png} is blank"
    finally:
        ui.terminate()
        ui.wait(timeout=30)
