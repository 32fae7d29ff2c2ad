"""Checks shared by every entry point: input counts, cell and gene ids, file digests, torch files.

An entry point that takes counts (``build_local_census``, ``sample_census`` on a store, ``scllm
embed``) calls ``check_cells_and_genes`` once and ``check_counts`` on every block it reads, so a
bad input is refused the same way wherever it comes in, before anything is written.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path

import numpy as np
import pandas as pd

from scllm.errors import CorruptArtifactError, InputError, UnsafeFileError

log = logging.getLogger("scllm")


def check_counts(values: np.ndarray, where: str, fix: str = "", *, integer: bool = True) -> None:
    """Counts must be finite and non-negative, and integers unless ``integer`` is False (``scllm
    embed`` also takes normalized values). HVG selection and QC thresholds assume raw counts;
    NaN or inf would silently become bins (or NaN embeddings)."""
    values = np.asarray(values)
    if _plainly_counts(values, integer):
        return
    finite = np.isfinite(values)
    safe = np.where(finite, values, 0)
    negative = safe < 0
    fractional = np.mod(safe, 1) != 0 if integer else np.zeros(values.shape, bool)
    bad = ~finite | negative | fractional
    if not bad.any():
        return
    kinds = [
        name
        for name, hit in (
            ("NaN or infinite", ~finite),
            ("negative", negative),
            ("non-integer", fractional),
        )
        if hit.any()
    ]
    if integer:
        need = "The pipeline needs raw counts, not normalized or log-transformed values" + (
            fix or ": use the raw count matrix of your data"
        )
        what = "non-negative integer counts"
    else:
        need = (
            "Embedding needs raw counts or normalized (log-transformed) values, not scaled or "
            "centred data and no missing values"
            + (fix or ": use the raw count matrix of your data")
        )
        what = "finite non-negative values"
    raise InputError(
        f"{where} holds values that are not {what} ({' and '.join(kinds)}, e.g. "
        f"{values[bad][:3].tolist()}). {need}."
    )


def _plainly_counts(values: np.ndarray, integer: bool) -> bool:
    """The quick test of check_counts for the common case, in a few passes over the values (the
    full test takes about ten and, run on every streamed block, was 10% of a stage's time).
    False means: look closely (which may still find nothing wrong)."""
    if values.size == 0:
        return True
    if values.dtype.kind in "ub":
        return True
    if values.dtype.kind == "i":
        return values.min() >= 0
    if values.dtype.kind != "f":
        return False
    # NaN fails the comparison; inf passes it but makes the sum infinite
    if not (values.min() >= 0 and np.isfinite(values.sum(dtype=np.float64))):
        return False
    return not integer or bool(np.array_equal(values, np.trunc(values)))


def check_cells_and_genes(cell_ids, gene_ids, where: str) -> pd.Index:
    """The whole input check on ids: at least one cell and one gene, unique gene ids, unique cell
    ids (made unique, logged). Returns the cell ids to use. ``gene_ids`` None: the caller maps
    genes itself and says how it treats duplicates."""
    require_cells(len(cell_ids), None if gene_ids is None else len(gene_ids), where)
    if gene_ids is not None:
        check_gene_ids(gene_ids, where)
    return unique_cell_ids(cell_ids, where)


def require_cells(n_cells: int, n_genes: int | None, where: str) -> None:
    if n_cells == 0:
        raise InputError(
            f"{where} holds no cells: there is nothing to process. Check that it is the file you "
            "meant, and that a subset taken before writing it kept some cells."
        )
    if n_genes == 0:
        raise InputError(
            f"{where} holds no genes (var is empty); write the file with its full gene matrix."
        )


def check_gene_ids(gene_ids, where: str, fix: str = "") -> None:
    """Refused, not made unique: which of two columns a gene id means is unknowable. ``fix``: how
    to drop the repeats where the ids came from (default: var_names)."""
    gene_ids = pd.Index(np.asarray(gene_ids).astype(str))
    if gene_ids.has_duplicates:
        dup = gene_ids[gene_ids.duplicated()].unique()
        raise InputError(
            f"{where}: {len(dup)} gene id(s) occur more than once (e.g. {dup[:3].tolist()}); "
            "genes are keyed on Ensembl ids, so each must name one column. "
            + (
                fix
                or "Drop the repeats, e.g. "
                "adata = adata[:, ~adata.var_names.duplicated()].copy(), or sum them, and rerun."
            )
        )


def unique_cell_ids(cell_ids, where: str) -> pd.Index:
    """Cell ids made unique as anndata's ``obs_names_make_unique`` does (the second occurrence of
    ``x`` becomes ``x-1``, the third ``x-2``, ...), with a warning. Duplicate ids (e.g. the same
    barcode in two 10x lanes) would otherwise be one cell to every later stage: in both train and
    validation, or matched to the wrong row."""
    from anndata.utils import make_index_unique

    cell_ids = pd.Index(np.asarray(cell_ids).astype(str))
    if not cell_ids.has_duplicates:
        return cell_ids
    dup = cell_ids[cell_ids.duplicated()].unique()
    unique = make_index_unique(cell_ids, join="-")
    log.warning(
        "%s: %d cell id(s) occur more than once (e.g. %s); made unique as anndata's "
        "obs_names_make_unique does: repeats get -1, -2, ... appended (e.g. %s). Give the cells "
        "unique ids to choose your own.",
        where,
        len(dup),
        dup[:3].tolist(),
        unique[cell_ids.duplicated()][:3].tolist(),
    )
    return unique


def check_embed_options(batch_size, chunk_size, min_coverage) -> None:
    """The numbers ``scllm embed`` and ``scllm.embed`` take, checked before any work: a negative
    step would embed nothing and leave every row zero, a zero one fails deep in ``range``."""
    for name, flag, value in (
        ("batch_size", "--batch-size", batch_size),
        ("chunk_size", "--chunk-size", chunk_size),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(
                f"{name} ({flag}) must be a whole number of cells, at least 1 (got {value!r}); "
                f"e.g. {flag} 64."
            )
    if not 0 <= min_coverage <= 1:
        raise InputError(
            f"min_coverage (--min-coverage) is a fraction of the vocabulary genes, between 0 and "
            f"1 (got {min_coverage!r}); e.g. --min-coverage 0.5."
        )


def file_sha256(path: str | Path, block: int = 1 << 24) -> str:
    """sha256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_torch_file(path: str | Path, fix: str):
    """``torch.load`` with ``weights_only=True``, refusing in this project's words: a pickle that
    holds more than tensors and plain values is not a file of this project and is never loaded
    (the unpickler would run whatever code it names); a damaged file says so. ``fix`` says how to
    get a good file back."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # from None: torch's own text suggests loading it unsafely, which is exactly what must not
        # happen
        raise UnsafeFileError(
            f"{path} is not a checkpoint of this project: it holds Python objects other than "
            "tensors and plain values, which could run code when unpickled. It was not loaded and "
            "must not be loaded. " + fix
        ) from None
    except FileNotFoundError:
        raise
    except (
        RuntimeError,
        OSError,
        EOFError,
        ValueError,
        KeyError,
    ) as err:  # truncated zip, garbage bytes
        raise CorruptArtifactError(
            f"cannot read {path} ({type(err).__name__}: {str(err)[:200]}): the file is "
            f"truncated or damaged. {fix}"
        ) from None
