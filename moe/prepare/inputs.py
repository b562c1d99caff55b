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

from moe.data import ranks
from moe.data.folder import SpectraFolder
from moe.data.noise_cache import cache_path
from moe.data.row_cache import RowCacheJob, ensure_row_caches, source_attrs
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


def input_jobs(
    folder: SpectraFolder,
    split: str,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pixels: torch.Tensor,
    progress: bool = True,
) -> list[RowCacheJob]:
    """The gate-input cache of every shard of ``split`` as a row-cache job (pieces start on read blocks)."""
    weight, bias, pixels = weight.detach().cpu(), bias.detach().cpu(), pixels.detach().cpu()
    key = map_key(weight, bias, pixels)
    clean = split == "train"
    stream = folder.stream(split, shuffle=False)
    shards = stream.shards
    rest = rest_covariance_weights(weight.double(), pixels) if clean else None
    jobs = []
    bar = None  # one progress bar for the split, opened by the first piece that is built

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

        @torch.no_grad()
        def blocks(start: int, stop: int, k=k, path=path):
            nonlocal bar
            log.info("caching %s gate inputs of %s -> %s", split, shards.infos[k].path, path.name)
            if bar is None:
                total = shards.n_rows if not ranks.distributed() else None  # a rank builds only its share
                bar = tqdm(total=total, desc=f"gate inputs ({split})", unit="spec", disable=not progress)
            lo = int(shards.offsets[k])
            for block in shards.blocks(lo + start, lo + stop, folder.block_rows):
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
                if bar.total is not None and bar.n >= bar.total:
                    bar.close()
                yield block.start, block.stop, arrays

        jobs.append(RowCacheJob(path, expected, blocks, f"{split} gate inputs", align=folder.block_rows))
    return jobs


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
    return dict(enumerate(ensure_row_caches(input_jobs(folder, split, weight, bias, pixels, progress))))


def attach_inputs(
    folder: SpectraFolder,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pixels: torch.Tensor,
    splits=SPLITS,
    progress: bool = True,
    shared: bool = False,
) -> dict[str, dict[int, Path]]:
    """Build (or find) the gate-input caches of ``splits`` for one map and have ``folder`` stream them.

    With ``shared`` (collective: every rank calls it) the pre-noised copies and then the gate inputs of all
    ``splits`` are built together, their rows split over the ranks (:func:`moe.data.row_cache.ensure_row_caches`)."""
    for split in ("val", "test"):
        if split in splits:
            folder.noisy_caches(split, shared)
    jobs = {split: input_jobs(folder, split, weight, bias, pixels, progress) for split in splits}
    paths = iter(ensure_row_caches([j for split in splits for j in jobs[split]], shared))
    inputs = {split: {k: next(paths) for k in range(len(jobs[split]))} for split in splits}
    folder.attach_inputs(inputs, weight[:, pixels])
    return inputs
