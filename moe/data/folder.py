"""``SpectraFolder``: one dataset folder of pfsspec shards at one noise level, without Lightning.

It knows the three splits (:class:`~moe.data.stream.ShardSet`), the pixel grid, the
pre-noised val/test copies (:mod:`moe.data.noise_cache`) and -- once the preparation step
has built them -- the per-row gate-input caches; it streams any split as batches
(:class:`~moe.data.stream.SpectraStream`) and noises clean training batches. The experts,
the preparation step and the experiments take a ``SpectraFolder``; the Lightning
``SpectraDataModule`` is one with loaders added.

The dataset is generated on first use when ``synth`` is given and the folder holds no dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from moe.data.noise import add_noise, noisy_inputs
from moe.data.noise_cache import ensure_noisy
from moe.data.shards import SPLITS, ShardError, check_grid, content_hash, find_split, read_wave
from moe.data.stream import ShardSet, SpectraStream, rank_world
from moe.data.synth import MANIFEST, SynthConfig, write_dataset

log = logging.getLogger(__name__)
# Salt of the per-epoch training shuffle; the randomness itself comes from torch's seed
# (seed_everything) and the epoch count, so runs are reproducible and epochs differ.
SHUFFLE_SALT = 1234


def ensure_dataset(data_dir: str | Path, synth: SynthConfig | None) -> Path:
    """Return ``data_dir``, generating (or finishing) the synthetic dataset there when needed.

    A folder with a ``synth.json`` manifest is a complete synthetic dataset and is used as
    it is (a warning says so when ``synth`` asks for other settings); a folder whose three splits all have shards but no manifest
    holds real data and is used as it is; anything else is generated when ``synth`` is
    given -- shards already written are kept, so an interrupted generation resumes.
    """
    root = Path(data_dir)
    if (root / MANIFEST).is_file():
        found = json.loads((root / MANIFEST).read_text())
        if synth is not None and {k: v for k, v in found.items() if k != "generator_version"} != asdict(synth):
            log.warning("%s holds a synthetic dataset generated with %s; the requested synth settings %s are ignored "
                        "(generate into another folder to use them)", root, found, asdict(synth))
        return root
    complete = True
    for split in SPLITS:
        try:
            find_split(root, split)
        except ShardError:
            complete = False
    if complete:
        return root
    if synth is None:
        find_split(root, "train")  # raises with the folder and the missing pattern
        raise ShardError(root, "dataset is incomplete (a val* or test* split is missing) and no synth config was given")
    log.info("generating the synthetic dataset in %s (%s)", root, synth)
    write_dataset(root, synth)
    return root


class SpectraFolder:
    """The splits of a dataset folder at one noise level (see module docstring).

    Args:
        data_dir: dataset folder (``train_*/``, ``val*/``, ``test*/``).
        noise_level: multiplier of the 1-sigma error for the heteroscedastic noise.
        block_rows: rows per contiguous read.
        max_train_rows: use only the first N training rows (scaling studies, smoke runs).
        val_seed / test_seed: seeds of the pre-noised val/test copies.
        cache_dir: where pre-noised copies and gate-input caches go (default: next to the shards).
        synth: generate this synthetic dataset in ``data_dir`` when it holds none; ``None``
            never generates (real data).
    """

    def __init__(self, data_dir: str = "data/synth", noise_level: float = 1.0, block_rows: int = 2048,
                 max_train_rows: int | None = None, val_seed: int = 1234, test_seed: int = 5678,
                 cache_dir: str | None = None, synth: SynthConfig | None = SynthConfig()):
        if noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {noise_level}")
        self.data_dir = ensure_dataset(data_dir, synth)
        self.synth = synth
        self.noise_level = float(noise_level)
        self.block_rows = int(block_rows)
        self.cache_dir = cache_dir
        self.seeds = {"val": int(val_seed), "test": int(test_seed)}
        self.train_set = ShardSet(find_split(self.data_dir, "train"), max_train_rows)
        self.val_set = ShardSet(find_split(self.data_dir, "val"))
        self.test_set = ShardSet(find_split(self.data_dir, "test"))
        self.n_pixels = self.train_set.n_pixels
        self.inputs: dict[str, dict[int, Path]] = {}
        self.window_weight: torch.Tensor | None = None
        self.wave = read_wave(self.train_set.paths[0])
        for s in (self.val_set, self.test_set):
            if s.n_pixels != self.n_pixels:
                raise ShardError(s.paths[0], f"has {s.n_pixels} pixels, the train split has {self.n_pixels}")
            check_grid(s.paths[0], read_wave(s.paths[0]), self.wave, "the train split's")

    # ---- identity ---------------------------------------------------------------
    def fingerprint(self) -> dict:
        """What the experts depend on: the train/val shards (name, size, mtime_ns, rows used, content hash),
        the noise level and the val seed. An in-place edit of a shard changes it, so its caches are not reused."""

        def files(s: ShardSet) -> list:
            return [
                [str(p.relative_to(self.data_dir)), p.stat().st_size, p.stat().st_mtime_ns, int(n), content_hash(p)]
                for p, n in zip(s.paths, s.counts)
            ]

        return {"train": files(self.train_set), "val": files(self.val_set), "n_pixels": self.n_pixels,
                "noise_level": self.noise_level, "val_seed": self.seeds["val"]}

    def fingerprint_hash(self) -> str:
        return hashlib.sha1(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:12]

    # ---- pre-noised splits -------------------------------------------------------
    def noisy_caches(self, split: str) -> dict[int, Path]:
        """Pre-noised cache path per shard of ``split`` ('val' or 'test'), built if needed."""
        s = self.val_set if split == "val" else self.test_set
        return {k: ensure_noisy(info.path, info.n_rows, info.n_pixels, self.noise_level, self.seeds[split], self.cache_dir)
                for k, info in enumerate(s.infos)}

    def split_set(self, split: str) -> ShardSet:
        """The shards of ``split`` ('train', 'val', 'test'; 'predict' is the test split)."""
        return {"train": self.train_set, "val": self.val_set}.get(split, self.test_set)

    # ---- cached gate inputs --------------------------------------------------------
    def attach_inputs(self, inputs: dict[str, dict[int, Path]], window_weight: torch.Tensor) -> None:
        """Stream the per-row gate-input caches ``inputs[split][shard index]`` instead of the spectra.

        ``window_weight`` [P, W] is the projection map at the window pixels, used to noise the
        clean training rows (:func:`moe.data.noise.noisy_inputs`).
        """
        self.inputs = dict(inputs)
        self.window_weight = window_weight.detach().cpu()

    # ---- streams -------------------------------------------------------------------
    def stream(self, split: str, shuffle: bool | None = None, batch_size: int = 2048, cached: bool = False,
               num_workers: int = 0) -> SpectraStream:
        """The batch stream of ``split`` (train: clean; val/test/predict: pre-noised): of the spectra,
        or with ``cached`` of the attached gate-input caches when there are some (the loaders do)."""
        bs = batch_size
        name = "test" if split == "predict" else split
        inputs = self.inputs.get(name) if cached else None
        if split == "train":
            return SpectraStream(self.train_set, bs, self.noise_level, self.block_rows,
                                 shuffle=True if shuffle is None else shuffle, seed=SHUFFLE_SALT,
                                 equalize_ranks=rank_world()[1] > 1, num_workers=num_workers, inputs=inputs)
        return SpectraStream(self.split_set(name), bs, self.noise_level, self.block_rows, shuffle=bool(shuffle),
                             noisy=self.noisy_caches(name) if inputs is None else None,
                             num_workers=num_workers, inputs=inputs, ids=split == "predict")

    def add_noise(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """A clean batch made noisy: ``flux + noise_level * error * z``, or the same on its cached gate inputs."""
        if "flux" in batch:
            return batch | {"flux": add_noise(batch["flux"], batch["error"], self.noise_level, generator)}
        return noisy_inputs(batch, self.window_weight.to(batch["proj"].device), self.noise_level, generator)

    def describe(self) -> dict:
        return {"data_dir": str(self.data_dir), "n_train": self.train_set.n_rows, "n_val": self.val_set.n_rows,
                "n_test": self.test_set.n_rows, "n_pixels": self.n_pixels, "noise_level": self.noise_level,
                **({"synth": asdict(self.synth)} if self.synth is not None else {})}
