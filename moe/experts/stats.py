"""Ridge sufficient statistics per cell, accumulated in one streamed pass.

For every cell ``c`` (see :mod:`moe.experts.groups`), in float64:

- ``n[c]``, ``sy[c] = sum y``, ``syy[c] = sum y^2``
- ``sx[c] = sum (x - shift)``, ``xtx[c] = sum (x - shift)(x - shift)^T``, ``xty[c] = sum (x - shift) y``
- ``se2[c] = sum error^2`` (per pixel; the noise variance at noise_level 1)

``shift`` is the first block's mean flux: subtracting it before the products keeps the
centred Gram accurate (the flux mean is ~10x its spread), which matters most for the
``float32`` products option (block products in float32, summed in float64).

Groups are sums of cells (:meth:`CellStats.group`); statistics from several ranks are
summed with :meth:`CellStats.all_reduce`. The global Gram is also the training flux
covariance from which the PCA features are taken -- no second pass.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

PRODUCTS = ("float64", "float32")


@dataclass
class CellStats:
    """Per-cell sums (leading axis: cell) around a common ``shift`` [D]."""

    n: np.ndarray      # [C]
    sy: np.ndarray     # [C]
    syy: np.ndarray    # [C]
    sx: np.ndarray     # [C, D]
    xtx: np.ndarray    # [C, D, D]
    xty: np.ndarray    # [C, D]
    se2: np.ndarray    # [C, D]
    shift: np.ndarray  # [D]

    @classmethod
    def zeros(cls, n_cells: int, n_pixels: int, shift: np.ndarray) -> "CellStats":
        c, d = n_cells, n_pixels
        return cls(np.zeros(c), np.zeros(c), np.zeros(c), np.zeros((c, d)), np.zeros((c, d, d)),
                   np.zeros((c, d)), np.zeros((c, d)), np.asarray(shift, dtype=np.float64))

    @property
    def n_pixels(self) -> int:
        return self.shift.size

    def group(self, cells: np.ndarray) -> "CellStats":
        """One group: the sum over ``cells`` (leading axis of size 1)."""
        idx = np.asarray(cells)
        return CellStats(*(getattr(self, f.name)[idx].sum(0, keepdims=True) for f in fields(self) if f.name != "shift"),
                         shift=self.shift)

    def all_reduce(self) -> "CellStats":
        """Sum over DDP ranks (no-op without an initialised process group)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        for f in fields(self):
            if f.name == "shift":
                continue
            t = torch.from_numpy(getattr(self, f.name))
            torch.distributed.all_reduce(t)
            setattr(self, f.name, t.numpy())
        return self


def _gram_update(acc: np.ndarray, x: np.ndarray, products: str) -> None:
    """acc [D, D] += x^T x, x [m, D] already shifted."""
    if products == "float32":
        xf = x.astype(np.float32, copy=False)
        acc += (xf.T @ xf).astype(np.float64)
    else:
        xd = x.astype(np.float64, copy=False)
        acc += xd.T @ xd


class StatsAccumulator:
    """Streams blocks ``(x [m, D], error [m, D], y [m], cell [m])`` into :class:`CellStats`.

    Rows are buffered per cell and flushed ``flush_rows`` at a time, so each Gram update
    is a tall matrix product whatever the block size and however unevenly cells fill.
    """

    def __init__(self, n_cells: int, n_pixels: int, products: str = "float64", flush_rows: int = 1024):
        if products not in PRODUCTS:
            raise ValueError(f"products must be one of {PRODUCTS}, got {products!r}")
        self.n_cells, self.n_pixels, self.products, self.flush_rows = n_cells, n_pixels, products, flush_rows
        self.stats: CellStats | None = None
        self._buf: list[list[np.ndarray]] = [[] for _ in range(n_cells)]
        self._buf_rows = np.zeros(n_cells, dtype=np.int64)

    def update(self, x: np.ndarray, error: np.ndarray, y: np.ndarray, cell: np.ndarray) -> None:
        x = np.asarray(x)
        if x.shape[1] != self.n_pixels:
            raise ValueError(f"block has {x.shape[1]} pixels, expected {self.n_pixels}")
        if self.stats is None:
            self.stats = CellStats.zeros(self.n_cells, self.n_pixels, x.mean(0, dtype=np.float64))
        s = self.stats
        y = np.asarray(y, dtype=np.float64)
        cell = np.asarray(cell, dtype=np.int64)
        if cell.size and (cell.min() < 0 or cell.max() >= self.n_cells):
            raise ValueError(f"cell index out of range [0, {self.n_cells})")
        work = np.float32 if self.products == "float32" else np.float64
        xs = x.astype(work) - s.shift.astype(work)
        e2 = np.square(np.asarray(error, dtype=np.float64))
        order = np.argsort(cell, kind="stable")
        bounds = np.searchsorted(cell[order], np.arange(self.n_cells + 1))
        for c in np.flatnonzero(np.diff(bounds)):
            rows = order[bounds[c]:bounds[c + 1]]
            xc, yc = xs[rows], y[rows]
            s.n[c] += rows.size
            s.sy[c] += yc.sum()
            s.syy[c] += yc @ yc
            s.sx[c] += xc.sum(0, dtype=np.float64)
            s.xty[c] += yc @ xc.astype(np.float64)
            s.se2[c] += e2[rows].sum(0)
            self._buf[c].append(xc)
            self._buf_rows[c] += rows.size
            if self._buf_rows[c] >= self.flush_rows:
                self._flush(c)

    def _flush(self, c: int) -> None:
        if self._buf_rows[c]:
            _gram_update(self.stats.xtx[c], np.concatenate(self._buf[c]), self.products)
        self._buf[c], self._buf_rows[c] = [], 0

    def finalize(self) -> CellStats:
        if self.stats is None:
            raise ValueError("no rows were accumulated")
        for c in range(self.n_cells):
            self._flush(c)
        return self.stats


def accumulate(blocks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], n_cells: int, n_pixels: int,
               products: str = "float64", total: int | None = None, progress: bool = True) -> CellStats:
    """One pass over ``blocks`` -> per-cell statistics (progress bar in spectra)."""
    acc = StatsAccumulator(n_cells, n_pixels, products)
    with tqdm(total=total, unit="spec", desc="expert statistics", disable=not progress) as bar:
        for x, error, y, cell in blocks:
            acc.update(x, error, y, cell)
            bar.update(len(y))
    return acc.finalize()


def in_memory_blocks(x: np.ndarray, error: np.ndarray, y: np.ndarray, cell: np.ndarray,
                     block_rows: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Blocks of arrays already in memory (tests, small problems)."""
    for s in range(0, len(y), block_rows):
        sl = slice(s, s + block_rows)
        yield x[sl], error[sl], y[sl], cell[sl]
