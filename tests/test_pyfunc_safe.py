"""The MLflow model of a bundle holds no pickle (models-from-code) and refuses a changed bundle at load."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from finetune.annotate import Annotator
from finetune.export import PYFUNC_ENTRY, log_pyfunc
from hiceller.errors import InputError

BUNDLE = Path(__file__).resolve().parent / "assets" / "bundle_v1"
PICKLE_SUFFIXES = {".pkl", ".pickle", ".cloudpickle", ".joblib", ".dill"}


def _logged(tmp_path: Path, name: str) -> tuple[str, Path]:
    """Log and register the small v1 bundle; its uri and the logged model's folder in the artifact store."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_pyfunc(BUNDLE, uri, name)
    source = mlflow.MlflowClient(uri).get_model_version(name, "1").source  # models:/m-<id>
    mlflow.set_tracking_uri(uri)  # get_logged_model reads the global store (log_pyfunc leaves it as it was)
    folder = mlflow.get_logged_model(source.removeprefix("models:/")).artifact_location
    return uri, Path(folder.removeprefix("file://"))


def _is_pickle(path: Path) -> bool:
    if path.suffix in PICKLE_SUFFIXES:
        return True
    if path.suffix == ".safetensors":  # an 8-byte header length may begin with 0x80
        return False
    head = path.read_bytes()[:2]
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # pickle protocols 2-5


def test_logged_model_is_code_and_safetensors_without_pickle(tmp_path):
    import mlflow

    uri, folder = _logged(tmp_path, "celler-safe")
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files and not [p for p in files if _is_pickle(p)]
    pyfunc = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in pyfunc
    assert (folder / PYFUNC_ENTRY.name).read_text() == PYFUNC_ENTRY.read_text()
    assert {p.name for p in (folder / pyfunc["artifacts"]["bundle"]["path"]).iterdir()} == {p.name for p in BUNDLE.iterdir()}

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/celler-safe/1")
    rng = np.random.default_rng(3)
    genes = json.loads((BUNDLE / "vocab.json").read_text())
    frame = pd.DataFrame(rng.poisson(1.5, (12, len(genes))).astype(np.float32), columns=genes,
                         index=[f"c{i}" for i in range(12)])
    pred = model.predict(frame)
    query = ad.AnnData(X=sp.csr_matrix(frame.to_numpy()), obs=pd.DataFrame(index=frame.index), var=pd.DataFrame(index=genes))
    direct = Annotator.load(BUNDLE).annotate(query, min_confidence=0.0)
    assert list(pred["label"]) == list(direct.obs["celler_label"].astype(str))
    np.testing.assert_allclose(pred["confidence"].to_numpy(), direct.obs["celler_confidence"].to_numpy(), atol=1e-6)


def test_tampered_bundle_artifact_refused_at_load(tmp_path, in_process):
    import mlflow

    uri, folder = _logged(tmp_path, "celler-tampered")
    labels_file = next(folder.rglob("labels.json"))
    labels = json.loads(labels_file.read_text())
    labels["names"][0] = "evil"
    labels_file.write_text(json.dumps(labels))

    mlflow.set_tracking_uri(uri)
    with pytest.raises(InputError, match="checksum mismatch for labels.json"):
        mlflow.pyfunc.load_model("models:/celler-tampered/1")
    q = tmp_path / "q.h5ad"
    genes = json.loads((BUNDLE / "vocab.json").read_text())
    ad.AnnData(X=np.ones((3, len(genes)), dtype=np.float32), var=pd.DataFrame(index=genes)).write_h5ad(q)
    rc, _, err = in_process("annotate", "--model", "models:/celler-tampered/1", "--tracking-uri", uri,
                            "--input", q, "--output", tmp_path / "out.h5ad", "--no-progress")
    assert rc == 2 and "checksum mismatch for labels.json" in err


def test_logging_leaves_the_process_tracking_uri_as_it_was(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; an export must not hand its store to
    whatever this process starts next."""
    import os

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'home.db'}")
    log_pyfunc(BUNDLE, f"sqlite:///{tmp_path / 'other.db'}", None)
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'home.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    log_pyfunc(BUNDLE, f"sqlite:///{tmp_path / 'other.db'}", None)
    assert "MLFLOW_TRACKING_URI" not in os.environ
