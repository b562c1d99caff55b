"""Catalogue files, written batch by batch (memory flat in rows) to a temporary name and renamed at the end.

By the output's suffix:

- ``.csv``: a plain table (``pandas.read_csv(path)`` reads it without options); what each column and flag
  bit means, with the run's provenance, goes to the sidecar ``<name>.meta.json``;
- ``.h5`` / ``.hdf5`` / ``.hdf``: a pandas table (``pandas.read_hdf(path)``), key ``catalogue``; the same
  meanings and provenance as attributes of the table node (``store.get_storer("catalogue").attrs``:
  ``columns``, ``flag_bits``, ``provenance``);
- ``.fits`` / ``.fit`` / ``.fts``: a FITS binary table (``astropy.table.Table.read(path)``): a unit
  (``TUNITn``) and a description (``TCOMMn``, the TTYPEn comment, and astropy's column metadata) per column,
  the flag bits (``FLAGBITn``) and the provenance in the header. Rows are appended to the data unit as they
  come; the row count in the header is set when prediction ends.

Each writer has ``append(frame)``, ``commit()`` and ``abort()``; a failed write (disk full) is one
:class:`~moe.shared.errors.WriteError` naming the catalogue, and nothing is left behind.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tables import HDF5ExtError

from moe.catalogue.flags import describe as flag_bits
from moe.shared.atomic import AtomicFile, write_text

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
FITS_SUFFIXES = (".fits", ".fit", ".fts")
HDF5_KEY = "catalogue"
FITS_BLOCK = 2880

# unit and description of each label column; "<label>_<suffix>" columns derive theirs from these
LABEL_META = {
    "log_g": ("dex", "surface gravity log10(g / cm s^-2)"),
    "T_eff": ("K", "effective temperature"),
    "M_H": ("dex", "metallicity [M/H]"),
}
FIXED_META = {
    "shard": ("", "shard file the star was read from"),
    "row": ("", "row of the star in its shard"),
    "objid": ("", "object id (from the shard's parameter table)"),
    "catid": ("", "catalogue id (from the shard's parameter table)"),
    "fiberid": ("", "fibre id (from the shard's parameter table)"),
    "ra": ("deg", "right ascension (from the shard's parameter table)"),
    "dec": ("deg", "declination (from the shard's parameter table)"),
    "mag": ("mag", "magnitude (from the shard's parameter table)"),
    "snr": ("", "signal-to-noise ratio of the usable pixels, |flux| / |noise_level * error| (clean estimate)"),
    "snr_bin": ("", "SNR bin: X <= 2 < L <= 4 < M <= 7 < H"),
    "n_masked": ("pix", "masked pixels (NaN/Inf flux, error NaN/Inf/<= 0, or non-zero mask); imputed"),
    "ood_score": ("", "unlikeness to the training spectra in units of its threshold: > 1 is OOD"),
    "flags": ("", "flag bits (FLAGBITn / flag_bits): 0 = nothing to warn about"),
}


def column_meta(name: str) -> tuple[str, str]:
    """(unit, description) of a catalogue column."""
    if name in FIXED_META:
        return FIXED_META[name]
    for label, (unit, what) in LABEL_META.items():
        if name == f"{label}_pred":
            return unit, f"predicted {what}"
        if name == f"{label}_sigma":
            return unit, f"calibrated 1-sigma uncertainty of {label}_pred"
        if name == f"{label}_true":
            return unit, f"{what} from the shard's parameter table (may lie outside the training range)"
        if name == f"{label}_edge":
            return "", f"{label}_pred outside the training range or within its sigma of an edge (sets LABEL_EDGE)"
    if name.startswith("rho_"):  # rho_<a>_<b>
        for a in LABEL_META:
            if name.startswith(f"rho_{a}_") and name[len(a) + 5 :] in LABEL_META:
                b = name[len(a) + 5 :]
                return (
                    "",
                    f"correlation of the errors of {a}_pred and {b}_pred (per SNR bin, from the predicted labels)",
                )
        return "", "correlation of the errors of two labels (per SNR bin, from the predicted labels)"
    if name.startswith("pred_"):  # pred_<label>_<expert>
        for label, (unit, what) in LABEL_META.items():
            if name.startswith(f"pred_{label}_"):
                return unit, f"{what} predicted by expert {name[len(label) + 6 :]}"
        return "", f"predicted by expert {name[5:]}"
    if name.startswith("w_"):  # w_<expert> (shared routing) or w_<label>_<expert>
        for label in LABEL_META:
            if name.startswith(f"w_{label}_"):
                return "", f"gate weight of expert {name[len(label) + 3 :]} for {label}"
        return "", f"gate weight of expert {name[2:]}"
    return "", ""


def describe_columns(columns) -> dict[str, dict[str, str]]:
    return {c: dict(zip(("unit", "description"), column_meta(c))) for c in columns}


def sidecar(path: Path) -> Path:
    """The ``.meta.json`` sidecar of a CSV catalogue."""
    return path.with_name(path.stem + ".meta.json")


def write_meta(path: Path, meta: dict) -> None:
    """The meanings and provenance ``meta`` of a finished catalogue (a table joined from the ranks' parts):
    HDF5 attributes of its table, or the sidecar of a CSV."""
    suffix = path.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        _hdf5_attrs(path, meta)
    elif suffix not in FITS_SUFFIXES:
        write_text(sidecar(path), json.dumps(meta, indent=2) + "\n", "the catalogue's sidecar")


def _hdf5_attrs(path: Path, meta: dict) -> None:
    with pd.HDFStore(path, mode="a") as store:
        attrs = store.get_storer(HDF5_KEY).attrs
        for name, value in meta.items():
            setattr(attrs, name, json.dumps(value))


def writer_for(path: Path, provenance: dict, string_widths: dict[str, int]):
    """The writer of ``path``'s format (by suffix; anything else is CSV)."""
    suffix = path.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        return HDF5Catalogue(path, provenance, string_widths)
    if suffix in FITS_SUFFIXES:
        return FITSCatalogue(path, provenance, string_widths)
    return CSVCatalogue(path, provenance, string_widths)


class _Catalogue:
    body_failures: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, path: Path, provenance: dict, string_widths: dict[str, int]):
        self.path = Path(path)
        self.provenance = provenance
        self.string_widths = string_widths
        self.file = AtomicFile(self.path, "the catalogue", body_failures=self.body_failures)
        self.columns: list[str] | None = None
        self.rows = 0

    @property
    def tmp(self) -> Path:
        """The temporary file being written."""
        return self.file.tmp

    def append(self, df: pd.DataFrame) -> None:
        try:
            self._append(df)
        except self.body_failures as exc:
            self.abort()
            raise self.file.error(exc) from exc
        self.columns = list(df.columns) if self.columns is None else self.columns
        self.rows += len(df)

    def commit(self) -> bool:
        """Finish and rename into place; False when nothing was written (no rows)."""
        if not self.file.tmp.exists():
            return False
        try:
            self._finish()
        except self.body_failures as exc:
            self.abort()
            raise self.file.error(exc) from exc
        self.file.commit()
        return True

    def abort(self) -> None:
        self.file.abort()

    def meta(self) -> dict:
        return {
            "columns": describe_columns(self.columns or []),
            "flag_bits": flag_bits(),
            "provenance": self.provenance,
        }

    def _append(self, df: pd.DataFrame) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        pass


