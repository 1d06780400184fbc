"""The sources of tests/assets/legacy_store_v1 (a store in the format-1 layout), rebuilt identically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from _fixtures import count_value, gene_names, make_h5ad

LEGACY_STORE = Path(__file__).resolve().parent / "assets" / "legacy_store_v1"


def legacy_sources(tmp: Path) -> tuple[Path, Path, Path]:
    """Files ``a`` (30 cells, an extra obs column), ``b`` (20 cells, other genes) and ``c`` (10 cells)."""
    a, b, c = tmp / "a.h5ad", tmp / "b.h5ad", tmp / "c.h5ad"
    make_h5ad(a, 30, gene_names(12), count_value, seed=1, extra_obs={"n_counts": np.arange(30)})
    make_h5ad(b, 20, gene_names(12, start=6), count_value, seed=2)
    make_h5ad(c, 10, gene_names(8, start=3), count_value, seed=3)
    return a, b, c
