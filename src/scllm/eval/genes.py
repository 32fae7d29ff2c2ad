"""Which input column feeds each of the model's vocabulary genes: Ensembl ids (version suffixes
ignored) in var_names or any var column, or symbols as the model's genes.tsv lists them; the
match that finds the most vocabulary genes wins. Too few genes found is refused
(``GeneCoverageError``): missing genes read as "not expressed" to the model."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("scllm")

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


class GeneCoverageError(ValueError):
    """Too few of the model's vocabulary genes were found in the input."""


@dataclass
class GeneMapping:
    """Which input column feeds each vocabulary gene found."""

    token_ids: np.ndarray  # vocabulary token ids found, ascending
    columns: np.ndarray  # input column of each, same order
    n_vocab: int
    source: str  # e.g. "Ensembl ids in var['gene_ids']"
    missing_examples: list[str]
    n_duplicated: int = (
        0  # vocabulary genes found in more than one input column (the first is used)
    )

    @property
    def n_found(self) -> int:
        """How many vocabulary genes were found in the input."""
        return len(self.token_ids)

    @property
    def coverage(self) -> float:
        """The share of the vocabulary genes found in the input (0 to 1)."""
        return self.n_found / max(self.n_vocab, 1)

    def describe(self) -> str:
        """The mapping in words, for logs and messages.

        Returns
        -------
        str
            E.g. ``"1800 of 2000 vocabulary genes (90.0%), matched by Ensembl ids in
            var['gene_ids']"``.
        """
        return (
            f"{self.n_found} of {self.n_vocab} vocabulary genes ({self.coverage:.1%}), "
            f"matched by {self.source}"
        )


def model_genes(model_dir, vocab: dict[str, int]) -> pd.DataFrame:
    """The vocabulary genes (feature_id, feature_name, token_id) in token order.

    Parameters
    ----------
    model_dir : str or Path
        The model folder; its ``genes.tsv``, if there is one, gives the symbols.
    vocab : dict of str to int
        The model's vocabulary (``vocab.json``): Ensembl id -> token id; the special tokens
        (``<cls>``, ``<pad>``) are left out.

    Returns
    -------
    pandas.DataFrame
        One row per vocabulary gene, in token order: ``feature_id``, ``feature_name`` (NA for
        every gene when the folder has no ``genes.tsv``) and ``token_id``.

    Raises
    ------
    ValueError
        ``genes.tsv`` does not list the vocabulary's genes in token order (the folder mixes
        files of different runs).
    """
    path = Path(model_dir) / "genes.tsv"
    ids = [g for g, i in sorted(vocab.items(), key=lambda kv: kv[1]) if not g.startswith("<")]
    if path.exists():
        genes = pd.read_csv(path, sep="\t", dtype={"feature_id": str, "feature_name": str})
        if genes["feature_id"].tolist() != ids:
            raise ValueError(
                f"{path} does not list the genes of {Path(model_dir) / 'vocab.json'} in order; "
                "the model directory mixes files of different runs"
            )
    else:  # symbols unknown: Ensembl ids only
        genes = pd.DataFrame({"feature_id": ids, "feature_name": pd.NA})
    genes["token_id"] = [vocab[g] for g in genes["feature_id"]]
    return genes.reset_index(drop=True)


def _strip_version(values: np.ndarray) -> np.ndarray:
    return np.array([v.split(".")[0] if _ENSEMBL.match(v) else v for v in values], dtype=object)


