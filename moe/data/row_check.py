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
first check of a shard runs under a file lock, so concurrent processes (DDP ranks) check it once.
A marker that cannot be written (read-only folder) only costs the check again next time.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from filelock import FileLock

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
def _lock(marker: Path) -> Iterator[None]:
    """A file lock next to ``marker`` when its folder can hold one; otherwise none."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(marker.with_name(f".{marker.name}.lock")))
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def checked_rows(
    info: ShardInfo, n_rows: int | None = None, cache_dir: str | os.PathLike | None = None, labelled: bool = True
) -> RowCheck:
    """The bad rows among the first ``n_rows`` rows of a shard: from the marker when it matches, else checked."""
    n = info.n_rows if n_rows is None else int(n_rows)
    key = _key(info, labelled)
    memo_key = (str(info.path.resolve()), json.dumps(key, sort_keys=True))
    hit = _memo.get(memo_key)
    if hit is not None and hit.n_rows >= n:
        return hit.head(n)
    marker = marker_path(info.path, cache_dir)
    found = _read_marker(marker, key, info.path)
    if found is None or found.n_rows < n:
        with _lock(marker):
            found = _read_marker(marker, key, info.path)  # another process may have checked it meanwhile
            if found is None or found.n_rows < n:
                log.info("checking the rows of %s", info.path)
                found = check_rows(info.path, info, stop=n, labelled=labelled)
                _write_marker(marker, key, found)
    _memo[memo_key] = found
    return found.head(n)


def screen(sets: Sequence[ShardSet], bad_rows: str = "error", cache_dir: str | os.PathLike | None = None) -> int:
    """Check every row ``sets`` use (see module docstring); return how many rows were dropped.

    ``bad_rows="error"``: a ShardError naming the first shard with bad rows (and how many others have some);
    ``"drop"``: those rows are left out of their set, one warning per shard.
    """
    if bad_rows not in BAD_ROWS:
        raise ValueError(f"bad_rows must be one of {BAD_ROWS}, got {bad_rows!r}")
    found = []
    for s in sets:
        for k, info in enumerate(s.infos):
            check = checked_rows(info, int(s.counts[k]), cache_dir, s.labelled)
            if not check.ok:
                found.append((s, k, check))
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
