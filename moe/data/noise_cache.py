"""Pre-noised copies of val/test shards: noised once with a fixed seed, cached next to the data.

The cache ``noisy_nl{level}_seed{seed}.h5`` holds ``flux`` (N, D) float32 -- the shard's
clipped flux plus ``noise_level * error * N(0, 1)`` -- and ``snr`` (N,) computed from the
clean flux. Noise for rows ``[i * 1024, (i + 1) * 1024)`` comes from
``default_rng([seed, crc32(shard folder name), i])``, so the result does not depend on
who builds it or when. The file records its source (size, mtime, rows, pixels) and is
rebuilt, atomically, when they no longer match (:mod:`moe.data.row_cache`).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from moe.data.noise import add_noise_np
from moe.data.noise import snr as snr_of
from moe.data.row_cache import RowCacheJob, ensure_row_caches, source_attrs
from moe.data.shards import read_block

CACHE_VERSION = 1
NOISE_BLOCK = 1024


def cache_path(shard: Path, noise_level: float, seed: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the pre-noised copy of ``shard`` lives (next to it unless ``cache_dir`` is given)."""
    folder = shard.parent if cache_dir is None else Path(cache_dir) / shard.parent.name
    return folder / f"noisy_nl{noise_level:g}_seed{seed}.h5"


def noisy_job(
    shard: Path,
    n_rows: int,
    n_pixels: int,
    noise_level: float,
    seed: int,
    cache_dir: str | os.PathLike | None = None,
    dead_ok: bool = False,
) -> RowCacheJob:
    """The pre-noised cache of ``shard`` as a row-cache job (built by :func:`moe.data.row_cache.ensure_row_caches`;
    pieces start on noise blocks, so who builds which rows does not change the draw)."""
    shard = Path(shard)
    expected = {
        "version": CACHE_VERSION,
        **source_attrs(shard, n_rows, n_pixels),
        "noise_level": float(noise_level),
        "seed": int(seed),
    }
    tag = zlib.crc32(shard.parent.name.encode())

    def blocks(lo: int, hi: int):
        for start in range(lo, hi, NOISE_BLOCK):
            stop = min(start + NOISE_BLOCK, hi)
            flux, error = read_block(shard, start, stop, dead_ok=dead_ok)
            rng = np.random.default_rng([seed, tag, start // NOISE_BLOCK])
            with np.errstate(invalid="ignore", divide="ignore"):
                yield (
                    start,
                    stop,
                    {
                        "flux": add_noise_np(flux, error, noise_level, rng),
                        "snr": snr_of(flux, error, noise_level).astype(np.float64),
                    },
                )

    path = cache_path(shard, noise_level, seed, cache_dir)
    return RowCacheJob(path, expected, blocks, "pre-noised copy", align=NOISE_BLOCK)


def ensure_noisy(
    shard: Path,
    n_rows: int,
    n_pixels: int,
    noise_level: float,
    seed: int,
    cache_dir: str | os.PathLike | None = None,
    dead_ok: bool = False,
) -> Path:
    """Path of a valid pre-noised cache of ``shard``, building it if absent or stale (``dead_ok``: the
    shard has dropped rows whose error may have no finite pixel; they are copied as NaN)."""
    return ensure_row_caches([noisy_job(shard, n_rows, n_pixels, noise_level, seed, cache_dir, dead_ok)])[0]
