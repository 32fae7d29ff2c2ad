"""``scllm`` command line: tools around the pipeline (the pipeline itself runs with snakemake)."""

from __future__ import annotations

import argparse
import sys

from scllm.io import setup_logging


def _build_census(args: argparse.Namespace) -> None:
    from scllm.census import build_local_census

    build_local_census(
        args.h5ad, args.out,
        dataset_id=args.dataset_id, dataset_title=args.dataset_title, donor_id=args.donor_id,
        donor_column=args.donor_column, cell_type_column=args.cell_type_column,
        gene_id_column=args.gene_id_column, counts_layer=args.counts_layer,
        tissue_general=args.tissue_general, disease=args.disease, organism=args.organism,
    )
    print(f"Wrote a Census-shaped store to {args.out}. Use it with census.source: uri and census.uri: {args.out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser(
        "build-census",
        help="build a local Census-shaped SOMA store from an h5ad of raw counts",
        description="Write a SOMA store with the CELLxGENE Census layout from an h5ad of raw counts, "
        "so the pipeline samples your cells through the same code path as the real Census. "
        "Census obs columns already in the file (dataset_id, donor_id, tissue_general, "
        "is_primary_data, disease, cell_type) are kept; the options fill in missing ones.",
    )
    build.add_argument("h5ad", help="input h5ad with raw integer counts in X (or --counts-layer)")
    build.add_argument("out", help="directory of the store to write")
    build.add_argument("--dataset-id", help="dataset id for every cell (default: obs.dataset_id or the file name)")
    build.add_argument("--dataset-title", default="")
    build.add_argument("--donor-id", help="donor id for every cell (default: obs.donor_id or 'donor_0')")
    build.add_argument("--donor-column", help="obs column holding each cell's donor")
    build.add_argument("--cell-type-column", help="obs column holding cell-type labels")
    build.add_argument("--gene-id-column", help="var column of Ensembl ids (default: detected)")
    build.add_argument("--counts-layer", help="layer holding raw counts (default: X)")
    build.add_argument("--tissue-general", default="blood")
    build.add_argument("--disease", default="normal")
    build.add_argument("--organism", default="homo_sapiens")
    build.set_defaults(func=_build_census)

    args = parser.parse_args(argv)
    setup_logging()
    try:
        args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"scllm {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
