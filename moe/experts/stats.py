"""Ridge sufficient statistics per cell, accumulated in one streamed pass.

For every cell ``c`` (see :mod:`moe.experts.groups`), in float64:

- ``n[c]``, ``sy[c] = sum y``, ``syy[c] = sum y^2`` per label ([C, L]: ``y`` holds L label columns)
- ``sx[c] = sum (x - shift)``, ``xty[c] = sum y (x - shift)^T`` ([C, L, D]; with ``sx`` one matrix
  product ``[1, y]^T (x - shift)`` per Gram update, so more labels cost almost nothing next to the Gram)
- ``xtx[c] = sum (x - shift)(x - shift)^T`` in LAPACK's rectangular full packed (RFP) layout:
  the lower triangle, ``D (D + 1) / 2`` numbers, updated in place by the level-3 ``dsfrk``
  (as fast as ``dsyrk`` on a full matrix, half the memory); :meth:`CellStats.gram` and
  :func:`unpack` give the full symmetric matrix
- ``se2[c] = sum error^2`` (per pixel; the noise variance at noise_level 1, float32 products)

``shift`` is a reference flux near the mean (by default the first block's mean; under
DDP every rank uses the same one): subtracting it before the products keeps the
centred Gram accurate (the flux mean is ~10x its spread), which matters most for the
``float32`` products option (block products in float32, summed in float64).

Groups are sums of cells (:meth:`CellStats.group`); statistics from several ranks are
summed with :meth:`CellStats.all_reduce`. The global Gram is also the training flux
covariance from which the PCA features are taken -- no second pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields, replace

import numpy as np
from scipy.linalg.lapack import dsfrk, dtfttr, ssfrk
from tqdm.auto import tqdm

from moe.data import ranks

PRODUCTS = ("float64", "float32")


@dataclass
class CellStats:
    """Per-cell sums (leading axis: cell) around a common ``shift`` [D]."""

    n: np.ndarray  # [C]
    sy: np.ndarray  # [C, L]
    syy: np.ndarray  # [C, L]
    sx: np.ndarray  # [C, D]
    xtx: np.ndarray  # [C, D (D + 1) / 2] lower triangle, RFP layout (see unpack)
    xty: np.ndarray  # [C, L, D]
    se2: np.ndarray  # [C, D]
    shift: np.ndarray  # [D]

    @classmethod
    def zeros(cls, n_cells: int, n_pixels: int, shift: np.ndarray, n_labels: int = 1) -> CellStats:
        c, d, n_l = n_cells, n_pixels, n_labels
        return cls(
            np.zeros(c),
            np.zeros((c, n_l)),
            np.zeros((c, n_l)),
            np.zeros((c, d)),
            np.zeros((c, d * (d + 1) // 2)),
            np.zeros((c, n_l, d)),
            np.zeros((c, d)),
            np.asarray(shift, dtype=np.float64),
        )

    @property
    def n_pixels(self) -> int:
        return self.shift.size

    @property
    def n_labels(self) -> int:
        return self.sy.shape[1]

    def group(self, cells: np.ndarray, xtx: np.ndarray | None = None) -> CellStats:
        """One group: the sum over ``cells`` (leading axis of size 1); ``xtx`` [1, D (D + 1) / 2]: its Gram,
        already summed (:meth:`reduce_group_grams`), instead of the cells'."""
        idx = np.atleast_1d(np.asarray(cells))
        sums = {f.name: _sum_cells(getattr(self, f.name), idx) for f in fields(self) if f.name not in ("shift", "xtx")}
        return CellStats(**sums, xtx=_sum_cells(self.xtx, idx) if xtx is None else xtx, shift=self.shift)

    def select_labels(self, idx: list[int]) -> CellStats:
        """The same sums for the labels ``idx`` only (``sy``, ``syy`` [C, L'], ``xty`` [C, L', D]; the Grams and
        the other sums shared, not copied): what a family fitted for fewer labels solves."""
        if list(idx) == list(range(self.n_labels)):
            return self
        return replace(self, sy=self.sy[:, idx], syy=self.syy[:, idx], xty=self.xty[:, idx])

    def gram(self, cell: int = 0) -> np.ndarray:
        """Full symmetric X^T X [D, D] of one cell (or of a group from :meth:`group`)."""
        return unpack(self.xtx[cell], self.n_pixels)

    def all_reduce(self, grams: bool = True) -> CellStats:
        """Sum over the ranks, in place (collective over :mod:`moe.data.ranks`' CPU group, one cell's row at a
        time so no copy of the Grams is made; no-op in one process). ``grams=False`` leaves each rank's own
        cell Grams (``xtx``): the groups' are then summed to the rank that needs them
        (:meth:`reduce_group_grams`)."""
        if not ranks.distributed():
            return self
        for f in fields(self):
            if f.name != "shift" and (grams or f.name != "xtx"):
                a = getattr(self, f.name)
                for row in a if a.ndim > 1 else [a]:
                    ranks.all_reduce_sum(row)
        return self

    def reduce_group_grams(self, groups: list[np.ndarray], owners: list[int]) -> list[np.ndarray | None]:
        """The Gram [1, D (D + 1) / 2] of each group (``groups[i]``: its cells) summed over its cells and over
        the ranks, on rank ``owners[i]``; None on the others (collective). Each rank sums its own cells per group
        and sends the sum to the owner (a reduce, two in flight): 14 groups' Grams move once instead of the 36
        cells' in an all-reduce. In one process: the groups' sums."""
        rank = ranks.rank_world()[0]
        out: list[np.ndarray | None] = [None] * len(groups)
        pending: list = []  # (work, buffer) of the reduces in flight
        for i, (cells, owner) in enumerate(zip(groups, owners)):
            total = _sum_cells(self.xtx, np.atleast_1d(np.asarray(cells)))
            pending.append((ranks.reduce_sum(total[0], owner), total))
            if owner == rank:
                out[i] = total
            while len(pending) > 2:
                work, _ = pending.pop(0)
                work.wait()
        for work, _ in pending:
            work.wait()
        return out


