"""Per-row caches of a shard: HDF5 files of arrays with one row per spectrum, validated by attributes.

A cache records what it was built from as attributes (the source shard's name, size,
``mtime_ns``, rows, pixels, a format version and whatever key the builder adds). It is
valid when every expected attribute matches and every dataset has the shard's row count;
otherwise it is rebuilt -- written block by block to a temporary name, then renamed
(atomic, :mod:`moe.shared.atomic`: a failure leaves no file and is one error naming the cache), with a
log line saying why. Datasets are contiguous, so a block of rows is one read.

:func:`ensure_row_caches` builds several caches at once and, with ``shared=True`` on every rank of a
run (:mod:`moe.data.ranks`), splits their rows over the ranks: the rows of the stale caches are cut
into one contiguous share per rank (:func:`moe.data.ranks.split_rows`); a rank writes a cache its
share covers whole under its own name, and any other piece as a part file ``.<name>.part<start>-<stop>``
(atomic too, with the cache's attributes and its row range); after a barrier one rank joins the parts of
each cache into the cache (atomic) and removes them. A rank that dies leaves no file under any of these
names half-written; a rerun over the same ranks keeps the valid parts and builds the rest, a rerun over
other ranks rebuilds (stale parts are removed when their cache is joined).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from moe.data import ranks
from moe.shared.atomic import atomic_h5
from moe.shared.heap import block_heap

log = logging.getLogger(__name__)

Blocks = Iterable[tuple[int, int, dict[str, np.ndarray]]]


def source_attrs(shard: Path, n_rows: int, n_pixels: int) -> dict:
    """What identifies the shard a cache was built from."""
    st = Path(shard).stat()
    return {
        "source": Path(shard).name,
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "n_rows": int(n_rows),
        "n_pixels": int(n_pixels),
    }


def _same(a, b) -> bool:
    if isinstance(a, bytes):
        a = a.decode()
    if isinstance(b, float) or isinstance(a, (float, np.floating)):
        return a is not None and float(a) == float(b)
    if isinstance(a, np.generic):
        a = a.item()
    return a == b


def stale_reason(path: Path, expected: dict) -> str | None:
    """Why the cache at ``path`` cannot be used (None: it is valid)."""
    if not path.is_file():
        return "absent"
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: f.attrs[k] for k in expected if k in f.attrs}
            lengths = {name: f[name].shape[0] for name in f}
    except (OSError, KeyError) as exc:
        return f"unreadable ({exc})"
    differ = sorted(k for k, v in expected.items() if not _same(attrs.get(k), v))
    if differ:
        return f"built from other data or settings ({', '.join(differ)} differ)"
    if not lengths or any(n != expected["n_rows"] for n in lengths.values()):
        return "incomplete"
    return None


@dataclass(frozen=True)
class RowCacheJob:
    """One cache to have: its ``path``, the ``expected`` attributes (with ``n_rows``) and ``blocks(start, stop)``,
    which yields ``(start, stop, {name: array [stop - start, ...]})`` covering rows ``start..stop`` in order;
    pieces built apart start at multiples of ``align`` rows (rows built together, e.g. by one noise draw)."""

    path: Path
    expected: dict
    blocks: Callable[[int, int], Blocks]
    what: str = "cache"
    align: int = 1


def ensure_row_cache(path: Path, expected: dict, blocks: Callable[[], Blocks], what: str = "cache") -> Path:
    """``path`` if it is a valid cache for ``expected``; else build it from ``blocks()``.

    ``blocks()`` yields ``(start, stop, {name: array [stop - start, ...]})`` covering rows
    ``0..expected['n_rows']`` in order.
    """
    return ensure_row_caches([RowCacheJob(Path(path), expected, lambda start, stop: blocks(), what)])[0]


def ensure_row_caches(jobs: Sequence[RowCacheJob], shared: bool = False) -> list[Path]:
    """The paths of ``jobs``, building those absent or stale; with ``shared`` (collective: every rank calls it
    with the same jobs) their rows are split over the ranks (see the module docstring)."""
    rank, world = ranks.rank_world() if shared else (0, 1)
    reasons = [stale_reason(Path(j.path), j.expected) for j in jobs] if rank == 0 else None
    if world > 1:  # one view of the files for every rank (a shared filesystem may lag on some nodes)
        reasons = ranks.broadcast(reasons)
    todo = [i for i, reason in enumerate(reasons) if reason is not None]
    for i in todo:
        if rank == 0 and reasons[i] != "absent":
            log.info("rebuilding %s %s: %s", jobs[i].what, jobs[i].path, reasons[i])
    sizes = [int(jobs[i].expected["n_rows"]) for i in todo]
    shares = ranks.split_rows(sizes, world, [jobs[i].align for i in todo])
    with block_heap():  # the builders' [block, pixels] arrays reuse the heap (0.85x the time at 100k rows)
        for k, start, stop in shares[rank]:
            job = jobs[todo[k]]
            if (start, stop) == (0, sizes[k]):
                _write(Path(job.path), job.expected, job.blocks(0, sizes[k]), job.what)
                continue
            part, attrs = part_path(Path(job.path), start, stop), part_attrs(job.expected, start, stop)
            if stale_reason(part, attrs) is not None:  # a valid part of an interrupted run is kept
                blocks = ((a - start, b - start, arrays) for a, b, arrays in job.blocks(start, stop))
                _write(part, attrs, blocks, job.what)
    if world > 1:
        ranks.barrier()
        pieces = {}  # cache -> its parts in row order, joined by the rank that built its first piece
        for r, share in enumerate(shares):
            for k, start, stop in share:
                pieces.setdefault(k, []).append((r, start, stop))
        for k, parts in pieces.items():
            if len(parts) > 1 and parts[0][0] == rank:
                _join(jobs[todo[k]], [(start, stop) for _, start, stop in parts])
        ranks.barrier()
    return [Path(j.path) for j in jobs]


def part_path(path: Path, start: int, stop: int) -> Path:
    """The part file of rows [start, stop) of the cache at ``path`` (hidden: no shard search finds it)."""
    return path.with_name(f".{path.name}.part{start}-{stop}")


def part_attrs(expected: dict, start: int, stop: int) -> dict:
    """What a part file of rows [start, stop) records: the cache's attributes, its own rows and its range."""
    return {
        **expected,
        "n_rows": stop - start,
        "part_start": start,
        "part_stop": stop,
        "cache_rows": expected["n_rows"],
    }