def _first_positions(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Position of each key's first occurrence in ``values`` (-1 where absent)."""
    values = pd.Index(values)
    first = ~values.duplicated(keep="first")
    positions = np.flatnonzero(first)
    where = values[first].get_indexer(keys)
    return np.where(where >= 0, positions[np.maximum(where, 0)], -1)


def map_genes(
    var: pd.DataFrame, genes: pd.DataFrame, gene_id_column: str | None = None
) -> GeneMapping:
    """Map the input's genes (``var`` with its index as var_names) to the vocabulary.

    Looks at var_names and every text column of var (or only ``gene_id_column``; ``index`` means
    var_names), matching Ensembl ids (version suffixes dropped) against ``feature_id`` and other
    values against ``feature_name`` (symbols shared by several vocabulary genes are skipped),
    and keeps the candidate that finds the most vocabulary genes. Duplicate input genes: the
    first column counts.

    Parameters
    ----------
    var : pandas.DataFrame
        The input's genes: var_names as the index, and any var columns.
    genes : pandas.DataFrame
        The vocabulary genes, as ``model_genes`` returns them.
    gene_id_column : str, optional
        The one var column to match on (``"index"`` or ``"var_names"``: var_names); None: try
        var_names and every text column.

    Returns
    -------
    GeneMapping
        The best candidate's match, however few genes it found (``checked_mapping`` refuses a
        low coverage).

    Raises
    ------
    ValueError
        ``gene_id_column`` is not a column of ``var``.
    """
    if (
        gene_id_column is not None
        and gene_id_column not in ("index", "var_names")
        and gene_id_column not in var
    ):
        raise ValueError(
            f"var has no column {gene_id_column!r} (gene id column); available: "
            f"{['index'] + list(var.columns)}"
        )
    if gene_id_column in (None, "index", "var_names"):
        candidates = [("var_names", var.index)]
    else:
        candidates = []
    if gene_id_column is None:
        candidates += [
            (f"var[{c!r}]", var[c])
            for c in var.columns
            if var[c].dtype == object
            or isinstance(var[c].dtype, (pd.CategoricalDtype, pd.StringDtype))
        ]
    elif gene_id_column not in ("index", "var_names"):
        candidates = [(f"var[{gene_id_column!r}]", var[gene_id_column])]

    feature_ids = genes["feature_id"].to_numpy(dtype=object)
    names = genes["feature_name"]
    unique_name = names.notna() & ~names.duplicated(keep=False)
    best = None
    for label, values in candidates:
        values = np.asarray(values).astype(str)
        ids = _strip_version(values)
        for kind, keys, usable in (
            ("Ensembl ids", feature_ids, np.ones(len(genes), bool)),
            ("gene symbols", names.astype(str).to_numpy(dtype=object), unique_name.to_numpy()),
        ):
            positions = np.where(
                usable, _first_positions(ids if kind == "Ensembl ids" else values, keys), -1
            )
            score = (
                int((positions >= 0).sum()),
                kind == "Ensembl ids",
            )  # ties: ids, they are unambiguous
            if best is None or score > best[0]:
                matched = pd.Index(ids if kind == "Ensembl ids" else values)
                n_dup = int(
                    pd.Index(keys[positions >= 0]).isin(matched[matched.duplicated()]).sum()
                )
                best = (score, f"{kind} in {label}", positions, n_dup)
    if best is None:
        raise ValueError("var has no text column and no var_names to match genes on")
    _, source, positions, n_duplicated = best
    hit = positions >= 0
    missing = genes.loc[~hit, "feature_id"].head(3).tolist()
    return GeneMapping(
        token_ids=genes["token_id"].to_numpy()[hit].astype(np.int64),
        columns=positions[hit].astype(np.int64),
        n_vocab=len(genes),
        source=source,
        missing_examples=missing,
        n_duplicated=n_duplicated,
    )


def checked_mapping(
    var: pd.DataFrame,
    genes: pd.DataFrame,
    gene_id_column,
    where: str,
    n_cells: int,
    model_dir,
    min_coverage: float,
) -> GeneMapping:
    """``map_genes``, refused (GeneCoverageError) below ``min_coverage`` with what to do about
    it.

    Logs the coverage, and warns when vocabulary genes match several input columns or when
    more than a tenth of them is missing (they read as not expressed).

    Parameters
    ----------
    var, genes : pandas.DataFrame
        The input's genes and the vocabulary genes, as ``map_genes`` takes them.
    gene_id_column : str or None
        As in ``map_genes``.
    where : str
        The input, for messages (e.g. its path).
    n_cells : int
        The input's cells, for the log.
    model_dir : str or Path
        The model folder, whose ``genes.tsv`` the refusal points to.
    min_coverage : float
        The smallest share of vocabulary genes that must be found.

    Returns
    -------
    GeneMapping
        The mapping, with a coverage of at least ``min_coverage``.

    Raises
    ------
    GeneCoverageError
        The coverage is below ``min_coverage``; the message says how to identify the genes.
    ValueError
        ``gene_id_column`` is not a column of ``var``.
    """
    mapping = map_genes(var, genes, gene_id_column)
    if mapping.n_duplicated:
        log.warning(
            "embed: %d vocabulary genes match more than one column of %s (%s); the first column "
            "of each is used",
            mapping.n_duplicated,
            where,
            mapping.source,
        )
    log.info(
        "embed: %s: %d cells x %d genes; vocabulary coverage: %s",
        where,
        n_cells,
        len(var),
        mapping.describe(),
    )
    if mapping.coverage < min_coverage:
        raise GeneCoverageError(
            f"{where}: vocabulary coverage {mapping.coverage:.1%} is below the minimum "
            f"{min_coverage:.0%}: only {mapping.describe()} (best of var_names and the text "
            f"columns of var; missing e.g. {', '.join(mapping.missing_examples)}). Missing genes "
            "look unexpressed to the model, so these embeddings would not be comparable to those "
            "of the training cells. To fix: keep all genes of your data (do not subset to your "
            "own highly variable genes before embedding) and identify them the way the model "
            "does: Ensembl ids (e.g. ENSG00000163736) in var_names or a var column "
            "(--gene-id-column COLUMN), or symbols as in the feature_name column of "
            f"{Path(model_dir) / 'genes.tsv'}. --min-coverage lowers the threshold at your own "
            "risk."
        )
    if mapping.coverage < 0.9:
        log.warning(
            "embed: %d vocabulary genes are missing from %s and will read as not expressed",
            mapping.n_vocab - mapping.n_found,
            where,
        )
    return mapping
