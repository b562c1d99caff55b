"""One catalogue from the parts the ranks of a ``predict`` wrote: rank r's part holds the r-th contiguous
share of the rows (:mod:`moe.data.stream`), so the parts in rank order are the rows in input order.

A part is ``.<name>.rank<r><suffix>`` next to the catalogue (hidden, whole: written atomically like a
catalogue). :func:`join_parts` reads them chunk by chunk (memory flat in rows) into the catalogue,
atomically, then removes them; columns are the union of the parts' (a part of unlabelled shards has
no ``*_true`` column: empty there).

A FITS catalogue is joined record by record: the table header of the part with the most columns (units,
descriptions, flag bits, provenance: what one process writes) with the total row count and the join's
``DATE``, then every part's rows read through a memory map, in chunks, in that header's record layout
(a column a part lacks is NaN there, strings as wide as the widest part's).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from tables import HDF5ExtError

from moe.catalogue.writers import FITS_BLOCK, FITS_SUFFIXES, HDF5_KEY, HDF5_SUFFIXES
from moe.shared.atomic import AtomicFile

CHUNK_ROWS = 100_000
CARD = 80  # bytes of a FITS header card


def part_path(target: Path, rank: int) -> Path:
    """Where rank ``rank`` writes its share of the catalogue ``target``."""
    return target.with_name(f".{target.stem}.rank{rank}{target.suffix}")


def join_parts(parts: list[Path], target: Path) -> int:
    """Write the rows of ``parts`` (in order; absent ones -- a rank without rows -- skipped) as the catalogue
    ``target`` and remove the parts; returns the number of rows."""
    parts = [p for p in parts if p.is_file()]
    if target.suffix.lower() in FITS_SUFFIXES:
        return _join_fits(parts, target)
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


class _FITSPart:
    """A FITS part's table: its header cards (raw, as written), record layout (on-disk, big-endian) and rows."""

    def __init__(self, path: Path):
        from astropy.io import fits

        with fits.open(path, memmap=False, lazy_load_hdus=True) as hdus:
            info = hdus.fileinfo(1)
            cols = hdus[1].columns
            self.names = list(cols.names)
            self.dtype = np.dtype([(n, _big_endian(cols.dtype[n])) for n in self.names])
            self.rows, width = int(hdus[1].header["NAXIS2"]), int(hdus[1].header["NAXIS1"])
        if self.dtype.itemsize != width:
            raise ValueError(f"{path}: a FITS row of {width} bytes, its columns make {self.dtype.itemsize}")
        self.path = path
        self.data_at = int(info["datLoc"])
        with open(path, "rb") as f:
            f.seek(int(info["hdrLoc"]))
            raw = f.read(self.data_at - int(info["hdrLoc"])).decode("ascii")
        self.cards = [raw[i : i + CARD] for i in range(0, len(raw), CARD)]

    def records(self) -> Iterator[np.ndarray]:
        """The rows in chunks of ``CHUNK_ROWS`` (a memory map: memory flat in rows)."""
        if self.rows == 0:
            return
        data = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.data_at, shape=(self.rows,))
        for start in range(0, self.rows, CHUNK_ROWS):
            yield data[start : start + CHUNK_ROWS]
        del data


def _big_endian(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder(">") if dtype.kind in "iuf" and dtype.itemsize > 1 else dtype


def _card(key: str, value, like: str | None = None) -> str:
    """One header card image ``key = value``, with the comment of the card ``like`` (an image) if given."""
    from astropy.io import fits

    comment = fits.Card.fromstring(like).comment if like else ""
    return fits.Card(key, value, comment).image


def _join_fits(parts: list[Path], target: Path) -> int:
    """The FITS parts as one FITS catalogue at ``target`` (module docstring); returns the number of rows."""
    import time

    from astropy.io import fits

    tables = [_FITSPart(p) for p in parts]
    if not tables:
        return 0
    template = max(tables, key=lambda t: len(t.names))  # the first of the widest
    extra = {n for t in tables for n in t.names} - set(template.names)
    if extra:
        raise ValueError(f"the catalogue parts disagree on their columns: {sorted(extra)} are not in {template.path}")
    fields = []
    for n in template.names:  # strings as wide as the widest part's
        kind = template.dtype[n]
        if kind.kind == "S":
            kind = np.dtype(f"S{max(t.dtype[n].itemsize for t in tables if n in t.names)}")
        fields.append((n, kind))
    dtype = np.dtype(fields)
    rows = sum(t.rows for t in tables)
    edits = {"NAXIS1": dtype.itemsize, "NAXIS2": rows, "DATE": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())}
    for i, n in enumerate(template.names, start=1):
        if dtype[n].kind == "S" and dtype[n] != template.dtype[n]:
            edits[f"TFORM{i}"] = f"{dtype[n].itemsize}A"
    cards = [_card(key, edits[key], card) if (key := card[:8].rstrip()) in edits else card for card in template.cards]
    with AtomicFile(target, "the catalogue", body_failures=(OSError,)) as tmp, open(tmp, "wb") as out:
        out.write(fits.PrimaryHDU().header.tostring().encode("ascii"))
        out.write("".join(cards).encode("ascii"))
        for table in tables:
            for chunk in table.records():
                if chunk.dtype == dtype:
                    out.write(chunk.tobytes())
                    continue
                rec = np.zeros(len(chunk), dtype=dtype)
                for n in dtype.names:
                    if n in chunk.dtype.names:
                        rec[n] = chunk[n]
                    elif dtype[n].kind == "f":
                        rec[n] = np.nan
                out.write(rec.tobytes())
        out.write(b"\0" * (-out.tell() % FITS_BLOCK))
    for part in parts:
        part.unlink(missing_ok=True)
    return rows
