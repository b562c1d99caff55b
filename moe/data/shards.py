"""Read, validate and write shards in the pfsspec layout of the PFS simulator.

A shard is one ``dataset.h5``:

- ``spectrumdataset/wave``       (D,)   float, Angstrom, strictly increasing
- ``dataset/arrays/flux/value``  (N, D) float32, median-normalised (clipped at 0 on load)
- ``dataset/arrays/error/value`` (N, D) float32, 1 sigma (NaN filled from the nearest
  finite pixel on load)
- ``dataset/arrays/mask/value`` (N, D) integer, optional: non-zero = masked pixel (honoured by
  ``predict`` only, :func:`read_observed`; training data stay strict)
- a pandas table with columns ``T_eff, log_g, M_H, a_M, C_M, mag, redshift, snr``
  (N rows) that ``pandas.read_hdf(path)`` reads without a key.

A dataset is a folder of shards ``train_*/dataset.h5``, ``val*/dataset.h5``,
``test*/dataset.h5``. Rows are read in contiguous blocks; a split is never loaded whole.

Command line::

    moe data validate PATH [PATH ...]   # files or dataset folders
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from moe.shared.arguments import PositiveInt, ToolParser, run_tool
from moe.shared.atomic import AtomicFile, close_quietly, ensure_space, is_write_failure
from moe.shared.errors import ShardError, WriteError, reason

WAVE_KEY = "spectrumdataset/wave"
FLUX_KEY = "dataset/arrays/flux/value"
ERROR_KEY = "dataset/arrays/error/value"
MASK_KEY = "dataset/arrays/mask/value"  # optional, (N, D) integer: non-zero = masked pixel
PARAMS_KEY = "dataset/params"
PARAM_COLUMNS = ("T_eff", "log_g", "M_H", "a_M", "C_M", "mag", "redshift", "snr")
LABEL_COLUMNS = ("log_g", "T_eff", "M_H")
# numeric columns of a parameter table that identify a star in a catalogue, when present
ID_COLUMNS = ("objid", "catid", "fiberid", "ra", "dec", "mag")
SHARD_FILE = "dataset.h5"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ShardInfo:
    """Cheap facts about one shard, read from metadata only (``params_key`` None: no parameter table)."""

    path: Path
    n_rows: int
    n_pixels: int
    params_key: str | None


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def split_pattern(split: str) -> str:
    """The glob of a split's shard files inside a dataset folder: ``train_*/dataset.h5``, ``val*/...``, ``test*/...``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return f"{split}_*/{SHARD_FILE}" if split == "train" else f"{split}*/{SHARD_FILE}"


