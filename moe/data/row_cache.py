"""Per-row caches of a shard: HDF5 files of arrays with one row per spectrum, validated by attributes.

A cache records what it was built from as attributes (the source shard's name, size,
``mtime_ns``, rows, pixels, a format version and whatever key the builder adds). It is
valid when every expected attribute matches and every dataset has the shard's row count;
otherwise it is rebuilt -- written block by block to a temporary name, then renamed
(atomic, :mod:`moe.shared.atomic`: a failure leaves no file and is one error naming the cache), with a
log line saying why. Datasets are contiguous, so a block of rows is one read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import h5py
import numpy as np

from moe.shared.atomic import atomic_h5

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


def ensure_row_cache(path: Path, expected: dict, blocks: Callable[[], Blocks], what: str = "cache") -> Path:
    """``path`` if it is a valid cache for ``expected``; else build it from ``blocks()``.

    ``blocks()`` yields ``(start, stop, {name: array [stop - start, ...]})`` covering rows
    ``0..expected['n_rows']`` in order.
    """
    path = Path(path)
    reason = stale_reason(path, expected)
    if reason is None:
        return path
    if reason != "absent":
        log.info("rebuilding %s %s: %s", what, path, reason)
    n = int(expected["n_rows"])
    with atomic_h5(path, what) as f:
        for start, stop, arrays in blocks():
            for name, arr in arrays.items():
                if name not in f:
                    f.create_dataset(name, shape=(n,) + arr.shape[1:], dtype=arr.dtype)
                f[name][start:stop] = arr
        for k, v in expected.items():
            f.attrs[k] = v
    return path


def read_rows(path: Path, start: int, stop: int, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Rows [start, stop) of every dataset (or of ``names``) of a row cache."""
    with h5py.File(path, "r") as f:
        return {name: f[name][start:stop] for name in (names if names is not None else f)}
