"""A user's h5ad, read in blocks: obs and var in memory, the count matrix never whole.

``build_local_census`` ingests an h5ad of any size through this module. The count matrix may be
X or a layer, stored CSR, CSC or dense, compressed or not; it is read straight from the HDF5
datasets in blocks of at most ``block_nnz`` stored values, so memory depends on the block size,
not on the number of cells. (``anndata.read_h5ad(..., backed="r")`` would load every layer into
memory, and ``read_h5ad`` without it the whole file.)
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem

from scllm.errors import InputError

log = logging.getLogger("scllm")


class H5adInput:
    """An h5ad opened for block reading. Use as a context manager (it holds the HDF5 file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no h5ad at {path} (census.h5ad.path); check the path")
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
                f"cannot read {path} as h5ad ({type(err).__name__}: {err}). "
                "The file is truncated, damaged or not an h5ad: copy or export it again "
                "(AnnData.write_h5ad) and rerun."
            ) from err
        self.n_obs, self.n_vars = len(self.obs_names), self.var.shape[0]
        self.obs_columns = [c for c in self._obs.keys() if c != self._obs.attrs["_index"]]
        self.layers = list(self.file["layers"].keys()) if "layers" in self.file else []
        self.has_raw = "raw" in self.file

    def obs_column(self, name: str) -> pd.Series:
        """One obs column (categoricals stay categorical), read on its own."""
        values = read_elem(self._obs[name])
        return pd.Series(values, index=pd.RangeIndex(self.n_obs), name=name)

    def matrix(self, layer: str | None) -> CountMatrix:
        """X, or ``layers[layer]``, as a block reader."""
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
            self.data, self.indices = elem["data"], elem["indices"]
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
        """Values stored per row (CSR: from the row pointers). ``canonical`` (and dense input):
        non-zero genes per row, each once, counted in one pass over the values."""
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
        """Yield ``(stop, block, start)``: rows start..stop-1 as a CSR matrix of the stored values
        (explicit zeros included), at most ``block_nnz`` values and ``max_rows`` rows a block."""
        if self.layout == "csc":
            raise ValueError("a CSC matrix is not read by rows")
        if self.layout == "dense":
            step = max(1, min(block_nnz // max(self.n_vars, 1), max_rows or self.n_obs))
            for start in range(0, self.n_obs, step):
                stop = min(start + step, self.n_obs)
                yield stop, sp.csr_matrix(self.elem[start:stop]), start
            return
        for start, stop in _cuts(self.indptr, block_nnz, max_rows):
            a, b = self.indptr[start], self.indptr[stop]
            indices = self.indices[a:b]
            if indices.size and (indices.min() < 0 or indices.max() >= self.n_vars):
                raise InputError(
                    f"{self.name} of the input h5ad is damaged: gene indices out of range "
                    f"near row {start}; export it again."
                )
            yield (
                stop,
                sp.csr_matrix(
                    (self.data[a:b], indices, self.indptr[start : stop + 1] - a),
                    shape=(stop - start, self.n_vars),
                ),
                start,
            )

    def blocks(self, block_nnz: int):
        """Yield ``(done, rows, cols, values)``: int64 cell and gene positions and the raw values
        of one block; ``done`` counts the rows (columns for CSC) read so far."""
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
