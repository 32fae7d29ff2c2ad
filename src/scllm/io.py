"""File helpers shared by every stage: atomic writes, stage logging, streaming h5ad I/O."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import write_elem

from scllm.errors import (
    REFUSALS,
    CorruptArtifactError,
    DiskFullError,
    OutputBusyError,
    UnsafeOutputError,
)

log = logging.getLogger("scllm")


class Progress:
    """Elapsed wall time since it was made, and the time left at the rate so far, for log lines
    of long loops: ``Progress(done_before, total).text(done)``."""

    def __init__(self, first: int, total: int):
        self.start, self.first, self.total = time.perf_counter(), first, total

    def text(self, done: int) -> str:
        elapsed = time.perf_counter() - self.start
        if done - self.first <= 0:
            return f"elapsed {_duration(elapsed)}"
        return (
            f"elapsed {_duration(elapsed)}, "
            f"about {_duration(elapsed / (done - self.first) * (self.total - done))} to go"
        )


PROVENANCE_PACKAGES = (
    "torch",
    "numpy",
    "scipy",
    "anndata",
    "h5py",
    "pandas",
    "numba",
    "scanpy",
    "tiledbsoma",
    "cellxgene-census",
    "snakemake",
)


def software_provenance() -> dict:
    """What produced an artifact: scllm's version and git commit ("-dirty" with uncommitted
    changes), Python and the versions of the packages that shape the numbers. Strings only, so
    that it can go into an h5ad's uns as well as into args.json."""
    import platform
    import subprocess
    from importlib import metadata

    from scllm import __version__

    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    commit = "unknown (not a git checkout)"
    repo = Path(__file__).resolve().parents[2]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            commit = head.stdout.strip() + ("-dirty" if dirty else "")
    return {
        "scllm": __version__,
        "git_commit": commit,
        "python": platform.python_version(),
        "packages": {p: version(p) for p in PROVENANCE_PACKAGES},
    }


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def setup_logging(log_file: str | Path | None = None, append: bool = False) -> logging.Logger:
    """Log to stderr and, inside a Snakemake job, to the rule's log file (``append`` for a
    process that continues a log its launcher started)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a" if append else "w"))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )
    sys.excepthook = _log_uncaught
    return log


def _log_uncaught(exc_type, exc, tb) -> None:
    """Errors end up in the rule's log: the message alone for input/config problems (they say
    what to fix), the full traceback for anything unexpected."""
    if issubclass(exc_type, REFUSALS):
        log.error("%s: %s", exc_type.__name__, exc)
    else:
        log.critical("unexpected error", exc_info=(exc_type, exc, tb))


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or an error therefore never leaves a half-written artifact under the final name.
    Works for files and directories alike, but never puts a file where a directory is or a
    directory where a file is (UnsafeOutputError). The process holds ``path``'s writer lock
    for the whole block: a second writer of ``path`` is refused (OutputBusyError) instead of
    both writing. An error removes the temporary; temporaries of ``path`` left by a killed
    process (SIGKILL cannot be caught) are removed on the next write.
    """
    path = Path(path)
    with temporary_sibling(path) as tmp:
        try:
            yield tmp
            _replace(tmp, path)
        except (OSError, RuntimeError) as err:
            if _out_of_space(err):
                raise DiskFullError(_disk_full_message(path, err)) from err
            raise


@contextlib.contextmanager
def temporary_sibling(path: str | Path):
    """Yield ``.NAME.tmpPID`` beside ``path``, removed when the block ends, while holding the
    writer lock of ``path`` (refused with OutputBusyError if another process holds it). Holding
    it proves that any other temporary of ``path`` belongs to a writer that is gone: those are
    removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(path)
    try:
        for stale in _temporaries_of(path):
            _remove(stale)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            yield tmp
        finally:
            _remove(tmp)
    finally:
        _release_lock(path, lock)


def _out_of_space(err: BaseException) -> bool:
    """A write that failed for want of space: ENOSPC/EDQUOT, or torch.save's report of a short
    write ("unexpected pos"), which names neither."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return "unexpected pos" in str(err) or "PytorchStreamWriter failed writing" in str(err)


def _disk_full_message(path: Path, err: BaseException) -> str:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 1e6:.0f} MB free there now"
    except OSError:
        free = "free space unknown"
    return (
        f"could not write {path}: the disk (or your quota) is full ({free}; {err}). What was at "
        f"{path.name} before is unchanged. Free some space on that file system (or write the "
        "results to a larger one) and rerun: a training run resumes from its last checkpoint."
    )


def _replace(tmp: Path, path: Path) -> None:
    new_is_dir = tmp.is_dir()
    if path.exists() or path.is_symlink():
        if path.is_dir() != new_is_dir or (new_is_dir and path.is_symlink()):
            kind = "a folder" if path.is_dir() else "a file"
            kind = f"a link to {kind}" if path.is_symlink() else kind
            raise UnsafeOutputError(
                f"{path} is {kind}; writing {'a folder' if new_is_dir else 'a file'} there would "
                f"delete it. Nothing was changed: choose another output path, or move {path} "
                "away."
            )
        if new_is_dir:
            # A folder of the writer's own (build-census refuses any other before it starts;
            # Snakemake removes a rule's outputs before running it).
            shutil.rmtree(path)
    os.replace(tmp, path)


# The names atomic_path gives its temporaries, and the writer lock files beside them.
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.tmp\d+$")
_LOCK_SUFFIX = ".scllm.lock"


