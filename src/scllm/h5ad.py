"""Cells in h5ad files, read and written in row blocks, so no matrix ever has to fit in memory.

- The pipeline's own files (cells, filtered, binned): CSR X, opened backed (``open_backed``), read
  in row chunks (``read_rows``, ``row_chunks``) and written block by block (``CSRWriter``).
- Your h5ad (``H5adInput``): the count matrix may be X or a layer, stored CSR, CSC or dense,
  compressed or not; it is read straight from the HDF5 datasets in blocks of at most
  ``block_nnz`` stored values, so memory depends on the block size, not on the number of cells.
  (``anndata.read_h5ad(..., backed="r")`` would load every layer into memory, and ``read_h5ad``
  without it the whole file.)
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset, write_elem

from scllm.errors import CorruptArtifactError, InputError

log = logging.getLogger("scllm")

# The fix for an input h5ad that exists but cannot be read: the pipeline cannot rewrite it.
UNREADABLE_INPUT = (
    "The file is truncated, damaged or not an h5ad: copy or export it again "
    "(AnnData.write_h5ad) and rerun."
)

# --- the pipeline's own files --------------------------------------------------------------------


def open_backed(path: str | Path, own: bool = True) -> ad.AnnData:
    """Open an h5ad without loading X; a clear error if the file is missing or damaged.

    Parameters
    ----------
    path : str or Path
        The h5ad file.
    own : bool, default True
        Whether the pipeline wrote the file (rerunning its stage rewrites it); False for your
        input (``scllm embed``'s h5ad, heldout.path), which only you can fix.

    Returns
    -------
    anndata.AnnData
        The file opened backed, read-only.

    Raises
    ------
    InputError
        No file at ``path`` (a ValueError).
    ValueError
        The file is truncated or not an h5ad.
    """
    if not Path(path).exists():
        fix = "rerun the stage that writes it" if own else "check the path"
        raise InputError(f"{path} does not exist; {fix}")
    try:
        return ad.read_h5ad(path, backed="r")
    except Exception as err:  # h5py raises several types for damaged files
        fix = (
            "The file is truncated or not an h5ad; delete it and rerun the stage that writes it."
            if own
            else UNREADABLE_INPUT
        )
        raise ValueError(
            f"cannot open {path} as h5ad ({type(err).__name__}: {err}). {fix}"
        ) from err


def read_rows(adata: ad.AnnData, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of a backed AnnData's CSR X as an in-memory CSR matrix.

    Reads the HDF5 datasets directly; the row index is read once per opened file and kept on
    the object (anndata's ``adata.X[start:stop]`` re-reads all of it for every slice).

    Parameters
    ----------
    adata : anndata.AnnData
        A backed AnnData (``open_backed``) whose X is stored CSR.
    start, stop : int
        The rows to read, ``stop`` excluded.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``stop - start`` rows by ``adata.n_vars`` columns, values as stored.

    Raises
    ------
    ValueError
        X is not a CSR matrix.
    CorruptArtifactError
        The row pointers or the column indices of X are damaged.
    """
    index = getattr(adata, "_scllm_indptr", None)
    group = adata.file["X"]
    if index is None:
        if not isinstance(group, h5py.Group) or group.attrs.get("encoding-type") != "csr_matrix":
            raise ValueError(
                f"{adata.filename}: X is not a CSR matrix; the pipeline's h5ad files store CSR"
            )
        index = group["indptr"][:].astype(np.int64)
        n_stored = min(group["data"].shape[0], group["indices"].shape[0])
        if (
            len(index) != adata.n_obs + 1
            or index[0] != 0
            or np.any(np.diff(index) < 0)
            or index[-1] > n_stored
        ):
            raise _damaged_matrix(
                adata.filename,
                f"its row pointers (X/indptr) do not describe {adata.n_obs} rows "
                f"of {n_stored} stored values",
            )
        adata._scllm_indptr = index
    a, b = index[start], index[stop]
    indices = group["indices"][a:b]
    # Column indices out of range would read as other genes or fail deep inside scipy.
    if indices.size and (indices.min() < 0 or indices.max() >= adata.n_vars):
        raise _damaged_matrix(
            adata.filename,
            f"rows {start}..{stop - 1} have column indices outside 0..{adata.n_vars - 1}",
        )
    return sp.csr_matrix(
        (group["data"][a:b], indices, index[start : stop + 1] - a),
        shape=(stop - start, adata.n_vars),
    )


def _damaged_matrix(path, problem: str) -> CorruptArtifactError:
    return CorruptArtifactError(
        f"{path} is damaged: {problem}. Delete it and rerun the stage that writes it "
        "(Snakemake reruns a rule whose output file is missing)."
    )


def row_chunks(n_rows: int, chunk_size: int):
    """(start, stop) pairs covering ``range(n_rows)``.

    Parameters
    ----------
    n_rows : int
        Rows to cover.
    chunk_size : int
        Rows a chunk (the last may be shorter).

    Yields
    ------
    tuple of int
        ``(start, stop)``, ``stop`` excluded.
    """
    for start in range(0, n_rows, chunk_size):
        yield start, min(start + chunk_size, n_rows)


def require_obs_columns(
    adata: ad.AnnData, columns: list[str], path, writer: str = "sample_census"
) -> None:
    """A clear error when an h5ad lacks obs columns the stage needs (before anything is written).

    Parameters
    ----------
    adata : anndata.AnnData
        The opened file.
    columns : list of str
        The obs columns the stage needs.
    path : str or Path
        The file's path, for the message.
    writer : str, default "sample_census"
        The rule that writes the file, which the message says to rerun.

    Raises
    ------
    ValueError
        A column is missing.
    """
    missing = [c for c in columns if c not in adata.obs.columns]
    if missing:
        raise ValueError(
            f"{path} has no obs column(s) {missing} (it has {list(adata.obs.columns)}); "
            f"the pipeline's own files carry them: rerun {writer} (or the rules before this one) "
            "to rewrite it."
        )


class CSRWriter:
    """Append row blocks of a CSR matrix to an h5ad file, so X never has to fit in memory.

    The file is a regular h5ad (anndata's csr_matrix encoding): var/uns are written up front,
    ``X``'s data/indices/indptr datasets grow by resizing, and obs (often known only once every
    row has been seen) is written by ``set_obs`` before closing. Use inside ``atomic_path``, as a
    context manager (closing it without obs is an error). We write X ourselves rather than
    through anndata's sparse ``append``: that re-reads the whole row index on every append and lets
    h5py pick tiny chunks (one per row for indptr), which made reading and writing slow down and
    grow in memory with the number of cells.

    Parameters
    ----------
    path : str or Path
        The file to write (created, or truncated).
    var : pandas.DataFrame
        The genes, one row per column of X.
    uns : dict or None, default None
        The file's uns.
    dtype : numpy dtype, default numpy.float32
        The dtype of X's values.
    """

    CHUNK = 1 << 18  # elements per HDF5 chunk: large sequential reads, small enough for slices

    def __init__(self, path, var: pd.DataFrame, uns: dict | None = None, dtype=np.float32):
        self.file = h5py.File(path, "w")
        self.n_vars = var.shape[0]
        self.dtype = dtype
        self.rows_written = 0
        self.nnz = 0
        self.obs_written = False
        self.reserved = None  # row pointers of X, once reserve() has sized it
        write_elem(self.file, "var", var)
        write_elem(self.file, "uns", uns or {})
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(self.file, key, {})
        self.file.attrs["encoding-type"] = "anndata"
        self.file.attrs["encoding-version"] = "0.1.0"
        X = self.file.create_group("X")
        X.attrs["encoding-type"] = "csr_matrix"
        X.attrs["encoding-version"] = "0.1.0"
        X.attrs["shape"] = (0, self.n_vars)
        # int64 row pointers: a matrix may hold more than 2**31 non-zeros
        for name, dt, first in (
            ("data", dtype, []),
            ("indices", np.int32, []),
            ("indptr", np.int64, [0]),
        ):
            X.create_dataset(
                name, data=np.asarray(first, dtype=dt), maxshape=(None,), chunks=(self.CHUNK,)
            )
        self.X = X

    def _extend(self, name: str, values: np.ndarray) -> None:
        dataset = self.X[name]
        n = dataset.shape[0]
        dataset.resize((n + len(values),))
        dataset[n:] = values

    def append(self, block: sp.spmatrix) -> None:
        """Append rows to X.

        Parameters
        ----------
        block : scipy.sparse matrix
            Rows with ``len(var)`` columns (converted to CSR of the writer's dtype).

        Raises
        ------
        ValueError
            The block has another number of columns.
        """
        block = sp.csr_matrix(block, dtype=self.dtype)
        if block.shape[1] != self.n_vars:
            raise ValueError(f"block has {block.shape[1]} columns, expected {self.n_vars}")
        if block.shape[0] == 0:
            return
        self._extend("data", block.data)
        self._extend("indices", block.indices.astype(np.int32, copy=False))
        self._extend("indptr", block.indptr[1:].astype(np.int64) + self.nnz)
        self.nnz += block.nnz
        self.rows_written += block.shape[0]
        self.X.attrs["shape"] = (self.rows_written, self.n_vars)

    def reserve(self, row_nnz: np.ndarray) -> None:
        """Size X for rows of known lengths, to be filled in any order with ``write_at``.

        Rows that arrive scattered (a sample's cells spread over an input file) then go straight to
        their place, in one pass over the input. Call it before any row is written.

        Parameters
        ----------
        row_nnz : numpy.ndarray
            Stored values of each row, in row order.
        """
        if self.rows_written:
            raise RuntimeError("reserve() must come before any row is written")
        indptr = np.r_[0, np.cumsum(row_nnz, dtype=np.int64)]
        for name in ("data", "indices"):
            self.X[name].resize((int(indptr[-1]),))
        self.X["indptr"].resize((len(indptr),))
        self.X["indptr"][:] = indptr
        self.reserved = indptr
        self.rows_written, self.nnz = len(row_nnz), int(indptr[-1])
        self.X.attrs["shape"] = (self.rows_written, self.n_vars)

    def write_at(self, first_row: int, block: sp.spmatrix) -> None:
        """Rows ``first_row ..`` of a reserved X; their lengths must be the reserved ones.

        Parameters
        ----------
        first_row : int
            The row the block starts at.
        block : scipy.sparse matrix
            The rows, with the number of stored values ``reserve`` was given for them.
        """
        block = sp.csr_matrix(block, dtype=self.dtype)
        a, b = self.reserved[first_row], self.reserved[first_row + block.shape[0]]
        if block.nnz != b - a or block.shape[1] != self.n_vars:
            raise RuntimeError(
                f"rows {first_row}.. hold {block.nnz} values, {b - a} were reserved"
            )
        self.X["data"][a:b] = block.data
        self.X["indices"][a:b] = block.indices.astype(np.int32, copy=False)

    def set_obs(self, obs: pd.DataFrame) -> None:
        """Write obs, once every row of X is written.

        Parameters
        ----------
        obs : pandas.DataFrame
            One row per row of X.
        """
        if obs.shape[0] != self.rows_written:
            raise RuntimeError(
                f"obs has {obs.shape[0]} rows but {self.rows_written} rows of X were written"
            )
        write_elem(self.file, "obs", obs)
        self.obs_written = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.file.close()
        if exc_type is None and not self.obs_written:
            raise RuntimeError("CSRWriter closed before set_obs(): the h5ad would have no obs")
        return False


# --- your h5ad -----------------------------------------------------------------------------------


class H5adInput:
    """An h5ad opened for block reading. Use as a context manager (it holds the HDF5 file).

    Opening reads var and the cell ids, nothing else; obs columns and the count matrix are read
    when asked for.

    Parameters
    ----------
    path : str or Path
        The h5ad file.
    setting : str, optional
        What names the file, for the message when there is none (default: the workflow's
        ``census.h5ad.path``; None where the caller's own argument does).

    Attributes
    ----------
    var : pandas.DataFrame
        The genes.
    obs_names : pandas.Index
        The cell ids, as strings.
    n_obs, n_vars : int
        Cells and genes.
    obs_columns, layers : list of str
        The obs columns and the layers the file has.
    has_raw : bool
        Whether the file has a ``raw`` group.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file is truncated, damaged or not an h5ad.
    """

    def __init__(self, path: str | Path, setting: str | None = "census.h5ad.path"):
        self.path = Path(path)
        if not self.path.is_file():
            named = f" ({setting})" if setting else ""
            raise FileNotFoundError(f"no h5ad at {path}{named}; check the path")
        try:
            self.file = h5py.File(self.path, "r")
            self._obs = self.file["obs"]
            self.var = read_elem(self.file["var"])
            self.obs_names = pd.Index(read_elem(self._obs[self._obs.attrs["_index"]])).astype(str)
        except (
            Exception
        ) as err:  # h5py and anndata raise several types for damaged or foreign files
            self.close()
            raise ValueError(
                f"cannot read {path} as h5ad ({type(err).__name__}: {err}). {UNREADABLE_INPUT}"
            ) from err
        self.n_obs, self.n_vars = len(self.obs_names), self.var.shape[0]
        self.obs_columns = [c for c in self._obs.keys() if c != self._obs.attrs["_index"]]
        self.layers = list(self.file["layers"].keys()) if "layers" in self.file else []
        self.has_raw = "raw" in self.file

    def obs_column(self, name: str) -> pd.Series:
        """One obs column (categoricals stay categorical), read on its own.

        Parameters
        ----------
        name : str
            The column.

        Returns
        -------
        pandas.Series
            Indexed by cell position (0..n_obs-1).
        """
        values = read_elem(self._obs[name])
        return pd.Series(values, index=pd.RangeIndex(self.n_obs), name=name)

    def matrix(self, layer: str | None) -> CountMatrix:
        """X, or ``layers[layer]``, as a block reader.

        Parameters
        ----------
        layer : str or None
            The layer holding the counts; None (or "") for X.

        Returns
        -------
        CountMatrix

        Raises
        ------
        InputError
            The file has no such layer, or no X; or the matrix is not one CountMatrix reads.
        """
        if layer:
            if layer not in self.layers:
                raise InputError(
                    f"the input h5ad has no layer {layer!r} "
                    "(census.h5ad.counts_layer, --counts-layer); "
                    f"it has {self.layers}"
                )
            return CountMatrix(
                self.file["layers"][layer], self.n_obs, self.n_vars, f"layers[{layer!r}]"
            )
        if "X" not in self.file:
            raise InputError(
                f"{self.path} has no X matrix; name the layer holding raw counts with "
                "census.h5ad.counts_layer (--counts-layer)"
                f"{f' (it has {self.layers})' if self.layers else ''}"
            )
        return CountMatrix(self.file["X"], self.n_obs, self.n_vars, "X")

    def close(self) -> None:
        """Close the HDF5 file (if it was opened)."""
        if getattr(self, "file", None) is not None:
            self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class CountMatrix:
    """A stored matrix read as COO blocks (rows, columns, values).

    CSR is read in row blocks and CSC in column blocks, each cut where the block reaches
    ``block_nnz`` stored values (the row or column pointers say where, without reading values);
    dense in row blocks of about ``block_nnz`` elements. Explicitly stored zeros are dropped,
    as a SOMA sparse array holds none.

    Parameters
    ----------
    elem : h5py.Dataset or h5py.Group
        The matrix: a dataset (dense) or a group in anndata's (or h5sparse's) CSR or CSC encoding.
    n_obs, n_vars : int
        Its shape, cells x genes.
    name : str
        What to call it in messages (e.g. ``X`` or ``layers['counts']``).

    Attributes
    ----------
    layout : str
        "csr", "csc" or "dense".

    Raises
    ------
    InputError
        A dense shape other than ``(n_obs, n_vars)``, an unknown encoding, row or column pointers
        of the wrong length, or values that are not numbers.
    """

    def __init__(self, elem, n_obs: int, n_vars: int, name: str):
        self.name, self.n_obs, self.n_vars = name, n_obs, n_vars
        if isinstance(elem, h5py.Dataset):
            self.layout = "dense"
            if elem.shape != (n_obs, n_vars):
                raise InputError(
                    f"{name} of the input h5ad has shape {elem.shape}, "
                    f"but obs x var is {(n_obs, n_vars)}"
                )
            self.elem, self.dtype = elem, elem.dtype
        else:
            encoding = elem.attrs.get("encoding-type", elem.attrs.get("h5sparse_format", ""))
            encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
            self.layout = {
                "csr_matrix": "csr",
                "csr": "csr",
                "csc_matrix": "csc",
                "csc": "csc",
            }.get(encoding)
            if self.layout is None:
                raise InputError(
                    f"{name} of the input h5ad is stored as "
                    f"{encoding or 'an unknown encoding'!r}; expected a CSR, CSC or dense matrix. "
                    "Write it with a recent anndata (AnnData.write_h5ad)."
                )
            self.elem, self.data, self.indices = elem, elem["data"], elem["indices"]
            self.indptr = elem["indptr"][:].astype(
                np.int64
            )  # one pointer per row (CSR) or column (CSC)
            self.dtype = self.data.dtype
            n_major = n_obs if self.layout == "csr" else n_vars
            if len(self.indptr) != n_major + 1:
                raise InputError(
                    f"{name} of the input h5ad is damaged: {len(self.indptr) - 1} "
                    f"row/column pointers for {n_major} "
                    f"{'rows' if self.layout == 'csr' else 'columns'}; export it again."
                )
        if not (np.issubdtype(self.dtype, np.number) or self.dtype == bool):
            raise InputError(f"{name} of the input h5ad holds {self.dtype} values, not numbers")

    @property
    def n_major(self) -> int:
        """Length of the axis blocks run along: rows, or columns for CSC."""
        return self.n_vars if self.layout == "csc" else self.n_obs

    def row_nnz(self, block_nnz: int, canonical: bool = False) -> np.ndarray:
        """Values stored per row: CSR from its row pointers, dense input its non-zero genes.

        Parameters
        ----------
        block_nnz : int
            Values a block, where the values are read (``canonical``, or dense input).
        canonical : bool, default False
            Count non-zero genes per row, each once (duplicates summed, zeros dropped), in one pass
            over the values.

        Returns
        -------
        numpy.ndarray
            int64, one count per row.

        Raises
        ------
        ValueError
            The matrix is CSC, which is not read by rows.
        """
        if self.layout == "csr" and not canonical:
            return np.diff(self.indptr)
        if self.layout == "csr":
            lengths = []
            for _, block, _ in self.row_blocks(block_nnz):
                block.sum_duplicates()
                block.eliminate_zeros()
                lengths.append(np.diff(block.indptr))
            return np.concatenate(lengths).astype(np.int64)
        if self.layout == "dense":
            step = max(1, block_nnz // max(self.n_vars, 1))
            return np.concatenate(
                [
                    np.count_nonzero(self.elem[a : min(a + step, self.n_obs)], axis=1)
                    for a in range(0, self.n_obs, step)
                ]
            ).astype(np.int64)
        raise ValueError("a CSC matrix is not read by rows")

    def row_blocks(self, block_nnz: int, max_rows: int | None = None):
        """Rows in blocks, as CSR matrices of the stored values (explicit zeros included).

        Parameters
        ----------
        block_nnz : int
            Values a block at the most (a block holds at least one row, however long).
        max_rows : int or None, default None
            Rows a block at the most; None for no limit.

        Yields
        ------
        tuple
            ``(stop, block, start)``: rows ``start..stop-1`` as a scipy.sparse.csr_matrix.

        Raises
        ------
        ValueError
            The matrix is CSC, which is not read by rows.
        """
        if self.layout == "csc":
            raise ValueError("a CSC matrix is not read by rows")
        if self.layout == "dense":
            step = max(1, min(block_nnz // max(self.n_vars, 1), max_rows or self.n_obs))
            for start in range(0, self.n_obs, step):
                stop = min(start + step, self.n_obs)
                yield stop, sp.csr_matrix(self.elem[start:stop]), start
            return
        for start, stop in _cuts(self.indptr, block_nnz, max_rows):
            yield stop, self._csr_rows(start, stop), start

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start..stop-1`` as a float32 CSR matrix of the stored values, in any layout.

        CSC is read through anndata, which reads far more than the rows: slow, but right.

        Parameters
        ----------
        start, stop : int
            The rows, ``stop`` excluded.

        Returns
        -------
        scipy.sparse.csr_matrix
        """
        if self.layout == "dense":
            return sp.csr_matrix(self.elem[start:stop], dtype=np.float32)
        if self.layout == "csc":
            return sp.csr_matrix(sparse_dataset(self.elem)[start:stop], dtype=np.float32)
        return sp.csr_matrix(self._csr_rows(start, stop), dtype=np.float32)

    def _csr_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start..stop-1`` of a CSR matrix as stored, its gene indices checked."""
        a, b = self.indptr[start], self.indptr[stop]
        indices = self.indices[a:b]
        if indices.size and (indices.min() < 0 or indices.max() >= self.n_vars):
            raise InputError(
                f"{self.name} of the input h5ad is damaged: gene indices out of range "
                f"near row {start}; export it again."
            )
        return sp.csr_matrix(
            (self.data[a:b], indices, self.indptr[start : stop + 1] - a),
            shape=(stop - start, self.n_vars),
        )

    def blocks(self, block_nnz: int):
        """The stored non-zero values in blocks, as COO arrays.

        Parameters
        ----------
        block_nnz : int
            Values a block at the most (a block holds at least one row or column; dense input is
            read in blocks of about ``block_nnz`` elements).

        Yields
        ------
        tuple
            ``(done, rows, cols, values)``: int64 cell and gene positions and the raw values of one
            block; ``done`` counts the rows (columns for CSC) read so far.

        Raises
        ------
        InputError
            Indices out of range (a damaged file).
        """
        if self.layout == "dense":
            step = max(1, block_nnz // max(self.n_vars, 1))
            for start in range(0, self.n_obs, step):
                stop = min(start + step, self.n_obs)
                dense = self.elem[start:stop]
                rows, cols = np.nonzero(dense)
                yield stop, rows.astype(np.int64) + start, cols.astype(np.int64), dense[rows, cols]
            return
        for start, stop in _cuts(self.indptr, block_nnz):
            a, b = self.indptr[start], self.indptr[stop]
            values, minor = self.data[a:b], self.indices[a:b].astype(np.int64)
            major = np.repeat(
                np.arange(start, stop, dtype=np.int64), np.diff(self.indptr[start : stop + 1])
            )
            if minor.size and (
                minor.min() < 0
                or minor.max() >= (self.n_vars if self.layout == "csr" else self.n_obs)
            ):
                raise InputError(
                    f"{self.name} of the input h5ad is damaged: indices out of range near "
                    f"{'row' if self.layout == 'csr' else 'column'} {start}; export it again."
                )
            keep = values != 0
            if not keep.all():
                values, minor, major = values[keep], minor[keep], major[keep]
            rows, cols = (major, minor) if self.layout == "csr" else (minor, major)
            yield stop, rows, cols, values


@contextlib.contextmanager
def open_matrix(path, layer: str | None):
    """X (or ``layers[layer]``) of the h5ad at ``path`` as a CountMatrix, for the ``with`` block.

    The counts ``scllm embed`` reads with ``rows``. Stored column-wise (CSC) they still read, only
    slowly (a warning says so).

    Parameters
    ----------
    path : str or Path
        The h5ad file.
    layer : str or None
        The layer holding the counts; None (or "") for X.

    Yields
    ------
    CountMatrix
        The matrix, valid while the block runs (the file is closed after it).

    Raises
    ------
    ValueError
        The file has no such matrix.
    InputError
        The matrix records no shape, or is not one CountMatrix reads.
    """
    with h5py.File(path, "r") as file:
        key = f"layers/{layer}" if layer else "X"
        if key not in file:
            layers = list(file["layers"].keys()) if "layers" in file else []
            raise ValueError(f"{path} has no {key} (layers: {layers})")
        elem = file[key]
        shape = (
            elem.shape
            if isinstance(elem, h5py.Dataset)
            else elem.attrs.get("shape", elem.attrs.get("h5sparse_shape"))
        )
        if shape is None or len(shape) != 2:
            raise InputError(f"{key} of {path} records no matrix shape; write it with anndata")
        matrix = CountMatrix(
            elem, int(shape[0]), int(shape[1]), f"layers[{layer!r}]" if layer else "X"
        )
        if matrix.layout == "csc" and matrix.n_obs:
            log.warning(
                "%s of %s is stored column-wise (CSC): reading rows is slow; store it as CSR",
                matrix.name,
                path,
            )
        yield matrix


def _cuts(indptr: np.ndarray, block_nnz: int, max_rows: int | None = None):
    """(start, stop) ranges of the major axis holding at most ``block_nnz`` values and
    ``max_rows`` rows each (at least one row or column, however many values it holds)."""
    n = len(indptr) - 1
    start = 0
    while start < n:
        stop = int(np.searchsorted(indptr, indptr[start] + block_nnz, side="right")) - 1
        stop = min(max(stop, start + 1), n, start + (max_rows or n))
        yield start, stop
        start = stop