class CSVCatalogue(_Catalogue):
    """Plain CSV; meanings and provenance in the sidecar ``<name>.meta.json``."""

    def _append(self, df: pd.DataFrame) -> None:
        tmp = self.file.tmp
        df.to_csv(tmp, mode="a", header=not tmp.exists(), index=False, float_format="%.7g")

    def commit(self) -> bool:
        done = super().commit()
        if done:
            write_meta(self.path, self.meta())
        return done


class HDF5Catalogue(_Catalogue):
    """A pandas table; meanings and provenance as attributes of its node."""

    body_failures = (OSError, HDF5ExtError)

    def _append(self, df: pd.DataFrame) -> None:
        widths = {c: w for c, w in self.string_widths.items() if c in df}
        with pd.HDFStore(self.file.tmp, mode="a") as store:
            store.append(HDF5_KEY, df, format="table", index=False, min_itemsize=widths)

    def _finish(self) -> None:
        _hdf5_attrs(self.file.tmp, self.meta())


def _is_text(series: pd.Series) -> bool:
    return series.dtype == object or pd.api.types.is_string_dtype(series.dtype)


def _fits_dtype(series: pd.Series, width: int | None) -> np.dtype:
    """The big-endian on-disk dtype of a column (strings fixed-width ASCII; unsigned and bool as int)."""
    if _is_text(series):
        return np.dtype(f"S{max(width or 1, 1)}")
    kind = series.dtype.kind
    if kind == "b":
        return np.dtype(">i2")
    if kind == "u":
        return np.dtype(">i8")
    return series.dtype.newbyteorder(">")


