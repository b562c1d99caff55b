"""Streaming reads of a split: contiguous row blocks, split across DDP ranks and workers.

A split is the concatenation of its shards (rows ``0..N-1`` in shard order). For
``S = world_size * num_workers`` slots, slot ``s`` owns the contiguous rows
``[round(s N / S), round((s+1) N / S))`` -- every row belongs to exactly one slot. A slot
reads its range in blocks of at most ``block_rows`` contiguous rows (never across a shard
boundary); when shuffling, the block order and the row order inside each block are
redrawn every epoch. With several ranks the training slots are truncated to the shortest
slot length so every rank yields the same number of batches (DDP would hang otherwise);
this drops fewer than ``S`` rows per epoch, different ones each epoch. Rows the split's
:class:`ShardSet` leaves out (bad rows, :mod:`moe.data.row_check`) are skipped as blocks are
read; slots are then truncated to the smallest number of kept rows.

Batches are assembled here (use ``DataLoader(batch_size=None)``): dicts of tensors
``flux [B, D], error [B, D], log_g, T_eff, M_H, snr [B] (float32), phys_bin, snr_bin,
row [B] (int64)``, plus any further label column asked for (``labels``: float32 [B] under its column
name, e.g. ``a_M``). A stream over per-row gate-input caches (``inputs``) yields their arrays
(:mod:`moe.features.gate_inputs`: ``proj, win, quality, var`` and, for clean rows,
``win_error, chol``) in place of ``flux`` and ``error``, with the same labels and rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from moe.data import bins
from moe.data.noise import snr as snr_of
from moe.data.ranks import rank_world
from moe.data.row_cache import read_rows
from moe.data.shards import (
    ID_COLUMNS,
    ShardInfo,
    inspect_shard,
    numeric_columns,
    read_block,
    read_observed,
    read_params,
)
from moe.data.shards import (
    LABEL_COLUMNS as LABELS,
)


@dataclass(frozen=True)
class Block:
    """Rows [start, stop) of shard ``shard`` (index into the split), at split row ``offset``."""

    shard: int
    start: int
    stop: int
    offset: int


class ShardSet:
    """The shards of one split, their row counts and offsets; optionally capped at ``max_rows``.

    ``labelled=False`` (spectra to predict) accepts shards without labels or parameter table.
    Rows left out (:meth:`drop`, bad rows) keep their place: split row ``r`` is always row
    ``r - offsets[k]`` of shard ``k``, so per-row caches stay aligned with the shards; streams
    skip the dropped rows when they read.
    """

    def __init__(self, files: Sequence[str | os.PathLike], max_rows: int | None = None, labelled: bool = True):
        self.labelled = labelled
        infos = [inspect_shard(f, labelled) for f in files]
        if not infos:
            raise ValueError("a ShardSet needs at least one shard")
        d = {i.n_pixels for i in infos}
        if len(d) != 1:
            raise ValueError(f"shards disagree on the pixel count: { {str(i.path): i.n_pixels for i in infos} }")
        counts = np.array([i.n_rows for i in infos], dtype=np.int64)
        if max_rows is not None:
            if max_rows <= 0:
                raise ValueError(f"max_rows must be positive, got {max_rows}")
            keep = np.minimum(counts, np.maximum(max_rows - np.concatenate([[0], np.cumsum(counts)[:-1]]), 0))
            infos = [i for i, k in zip(infos, keep) if k > 0]
            counts = keep[keep > 0]
        self.infos: list[ShardInfo] = infos
        self.counts = counts
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.n_rows = int(self.offsets[-1])
        self.n_pixels = infos[0].n_pixels
        self.dropped = np.zeros(0, dtype=np.int64)  # split rows left out, sorted

    def drop(self, shard: int, rows: np.ndarray) -> None:
        """Leave out ``rows`` (indices within shard ``shard``; those beyond its used rows are ignored)."""
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[(rows >= 0) & (rows < self.counts[shard])]
        self.dropped = np.union1d(self.dropped, self.offsets[shard] + rows).astype(np.int64)

    @property
    def n_kept(self) -> int:
        """Rows a stream yields: ``n_rows`` less the dropped ones."""
        return self.n_rows - len(self.dropped)

    def dropped_in(self, shard: int) -> int:
        """How many rows of shard ``shard`` are left out."""
        lo, hi = self.offsets[shard], self.offsets[shard + 1]
        return int(np.searchsorted(self.dropped, hi) - np.searchsorted(self.dropped, lo))

    def kept(self, lo: int, hi: int) -> int:
        """Rows of the split range [lo, hi) that are not dropped."""
        return (hi - lo) - int(np.searchsorted(self.dropped, hi) - np.searchsorted(self.dropped, lo))

    def keep_mask(self, lo: int, hi: int) -> np.ndarray | None:
        """Boolean mask [hi - lo] of the kept rows of split range [lo, hi); None when none is dropped there."""
        a, b = np.searchsorted(self.dropped, lo), np.searchsorted(self.dropped, hi)
        if a == b:
            return None
        mask = np.ones(hi - lo, dtype=bool)
        mask[self.dropped[a:b] - lo] = False
        return mask

    def end_after(self, lo: int, n_kept: int) -> int:
        """The smallest ``hi`` such that [lo, hi) holds ``n_kept`` kept rows."""
        hi = lo + n_kept
        while (short := n_kept - self.kept(lo, hi)) > 0:
            hi += short
        return hi

    @property
    def paths(self) -> list[Path]:
        return [i.path for i in self.infos]

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, row within the shard) of split rows [N]."""
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        return shard, rows - self.offsets[shard]

    def slot_range(self, slot: int, n_slots: int) -> tuple[int, int]:
        """Split rows [lo, hi) owned by ``slot`` of ``n_slots``."""
        return (slot * self.n_rows) // n_slots, ((slot + 1) * self.n_rows) // n_slots

    def blocks(self, lo: int, hi: int, block_rows: int) -> list[Block]:
        """Contiguous blocks covering split rows [lo, hi), none crossing a shard boundary."""
        out = []
        for k in range(len(self.infos)):
            a, b = max(lo, self.offsets[k]), min(hi, self.offsets[k + 1])
            for s in range(int(a), int(b), block_rows):
                e = min(s + block_rows, int(b))
                out.append(Block(k, s - int(self.offsets[k]), e - int(self.offsets[k]), s))
        return out


