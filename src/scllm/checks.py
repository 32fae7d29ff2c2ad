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
    """Refuse values that are not counts: finite, non-negative and (by default) whole numbers.

    HVG selection and QC thresholds assume raw counts; NaN or inf would silently become bins (or
    NaN embeddings). ``scllm embed`` also takes normalized values (``integer=False``).

    Parameters
    ----------
    values : numpy.ndarray
        The values (e.g. a block's stored values).
    where : str
        What holds them, for the message (e.g. ``adata.X``).
    fix : str, default ""
        The fix the message suggests, after its explanation (default: use the raw count matrix).
    integer : bool, default True
        Require integers.

    Raises
    ------
    InputError
        A value is NaN or infinite, negative, or (with ``integer``) not a whole number.
    """
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
    """The whole input check on ids; returns the cell ids to use.

    At least one cell and one gene, unique gene ids, unique cell ids (made unique, logged).

    Parameters
    ----------
    cell_ids : array_like
        The cell ids.
    gene_ids : array_like or None
        The gene ids; None: the caller maps genes itself and says how it treats duplicates.
    where : str
        What holds them, for the messages.

    Returns
    -------
    pandas.Index
        The cell ids as strings, made unique (``unique_cell_ids``).

    Raises
    ------
    InputError
        No cells, no genes, or a gene id that occurs twice.
    """
    require_cells(len(cell_ids), None if gene_ids is None else len(gene_ids), where)
    if gene_ids is not None:
        check_gene_ids(gene_ids, where)
    return unique_cell_ids(cell_ids, where)


def require_cells(n_cells: int, n_genes: int | None, where: str) -> None:
    """Refuse an input without cells or without genes.

    Parameters
    ----------
    n_cells : int
        Cells in the input.
    n_genes : int or None
        Genes in the input; None: not checked.
    where : str
        What the input is, for the message.

    Raises
    ------
    InputError
        ``n_cells`` or ``n_genes`` is 0.
    """
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
    """Refuse repeated gene ids; they are not made unique.

    Which of two columns a gene id means is unknowable.

    Parameters
    ----------
    gene_ids : array_like
        The gene ids.
    where : str
        What holds them, for the message.
    fix : str, default ""
        How to drop the repeats where the ids came from (default: var_names).

    Raises
    ------
    InputError
        A gene id occurs more than once.
    """
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
    """Cell ids made unique as anndata's ``obs_names_make_unique`` does, with a warning.

    The second occurrence of ``x`` becomes ``x-1``, the third ``x-2``, ... Duplicate ids (e.g.
    the same barcode in two 10x lanes) would otherwise be one cell to every later stage: in both
    train and validation, or matched to the wrong row.

    Parameters
    ----------
    cell_ids : array_like
        The cell ids.
    where : str
        What holds them, for the warning.

    Returns
    -------
    pandas.Index
        The ids as strings, unique.
    """
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
    """The numbers ``scllm embed`` and ``scllm.embed`` take, checked before any work.

    A negative step would embed nothing and leave every row zero, a zero one fails deep in
    ``range``.

    Parameters
    ----------
    batch_size, chunk_size : int
        Cells a batch and cells a chunk: whole numbers, at least 1.
    min_coverage : float
        The fraction of the vocabulary genes the input must have, 0 to 1.

    Raises
    ------
    InputError
        A value out of range, or a size that is not a whole number.
    """
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
    """sha256 of a file's bytes, read in blocks.

    Parameters
    ----------
    path : str or Path
        The file.
    block : int, default 2**24
        Bytes read at a time (16 MiB).

    Returns
    -------
    str
        The hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_torch_file(path: str | Path, fix: str):
    """``torch.load`` with ``weights_only=True``, refusing in this project's words.

    A pickle that holds more than tensors and plain values is not a file of this project and is
    never loaded (the unpickler would run whatever code it names); a damaged file says so.

    Parameters
    ----------
    path : str or Path
        The file (loaded onto the CPU).
    fix : str
        How to get a good file back, for the messages.

    Returns
    -------
    object
        What the file holds (e.g. a state dict).

    Raises
    ------
    UnsafeFileError
        The file holds Python objects other than tensors and plain values.
    CorruptArtifactError
        The file is truncated or damaged.
    FileNotFoundError
        No file at ``path``.
    """
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
