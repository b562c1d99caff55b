"""Bad rows are found before any work: one streamed check per shard, remembered by the shard's content.

Before a :class:`~moe.data.folder.SpectraFolder` is used -- before the experts are fitted or any
cache is built -- every row it will read is checked (:func:`moe.data.shards.check_rows`: NaN/Inf
flux; error with no finite pixel, infinite, <= 0 or NaN inside the spectrum; NaN labels or labels
outside :data:`moe.data.bins.LABEL_BOUNDS`). With ``bad_rows="error"`` the first shard with bad rows
is a :class:`~moe.shared.errors.ShardError` naming the file, each field, what is wrong and its first
rows; with ``"drop"`` those rows are left out of the split (:meth:`ShardSet.drop`) with one warning
per shard.

The result is kept in a small JSON marker per shard, ``row_check_<stem>.json`` next to the
pre-noised copies (the cache folder), keyed by the shard's name, size, ``mtime_ns`` and content
hash and by how many rows were checked: later runs read the marker instead of the shard. The
first check of a shard runs under a file lock, so concurrent processes (DDP ranks) check it once,
and they share the shards: each first checks those no other process is checking at that moment,
then reads the markers of the rest. A marker that cannot be written (read-only folder) only costs
the check again next time.

Inside :func:`deferred_screens` a screen is only queued, and runs when its caller says: the CLI
starts the run's other DDP processes first, so that they check the rows together instead of one
process checking them while the others are not started yet.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from filelock import FileLock, Timeout

from moe.data.shards import RowCheck, RowProblem, ShardInfo, check_rows, content_hash
from moe.data.stream import ShardSet
from moe.shared.atomic import write_text
from moe.shared.errors import ShardError, WriteError

log = logging.getLogger(__name__)

BadRows = Literal["error", "drop"]
BAD_ROWS: tuple[str, ...] = get_args(BadRows)
CHECK_VERSION = 1
DROP_HINT = "bad_rows='drop' leaves such rows out (moe fit: --data.bad_rows drop; moe experts: --bad-rows drop)"

_memo: dict[tuple[str, str], RowCheck] = {}
_queue: ContextVar[list[Callable[[], int]] | None] = ContextVar("row_check_queue", default=None)


def marker_path(shard: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the row-check marker of ``shard`` lives (next to it unless ``cache_dir`` is given)."""
    folder = shard.parent if cache_dir is None else Path(cache_dir) / shard.parent.name
    return folder / f"row_check_{shard.stem}.json"


def _key(info: ShardInfo, labelled: bool) -> dict:
    st = info.path.stat()
    return {
        "version": CHECK_VERSION,
        "source": info.path.name,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "content": content_hash(info.path),
        "n_rows": info.n_rows,
        "n_pixels": info.n_pixels,
        "labelled": bool(labelled),
    }


def _read_marker(marker: Path, key: dict, shard: Path) -> RowCheck | None:
    try:
        d = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("key") != key:
        return None
    try:
        problems = tuple(
            RowProblem(p["field"], p["what"], np.asarray(p["rows"], dtype=np.int64), p.get("example", ""))
            for p in d["problems"]
        )
        return RowCheck(shard, int(d["rows_checked"]), problems)
    except (KeyError, TypeError, ValueError):
        return None


def _write_marker(marker: Path, key: dict, check: RowCheck) -> None:
    body = {
        "key": key,
        "rows_checked": check.n_rows,
        "problems": [
            {"field": p.field, "what": p.what, "rows": p.rows.tolist(), "example": p.example} for p in check.problems
        ],
    }
    try:
        write_text(marker, json.dumps(body), "the row-check marker")
    except WriteError as exc:  # a read-only data folder: check again next time
        log.debug("row-check marker not written: %s", exc)


@contextmanager
def _lock(marker: Path, wait: bool = True) -> Iterator[bool]:
    """A file lock next to ``marker`` when its folder can hold one (otherwise none): yields whether this
    process may go on, False only without ``wait`` while another process holds the lock."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(marker.with_name(f".{marker.name}.lock")))
        lock.acquire(blocking=wait)
    except Timeout:
        yield False
        return
    except OSError:
        yield True
        return
    try:
        yield True
    finally:
        lock.release()


def checked_rows(
    info: ShardInfo,
    n_rows: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    labelled: bool = True,
    wait: bool = True,
) -> RowCheck | None:
    """The bad rows among the first ``n_rows`` rows of a shard: from the marker when it matches, else checked.
    Without ``wait``, None while another process is checking the shard."""
    n = info.n_rows if n_rows is None else int(n_rows)
    key = _key(info, labelled)
    memo_key = (str(info.path.resolve()), json.dumps(key, sort_keys=True))
    hit = _memo.get(memo_key)
    if hit is not None and hit.n_rows >= n:
        return hit.head(n)
    marker = marker_path(info.path, cache_dir)
    found = _read_marker(marker, key, info.path)
    if found is None or found.n_rows < n:
        with _lock(marker, wait) as mine:
            if not mine:
                return None
            found = _read_marker(marker, key, info.path)  # another process may have checked it meanwhile
            if found is None or found.n_rows < n:
                log.info("checking the rows of %s", info.path)
                found = check_rows(info.path, info, stop=n, labelled=labelled)
                _write_marker(marker, key, found)
    _memo[memo_key] = found
    return found.head(n)


@contextmanager
def deferred_screens() -> Iterator[list[Callable[[], int]]]:
    """Inside the block :func:`screen` queues its check in the yielded list instead of running it; the caller
    runs each queued check (it returns what :func:`screen` would have) before anything uses those shard sets."""
    queue: list[Callable[[], int]] = []
    token = _queue.set(queue)
    try:
        yield queue
    finally:
        _queue.reset(token)


def screen(sets: Sequence[ShardSet], bad_rows: str = "error", cache_dir: str | os.PathLike | None = None) -> int:
    """Check every row ``sets`` use (see module docstring); return how many rows were dropped (0 when queued
    by :func:`deferred_screens`).

    ``bad_rows="error"``: a ShardError naming the first shard with bad rows (and how many others have some);
    ``"drop"``: those rows are left out of their set, one warning per shard.
    """
    if bad_rows not in BAD_ROWS:
        raise ValueError(f"bad_rows must be one of {BAD_ROWS}, got {bad_rows!r}")
    queue = _queue.get()
    if queue is not None:
        queue.append(partial(_screen, list(sets), bad_rows, cache_dir))
        return 0
    return _screen(sets, bad_rows, cache_dir)


def _screen(sets: Sequence[ShardSet], bad_rows: str, cache_dir: str | os.PathLike | None) -> int:
    shards = [(s, k, info) for s in sets for k, info in enumerate(s.infos)]
    checks: dict[int, RowCheck] = {}
    for wait in (False, True):  # first the shards no other process is checking now, then the others' markers
        for i, (s, k, info) in enumerate(shards):
            if i not in checks:
                check = checked_rows(info, int(s.counts[k]), cache_dir, s.labelled, wait)
                if check is not None:
                    checks[i] = check
    found = [(s, k, checks[i]) for i, (s, k, _) in enumerate(shards) if not checks[i].ok]
    if not found:
        return 0
    if bad_rows == "error":
        check = found[0][2]
        more = f"; {len(found) - 1} more shard(s) have bad rows" if len(found) > 1 else ""
        raise ShardError(check.path, f"{check.summary()}{more}; {DROP_HINT}")
    total = 0
    for s, k, check in found:
        rows = check.bad_rows()
        s.drop(k, rows)
        log.warning("%s: leaving out %d bad row(s): %s", check.path, len(rows), check.summary())
        total += len(rows)
    return total
