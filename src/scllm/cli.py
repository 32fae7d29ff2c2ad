"""scllm command line: tools around the pipeline (the pipeline itself runs with snakemake)."""

from __future__ import annotations

import argparse
import sys

from scllm import __version__
from scllm.config import EmbedConfig  # defaults; no torch import (scllm.eval.embed has one)
from scllm.errors import REFUSALS
from scllm.files import setup_logging


def _cells(text: str) -> int:
    """argparse type of --batch-size and --chunk-size: a whole number of cells, at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be a whole number of cells, at least 1 (got {text})"
        )
    return value


def _fraction(text: str) -> float:
    """argparse type of --min-coverage: a fraction between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1 (got {text})")
    return value


def _build_census(args: argparse.Namespace) -> None:
    from scllm.prep.store import build_local_census

    build_local_census(
        args.h5ad,
        args.out,
        dataset_id=args.dataset_id,
        dataset_title=args.dataset_title,
        donor_id=args.donor_id,
        donor_column=args.donor_column,
        cell_type_column=args.cell_type_column,
        gene_id_column=args.gene_id_column,
        counts_layer=args.counts_layer,
        tissue_general=args.tissue_general,
        disease=args.disease,
        organism=args.organism,
        overwrite=args.overwrite,
        flags=True,  # messages name this command's flags, not the workflow's config keys
    )
    print(
        f"Wrote a Census-shaped store to {args.out}. "
        f"Use it with census.source: uri and census.uri: {args.out}"
    )


def _embed(args: argparse.Namespace) -> None:
    from scllm.eval.embed import embed_h5ad

    summary = embed_h5ad(
        args.model_dir,
        args.h5ad,
        args.out,
        gene_id_column=args.gene_id_column,
        counts_layer=args.counts_layer,
        min_coverage=args.min_coverage,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        device=args.device,
        overwrite=args.overwrite,
    )
    print(
        f"Embedded {summary['n_cells']} cells with {args.model_dir}: vocabulary coverage "
        f"{summary['n_found']}/{summary['n_vocab']} ({summary['coverage']:.1%}), "
        f"genes matched by {summary['gene_match']}. "
        f"Wrote obsm['X_scllm'] ({summary['n_cells']} x {summary['dim']}) and obs to {args.out}"
    )


def _data_folders(args: argparse.Namespace) -> None:
    from scllm.provenance import data_folder_use

    folders = data_folder_use(args.results)
    if not folders:
        print(f"{args.results}/data holds no data stage folders")
        return
    width = max(len(str(f["folder"])) for f in folders)
    print(f"{'folder':<{width}}  {'size':>9}  read by")
    for f in folders:
        runs = ", ".join(f["runs"]) or "no run"
        print(f"{str(f['folder']):<{width}}  {_size(f['bytes']):>9}  {runs}")
    unread = [f for f in folders if not f["runs"]]
    if unread:
        print(
            f"{len(unread)} of {len(folders)} folders ({_size(sum(f['bytes'] for f in unread))}) "
            "are read by no run's run.json: left by runs since changed, removed or failed, or "
            "made by a run whose data stages are still running (it writes run.json when they "
            "end). Remove one with rm -r when no run of yours is running."
        )


