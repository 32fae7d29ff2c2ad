"""Writing artifacts, shared by every stage: atomic writes (a failed step leaves nothing under
the final name), the stage log, progress lines, and the provenance an artifact records."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

from scllm.errors import REFUSALS

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
    Works for files and directories alike. An error removes the temporary; temporaries of
    ``path`` left by a killed process (SIGKILL cannot be caught) are removed on the next write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp*"):  # left by a killed process
        if _TEMPORARY.match(stale.name):
            _remove(stale)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


_TEMPORARY = re.compile(r"^\..+\.tmp\d+$")  # the names atomic_path gives its temporaries


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporaries (``.NAME.tmpPID``) that atomic_path leaves behind only when its
    process is killed outright (SIGKILL, out of memory, node failure). For a stage's own output
    folder, before it writes there; returns what was removed."""
    directory = Path(directory)
    stale = (
        [p for p in directory.glob(".*.tmp*") if _TEMPORARY.match(p.name)]
        if directory.is_dir()
        else []
    )
    for path in stale:
        _remove(path)
    return stale


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
