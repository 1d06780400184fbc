"""How tests/assets/legacy_store_v1 was made: a format-1 store (the registry as one JSON value in
the experiment's metadata), written by the data_store of commit d708f6c, the last one with that
format. Kept so that old stores stay tested against the code that reads them now.

Run with that commit's ``data_store`` first on ``sys.path``::

    git show d708f6c:data_store/store.py > OLD/data_store/store.py   # and ingest.py, __init__.py
    PYTHONPATH=OLD:. python tests/assets/make_legacy_store.py tests/assets/legacy_store_v1

Content (tests/test_registry.py checks it): datasets ``a`` (30 cells, an extra obs column) and
``b`` (20 cells) complete, ``c`` (10 cells) reserved and half written, as a killed ingest leaves it.
The sources are ``legacy_sources()`` of tests/_legacy.py, rebuilt identically by the tests.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from _legacy import legacy_sources  # noqa: E402
from data_store.ingest import IngestOptions, check_h5ad, ingest_files  # noqa: E402
from data_store.store import CorpusStore, DatasetRecord  # noqa: E402


def main(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        a, b, c = legacy_sources(Path(tmp))
        ingest_files(str(out), [a, b], IngestOptions())
        store = CorpusStore.open(out)
        check = check_h5ad(c, IngestOptions())
        ids, _ = store.extend_vocabulary(check.genes)
        rec = store.reserve_dataset(DatasetRecord(dataset_id="c", start=0, stop=check.n_cells, status="writing", fingerprint="killed"))
        import anndata as ad
        import scipy.sparse as sp

        X = sp.csr_matrix(ad.read_h5ad(c).X[:5])
        X.indices = ids[X.indices]
        X.sort_indices()
        store.write_chunk(rec, 0, X.indptr, X.indices, X.data, check.obs.iloc[:5])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
