"""Bundles written by older code keep loading and annotate the same (tests/assets/make_bundle_v1.py)."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from finetune.annotate import Annotator

ASSETS = Path(__file__).parent / "assets"


def fixed_query() -> ad.AnnData:
    """30 cells of counts over the fixture's genes (lower-case, as users hand them in) plus 3 unknown genes."""
    rng = np.random.default_rng(7)
    genes = [f"gene{i}" for i in range(20)] + ["OTHER1", "OTHER2", "OTHER3"]
    x = sp.csr_matrix(rng.poisson(1.5, (30, len(genes))).astype(np.float32))
    return ad.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(30)]), var=pd.DataFrame(index=genes))


def test_bundle_v1_loads_and_annotates_as_it_did():
    ann = Annotator.load(ASSETS / "bundle_v1")
    assert ann.spec.head == "transformer" and ann.labels == ["alpha", "beta", "rare"]
    assert ann.spec.input_genes == [f"GENE{i}" for i in range(12)]
    proba, emb = ann.predict_proba(fixed_query())
    expected = json.loads((ASSETS / "bundle_v1_expected.json").read_text())
    np.testing.assert_allclose(proba, np.array(expected["proba"]), atol=1e-6)
    # cells differ in their embeddings by ~1e-4 here, so a change in what the encoder reads shows
    np.testing.assert_allclose(emb, np.array(expected["emb"]), atol=2e-6)