def _sum_cells(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``a[idx].sum(0)`` [1, ...] added up in place, cell by cell (no copy of the selected rows)."""
    out = a[idx[0]].copy()
    for c in idx[1:]:
        out += a[c]
    return out[None]


def _gram_update(acc: np.ndarray, x: np.ndarray, products: str) -> None:
    """acc [D (D + 1) / 2] (RFP lower triangle) += x^T x for a shifted segment x [m, D], in place.

    ``x.T`` is x^T in Fortran order, so nothing is copied. float32 products go through a
    float32 product summed into the float64 accumulator.
    """
    m, d = x.shape
    if products == "float32":
        x = np.ascontiguousarray(x, dtype=np.float32)
        acc += ssfrk(d, m, 1.0, x.T, 0.0, np.zeros(acc.size, np.float32), transr="N", uplo="L", trans="N")
        return
    x = np.ascontiguousarray(x, dtype=np.float64)
    out = dsfrk(d, m, 1.0, x.T, 1.0, acc, transr="N", uplo="L", trans="N", overwrite_c=1)
    if out is not acc:  # f2py had to copy (never for a contiguous float64 accumulator)
        acc[...] = out


def unpack(packed: np.ndarray, d: int) -> np.ndarray:
    """RFP lower triangle [D (D + 1) / 2] -> full symmetric float64 [D, D] (C order, a new array)."""
    full, info = dtfttr(d, np.asarray(packed, dtype=np.float64), transr="N", uplo="L")
    if info != 0:
        raise ValueError(f"dtfttr failed (info={info})")
    symmetrize_lower(full)  # Fortran order: the transpose below is the C-order view of the same matrix
    return full.T


def symmetrize_lower(a: np.ndarray, block: int = 512) -> None:
    """Copy the lower triangle of a [D, D] onto its upper triangle, in cache-friendly blocks."""
    d = a.shape[0]
    for i in range(0, d, block):
        ie = min(i + block, d)
        sub = a[i:ie, i:ie]
        iu = np.triu_indices(ie - i, 1)
        sub[iu] = sub.T[iu]
        for j in range(ie, d, block):
            je = min(j + block, d)
            a[i:ie, j:je] = a[j:je, i:ie].T


class StatsAccumulator:
    """Streams blocks ``(x [m, D], error [m, D], y [m, L] (or [m]: one label), cell [m])`` into :class:`CellStats`.

    Rows are buffered per cell (float32) and flushed ``flush_rows`` at a time into an in-place
    level-3 rank-k update of the cell's Gram, so updates stay efficient whatever the block size
    and however unevenly cells fill; buffer memory is bounded by ``cells x flush_rows x D``
    (1.2 GB at the defaults, D = 4096: reached by ~75k rows, constant beyond). Measured in
    the 36-cell pass at 100k rows on 2 cores, 1024 rows per flush is 1.1x slower than 2048,
    and 256 1.5x (more, smaller updates of the cells' 67 MB packed Grams).
    """

    def __init__(
        self,
        n_cells: int,
        n_pixels: int,
        products: str = "float64",
        flush_rows: int = 2048,
        shift: np.ndarray | None = None,
        n_labels: int | None = None,
    ):
        if products not in PRODUCTS:
            raise ValueError(f"products must be one of {PRODUCTS}, got {products!r}")
        self.n_cells, self.n_pixels, self.products, self.flush_rows = n_cells, n_pixels, products, flush_rows
        self._shift = shift
        # with the shift and the label count known, the (zero) sums exist before any row: a rank without rows
        # still takes part in the all-reduce; else they are made from the first block
        known = shift is not None and n_labels is not None
        self.stats: CellStats | None = CellStats.zeros(n_cells, n_pixels, shift, n_labels) if known else None
        self._buf: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n_cells)]
        self._buf_rows = np.zeros(n_cells, dtype=np.int64)

    def update(self, x: np.ndarray, error: np.ndarray, y: np.ndarray, cell: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.n_pixels:
            raise ValueError(f"block has shape {x.shape}, expected (m, {self.n_pixels})")
        y = np.asarray(y, dtype=np.float64)
        y = y[:, None] if y.ndim == 1 else y
        if y.ndim != 2 or len(y) != len(x):
            raise ValueError(f"labels have shape {y.shape}, expected ({len(x)}, L)")
        if self.stats is None:
            shift = x.mean(0, dtype=np.float64) if self._shift is None else self._shift
            self.stats = CellStats.zeros(self.n_cells, self.n_pixels, shift, y.shape[1])
        s = self.stats
        if y.shape[1] != s.n_labels:
            raise ValueError(f"block has {y.shape[1]} label columns, the accumulator {s.n_labels}")
        cell = np.asarray(cell, dtype=np.int64)
        if cell.size == 0:
            return
        if cell.min() < 0 or cell.max() >= self.n_cells:
            raise ValueError(f"cell index out of range [0, {self.n_cells})")
        # sort the block by cell once: every cell is then a contiguous (view) segment. Rows stay
        # float32 (the input, exact) until a Gram update shifts them in float64 (exact), where
        # their sums and y-weighted sums come from the same shifted rows (see _gram).
        order = np.argsort(cell, kind="stable")
        xs = np.take(np.asarray(x, dtype=np.float32), order, axis=0)
        ys = y[order]  # [m, L]
        bounds = np.searchsorted(cell[order], np.arange(self.n_cells + 1))
        present = np.flatnonzero(np.diff(bounds))
        starts = bounds[present]
        counts = np.diff(bounds)[present]
        s.n[present] += counts
        s.sy[present] += np.add.reduceat(ys, starts, axis=0)
        s.syy[present] += np.add.reduceat(ys * ys, starts, axis=0)
        # the noise variance per pixel only enters the marginalised diagonal: float32 products
        # suffice; the cell-indicator matrix [cells, m] sums the unsorted rows in one BLAS call
        onehot = (cell[None, :] == present[:, None]).astype(np.float32)
        s.se2[present] += onehot @ np.square(np.asarray(error, dtype=np.float32))
        for c, a, m in zip(present, starts, counts):
            xc, yc = xs[a : a + m], ys[a : a + m]
            if m >= self.flush_rows // 2:  # tall enough: update the Gram straight from the segment
                self._gram(c, xc, yc)
                continue
            self._buf[c].append((xc.copy(), yc))  # a float32 copy, so the block can be freed
            self._buf_rows[c] += m
            if self._buf_rows[c] >= self.flush_rows:
                self._flush(c)

    def _gram(self, c: int, rows: np.ndarray, y: np.ndarray) -> None:
        """Cell c's sums and Gram from raw float32 rows [m, D] and their labels y [m, L]."""
        s = self.stats
        shifted = rows.astype(np.float64)
        shifted -= s.shift
        ones_y = np.empty((1 + y.shape[1], len(y)))  # [1 + L, m]: one GEMM gives sum(x - shift) and every label's
        ones_y[0] = 1.0
        ones_y[1:] = y.T
        sums = ones_y @ shifted  # [1 + L, D]: sum(x - shift), sum y_l (x - shift) per label
        s.sx[c] += sums[0]
        s.xty[c] += sums[1:]
        _gram_update(s.xtx[c], shifted if self.products == "float64" else shifted.astype(np.float32), self.products)

    def _flush(self, c: int) -> None:
        if self._buf_rows[c]:
            rows, ys = zip(*self._buf[c])
            self._gram(c, np.concatenate(rows), np.concatenate(ys))
        self._buf[c], self._buf_rows[c] = [], 0

    def finalize(self) -> CellStats:
        if self.stats is None:
            raise ValueError("no rows were accumulated")
        for c in range(self.n_cells):
            self._flush(c)
        return self.stats


def accumulate(
    blocks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    n_cells: int,
    n_pixels: int,
    products: str = "float64",
    total: int | None = None,
    progress: bool = True,
    shift: np.ndarray | None = None,
    n_labels: int | None = None,
) -> CellStats:
    """One pass over ``blocks`` ``(x [m, D], error [m, D], y [m, L] or [m], cell [m])`` -> per-cell statistics
    (progress bar in spectra).

    ``shift`` [D] defaults to the first block's mean; statistics that will be summed
    (DDP ranks) must share one shift, and give ``n_labels`` (L) so that a rank without rows has sums too.
    """
    acc = StatsAccumulator(n_cells, n_pixels, products, shift=shift, n_labels=n_labels)
    with tqdm(total=total, unit="spec", desc="expert statistics", disable=not progress) as bar:
        for x, error, y, cell in blocks:
            acc.update(x, error, y, cell)
            bar.update(len(y))
    return acc.finalize()


def in_memory_blocks(
    x: np.ndarray, error: np.ndarray, y: np.ndarray, cell: np.ndarray, block_rows: int = 4096
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Blocks of arrays already in memory (tests, small problems)."""
    for s in range(0, len(y), block_rows):
        sl = slice(s, s + block_rows)
        yield x[sl], error[sl], y[sl], cell[sl]
