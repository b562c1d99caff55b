"""Per-row gate-input caches of a dataset, built once for one gate's projection map.

For every shard of a split, one HDF5 row cache (:mod:`moe.data.row_cache`) holds what
:func:`moe.features.gate_inputs.row_inputs` computes from the spectra -- from the clean flux for
the training split (plus what its per-epoch noise needs), from the pre-noised copies for
val/test -- and the SNR. It lives next to the pre-noised copies, is named by a hash of the
map (experts, global expert, PCA basis, window pixels), the noise level and the seed, and
records its source shard, so new experts or an edited shard give a rebuilt cache. A cache has one row
per shard row, dropped (bad) rows included, so it stays aligned with the shard; streams skip those rows.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from moe.data.folder import SpectraFolder
from moe.data.noise_cache import cache_path
from moe.data.row_cache import ensure_row_cache, source_attrs
from moe.data.shards import SPLITS
from moe.features.gate_inputs import rest_covariance_weights, row_inputs

log = logging.getLogger(__name__)
INPUTS_VERSION = 1


def map_key(weight: torch.Tensor, bias: torch.Tensor, pixels: torch.Tensor) -> str:
    """Hash of a projection map ``weight [P, D], bias [P]`` and window ``pixels [W]``."""
    h = hashlib.sha1(f"v{INPUTS_VERSION}".encode())
    for t in (weight, bias, pixels):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def inputs_path(folder: SpectraFolder, split: str, shard: Path, n_rows: int, key: str) -> Path:
    """Where the gate-input cache of ``shard`` (its first ``n_rows`` rows) lives."""
    seed = 0 if split == "train" else folder.seeds[split]
    noisy = cache_path(shard, folder.noise_level, seed, folder.cache_dir)
    kind = f"clean_nl{folder.noise_level:g}" if split == "train" else noisy.stem
    return noisy.with_name(f"gate_inputs_{kind}_{key}_rows{n_rows}.h5")


@torch.no_grad()
def ensure_inputs(
    folder: SpectraFolder,
    split: str,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pixels: torch.Tensor,
    progress: bool = True,
) -> dict[int, Path]:
    """Path of a valid gate-input cache per shard index of ``split``, building what is absent or stale."""
    weight, bias, pixels = weight.detach().cpu(), bias.detach().cpu(), pixels.detach().cpu()
    key = map_key(weight, bias, pixels)
    clean = split == "train"
    stream = folder.stream(split, shuffle=False)
    shards = stream.shards
    rest = rest_covariance_weights(weight.double(), pixels) if clean else None
    out: dict[int, Path] = {}
    bar = None  # one progress bar for the split, opened by the first shard that needs building
    for k, info in enumerate(shards.infos):
        n = int(shards.counts[k])
        path = inputs_path(folder, split, info.path, n, key)
        expected = {
            "version": INPUTS_VERSION,
            **source_attrs(info.path, n, info.n_pixels),
            "map": key,
            "noise_level": float(folder.noise_level),
            "clean": clean,
        }
        lo = int(shards.offsets[k])

        def blocks(k=k, lo=lo, n=n, path=path):
            nonlocal bar
            log.info("caching %s gate inputs of %s -> %s", split, shards.infos[k].path, path.name)
            if bar is None:
                bar = tqdm(
                    total=shards.n_rows, initial=lo, desc=f"gate inputs ({split})", unit="spec", disable=not progress
                )
            for block in shards.blocks(lo, lo + n, folder.block_rows):
                part = stream.read(block, snr_dtype=np.float64, keep_all=True)  # one cache row per shard row
                keep = shards.keep_mask(block.offset, block.offset + block.stop - block.start)
                if keep is not None:  # bad rows, never streamed: harmless stand-ins keep the maths finite
                    part["flux"][~keep], part["error"][~keep] = 0.0, 1.0
                x = row_inputs(
                    torch.from_numpy(part["flux"]),
                    torch.from_numpy(part["error"]),
                    weight,
                    bias,
                    pixels,
                    noise_factor=clean,
                    rest_weights=rest,
                )
                arrays = {name: v.numpy() for name, v in x.items()}
                arrays["snr"] = part["snr"]
                bar.update(block.stop - block.start)
                yield block.start, block.stop, arrays

        out[k] = ensure_row_cache(path, expected, blocks, f"{split} gate inputs")
    if bar is not None:
        bar.close()
    return out


def attach_inputs(
    folder: SpectraFolder,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pixels: torch.Tensor,
    splits=SPLITS,
    progress: bool = True,
) -> dict[str, dict[int, Path]]:
    """Build (or find) the gate-input caches of ``splits`` for one map and have ``folder`` stream them."""
    inputs = {split: ensure_inputs(folder, split, weight, bias, pixels, progress) for split in splits}
    folder.attach_inputs(inputs, weight[:, pixels])
    return inputs
