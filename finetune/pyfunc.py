"""The MLflow pyfunc face of a bundle.

Input: a cells x genes pandas DataFrame whose columns are gene names (dense or with sparse
columns), or a scipy sparse matrix with ``params={"genes": [...]}``. Output: a DataFrame with
``label``, ``confidence`` and ``embedding`` (a list of floats per cell).

Logged as models-from-code (finetune/pyfunc_model.py), never pickled: the logged model holds that
file and the bundle as its ``bundle`` artifact, verified against its checksums at every load.
"""

from __future__ import annotations

import warnings
from typing import Any

import anndata as ad
import mlflow.pyfunc
import numpy as np
import pandas as pd
import scipy.sparse as sp
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec

from finetune.annotate import Annotator

__all__ = ["CellerPyfunc", "signature", "frame_to_anndata"]


def signature():
    # Inputs are left open (gene columns differ per query); the params are typed.
    params = ParamSchema([ParamSpec("batch_size", "long", 256), ParamSpec("min_confidence", "double", 0.0)])
    return ModelSignature(inputs=None, outputs=None, params=params)


def frame_to_anndata(data: Any, genes: list[str] | None = None):
    if isinstance(data, pd.DataFrame):
        if hasattr(data, "sparse") and all(isinstance(t, pd.SparseDtype) for t in data.dtypes):
            X = sp.csr_matrix(data.sparse.to_coo())
        else:
            X = sp.csr_matrix(data.to_numpy(dtype=np.float32))
        var = pd.DataFrame(index=[str(c) for c in data.columns])
        obs = pd.DataFrame(index=[str(i) for i in data.index])
        return ad.AnnData(X=X.astype(np.float32), obs=obs, var=var)
    if sp.issparse(data):
        if not genes or len(genes) != data.shape[1]:
            raise ValueError("a sparse matrix input needs params={'genes': [...]} naming its columns")
        return ad.AnnData(X=sp.csr_matrix(data, dtype=np.float32), var=pd.DataFrame(index=genes))
    raise TypeError(f"expected a DataFrame with gene-name columns or a sparse matrix, got {type(data).__name__}")


# MLflow inspects predict's type hints when the class is defined and, finding none, advises adding
# them (through its own "once" filter, so warning filters cannot hide it): recorded and dropped here.
# Hints would switch on MLflow's input checks, which the signature (a DataFrame of gene columns, or a
# sparse matrix with params) does not fit.
with warnings.catch_warnings(record=True):

    class CellerPyfunc(mlflow.pyfunc.PythonModel):
        def load_context(self, context) -> None:
            # load_bundle verifies checksums first: a changed artifact is an InputError, as in annotate
            self.annotator = Annotator.load(context.artifacts["bundle"])

        def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
            params = params or {}
            adata = frame_to_anndata(model_input, params.get("genes"))
            out = self.annotator.annotate(
                adata, batch_size=int(params.get("batch_size", 256)), min_confidence=float(params.get("min_confidence", 0.0))
            )
            return pd.DataFrame(
                {
                    "label": out.obs["celler_label"].astype(str).to_numpy(),
                    "confidence": out.obs["celler_confidence"].to_numpy(dtype=np.float64),
                    "embedding": list(out.obsm["X_celler"].astype(np.float64)),
                },
                index=out.obs_names,
            )