def split_files(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """Shard files of one split, in natural order (empty when there are none)."""
    return sorted(Path(data_dir).glob(split_pattern(split)), key=_natural_key)


def find_split(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """Shard files of one split (``train_*``, ``val*`` or ``test*``), in natural order; none is a ShardError."""
    files = split_files(data_dir, split)
    if not files:
        raise ShardError(data_dir, f"empty split {split!r}: no files match {split_pattern(split)}")
    return files


def _params_key(path: Path) -> str:
    try:
        with pd.HDFStore(path, mode="r") as store:
            keys = store.keys()
    except Exception as exc:  # PyTables raises a zoo of types on foreign files
        raise ShardError(path, f"cannot read the parameter table: {exc}") from exc
    if not keys:
        raise ShardError(path, "missing parameter table (no pandas table in the file)")
    for preferred in ("/" + PARAMS_KEY, "/params"):
        if preferred in keys:
            return preferred
    return keys[0]


def inspect_shard(path: str | os.PathLike, labelled: bool = True) -> ShardInfo:
    """Check the layout (datasets present, shapes agree, columns present) without scanning rows.

    ``labelled=False`` (spectra to predict) accepts a parameter table without the label columns,
    or none at all.
    """
    path = Path(path)
    if not path.is_file():
        raise ShardError(path, "file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ShardError(path, f"not a readable HDF5 file ({exc})") from exc
    with f:
        for key in (WAVE_KEY, FLUX_KEY, ERROR_KEY):
            if key not in f:
                raise ShardError(path, f"missing dataset {key!r}")
        wave, flux, error = f[WAVE_KEY], f[FLUX_KEY], f[ERROR_KEY]
        if wave.ndim != 1:
            raise ShardError(path, f"{WAVE_KEY} must be 1-D, has shape {wave.shape}")
        if flux.ndim != 2:
            raise ShardError(path, f"{FLUX_KEY} must be 2-D (N, D), has shape {flux.shape}")
        if error.shape != flux.shape:
            raise ShardError(path, f"{ERROR_KEY} shape {error.shape} disagrees with {FLUX_KEY} shape {flux.shape}")
        if wave.shape[0] != flux.shape[1]:
            raise ShardError(path, f"{WAVE_KEY} has {wave.shape[0]} pixels but {FLUX_KEY} has {flux.shape[1]}")
        for key, ds in ((WAVE_KEY, wave), (FLUX_KEY, flux), (ERROR_KEY, error)):
            if ds.dtype.kind not in "fiu":
                raise ShardError(path, f"{key} has dtype {ds.dtype}, expected real numbers (float32 / float64)")
        n_rows, n_pixels = flux.shape
        if MASK_KEY in f:
            mask = f[MASK_KEY]
            if mask.shape != flux.shape:
                raise ShardError(path, f"{MASK_KEY} shape {mask.shape} disagrees with {FLUX_KEY} shape {flux.shape}")
            if mask.dtype.kind not in "iub":
                raise ShardError(path, f"{MASK_KEY} has dtype {mask.dtype}, expected integers (non-zero = masked)")
        _check_wave(path, wave[()])
    if n_pixels == 0:
        raise ShardError(path, f"{FLUX_KEY} has no pixels (shape {flux.shape})")
    if n_rows == 0:
        raise ShardError(path, "empty shard (0 rows)")
    if not labelled and not _has_table(path):
        return ShardInfo(path=path, n_rows=int(n_rows), n_pixels=int(n_pixels), params_key=None)
    key = _params_key(path)
    with pd.HDFStore(path, mode="r") as store:
        storer = store.get_storer(key)
        n_params = storer.nrows if getattr(storer, "nrows", None) is not None else len(store.select(key))
        cols = _storer_columns(store, key)
    missing = [c for c in PARAM_COLUMNS if c not in cols]
    if missing and labelled:
        raise ShardError(path, f"parameter table {key} is missing columns {missing}")
    if n_params != n_rows:
        raise ShardError(path, f"parameter table {key} has {n_params} rows but {FLUX_KEY} has {n_rows}")
    return ShardInfo(path=path, n_rows=int(n_rows), n_pixels=int(n_pixels), params_key=key)


def _has_table(path: Path) -> bool:
    try:
        with pd.HDFStore(path, mode="r") as store:
            return bool(store.keys())
    except Exception:  # not readable as a pandas store: no table
        return False


def _storer_columns(store: pd.HDFStore, key: str) -> list[str]:
    storer = store.get_storer(key)
    if getattr(storer, "is_table", False):
        return list(storer.non_index_axes[0][1])
    return list(store.select(key, start=0, stop=1).columns)


def _check_wave(path: Path, wave: np.ndarray) -> None:
    if not np.all(np.isfinite(wave)):
        raise ShardError(path, f"{WAVE_KEY} contains non-finite values")
    if wave.size > 1 and not np.all(np.diff(wave) > 0):
        raise ShardError(path, f"{WAVE_KEY} is not strictly increasing")


def read_wave(path: str | os.PathLike) -> np.ndarray:
    """The wavelength grid [D] in Angstrom, validated."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        if WAVE_KEY not in f:
            raise ShardError(path, f"missing dataset {WAVE_KEY!r}")
        wave = np.asarray(f[WAVE_KEY][()], dtype=np.float64)
    _check_wave(path, wave)
    return wave


def read_params(path: str | os.PathLike, key: str | None = None, labelled: bool = True) -> pd.DataFrame:
    """The shard's parameter table (N rows; small, read whole)."""
    path = Path(path)
    key = key or _params_key(path)
    df = pd.read_hdf(path, key)
    missing = [c for c in PARAM_COLUMNS if c not in df.columns]
    if missing and labelled:
        raise ShardError(path, f"parameter table {key} is missing columns {missing}")
    return df.reset_index(drop=True)


def fill_nan_nearest(error: np.ndarray) -> np.ndarray:
    """Replace NaN in each row by the value of the nearest finite pixel (ties take the left). [N, D]."""
    error = np.asarray(error)
    bad = ~np.isfinite(error)
    if not bad.any():
        return error
    n, d = error.shape
    idx = np.arange(d)
    left = np.where(~bad, idx, -1)
    np.maximum.accumulate(left, axis=1, out=left)
    right = np.where(~bad, idx, d)
    right = np.minimum.accumulate(right[:, ::-1], axis=1)[:, ::-1]
    dist_left = np.where(left >= 0, idx - left, np.iinfo(np.int64).max)
    dist_right = np.where(right < d, right - idx, np.iinfo(np.int64).max)
    src = np.where(dist_left <= dist_right, left, right)
    src = np.clip(src, 0, d - 1)
    rows = np.arange(n)[:, None]
    return np.where(bad, error[rows, src], error)


def read_block(
    path: str | os.PathLike, start: int, stop: int, flux: bool = True, dead_ok: bool = False
) -> tuple[np.ndarray | None, np.ndarray]:
    """Rows [start, stop) as (flux, error), float32 [n, D]: flux clipped at 0, error NaN-filled.

    ``flux=False`` reads the error only (flux is returned as None). A row whose error has no finite
    pixel is a ShardError, unless ``dead_ok`` (rows a stream leaves out): it stays NaN.
    """
    with h5py.File(path, "r") as f:
        values = np.asarray(f[FLUX_KEY][start:stop], dtype=np.float32) if flux else None
        error = np.asarray(f[ERROR_KEY][start:stop], dtype=np.float32)
    dead = ~np.isfinite(error).any(axis=1)
    if dead.any() and not dead_ok:
        raise ShardError(path, f"error row {start + int(np.argmax(dead))} is all NaN")
    if values is not None:
        with np.errstate(invalid="ignore"):
            np.maximum(values, 0.0, out=values)
    return values, fill_nan_nearest(error).astype(np.float32, copy=False)


def read_observed(
    path: str | os.PathLike, start: int, stop: int, flux: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows [start, stop) as observations: (flux, error, usable), [n, D] float32, float32, bool.

    A pixel is masked (``usable`` False) when its flux is NaN/Inf, its error NaN, Inf or <= 0, or the shard's
    optional ``MASK_KEY`` array is non-zero there. Usable flux is clipped at 0 (as :func:`read_block`), masked flux
    is 0; a masked pixel's error is that of the
    nearest usable pixel (1 in a row without any), so every value downstream is finite. ``flux`` replaces
    the shard's flux (a pre-noised copy of it). Nothing here raises on bad values: ``predict`` honours masks.
    """
    with h5py.File(path, "r") as f:
        values = np.asarray(f[FLUX_KEY][start:stop], dtype=np.float32) if flux is None else np.array(flux, np.float32)
        error = np.asarray(f[ERROR_KEY][start:stop], dtype=np.float32)
        flagged = np.asarray(f[MASK_KEY][start:stop]) != 0 if MASK_KEY in f else None
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(values) & np.isfinite(error) & (error > 0)
    if flagged is not None:
        usable &= ~flagged
    values = np.where(usable, values, np.float32(0.0))
    if flux is None:  # the shard's flux is clipped at 0 on load (a noisy copy is used as it is)
        np.maximum(values, 0.0, out=values)
    error = np.where(usable, error, np.float32(np.nan))
    error[~usable.any(1)] = 1.0
    return values.astype(np.float32, copy=False), fill_nan_nearest(error).astype(np.float32, copy=False), usable


@dataclass(frozen=True)
class ShardSummary:
    """What ``validate`` reports for one shard."""

    path: Path
    n_rows: int
    n_pixels: int
    wave_min: float
    wave_max: float
    label_ranges: dict[str, tuple[float, float]]

    def line(self) -> str:
        labels = "  ".join(f"{k} [{lo:.4g}, {hi:.4g}]" for k, (lo, hi) in self.label_ranges.items())
        return (
            f"{self.path}: {self.n_rows} rows x {self.n_pixels} px, "
            f"wave {self.wave_min:.1f}-{self.wave_max:.1f} A  {labels}"
        )


@dataclass(frozen=True)
class RowProblem:
    """One kind of bad value in a shard: the field, what is wrong, every row (in the shard) that has it."""

    field: str  # "flux", "error" or a label column
    what: str  # "NaN or Inf", "<= 0", "outside [3750, 6000]", ...
    rows: np.ndarray  # [M] int64, sorted
    example: str = ""  # the first occurrence, e.g. "row 4, pixel 2, value 0"

    def line(self) -> str:
        n = len(self.rows)
        first = ", ".join(map(str, self.rows[:5].tolist())) + (", ..." if n > 5 else "")
        return f"{self.field} {self.what} in {n} row{'s' if n != 1 else ''} ({first}{'; first at ' + self.example if self.example else ''})"

    def head(self, n_rows: int) -> RowProblem | None:
        """The same problem in rows [0, n_rows) (the example is the first bad row, so it stays), or None."""
        rows = self.rows[self.rows < n_rows]
        return RowProblem(self.field, self.what, rows, self.example) if len(rows) else None


@dataclass(frozen=True)
class RowCheck:
    """The bad rows among the first ``n_rows`` of a shard (no problems: every row is usable)."""

    path: Path
    n_rows: int
    problems: tuple[RowProblem, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def bad_rows(self) -> np.ndarray:
        """Every row (in the shard) with at least one problem, sorted [M]."""
        if not self.problems:
            return np.zeros(0, np.int64)
        return np.unique(np.concatenate([p.rows for p in self.problems])).astype(np.int64)

    def summary(self) -> str:
        """The problems in one line (without the path)."""
        return "; ".join(p.line() for p in self.problems)

    def head(self, n_rows: int) -> RowCheck:
        """The same check restricted to rows [0, n_rows)."""
        if n_rows >= self.n_rows:
            return self
        return RowCheck(self.path, n_rows, tuple(q for p in self.problems if (q := p.head(n_rows)) is not None))


def _numeric_labels(path: Path, params: pd.DataFrame, col: str) -> np.ndarray:
    series = params[col]
    if not pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype):
        raise ShardError(path, f"parameter column {col!r} has dtype {series.dtype}, expected numbers")
    return series.to_numpy(dtype=np.float64, na_value=np.nan)


def check_rows(
    path: str | os.PathLike,
    info: ShardInfo | None = None,
    block_rows: int = 4096,
    stop: int | None = None,
    labelled: bool = True,
) -> RowCheck:
    """Every bad value in rows [0, stop) of a shard, read in blocks (one pass, bounded memory).

    Bad: flux NaN or Inf; error with no finite pixel, infinite, <= 0, or NaN inside the spectrum
    (NaN is allowed only in runs that touch the first or last pixel: real files have NaN edges,
    filled on load); with ``labelled``, labels NaN or outside :data:`moe.data.bins.LABEL_BOUNDS`.
    The layout must be valid (:func:`inspect_shard`; a broken layout raises ShardError).
    """
    from moe.data.bins import LABEL_BOUNDS

    info = info if info is not None else inspect_shard(path, labelled)
    path = info.path
    n = info.n_rows if stop is None else max(0, min(int(stop), info.n_rows))
    found: dict[tuple[str, str], list] = {}

    def add(field: str, what: str, rows: np.ndarray, example: str = "") -> None:
        if len(rows):
            entry = found.setdefault((field, what), [[], example])
            entry[0].append(rows.astype(np.int64))

    if labelled and info.params_key is not None:
        params = read_params(path, info.params_key, labelled=False).iloc[:n]
        for col, (lo, hi) in LABEL_BOUNDS.items():
            if col not in params.columns:
                continue
            v = _numeric_labels(path, params, col)
            bad = np.flatnonzero(~np.isfinite(v))
            add(col, "NaN or Inf", bad)
            with np.errstate(invalid="ignore"):
                out = np.flatnonzero(np.isfinite(v) & ((v < lo) | (v > hi)))
            if len(out):
                add(col, f"outside [{lo:g}, {hi:g}]", out, f"row {out[0]}, value {v[out[0]]:g}")
    with h5py.File(path, "r") as f:
        flux_ds, error_ds = f[FLUX_KEY], f[ERROR_KEY]
        d = info.n_pixels
        idx = np.arange(d)
        for start in range(0, n, max(1, int(block_rows))):
            stop_b = min(start + max(1, int(block_rows)), n)
            flux = np.asarray(flux_ds[start:stop_b])
            error = np.asarray(error_ds[start:stop_b])
            with np.errstate(invalid="ignore"):
                _pixel_problem(add, "flux", "NaN or Inf", ~np.isfinite(flux), flux, start)
                finite = np.isfinite(error)
                dead = ~finite.any(axis=1)
                add("error", "NaN or Inf at every pixel", start + np.flatnonzero(dead))
                _pixel_problem(add, "error", "infinite", np.isinf(error), error, start)
                _pixel_problem(add, "error", "<= 0", finite & (error <= 0), error, start)
                first = np.argmax(finite, axis=1)[:, None]
                last = d - 1 - np.argmax(finite[:, ::-1], axis=1)[:, None]
                inside = np.isnan(error) & (idx > first) & (idx < last) & ~dead[:, None]
                _pixel_problem(add, "error", "NaN inside the spectrum (not at its edges)", inside, error, start)
    problems = []
    for (field, what), (parts, example) in found.items():
        problems.append(RowProblem(field, what, np.unique(np.concatenate(parts)), example))
    return RowCheck(path, n, tuple(problems))


def _pixel_problem(add, field: str, what: str, mask: np.ndarray, values: np.ndarray, start: int) -> None:
    """Report the rows of ``mask`` [n, D] (example: its first pixel, with the value unless it is NaN/Inf)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return
    r, c = np.argwhere(mask[rows[0] : rows[0] + 1])[0]
    value = values[rows[0], c]
    example = f"row {start + rows[0]}, pixel {c}" + (f", value {value:g}" if np.isfinite(value) else "")
    add(field, what, start + rows, example)


def validate_shard(path: str | os.PathLike, block_rows: int = 4096) -> ShardSummary:
    """Full check of one shard (layout, then every row in blocks, :func:`check_rows`); raises :class:`ShardError`
    naming the file, each kind of bad value and its first rows."""
    info = inspect_shard(path)
    path = info.path
    check = check_rows(path, info, block_rows)
    if not check.ok:
        raise ShardError(path, check.summary())
    params = read_params(path, info.params_key)
    with h5py.File(path, "r") as f:
        wave = f[WAVE_KEY][()]
    ranges = {c: _range(params[c]) for c in ("T_eff", "log_g", "M_H", "mag", "snr")}
    return ShardSummary(path, info.n_rows, info.n_pixels, float(wave[0]), float(wave[-1]), ranges)


def _range(series: pd.Series) -> tuple[float, float]:
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    values = values[np.isfinite(values)]
    return (float(values.min()), float(values.max())) if values.size else (float("nan"), float("nan"))


class ShardWriter:
    """Write one shard block by block, atomically: a temp file renamed into place on close.

    Usage::

        with ShardWriter(path, wave, n_rows) as w:
            w.write(start, flux_block, error_block)
            w.set_params(df)

    An exception inside the block removes the temp file, so an interrupted run never leaves a
    half-written ``dataset.h5``; a failed write (disk full) is one :class:`WriteError` naming
    ``path`` (:mod:`moe.shared.atomic`). The arrays are stored contiguous, as the simulator writes them.
    """

    def __init__(self, path: str | os.PathLike, wave: np.ndarray, n_rows: int):
        self.path = Path(path)
        self.n_rows = int(n_rows)
        self.wave = np.asarray(wave, dtype=np.float64)
        self._params: pd.DataFrame | None = None
        self._f: h5py.File | None = None
        self._target = AtomicFile(self.path, "the shard")
        self.tmp = self._target.tmp
        d = self.wave.size
        try:
            ensure_space(self.path, 2 * self.n_rows * d * 4 + self.n_rows * 8 * 16 + 2**20, "the shard")
            self._f = h5py.File(self.tmp, "w")
            self._f.create_dataset(WAVE_KEY, data=self.wave)
            for key in (FLUX_KEY, ERROR_KEY):
                self._f.create_dataset(key, shape=(self.n_rows, d), dtype=np.float32)
        except BaseException as exc:
            self._fail(exc, always=True)
            raise

    def _fail(self, exc: BaseException, always: bool = False) -> None:
        """Close and remove the temp file; raise a WriteError for a failed write (any OS/HDF5 error when ``always``)."""
        close_quietly(self._f)
        self._f = None
        self._target.abort()
        if isinstance(exc, WriteError):
            return
        if is_write_failure(exc) or (always and isinstance(exc, (OSError, RuntimeError))):
            raise self._target.error(exc) from exc

    def write(self, start: int, flux: np.ndarray, error: np.ndarray) -> None:
        stop = start + flux.shape[0]
        self._f[FLUX_KEY][start:stop] = flux
        self._f[ERROR_KEY][start:stop] = error

    def set_params(self, params: pd.DataFrame, labelled: bool = True) -> None:
        """The parameter table (all of ``PARAM_COLUMNS``; ``labelled=False``: any columns, e.g. observations)."""
        missing = [c for c in PARAM_COLUMNS if c not in params.columns]
        if missing and labelled:
            raise ValueError(f"{self.path}: parameter table is missing columns {missing}")
        if len(params) != self.n_rows:
            raise ValueError(f"{self.path}: parameter table has {len(params)} rows, expected {self.n_rows}")
        self._params = params.reset_index(drop=True)

    def _read_back(self) -> None:
        """The temp file opens and holds the parameter table as given: PyTables can lose a failed write
        (disk full) without raising, leaving a truncated file."""
        try:
            h5py.File(self.tmp, "r").close()  # a truncated file does not open
        except OSError as exc:
            raise ShardError(self.tmp, f"not a readable HDF5 file ({reason(exc)})") from exc
        if self.n_rows == 0:  # pandas writes no table for an empty frame
            return
        try:
            pd.testing.assert_frame_equal(
                read_params(self.tmp, labelled=False), self._params, check_dtype=False, check_index_type=False
            )
        except AssertionError as exc:
            raise ShardError(self.tmp, "the parameter table read back differs from the one written") from exc

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._fail(exc)
            return
        if self._params is None:
            self._fail(ValueError())
            raise ValueError(f"{self.path}: set_params() was never called; shard not written")
        try:
            self._f.close()
            self._f = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PyTables' NaturalNameWarning etc.
                self._params.to_hdf(self.tmp, key=PARAMS_KEY, mode="a", format="table")
            self._read_back()
        except ShardError as exc:
            self._fail(exc)
            raise WriteError(
                self.path, f"cannot write the shard: it does not read back ({exc.problem}); is the disk full?"
            ) from exc
        except BaseException as exc:
            self._fail(exc, always=True)
            raise
        self._target.commit()


def write_shard(
    path: str | os.PathLike,
    wave: np.ndarray,
    flux: np.ndarray,
    error: np.ndarray,
    params: pd.DataFrame,
    labelled: bool = True,
) -> None:
    """Write a whole in-memory shard atomically (tests, small files; ``labelled=False``: no labels needed)."""
    with ShardWriter(path, wave, flux.shape[0]) as w:
        w.write(0, np.asarray(flux, np.float32), np.asarray(error, np.float32))
        w.set_params(params, labelled)


def iter_paths(paths: Sequence[str]) -> Iterator[Path]:
    """Expand dataset folders into their shard files; files pass through."""
    for p in map(Path, paths):
        if p.is_dir() and not (p / SHARD_FILE).is_file():
            for split in SPLITS:
                yield from find_split(p, split)
        elif p.is_dir():
            yield p / SHARD_FILE
        else:
            yield p


def main(argv: Sequence[str] | None = None) -> int:
    parser = ToolParser("moe data", description=__doc__.split("\n")[0])
    val = ToolParser("moe data validate", description="check shards and print a one-line summary per shard")
    val.add_argument("paths", type=str, nargs="+", help="dataset.h5 files or dataset folders")
    val.add_argument("--block-rows", type=PositiveInt, default=4096, help="rows read at a time")
    parser.add_tool_subcommands({"validate": val})
    args = parser.parse_args(argv).validate
    try:
        for path in iter_paths(args.paths):
            print(validate_shard(path, args.block_rows).line(), flush=True)
    except ShardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main, "moe data"))


CONTENT_ROWS = 64  # rows read from each end of a shard for its content hash


@functools.lru_cache(maxsize=1024)
def _content_hash(path: str, size: int, mtime_ns: int, ctime_ns: int) -> str:
    with h5py.File(path, "r") as f:
        n = f[FLUX_KEY].shape[0]
        h = hashlib.sha1(np.ascontiguousarray(f[WAVE_KEY][()]).tobytes())
        for key in (FLUX_KEY, ERROR_KEY):
            h.update(np.ascontiguousarray(f[key][: min(CONTENT_ROWS, n)]).tobytes())
            h.update(np.ascontiguousarray(f[key][max(n - CONTENT_ROWS, 0) :]).tobytes())
    if _has_table(Path(path)):
        params = read_params(path, labelled=False)
        h.update(pd.util.hash_pandas_object(params, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def content_hash(path: str | os.PathLike) -> str:
    """A cheap hash of a shard's content: its wavelength grid, the flux and error of its first and last
    ``CONTENT_ROWS`` rows, and its whole parameter table. Cached per path, size, mtime and ctime (any write
    or ``utime`` changes the ctime, so a file edited in place with its mtime restored is hashed again)."""
    st = Path(path).stat()
    return _content_hash(str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def numeric_columns(path: str | os.PathLike, key: str) -> set[str]:
    """Names of the numeric columns of a shard's parameter table (one row read)."""
    with pd.HDFStore(path, mode="r") as store:
        head = store.select(key, start=0, stop=1)
    return {c for c in head.columns if np.issubdtype(head[c].dtype, np.number)}


def check_grid(path: str | os.PathLike, wave: np.ndarray, expected: np.ndarray, whose: str) -> None:
    """A shard's wavelength grid must be ``expected`` (same pixels, within 1e-6 A), else a ShardError naming both."""
    if wave.shape != expected.shape or not np.allclose(wave, expected, rtol=0, atol=1e-6):
        raise ShardError(
            path,
            f"wavelength grid ({wave.size} px, {wave[0]:.2f}-{wave[-1]:.2f} A) differs from {whose} "
            f"({expected.size} px, {expected[0]:.2f}-{expected[-1]:.2f} A)",
        )