def _comment_room(keyword: str, value: str) -> int:
    """Characters of comment that fit one 80-character FITS card ``keyword = 'value' / comment`` beside a
    string value (quoted, padded to 8 characters, the closing quote at column 20 or later): longer ones
    astropy truncates with a VerifyWarning."""
    return max(0, 80 - len(f"{keyword:8}= ") - max(len(f"'{value:8}'"), 20) - len(" / "))


def _ascii(value) -> str:
    """A header value FITS can hold (printable ASCII)."""
    return re.sub(r"[^\x20-\x7e]", "?", str(value))


class FITSCatalogue(_Catalogue):
    """A FITS binary table streamed to disk: primary HDU, table header (row count 0), rows as they come; the
    header is written again with the row count at the end (same size: only NAXIS2 changes)."""

    def __init__(self, path: Path, provenance: dict, string_widths: dict[str, int]):
        super().__init__(path, provenance, string_widths)
        self._dtype: np.dtype | None = None
        self._header = None
        self._header_at = 0

    def _table_header(self, df: pd.DataFrame):
        from astropy.io import fits
        from astropy.table import Table

        self._dtype = np.dtype([(c, _fits_dtype(df[c], self.string_widths.get(c))) for c in df])
        empty = Table(np.zeros(0, dtype=self._dtype.newbyteorder("=")))
        for c in df:
            unit, description = column_meta(c)
            empty[c].unit = unit if unit and unit != "dex" else None  # astropy cannot write dex (below)
            empty[c].description = description or None
        buf = io.BytesIO()  # written by astropy itself, so the header carries its column metadata (descriptions)
        empty.write(buf, format="fits")
        buf.seek(0)
        with fits.open(buf) as hdus:
            header = hdus[1].header.copy()
        header["EXTNAME"] = ("CATALOGUE", "moe predict: one row per star")
        header["DATE"] = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), "file creation date (UTC)")
        for i, c in enumerate(df.columns, start=1):
            unit, description = column_meta(c)
            if unit == "dex":  # not a FITS-standard unit, but the one surveys write (Gaia's mh_gspphot)
                header.insert(f"TFORM{i}", (f"TUNIT{i}", unit), after=True)
            if description:
                header.comments[f"TTYPE{i}"] = _ascii(description)[: _comment_room(f"TTYPE{i}", c)]
                header[f"TCOMM{i}"] = _ascii(description)
        for value, meaning in flag_bits().items():
            bit, name = value.split(" ", 1)
            header[f"FLAGBIT{int(bit).bit_length() - 1}"] = (name, _ascii(meaning)[:47])
        for key, value in self.provenance.items():
            header[f"HIERARCH MOE {key.upper().removeprefix('MOE_')}"] = (
                _ascii(value) if not isinstance(value, (int, float)) else value
            )
        if header["NAXIS1"] != self._dtype.itemsize:
            raise ValueError(f"FITS row of {header['NAXIS1']} bytes, the records have {self._dtype.itemsize}")
        return header

    def _append(self, df: pd.DataFrame) -> None:
        from astropy.io import fits

        tmp = self.file.tmp
        if self._header is None:
            self._header = self._table_header(df)
            with open(tmp, "wb") as f:
                f.write(fits.PrimaryHDU().header.tostring().encode("ascii"))
                self._header_at = f.tell()
                f.write(self._header.tostring().encode("ascii"))
        rec = np.empty(len(df), dtype=self._dtype)
        for c in df:
            values = df[c].to_numpy()
            if rec.dtype[c].kind == "S":
                values = np.char.encode(values.astype(str), "ascii", "replace")
            rec[c] = values
        with open(tmp, "ab") as f:
            f.write(rec.tobytes())

    def _finish(self) -> None:
        tmp = self.file.tmp
        with open(tmp, "r+b") as f:
            f.seek(0, 2)
            f.write(b"\0" * (-f.tell() % FITS_BLOCK))
            old = self._header.tostring()
            self._header["NAXIS2"] = self.rows
            new = self._header.tostring()
            if len(new) != len(old):
                raise OSError("the FITS table header changed size")
            f.seek(self._header_at)
            f.write(new.encode("ascii"))