def _write(path: Path, expected: dict, blocks: Blocks, what: str) -> None:
    """Write the blocks (rows from 0) as the cache ``path`` with attributes ``expected``, atomically."""
    n = int(expected["n_rows"])
    with atomic_h5(path, what) as f:
        for start, stop, arrays in blocks:
            for name, arr in arrays.items():
                if name not in f:
                    f.create_dataset(name, shape=(n,) + arr.shape[1:], dtype=arr.dtype)
                f[name][start:stop] = arr
        for k, v in expected.items():
            f.attrs[k] = v


def _join(job: RowCacheJob, pieces: list[tuple[int, int]], block_rows: int = 65536) -> None:
    """The cache of ``job`` from its part files (rows ``pieces``, in order), atomically; then the parts go
    (and those of other row ranges: an earlier run over other ranks)."""
    path = Path(job.path)
    parts = [part_path(path, start, stop) for start, stop in pieces]
    for part, (start, stop) in zip(parts, pieces):
        reason = stale_reason(part, part_attrs(job.expected, start, stop))
        if reason is not None:  # a rank said it wrote it: only a lost file gets here
            raise OSError(f"{part}: part of {job.what} {path} is {reason}")

    def blocks():
        for part, (start, stop) in zip(parts, pieces):
            for a in range(start, stop, block_rows):
                b = min(a + block_rows, stop)
                yield a, b, read_rows(part, a - start, b - start)

    _write(path, job.expected, blocks(), job.what)
    for stale in path.parent.glob(f".{path.name}.part*"):
        stale.unlink(missing_ok=True)


def read_rows(path: Path, start: int, stop: int, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Rows [start, stop) of every dataset (or of ``names``) of a row cache."""
    with h5py.File(path, "r") as f:
        return {name: f[name][start:stop] for name in (names if names is not None else f)}
