"""`hiceller ingest`, `hiceller synth`, `hiceller info`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hiceller.errors import InputError

__all__ = ["register"]


def _none_or(value: str) -> str | None:
    return None if value.lower() == "none" else value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="append .h5ad files to a TileDB-SOMA corpus store (one dataset per file)",
        description="Validate each .h5ad fully, then append it to the store in chunks of cells. "
        "Nothing is written when any file is bad; an interrupted ingest is finished by re-running it.",
    )
    p.add_argument("--store", required=True, help="store directory or s3:// URI (created if missing)")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE.h5ad")
    p.add_argument("--label-column", default="cell_type", type=_none_or, help="obs label column, or 'none' (default: cell_type)")
    p.add_argument("--batch-column", default="batch", type=_none_or, help="obs column stored as donor_id (default: batch)")
    p.add_argument("--tissue", help="tissue of every cell (else obs['tissue'] or 'unknown')")
    p.add_argument("--disease", help="disease of every cell (else obs['disease'] or 'unknown')")
    p.add_argument("--dataset-id", help="dataset id (default: the file name without .h5ad)")
    p.add_argument("--gene-column", help="var column of gene ids to use instead of upper-cased var_names")
    p.add_argument("--require-overlap", action="store_true", help="refuse a file sharing no gene with a non-empty store")
    p.add_argument("--skip-existing", action="store_true", help="skip files whose dataset id is already complete")
    p.add_argument("--chunk-nnz", type=int, default=None, help="non-zeros per write chunk (memory bound)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_ingest)

    p = sub.add_parser(
        "synth",
        help="write a Celler-75-like synthetic corpus into a store",
        description="Long-tailed cell types per tissue, disease and donor effects, negative-binomial counts; "
        "deterministic for a seed; one dataset per tissue.",
    )
    p.add_argument("--store", required=True)
    p.add_argument("--cells", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--tissues", type=int, default=80)
    p.add_argument("--diseases", type=int, default=75)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_synth)

    p = sub.add_parser("info", help="cells, genes, datasets and cells per tissue / disease / cell type of a store")
    p.add_argument("--store", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--top", type=int, default=15, help="rows per table in the text view")
    p.set_defaults(func=_info)


def _ingest(args: argparse.Namespace) -> int:
    from data_store.ingest import DEFAULT_CHUNK_NNZ, IngestOptions, ingest_files
    from hiceller.progress import progress_factory

    if args.chunk_nnz is not None and args.chunk_nnz < 1:
        raise InputError(f"--chunk-nnz must be >= 1, got {args.chunk_nnz}")
    opts = IngestOptions(
        label_column=args.label_column,
        batch_column=args.batch_column,
        tissue=args.tissue,
        disease=args.disease,
        dataset_id=args.dataset_id,
        gene_column=args.gene_column,
        require_overlap=args.require_overlap,
        skip_existing=args.skip_existing,
        chunk_nnz=args.chunk_nnz or DEFAULT_CHUNK_NNZ,
    )
    done = ingest_files(args.store, args.files, opts, progress_factory(not args.no_progress))
    for rec in done:
        extra = f"; {'; '.join(rec.notes)}" if rec.notes else ""
        print(f"ingested {rec.dataset_id}: {rec.n_cells} cells, {rec.n_genes} genes ({rec.new_genes} new), {rec.kind}{extra}")
    if not done:
        print("nothing to ingest: every dataset is already in the store")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from data_store.synth import SynthSpec, synthesize
    from hiceller.progress import progress_factory

    spec = SynthSpec(n_cells=args.cells, n_genes=args.genes, n_tissues=args.tissues, n_diseases=args.diseases, seed=args.seed)
    done = synthesize(args.store, spec, progress_factory(not args.no_progress))
    print(f"synthesized {sum(r.n_cells for r in done)} cells in {len(done)} datasets into {args.store}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from data_store.store import CorpusStore

    summary = CorpusStore.open(args.store).summary()
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"store     {summary['store']}")
    print(f"cells     {summary['cells']:,}")
    print(f"genes     {summary['genes']:,}")
    print(f"datasets  {summary['datasets']}  donors {summary['donors']}")
    if summary["incomplete_datasets"]:
        print(f"incomplete (re-run their ingest): {', '.join(summary['incomplete_datasets'])}")
    for title, key in (("tissue", "cells_per_tissue"), ("disease", "cells_per_disease"), ("cell type", "cells_per_cell_type")):
        table = summary[key]
        print(f"\ncells per {title} ({len(table)}):")
        for k, v in list(table.items())[: args.top]:
            print(f"  {v:>10,}  {k}")
        if len(table) > args.top:
            print(f"  ... {len(table) - args.top} more (--json for all)")
    return 0
