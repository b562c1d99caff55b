"""Writes that are whole or absent: a temporary name next to the target, renamed into place when complete.

Every file the project writes (shards, the synthetic manifest, per-row caches, expert bundles,
row-check markers) goes through :class:`AtomicFile` or :func:`atomic_h5`:

- the temporary file is ``.<name>.tmp-<host>-<pid>`` in the target's folder, so a crash never
  leaves a half-written file under the real name;
- it is removed on every failure path (an exception, Ctrl-C); a failure of the write itself --
  disk full, quota, a read-only folder -- becomes one :class:`~moe.shared.errors.WriteError`
  naming the target;
- before writing, temporary files of the same target left by an earlier run are removed: those
  of this host whose process is gone (or whose pid now belongs to a process started after the
  file was last written), and those of another host (shared storage) untouched for a day.

HDF5 files are written with contiguous datasets: a failed write then raises at once, where a
chunked dataset defers it to the chunk cache and the HDF5 library can crash the process at exit.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py

from moe.shared.errors import WRITE_ERRNOS, WriteError, reason

log = logging.getLogger(__name__)

HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
OTHER_HOST_STALE_S = 24 * 3600.0  # another host's temporary file untouched this long is abandoned
_CLOCK_SLACK_S = 2.0  # /proc's boot time has one-second resolution


def temp_path(path: str | os.PathLike) -> Path:
    """This process's temporary name for ``path``: ``.<name>.tmp-<host>-<pid>`` next to it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}")


def _owner(tmp: Path, name: str) -> tuple[str, int] | None:
    """(host, pid) encoded in a temporary file name of ``name`` (older names carry the pid only)."""
    tail = tmp.name[len(f".{name}.tmp-") :]
    host, _, pid = tail.rpartition("-")
    return (host or HOST, int(pid)) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _started(pid: int) -> float | None:
    """Start time (epoch seconds) of process ``pid`` from /proc, or None where that is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22, starttime, in clock ticks since boot
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def is_stale(tmp: Path, name: str) -> bool:
    """Whether ``tmp``, a temporary file of target ``name``, was left by a writer that is gone."""
    owner = _owner(tmp, name)
    if owner is None:
        return False
    host, pid = owner
    try:
        mtime = tmp.stat().st_mtime
    except OSError:
        return False
    if host != HOST:
        return time.time() - mtime > OTHER_HOST_STALE_S
    if pid == os.getpid():
        return True  # this process is about to write the target: an earlier attempt of its own
    if not _alive(pid):
        return True
    started = _started(pid)
    return started is not None and mtime < started - _CLOCK_SLACK_S  # the pid was reused since


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of ``path`` that earlier, finished or killed, writers left; return them."""
    path = Path(path)
    removed = []
    for tmp in map(Path, glob.glob(str(path.parent / f".{glob.escape(path.name)}.tmp-*"))):
        if is_stale(tmp, path.name):
            try:
                tmp.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.debug("cannot remove stale temporary file %s: %s", tmp, exc)
                continue
            log.info("removed stale temporary file %s (left by an interrupted run)", tmp)
            removed.append(tmp)
    return removed


def is_write_failure(exc: BaseException) -> bool:
    """An OS error that means the disk or folder refuses the write (full, quota, read-only, permissions)."""
    return isinstance(exc, OSError) and getattr(exc, "errno", None) in WRITE_ERRNOS


def ensure_space(path: str | os.PathLike, n_bytes: int, what: str) -> None:
    """Raise a WriteError naming ``path`` when its file system has less than ``n_bytes`` free."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < n_bytes:
        raise WriteError(path, f"{what} needs about {_size(n_bytes)}, but only {_size(free)} are free there")


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class AtomicFile:
    """``with AtomicFile(path, what) as tmp:`` write ``tmp``; it becomes ``path`` when the block ends.

    On an exception the temporary file is removed; a write failure (see :func:`is_write_failure`, or
    any exception of ``body_failures`` -- for writers whose every error is a write error) is raised as a
    :class:`WriteError` naming ``path``. The rename itself failing is always a WriteError.
    """

    def __init__(
        self, path: str | os.PathLike, what: str = "file", body_failures: tuple[type[BaseException], ...] = ()
    ):
        self.path = Path(path)
        self.what = what
        self.body_failures = body_failures
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WriteError(self.path.parent, f"cannot create the folder for {what} ({reason(exc)})") from exc
        remove_stale_temps(self.path)
        self.tmp = temp_path(self.path)

    def error(self, exc: BaseException) -> WriteError:
        return WriteError(self.path, f"cannot write {self.what} ({reason(exc)}); nothing was written")

    def abort(self) -> None:
        """Remove the temporary file (quietly: this runs while another error propagates)."""
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError as exc:
            log.debug("cannot remove %s: %s", self.tmp, exc)

    def commit(self) -> None:
        """Rename the temporary file into place (atomic on one file system)."""
        try:
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.abort()
            raise self.error(exc) from exc

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
            return False
        self.abort()
        if not isinstance(exc, WriteError) and (is_write_failure(exc) or isinstance(exc, self.body_failures)):
            raise self.error(exc) from exc
        return False


def write_text(path: str | os.PathLike, text: str, what: str = "file") -> Path:
    """Write ``text`` to ``path`` atomically (a WriteError naming it on failure)."""
    with AtomicFile(path, what, body_failures=(OSError,)) as tmp:
        tmp.write_text(text)
    return Path(path)


def close_quietly(f: h5py.File | None) -> None:
    """Close an HDF5 file after a failure, releasing its id even when the final flush fails."""
    if f is None:
        return
    try:
        f.close()
    except Exception:  # the flush of a failed file fails again; release the handle anyway
        try:
            f.id.close()
        except Exception as exc:
            log.debug("cannot release HDF5 handle: %s", exc)


@contextmanager
def atomic_h5(path: str | os.PathLike, what: str = "file") -> Iterator[h5py.File]:
    """``with atomic_h5(path, what) as f:`` fill the new HDF5 file ``f``; it becomes ``path`` when the block ends.

    Create datasets contiguous (no ``chunks``): see the module docstring. Failures as :class:`AtomicFile`;
    creating, flushing or closing the file failing is always a WriteError.
    """
    target = AtomicFile(path, what)
    f = None
    stage = "open"
    try:
        f = h5py.File(target.tmp, "w")
        stage = "body"
        yield f
        stage = "close"
        f.close()
        f = None
        with h5py.File(target.tmp, "r"):  # reads back: a truncated file (a write lost on the way) fails here
            pass
        target.commit()
    except BaseException as exc:
        close_quietly(f)
        target.abort()
        if isinstance(exc, WriteError):
            raise
        if is_write_failure(exc) or (stage != "body" and isinstance(exc, (OSError, RuntimeError))):
            raise target.error(exc) from exc
        raise
