"""Writing artifacts, shared by every stage: atomic writes (a failed step leaves nothing under
the final name), the stage log, progress lines, and the provenance an artifact records."""

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

from scllm.errors import REFUSALS, DiskFullError, OutputBusyError, UnsafeOutputError

log = logging.getLogger("scllm")


class Progress:
    """Elapsed wall time and the time left at the rate so far, for the log lines of long loops.

    Use: ``Progress(done_before, total).text(done)``; the clock starts when it is made.

    Parameters
    ----------
    first : int
        Items already done when it is made (the rate counts only those done since).
    total : int
        Items in the whole loop.
    """

    def __init__(self, first: int, total: int):
        self.start, self.first, self.total = time.perf_counter(), first, total

    def text(self, done: int) -> str:
        """The elapsed time and, once some items are done, about how long is left.

        Parameters
        ----------
        done : int
            Items done so far, those before ``first`` included.

        Returns
        -------
        str
            ``elapsed H:MM:SS``, followed by ``, about H:MM:SS to go`` once ``done`` exceeds
            ``first``.
        """
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
    "scikit-learn",
    "tiledbsoma",
    "cellxgene-census",
    "snakemake",
)


def software_provenance() -> dict:
    """What produced an artifact: scllm's version and git commit, Python and the package versions.

    The commit gets "-dirty" with uncommitted changes; the packages are those that shape the
    numbers (PROVENANCE_PACKAGES). Strings only, so that it can go into an h5ad's uns as well as
    into args.json.

    Returns
    -------
    dict
        ``scllm``, ``git_commit``, ``python`` and ``packages`` (package name -> version, or "not
        installed").
    """
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
    """Log to stderr and, inside a Snakemake job, to the rule's log file.

    It also installs the hook that logs an uncaught error: the message alone for the project's
    refusals (they say what to fix), the full traceback for anything unexpected.

    Parameters
    ----------
    log_file : str or Path or None, default None
        The log file (its folder is made); None logs to stderr only.
    append : bool, default False
        Append to ``log_file``, for a process that continues a log its launcher started.

    Returns
    -------
    logging.Logger
        The ``scllm`` logger.
    """
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
    directory where a file is. The process holds ``path``'s writer lock for the whole block: a
    second writer of ``path`` is refused instead of both writing. An error removes the temporary;
    temporaries of ``path`` left by a killed process (SIGKILL cannot be caught) are removed on the
    next write.

    Parameters
    ----------
    path : str or Path
        The final name of the file or folder.

    Yields
    ------
    Path
        The temporary to write (``.NAME.tmpPID`` beside ``path``; nothing exists there yet).

    Raises
    ------
    UnsafeOutputError
        A file would replace a folder, or a folder a file (or a link).
    OutputBusyError
        Another process is writing ``path`` now.
    DiskFullError
        The write failed for want of space (what was at ``path`` before is unchanged).
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
    """Yield ``.NAME.tmpPID`` beside ``path``, removed after the block, holding its writer lock.

    Holding the lock of ``path`` proves that any other temporary of ``path`` belongs to a writer
    that is gone: those are removed first.

    Parameters
    ----------
    path : str or Path
        The file or folder whose temporary it is (its parent folder is made).

    Yields
    ------
    Path
        The temporary's path.

    Raises
    ------
    OutputBusyError
        Another process holds the writer lock of ``path``.
    """
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
    """Delete the temporaries that atomic_path leaves behind only when its process is killed.

    A temporary (``.NAME.tmpPID``) is left only when its process is killed outright (SIGKILL, out
    of memory, node failure); its lock file goes too. A temporary whose writer still runs (it holds
    the lock of NAME) is left alone. For a stage's own output folder, before it writes there.

    Parameters
    ----------
    directory : str or Path
        The folder to clean (nothing happens if it is not a folder).

    Returns
    -------
    list of Path
        The temporaries removed.
    """
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
    """Whether two paths name one file (links followed, hard links included).

    Parameters
    ----------
    a, b : str or Path
        The two paths; where one does not exist, their resolved paths are compared.

    Returns
    -------
    bool
    """
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist
        return Path(a).resolve() == Path(b).resolve()


def lies_within(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies anywhere below it (links followed).

    Parameters
    ----------
    path : str or Path
        The path to place.
    folder : str or Path
        The folder.

    Returns
    -------
    bool
    """
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def sibling_name(path: str | Path, suffix: str) -> Path:
    """``path`` with ``suffix`` added to its name, to suggest another output beside a refused one.

    E.g. ``data/x`` -> ``data/x_store``.

    Parameters
    ----------
    path : str or Path
        The refused output (``.`` or ``..`` is resolved first).
    suffix : str
        What to add to the name (after the stem; the extension is dropped).

    Returns
    -------
    Path
    """
    path = Path(path)
    if path.name in ("", ".", ".."):
        path = path.resolve()
    return path.with_name(path.stem + suffix)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
