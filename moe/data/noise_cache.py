"""Pre-noised copies of val/test shards: noised once with a fixed seed, cached next to the data.

The cache ``noisy_nl{level}_seed{seed}.h5`` holds ``flux`` (N, D) float32 -- the shard's
clipped flux plus ``noise_level * error * N(0, 1)`` -- and ``snr`` (N,) computed from the
clean flux. Noise for rows ``[i * 1024, (i + 1) * 1024)`` comes from
``default_rng([seed, crc32(shard folder name), i])``, so the result does not depend on
who builds it or when. The file records its source (size, mtime, rows, pixels) and is
rebuilt, atomically, when they no longer match.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import h5py
import numpy as np

from moe.data.noise import add_noise_np, snr as snr_of
from moe.data.shards import read_block

CACHE_VERSION = 1
NOISE_BLOCK = 1024


def cache_path(shard: Path, noise_level: float, seed: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the pre-noised copy of ``shard`` lives (next to it unless ``cache_dir`` is given)."""
    folder = shard.parent if cache_dir is None else Path(cache_dir) / shard.parent.name
    return folder / f"noisy_nl{noise_level:g}_seed{seed}.h5"


def _expected_attrs(shard: Path, n_rows: int, n_pixels: int, noise_level: float, seed: int) -> dict:
    st = shard.stat()
    return {"version": CACHE_VERSION, "source": shard.name, "source_size": st.st_size,
            "source_mtime_ns": st.st_mtime_ns, "n_rows": n_rows, "n_pixels": n_pixels,
            "noise_level": float(noise_level), "seed": int(seed)}


def _valid(path: Path, expected: dict) -> bool:
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: f.attrs[k] for k in expected if k in f.attrs}
            shapes_ok = f["flux"].shape == (expected["n_rows"], expected["n_pixels"]) and f["snr"].shape == (expected["n_rows"],)
    except (OSError, KeyError):
        return False
    return shapes_ok and all(_same(attrs.get(k), v) for k, v in expected.items())


def _same(a, b) -> bool:
    if isinstance(a, bytes):
        a = a.decode()
    if isinstance(b, float) or isinstance(a, (float, np.floating)):
        return a is not None and float(a) == float(b)
    return a == b


def ensure_noisy(shard: Path, n_rows: int, n_pixels: int, noise_level: float, seed: int,
                 cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of a valid pre-noised cache of ``shard``, building it if absent or stale."""
    shard = Path(shard)
    path = cache_path(shard, noise_level, seed, cache_dir)
    expected = _expected_attrs(shard, n_rows, n_pixels, noise_level, seed)
    if path.is_file() and _valid(path, expected):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tag = zlib.crc32(shard.parent.name.encode())
    try:
        with h5py.File(tmp, "w") as f:
            flux_ds = f.create_dataset("flux", shape=(n_rows, n_pixels), dtype=np.float32,
                                       chunks=(min(64, n_rows), n_pixels))
            snr_ds = f.create_dataset("snr", shape=(n_rows,), dtype=np.float64)
            for i, start in enumerate(range(0, n_rows, NOISE_BLOCK)):
                stop = min(start + NOISE_BLOCK, n_rows)
                flux, error = read_block(shard, start, stop)
                rng = np.random.default_rng([seed, tag, i])
                flux_ds[start:stop] = add_noise_np(flux, error, noise_level, rng)
                snr_ds[start:stop] = snr_of(flux, error, noise_level)
            for k, v in expected.items():
                f.attrs[k] = v
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
