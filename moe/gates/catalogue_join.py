"""One catalogue from the parts the ranks of a ``predict`` wrote: rank r's part holds the r-th contiguous
share of the rows (:mod:`moe.data.stream`), so the parts in rank order are the rows in input order.

A part is ``.<name>.rank<r><suffix>`` next to the catalogue (hidden, whole: written atomically like a
catalogue). :func:`join_parts` reads them chunk by chunk (memory flat in rows) into the catalogue,
atomically, then removes them; columns are the union of the parts' (a part of unlabelled shards has
no ``*_true`` column: empty there).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from tables import HDF5ExtError

from moe.shared.atomic import AtomicFile

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
HDF5_KEY = "catalogue"
CHUNK_ROWS = 100_000


def part_path(target: Path, rank: int) -> Path:
    """Where rank ``rank`` writes its share of the catalogue ``target``."""
    return target.with_name(f".{target.stem}.rank{rank}{target.suffix}")


def join_parts(parts: list[Path], target: Path) -> int:
    """Write the rows of ``parts`` (in order; absent ones -- a rank without rows -- skipped) as the catalogue
    ``target`` and remove the parts; returns the number of rows."""
    parts = [p for p in parts if p.is_file()]
    hdf5 = target.suffix.lower() in HDF5_SUFFIXES
    columns = _columns(parts, hdf5)
    rows = 0
    with AtomicFile(target, "the catalogue", body_failures=(OSError, HDF5ExtError)) as tmp:
        if not hdf5 and all(list(_header(p)) == columns for p in parts):  # the usual case: bytes as they are
            with open(tmp, "wb") as out:
                for i, part in enumerate(parts):
                    with open(part, "rb") as f:
                        if i:
                            f.readline()  # the header, written once
                        shutil.copyfileobj(f, out, 1 << 22)
            rows = sum(_count_rows(p) for p in parts)
        else:
            widths = _string_widths(parts) if hdf5 else {}
            for chunk in (c.reindex(columns=columns) for p in parts for c in _chunks(p, hdf5)):
                if hdf5:
                    with pd.HDFStore(tmp, mode="a") as store:
                        store.append(HDF5_KEY, chunk, format="table", index=False, min_itemsize=widths)
                else:
                    chunk.to_csv(tmp, mode="a", header=rows == 0, index=False, float_format="%.7g")
                rows += len(chunk)
    for part in parts:
        part.unlink(missing_ok=True)
    return rows


def _chunks(path: Path, hdf5: bool) -> Iterator[pd.DataFrame]:
    if hdf5:
        with pd.HDFStore(path, mode="r") as store:
            n = store.get_storer(HDF5_KEY).nrows
            for start in range(0, n, CHUNK_ROWS):
                yield store.select(HDF5_KEY, start=start, stop=start + CHUNK_ROWS)
    else:
        yield from pd.read_csv(path, chunksize=CHUNK_ROWS)


def _header(path: Path) -> list[str]:
    return list(pd.read_csv(path, nrows=0).columns)


def _count_rows(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 22), b"")) - 1


def _columns(parts: list[Path], hdf5: bool) -> list[str]:
    """The union of the parts' columns, in order of first appearance."""
    out: dict[str, None] = {}
    for part in parts:
        if hdf5:
            with pd.HDFStore(part, mode="r") as store:
                names = list(store.select(HDF5_KEY, start=0, stop=0).columns)
        else:
            names = _header(part)
        out |= dict.fromkeys(names)
    return list(out)


def _string_widths(parts: list[Path]) -> dict[str, int]:
    """The widest of each string column over the parts (an HDF5 table fixes the width at its first append;
    the writer makes its string columns data columns, which the table names)."""
    widths: dict[str, int] = {}
    for part in parts:
        with pd.HDFStore(part, mode="r") as store:
            table = store.get_storer(HDF5_KEY).table
            for name in table.colnames:
                col = table.coldescrs[name]
                if col.kind == "string":
                    widths[name] = max(widths.get(name, 1), col.itemsize)
    return widths