def _size(n_bytes: int) -> str:
    """A size in bytes as people read it: 12.3 MB, 4.56 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{n_bytes} B"


def main(argv: list[str] | None = None) -> int:
    """Run one ``scllm`` command (``build-census``, ``embed``, ``data-folders``) as the command
    line does.

    A refusal (the project's errors, and ValueError, RuntimeError or FileNotFoundError) is
    printed to stderr as one line, ``scllm <command>: error: <message>``, never as a
    traceback; any other error is a bug and propagates.

    Parameters
    ----------
    argv : list of str, optional
        The arguments after the program name; None: ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0 when the command ran, 1 when it was refused.

    Raises
    ------
    SystemExit
        From argparse: status 2 for invalid arguments (with the usage), 0 after ``--help`` or
        ``--version``.
    """
    parser = argparse.ArgumentParser(prog="scllm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_build_census(commands)
    _add_embed(commands)
    folders = commands.add_parser(
        "data-folders",
        help="list the data stages' folders under results/data, their size and the runs that "
        "read them",
        description="List results/data/<stage>-<key>/ folders with their size and the runs whose "
        "run.json names them, to find the ones no run reads any more. Deletes nothing.",
    )
    folders.add_argument(
        "--results", default="results", help="the results folder (default: %(default)s)"
    )
    folders.set_defaults(func=_data_folders)

    args = parser.parse_args(argv)
    setup_logging()
    try:
        args.func(args)
    except REFUSALS as err:
        print(f"scllm {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


def _add_build_census(commands) -> None:
    build = commands.add_parser(
        "build-census",
        help="build a local Census-shaped SOMA store from an h5ad of raw counts",
        description="Write a SOMA store with the CELLxGENE Census layout from an h5ad of raw "
        "counts, so the pipeline samples your cells through the same code path as the real "
        "Census. Census obs columns already in the file (dataset_id, donor_id, tissue_general, "
        "is_primary_data, disease, cell_type) are kept; the options fill in missing ones.",
    )
    build.add_argument("h5ad", help="input h5ad with raw integer counts in X (or --counts-layer)")
    build.add_argument(
        "out",
        help="folder of the store to write; it must not exist yet (see --overwrite). A file, a "
        "folder holding the input and any folder that is not such a store are never replaced",
    )
    build.add_argument(
        "--dataset-id", help="dataset id for every cell (default: obs.dataset_id or the file name)"
    )
    build.add_argument("--dataset-title", default="")
    build.add_argument(
        "--donor-id", help="donor id for every cell (default: obs.donor_id or 'donor_0')"
    )
    build.add_argument("--donor-column", help="obs column holding each cell's donor")
    build.add_argument("--cell-type-column", help="obs column holding cell-type labels")
    build.add_argument("--gene-id-column", help="var column of Ensembl ids (default: detected)")
    build.add_argument("--counts-layer", help="layer holding raw counts (default: X)")
    build.add_argument("--tissue-general", default="blood")
    build.add_argument("--disease", default="normal")
    build.add_argument("--organism", default="homo_sapiens")
    build.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it holds a store that scllm build-census built earlier",
    )
    build.set_defaults(func=_build_census)


def _add_embed(commands) -> None:
    embed = commands.add_parser(
        "embed",
        help="embed the cells of an h5ad with a pretrained model "
        "(cell embeddings in obsm['X_scllm'])",
        description="Map the genes of an h5ad to the model's vocabulary (Ensembl ids in var_names "
        "or a var column, or symbols as in the model's genes.tsv), normalize and bin each cell as "
        "in training, and write the cell embeddings to obsm['X_scllm'] of OUT (with the input's "
        "obs). Reads the input in row chunks. Fails with the coverage figure if too few "
        "vocabulary genes are found.",
    )
    embed.add_argument(
        "model_dir",
        help="a pretrain output directory (best_model.pt, args.json, vocab.json, genes.tsv)",
    )
    embed.add_argument("h5ad", help="input h5ad with counts in X (or --counts-layer), all genes")
    embed.add_argument(
        "out",
        help="h5ad to write (obs of the input, obsm['X_scllm']); it must not exist yet (see "
        "--overwrite). The input, the model folder or anything in it, a folder and any file "
        "that scllm embed did not write are never replaced",
    )
    embed.add_argument(
        "--gene-id-column",
        help="var column identifying genes, or 'index' for var_names "
        "(default: whichever of var_names and the var columns matches the most vocabulary genes)",
    )
    embed.add_argument("--counts-layer", help="layer holding the counts (default: X)")
    embed.add_argument(
        "--min-coverage",
        type=_fraction,
        default=EmbedConfig.min_coverage,
        help="minimum fraction of vocabulary genes found (default: %(default)s)",
    )
    embed.add_argument(
        "--batch-size",
        type=_cells,
        default=EmbedConfig.batch_size,
        help="cells per forward pass (default: %(default)s)",
    )
    embed.add_argument(
        "--chunk-size",
        type=_cells,
        default=EmbedConfig.chunk_size,
        help="cells read at a time (default: %(default)s)",
    )
    embed.add_argument("--device", choices=["auto", "cpu", "cuda"], default=EmbedConfig.device)
    embed.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it is an h5ad that scllm embed wrote earlier",
    )
    embed.set_defaults(func=_embed)


if __name__ == "__main__":
    sys.exit(main())
