"""`hiceller ingest`, `synth`, `info`, `store optimize`, `store export`: their arguments and handlers
(a handler imports TileDB-SOMA and the rest only when it runs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hiceller.errors import InputError

__all__ = ["register"]


def _none_or(value: str) -> str | None:
    return None if value.lower() == "none" else value


def register(sub: argparse._SubParsersAction) -> None:
    _add_ingest(sub)
    _add_store(sub)
    _add_synth_info(sub)


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="append .h5ad files to a TileDB-SOMA corpus store (one dataset per file)",
        description="Validate each .h5ad fully, then append the files to the store in batches of cells. "
        "Nothing is written when any file is bad; an interrupted ingest is finished by re-running it "
        "(datasets already complete from the same file are skipped).",
    )
    p.add_argument("--store", required=True, help="store directory or s3:// URI (created if missing)")
    p.add_argument("files", nargs="*", type=Path, metavar="FILE.h5ad")
    p.add_argument(
        "--manifest",
        type=Path,
        help="TSV of files to ingest: a 'path' column, and optional dataset_id, tissue, disease, label, batch, "
        "gene_list columns per file (empty cells take the flags below)",
    )
    p.add_argument("--label-column", default="cell_type", type=_none_or, help="obs label column, or 'none' (default: cell_type)")
    p.add_argument("--batch-column", default="batch", type=_none_or, help="obs column stored as donor_id (default: batch)")
    p.add_argument("--tissue", help="tissue of every cell (else obs['tissue'] or 'unknown')")
    p.add_argument("--disease", help="disease of every cell (else obs['disease'] or 'unknown')")
    p.add_argument("--dataset-id", help="dataset id (default: the file name without .h5ad)")
    p.add_argument("--gene-column", help="var column of gene ids to use instead of upper-cased var_names")
    p.add_argument(
        "--gene-list",
        metavar="NAME",
        help="the files share one gene list (same var names in the same order): the first is read in full, the "
        "others checked by gene count and 64 sampled names (saves ~6-9 ms a file); not with --gene-column",
    )
    p.add_argument("--require-overlap", action="store_true", help="refuse a file sharing no gene with a non-empty store")
    p.add_argument("--skip-existing", action="store_true", help="skip files whose dataset id is already complete")
    p.add_argument("--chunk-nnz", type=int, default=None, help="non-zeros per write chunk (memory bound)")
    p.add_argument("--no-optimize", action="store_true", help="do not optimize what this ingest wrote, even when it wrote many fragments")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_ingest)


def _add_store(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="store maintenance: `hiceller store optimize`, `hiceller store export`")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    o = actions.add_parser(
        "optimize",
        help="consolidate and vacuum the store's fragments (TileDB consolidation)",
        description="Merge the fragments, fragment footers, commits and array metadata that many writes leave, "
        "then vacuum what was merged. Safe to kill and re-run; CellStream readers keep reading meanwhile.",
    )
    o.add_argument("--store", required=True)
    o.add_argument(
        "--orphans-older-than",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="delete uncommitted fragments (left by killed writes) older than this (default: 3600)",
    )
    o.add_argument("--json", action="store_true", help="print one JSON object")
    o.set_defaults(func=_optimize)
    e = actions.add_parser(
        "export",
        help="write the store's cells that match an obs filter to an .h5ad",
        description="The matching cells with their obs columns and counts (or log-expression, as ingested), "
        "genes named as in the store: e.g. one donor's cells to annotate, or a subset to share.",
    )
    e.add_argument("--store", required=True)
    e.add_argument("--filter", required=True, metavar="EXPR", help='SOMA value filter on obs, e.g. \'tissue == "lung" and donor_id == "d1"\'')
    e.add_argument("--out", required=True, type=Path, help=".h5ad file to write (must not exist)")
    e.set_defaults(func=_export_cells)


def _add_synth_info(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--disease-states", action="store_true",
                   help="add disease-specific rare cell states (a common type's state seen only under one disease)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_synth)

    p = sub.add_parser("info", help="cells, genes, datasets and cells per tissue / disease / cell type of a store")
    p.add_argument("--store", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--top", type=int, default=15, help="rows per table in the text view")
    p.set_defaults(func=_info)


def _ingest(args: argparse.Namespace) -> int:
    from data_store.ingest import DEFAULT_CHUNK_NNZ, IngestOptions, ingest_sources
    from hiceller.progress import progress_factory

    if args.chunk_nnz is not None and args.chunk_nnz < 1:
        raise InputError(f"--chunk-nnz must be >= 1, got {args.chunk_nnz}")
    if bool(args.files) == bool(args.manifest):
        raise InputError("give either .h5ad files or --manifest FILE.tsv")
    if "://" not in args.store:  # a local store must be writable before any file is read
        from hiceller.paths import check_output_dir

        check_output_dir(Path(args.store), "--store")
    if args.manifest and args.dataset_id:
        raise InputError("--dataset-id names one file; a manifest has a dataset_id column")
    if args.gene_list and args.gene_column:
        raise InputError("--gene-list declares shared var names; it cannot be combined with --gene-column")
    opts = IngestOptions(
        label_column=args.label_column,
        batch_column=args.batch_column,
        tissue=args.tissue,
        disease=args.disease,
        dataset_id=args.dataset_id,
        gene_column=args.gene_column,
        gene_list=args.gene_list,
        require_overlap=args.require_overlap,
        skip_existing=args.skip_existing,
        chunk_nnz=args.chunk_nnz or DEFAULT_CHUNK_NNZ,
        optimize=not args.no_optimize,
    )
    bars = progress_factory(not args.no_progress)
    if args.manifest:
        from data_store.manifest import manifest_sources, read_manifest

        sources, labels = manifest_sources(read_manifest(args.manifest), opts, args.manifest)
        result = ingest_sources(args.store, sources, bars, labels, manifest=args.manifest)
    else:
        if opts.dataset_id and len(args.files) > 1:
            raise InputError("--dataset-id names one dataset; give one file with it")
        result = ingest_sources(args.store, [(f, opts) for f in args.files], bars)
    _print_ingest(result)
    return 0


def _print_ingest(result) -> None:
    many = len(result.done) > 20
    for rec in result.done if not many else []:
        extra = f"; {'; '.join(rec.notes)}" if rec.notes else ""
        print(f"ingested {rec.dataset_id}: {rec.n_cells} cells, {rec.n_genes} genes ({rec.new_genes} new), {rec.kind}{extra}")
    if many:
        noted = sum(1 for r in result.done if r.notes)
        print(f"ingested {len(result.done)} datasets: {sum(r.n_cells for r in result.done)} cells, "
              f"{sum(r.new_genes for r in result.done)} new genes ({noted} with notes: `hiceller info --json`)")
    if result.skipped:
        print(f"skipped {len(result.skipped)} dataset(s) already in the store")
    if not result.done:
        print("nothing to ingest: every dataset is already in the store")
    if result.optimized:
        o = result.optimized
        print(f"optimized what was written: {o['fragments_before']} -> {o['fragments_after']} fragments in {o['seconds']:.1f} s")


def _optimize(args: argparse.Namespace) -> int:
    from data_store.optimize import optimize_store

    if args.orphans_older_than < 0:
        raise InputError(f"--orphans-older-than must be >= 0, got {args.orphans_older_than}")
    report = optimize_store(args.store, orphan_age_s=args.orphans_older_than)
    if args.json:
        print(json.dumps(report.as_dict()))
        return 0
    frag = "" if report.fragments_before is None else f", fragments {report.fragments_before} -> {report.fragments_after}"
    files = "" if report.files_before is None else f", files TileDB lists {report.files_before} -> {report.files_after}"
    orphans = f", {report.orphans_removed} uncommitted fragments removed" if report.orphans_removed else ""
    print(f"optimized {report.store}: {report.arrays} arrays{frag}{files}{orphans} in {report.seconds:.1f} s")
    return 0


def _export_cells(args: argparse.Namespace) -> int:
    from data_store.store import CorpusStore

    if args.out.exists():
        raise InputError(f"--out {args.out} already exists")
    if args.out.suffix != ".h5ad":
        raise InputError(f"--out {args.out}: name an .h5ad file")
    store = CorpusStore.open(args.store)
    try:
        ids = store.obs(["soma_joinid"], value_filter=args.filter)["soma_joinid"].to_numpy()
    except Exception as e:  # SOMA's query-condition parser raises several types
        raise InputError(f"--filter {args.filter!r} cannot be used: {str(e).splitlines()[0]}") from None
    if ids.size == 0:
        raise InputError(f"no cell of {args.store} matches {args.filter!r}")
    adata = store.to_anndata(ids)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.partial")
    adata.write_h5ad(tmp)
    tmp.replace(args.out)
    print(f"wrote {adata.n_obs} cells x {adata.n_vars} genes to {args.out}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from data_store.synth import SynthSpec, synthesize
    from hiceller.progress import progress_factory

    spec = SynthSpec(n_cells=args.cells, n_genes=args.genes, n_tissues=args.tissues, n_diseases=args.diseases, seed=args.seed,
                     disease_states=args.disease_states)
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