def _lock_file(path: Path) -> Path:
    return path.with_name(f".{path.name}{_LOCK_SUFFIX}")


def _temporaries_of(path: Path) -> list[Path]:
    found = path.parent.glob(f".{glob.escape(path.name)}.tmp*")
    return [p for p in found if (m := _TEMPORARY.match(p.name)) and m["target"] == path.name]


def _take_lock(path: Path) -> int | None:
    """An exclusive flock on the writer lock file of ``path`` (its descriptor), or
    OutputBusyError. The kernel drops the lock when its process ends, however it ends, so a lock
    that can be taken proves its last holder gone. None where the file system has no locks."""
    lock = _lock_file(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusyError(
                f"another process is writing {path} now; wait for it or choose another output"
            ) from None
        except OSError as err:  # e.g. ENOLCK: a network mount without a lock service
            os.close(fd)
            log.warning(
                "cannot lock %s (%s): writers of %s are not kept apart here", lock, err, path
            )
            return None
        try:
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            return fd
        os.close(fd)  # its holder removed that file as we opened it: lock the one there now


def _release_lock(path: Path, fd: int | None) -> None:
    # Unlinked while still held: a process that opened it meanwhile gets its lock only once it
    # is gone from the path, sees that and locks the new file (_take_lock).
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_lock_file(path))
    if fd is not None:
        os.close(fd)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporaries (``.NAME.tmpPID``) that atomic_path leaves behind only when its
    process is killed outright (SIGKILL, out of memory, node failure), and their lock files.
    A temporary whose writer still runs (it holds the lock of NAME) is left alone. For a stage's
    own output folder, before it writes there; returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    targets = {m["target"] for p in directory.glob(".*.tmp*") if (m := _TEMPORARY.match(p.name))}
    targets |= {p.name[1 : -len(_LOCK_SUFFIX)] for p in directory.glob(f".*{_LOCK_SUFFIX}")}
    for name in sorted(targets):
        try:
            lock = _take_lock(directory / name)
        except OutputBusyError:
            continue  # its writer is alive
        try:
            for stale in _temporaries_of(directory / name):
                _remove(stale)
                removed.append(stale)
        finally:
            _release_lock(directory / name, lock)
    return removed


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (links followed, hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist
        return Path(a).resolve() == Path(b).resolve()


def lies_within(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies anywhere below it (links followed)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def sibling_name(path: str | Path, suffix: str) -> Path:
    """``path`` with ``suffix`` added to its name (``data/x`` -> ``data/x_store``), to suggest
    another output beside one that is refused."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        path = path.resolve()
    return path.with_name(path.stem + suffix)


def require_obs_columns(
    adata: ad.AnnData, columns: list[str], path, writer: str = "sample_census"
) -> None:
    """A clear error when an h5ad lacks obs columns the stage needs (before anything is
    written)."""
    missing = [c for c in columns if c not in adata.obs.columns]
    if missing:
        raise ValueError(
            f"{path} has no obs column(s) {missing} (it has {list(adata.obs.columns)}); "
            f"the pipeline's own files carry them: rerun {writer} (or the rules before this one) "
            "to rewrite it."
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def row_chunks(n_rows: int, chunk_size: int):
    """(start, stop) pairs covering ``range(n_rows)``."""
    for start in range(0, n_rows, chunk_size):
        yield start, min(start + chunk_size, n_rows)


class CSRWriter:
    """Append row blocks of a CSR matrix to an h5ad file, so X never has to fit in memory.

    The file is a regular h5ad (anndata's csr_matrix encoding): var/uns are written up front,
    ``X``'s data/indices/indptr datasets grow by resizing, and obs (often known only once every
    row has been seen) is written by ``set_obs`` before closing. Use inside ``atomic_path``.
    We write X ourselves rather than through anndata's sparse ``append``: that re-reads the
    whole row index on every append and lets h5py pick tiny chunks (one per row for indptr),
    which made reading and writing slow down and grow in memory with the number of cells.
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
        """Size X for rows of known lengths, to be filled in any order with ``write_at``: rows
        that arrive scattered (a sample's cells spread over an input file) go straight to their
        place, in one pass over the input."""
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
        """Rows ``first_row ..`` of a reserved X; their lengths must be the reserved ones."""
        block = sp.csr_matrix(block, dtype=self.dtype)
        a, b = self.reserved[first_row], self.reserved[first_row + block.shape[0]]
        if block.nnz != b - a or block.shape[1] != self.n_vars:
            raise RuntimeError(
                f"rows {first_row}.. hold {block.nnz} values, {b - a} were reserved"
            )
        self.X["data"][a:b] = block.data
        self.X["indices"][a:b] = block.indices.astype(np.int32, copy=False)

    def set_obs(self, obs: pd.DataFrame) -> None:
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


def open_backed(path: str | Path) -> ad.AnnData:
    """Open an h5ad without loading X; a clear error if the file is missing or damaged."""
    try:
        return ad.read_h5ad(path, backed="r")
    except Exception as err:  # h5py raises several types for damaged files
        raise ValueError(
            f"cannot open {path} as h5ad ({type(err).__name__}: {err}). The file is missing, "
            "truncated or not an h5ad; delete it and rerun the stage that writes it."
        ) from err


def read_rows(adata: ad.AnnData, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of a backed AnnData's CSR X as an in-memory CSR matrix.

    Reads the HDF5 datasets directly; the row index is read once per opened file and kept on
    the object (anndata's ``adata.X[start:stop]`` re-reads all of it for every slice).
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