def observed_snr(flux: np.ndarray, error: np.ndarray, usable: np.ndarray, noise_level: float) -> np.ndarray:
    """SNR [N] of observed (noisy) spectra on their usable pixels: ``sqrt(max(|y|^2 / |s e|^2 - 1, 0))``, the
    estimate of the clean spectrum's ``|x| / |s e|`` (``E |y|^2 = |x|^2 + |s e|^2``), so that an observation
    falls in the SNR bin its clean spectrum would; 0 without usable pixels."""
    y2 = np.einsum("ij,ij->i", flux, flux, dtype=np.float64)  # masked flux is 0
    e = np.where(usable, error, 0.0)
    e2 = float(noise_level) ** 2 * np.einsum("ij,ij->i", e, e, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(e2 > 0, y2 / e2, np.inf)
    return np.where(usable.any(1), np.sqrt(np.clip(ratio - 1.0, 0.0, None)), 0.0)


def _slot() -> tuple[int, int, int]:
    """(this slot's index, number of slots, worker id) from torch.distributed and the worker info."""
    rank, world = rank_world()
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * nw + wid, world * nw, wid


class SpectraStream(IterableDataset):
    """Batches of one split, streamed in contiguous row blocks (see module docstring).

    ``noisy`` maps shard index -> path of a pre-noised cache (val/test); its ``flux`` and
    ``snr`` replace the clean flux and the computed SNR. ``labels``: parameter-table columns yielded
    besides ``log_g, T_eff, M_H`` (checked by :func:`moe.data.labels.check_labels` before a fit). ``inputs`` maps shard index -> path
    of a gate-input cache, whose arrays (and ``snr``) replace flux and error altogether. With
    ``ids`` batches also carry the parameter table's numeric id columns (``id_objid``, ``id_mag``...).
    Train batches are clean; the DataModule adds fresh noise after the transfer to the device.
    With ``observed`` (``predict``) the spectra are read as observations: masked pixels
    (:func:`moe.data.shards.read_observed`) are no error, batches carry ``usable [B, D]`` (bool), and the SNR
    is that of the usable pixels (:func:`observed_snr`).
    """

    def __init__(
        self,
        shards: ShardSet,
        batch_size: int,
        noise_level: float,
        block_rows: int = 2048,
        shuffle: bool = False,
        seed: int = 0,
        noisy: dict[int, Path] | None = None,
        equalize_ranks: bool = False,
        num_workers: int = 0,
        inputs: dict[int, Path] | None = None,
        ids: bool = False,
        observed: bool = False,
        labels: Sequence[str] = LABELS,
    ):
        self.shards = shards
        self.labels = tuple(dict.fromkeys((*LABELS, *labels)))  # the default labels first, always read
        self.observed = observed
        self.batch_size = int(batch_size)
        self.noise_level = float(noise_level)
        self.block_rows = int(block_rows)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.noisy = noisy or {}
        self.inputs = inputs or {}
        self.ids = ids
        self._ids: list[str] | None = None
        self.equalize_ranks = equalize_ranks
        self.num_workers = int(num_workers)
        self._iterations = 0
        self._epoch: int | None = None  # set by set_epoch (the training loader): order seeded by the epoch
        self._skip = 0
        self._base = 0
        self._labels: dict[int, dict[str, np.ndarray]] = {}

    def _id_columns(self) -> list[str]:
        """The numeric id columns every shard's parameter table has (one set, so batches and catalogues
        keep the same columns across shard boundaries)."""
        if self._ids is None:
            common = None
            for info in self.shards.infos:
                names = numeric_columns(info.path, info.params_key) if info.params_key else set()
                common = names if common is None else common & names
            self._ids = [c for c in ID_COLUMNS if c in (common or set())]
        return self._ids

    def _shard_labels(self, k: int) -> dict[str, np.ndarray]:
        """Labels (NaN where the table has none) and, with ``ids``, the numeric id columns (``id_*``) of shard k."""
        if k not in self._labels:
            info, n = self.shards.infos[k], int(self.shards.counts[k])
            p = read_params(info.path, info.params_key, self.shards.labelled) if info.params_key else None
            cols = {
                c: p[c].to_numpy(np.float64, copy=True)[:n] if p is not None and c in p else np.full(n, np.nan)
                for c in self.labels
            }
            if self.ids and p is not None:
                cols |= {f"id_{c}": p[c].to_numpy(copy=True)[:n] for c in self._id_columns()}
            self._labels[k] = cols
        return self._labels[k]

    def read(self, block: Block, snr_dtype=np.float32, keep_all: bool = False) -> dict[str, np.ndarray]:
        """One block as numpy arrays (rows in file order, dropped rows left out unless ``keep_all`` -- per-row
        caches are built with every row); ``snr`` in ``snr_dtype`` (float64 keeps the value the bins were
        computed from, for caches)."""
        path = self.shards.infos[block.shard].path
        cache = self.noisy.get(block.shard)
        if block.shard in self.inputs:  # cached gate inputs replace flux and error, which are not read
            out = read_rows(self.inputs[block.shard], block.start, block.stop)
            snr = out.pop("snr")
        elif self.observed:
            noisy, snr = None, None
            if cache is not None:
                with h5py.File(cache, "r") as f:
                    noisy = np.asarray(f["flux"][block.start : block.stop], dtype=np.float32)
                    snr = np.asarray(f["snr"][block.start : block.stop], dtype=np.float64)
            flux, error, usable = read_observed(path, block.start, block.stop, noisy)
            seen = observed_snr(flux, error, usable, self.noise_level)
            snr = seen if snr is None else np.where(usable.all(1), snr, seen)  # the copy's SNR is the clean one
            out = {"flux": flux, "error": error, "usable": usable}
        else:
            dead_ok = len(self.shards.dropped) > 0  # a dropped row may have no finite error
            flux, error = read_block(path, block.start, block.stop, flux=cache is None, dead_ok=dead_ok)
            if cache is not None:  # the pre-noised copy replaces the clean flux, which is not read
                with h5py.File(cache, "r") as f:
                    flux = np.asarray(f["flux"][block.start : block.stop], dtype=np.float32)
                    snr = np.asarray(f["snr"][block.start : block.stop], dtype=np.float64)
            else:
                with np.errstate(invalid="ignore", divide="ignore"):
                    snr = snr_of(flux, error, self.noise_level)
            out = {"flux": flux, "error": error}
        lab = self._shard_labels(block.shard)
        sl = slice(block.start, block.stop)
        out["snr"] = snr.astype(snr_dtype)
        for c in self.labels:
            out[c] = lab[c][sl].astype(np.float32)
        out |= {c: v[sl] for c, v in lab.items() if c.startswith("id_")}
        known = np.isfinite(lab["T_eff"][sl]) & np.isfinite(lab["M_H"][sl])
        out["phys_bin"] = np.where(known, bins.phys_bin(lab["T_eff"][sl], lab["M_H"][sl]), -1)  # -1: no labels
        out["snr_bin"] = bins.snr_bin(snr)
        out["row"] = np.arange(block.offset, block.offset + (block.stop - block.start), dtype=np.int64)
        keep = None if keep_all else self.shards.keep_mask(block.offset, block.offset + (block.stop - block.start))
        return out if keep is None else {k: v[keep] for k, v in out.items()}

    def plan(self, slot: int, n_slots: int) -> list[Block]:
        """Blocks of ``slot`` in file order (before any shuffling or truncation)."""
        return self.shards.blocks(*self._slot_rows(slot, n_slots), self.block_rows)

    def _slot_rows(self, slot: int, n_slots: int) -> tuple[int, int]:
        """Split rows [lo, hi) that ``slot`` reads (truncated to the common number of kept rows when
        equalising ranks)."""
        lo, hi = self.shards.slot_range(slot, n_slots)
        if not self.equalize_ranks:
            return lo, hi
        if not len(self.shards.dropped):
            return lo, lo + self.shards.n_rows // n_slots
        common = min(self.shards.kept(*self.shards.slot_range(s, n_slots)) for s in range(n_slots))
        return lo, self.shards.end_after(lo, common)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Shuffle for ``epoch`` (seeded by it and by torch's seed in this process, so a resumed run draws
        the same order) and leave out the first ``skip_batches`` batches this rank yields (already trained
        on before a resume; with workers, batches alternate between them)."""
        self._epoch, self._skip, self._base = int(epoch), int(skip_batches), torch.initial_seed()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        slot, n_slots, wid = _slot()
        self._iterations += 1
        blocks = self.plan(slot, n_slots)
        rng, skip = None, 0
        if self._epoch is not None:
            nw = max(self.num_workers, 1)
            skip = len(range(wid, self._skip, nw))  # this worker's share of the batches to leave out
        if self.shuffle:
            if self._epoch is not None:
                rng = np.random.default_rng([self.seed, self._epoch, self._base % (2**63), slot])
            else:
                base = torch.initial_seed() - wid  # differs per epoch in workers, same for all of them
                rng = np.random.default_rng([self.seed, self._iterations, base % (2**63), slot])
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        return self._batches(blocks, rng, skip * self.batch_size)

    def all_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every row of the split in file order, in batches, whatever the rank or worker.

        For computations that must agree across DDP ranks (alpha selection, feature scaling).
        """
        return self._batches(self.plan(0, 1), None)

    def sample_batches(self, max_rows: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """About ``max_rows`` rows of the split in batches: whole blocks drawn at random by ``seed`` (so a
        split sorted by its labels is still sampled across them), read in file order. The same rows on
        every rank and worker and in every run."""
        return self.sample_share(max_rows, seed)[1]

    def sample_share(
        self, max_rows: int, seed: int, rank: int = 0, world: int = 1
    ) -> tuple[int, Iterator[dict[str, torch.Tensor]]]:
        """Share ``rank`` of ``world`` of :meth:`sample_batches`' batches: (index of its first batch in the whole
        sample, its batches) -- the ``rank``-th contiguous run of them, so the shares in rank order are the
        sample. Blocks before the share are not read."""
        blocks = self.plan(0, 1)
        chosen, n = [], 0
        for i in np.random.default_rng(seed).permutation(len(blocks)):
            if n >= max_rows:
                break
            block = blocks[i]
            chosen.append(block)
            n += self.shards.kept(block.offset, block.offset + (block.stop - block.start))
        n_batches = -(-n // self.batch_size)
        first, stop = rank * n_batches // world, (rank + 1) * n_batches // world
        batches = self._batches(sorted(chosen, key=lambda b: b.offset), None, skip_rows=first * self.batch_size)
        return first, islice(batches, stop - first)

    def rank_blocks(self, prefetch: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """This rank's rows as whole blocks of numpy arrays, in file order (no batching, no copies).

        For consumers that take any block size (the experts' statistics pass). With
        ``prefetch`` a background thread reads the next block while the caller works on this
        one (h5py and numpy release the GIL while they read and reduce).
        """
        slot, n_slots, _ = _slot()
        blocks = self.plan(slot, n_slots)
        if not prefetch:
            yield from (part for part in map(self.read, blocks) if len(part["row"]))
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-read") as pool:
            pending = pool.submit(self.read, blocks[0]) if blocks else None
            for nxt in blocks[1:] + [None]:
                part = pending.result()
                pending = pool.submit(self.read, nxt) if nxt is not None else None
                if len(part["row"]):  # a block whose rows were all dropped yields nothing
                    yield part

    def _batches(
        self, blocks: list[Block], rng: np.random.Generator | None, skip_rows: int = 0
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Read ``blocks`` in order (rows permuted inside each when ``rng``), cut into full batches
        carried across block boundaries; the last batch may be short. The first ``skip_rows`` rows (whole
        batches) are left out; blocks wholly inside them are not read, their permutation still drawn."""
        carry: dict[str, np.ndarray] | None = None
        for block in blocks:
            if skip_rows:
                kept = self.shards.kept(block.offset, block.offset + (block.stop - block.start))
                if kept <= skip_rows:
                    if rng is not None:
                        rng.permutation(kept)
                    skip_rows -= kept
                    continue
            part = self.read(block)
            if rng is not None:
                order = rng.permutation(len(part["row"]))
                part = {k: v[order] for k, v in part.items()}
            if skip_rows:
                part, skip_rows = {k: v[skip_rows:] for k, v in part.items()}, 0
            if carry is not None:
                part = {k: np.concatenate([carry[k], part[k]]) for k in part}
            n = len(part["row"])
            full = n - n % self.batch_size
            for s in range(0, full, self.batch_size):
                yield {k: torch.from_numpy(np.ascontiguousarray(v[s : s + self.batch_size])) for k, v in part.items()}
            carry = {k: v[full:] for k, v in part.items()} if full < n else None
        if carry is not None:
            yield {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in carry.items()}

    def _slot_batches(self, slot: int, n_slots: int) -> int:
        lo, hi = self._slot_rows(slot, n_slots)
        return -(-self.shards.kept(lo, hi) // self.batch_size)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (over its ``num_workers`` slots)."""
        rank, world = rank_world()
        nw = max(self.num_workers, 1)
        return sum(self._slot_batches(rank * nw + w, world * nw) for w in range(nw))
