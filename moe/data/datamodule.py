"""``SpectraDataModule``: a :class:`~moe.data.folder.SpectraFolder` with Lightning's loaders.

- train: contiguous row blocks, reshuffled every epoch, split exactly once across ranks
  and workers (:mod:`moe.data.stream`); fresh noise ``noise_level * error * N(0,1)`` added
  in ``on_after_batch_transfer``, i.e. on the batch's device (the GPU when there is one);
- val/test: pre-noised once with fixed seeds, cached next to the data (:mod:`moe.data.noise_cache`);
- predict: the test split, or the spectra at ``predict_path`` (a folder of shards or shard
  files; labels optional): taken as observed, i.e. used as they are, without added noise, their
  masked pixels honoured (:func:`moe.data.shards.read_observed`).

Once the gate inputs of each split are cached per row (:meth:`SpectraFolder.attach_inputs`,
done by the preparation step), the loaders read those instead of the spectra, and the
training noise is drawn on them (:func:`moe.data.noise.noisy_inputs`): same gate inputs,
a fraction of the bytes and random numbers per epoch. ``n_pixels`` and ``wave`` are read
at construction so the CLI can link them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader

from moe.data.folder import SpectraFolder
from moe.data.resume import EpochPosition, TrainLoader, batch_seed
from moe.data.row_check import BadRows
from moe.data.shards import ShardError, check_grid, read_wave
from moe.data.stream import ShardSet, SpectraStream
from moe.data.synth import SynthConfig


def predict_files(paths: list[str]) -> list[Path]:
    """Shard files named by ``paths``: files as given, folders searched (recursively) for ``*.h5``."""
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found = sorted(p for p in entry.rglob("*.h5") if not p.name.startswith((".", "noisy_", "gate_inputs_")))
            if not found:
                raise ShardError(entry, "--data.predict_path: no *.h5 shard in this folder")
            files += found
        elif entry.is_file():
            files.append(entry)
        else:
            raise ShardError(entry, "--data.predict_path: no such file or folder")
    return files


class SpectraDataModule(SpectraFolder, pl.LightningDataModule):
    """Train/val/test/predict loaders over a folder of shards (see module docstring).

    Args:
        data_dir: dataset folder (``train_*/``, ``val*/``, ``test*/``).
        noise_level: multiplier of the 1-sigma error for the heteroscedastic noise.
        batch_size: spectra per batch.
        num_workers: DataLoader workers per rank. 0 (read in the training process) is fastest
            once the gate inputs are cached -- a few kB per row, cheaper to read than to ship
            from a worker (`benchmarks/gate_epoch.py`); workers pay off for
            streams of whole spectra.
        block_rows: rows per contiguous read.
        max_train_rows: use only the first N training rows (scaling studies, smoke runs).
        val_seed: seed of the pre-noised validation copy (the same noise draw in every run).
        test_seed: seed of the pre-noised test copy (the same noise draw in every run and report).
        cache_dir: where pre-noised copies and gate-input caches go (default: next to the shards).
        synth: generate this synthetic dataset as ``data_dir`` when that folder does not exist yet; ``None``
            never generates. An existing folder is only read (a missing split is an error).
        bad_rows: rows with NaN/Inf flux, error <= 0 or NaN inside the spectrum, NaN or out-of-range labels
            (checked before any work, cached per shard): ``error`` stops naming the file, field and rows;
            ``drop`` leaves them out. Spectra to predict are not screened: ``predict`` masks bad pixels instead.
        predict_path: spectra to predict: a folder (searched for ``*.h5`` shards), a shard file, or a list
            of them (``[a.h5, b.h5]``);
            default: the pre-noised test split. They must share the training data's pixel grid.
    """

    def __init__(
        self,
        data_dir: str = "data/synth",
        noise_level: NonNegativeFloat = 1.0,
        batch_size: PositiveInt = 256,
        num_workers: NonNegativeInt = 0,
        block_rows: PositiveInt = 2048,
        max_train_rows: int | None = None,
        val_seed: int = 1234,
        test_seed: int = 5678,
        cache_dir: str | None = None,
        synth: SynthConfig | None = SynthConfig(),
        predict_path: str | list[str] | None = None,
        bad_rows: BadRows = "error",
    ):
        pl.LightningDataModule.__init__(self)
        # plain numbers in the saved hyperparameters (the parser's restricted types are for checking)
        noise_level, batch_size, num_workers, block_rows = (
            float(noise_level),
            int(batch_size),
            int(num_workers),
            int(block_rows),
        )
        self.save_hyperparameters()
        SpectraFolder.__init__(
            self, data_dir, noise_level, block_rows, max_train_rows, val_seed, test_seed, cache_dir, synth, bad_rows
        )
        self.batch_size = int(batch_size)
        self.position = EpochPosition()  # where training stands in its epoch (saved with checkpoints)
        self._noise_seed = 0
        self.num_workers = int(num_workers)
        self.predict_path = [predict_path] if isinstance(predict_path, str) else predict_path
        self._predict_set: ShardSet | None = None

    def predict_set(self) -> ShardSet:
        """The shards ``predict`` reads: those at ``predict_path`` (unlabelled allowed), else the test split."""
        if not self.predict_path:
            return self.test_set
        if self._predict_set is None:
            predict_set = ShardSet(predict_files(self.predict_path), labelled=False)
            for path in predict_set.paths:
                check_grid(path, read_wave(path), self.wave, "the training data's")
            # no row screening: predict honours masked pixels (NaN/Inf flux, bad error, the mask array), and labels
            # are optional here and may lie outside the training range (the catalogue reports them)
            self._predict_set = predict_set
        return self._predict_set

    def prepare_data(self) -> None:
        for split in ("val", "test"):
            self.noisy_caches(split)

    def stream(
        self,
        split: str,
        shuffle: bool | None = None,
        batch_size: int | None = None,
        cached: bool = False,
        num_workers: int | None = None,
        labels: Sequence[str] | None = None,
    ) -> SpectraStream:
        """:meth:`SpectraFolder.stream` with this module's batch size and workers as defaults
        (``predict`` with a ``predict_path``: those spectra as they are)."""
        bs, nw = batch_size or self.batch_size, self.num_workers if num_workers is None else num_workers
        if split == "predict" and self.predict_path:
            return SpectraStream(
                self.predict_set(),
                bs,
                self.noise_level,
                self.block_rows,
                num_workers=nw,
                ids=True,
                observed=True,
                labels=self.labels if labels is None else labels,
            )
        return super().stream(split, shuffle, bs, cached, nw, labels)

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.stream(split, cached=True),
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Resumable mid-epoch (:mod:`moe.data.resume`): Lightning saves its position with each checkpoint."""
        self._noise_seed = torch.initial_seed()
        return TrainLoader(
            self.stream("train", cached=True),
            self.position,
            self._current_epoch,
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else self.position.epoch

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Fresh heteroscedastic noise on training batches, on the batch's device, seeded by the batch's place
        (seed, epoch, batch, rank), so a run resumed mid-epoch draws what the uninterrupted run drew."""
        if self.trainer is not None and self.trainer.training:
            index = self.position.advance(self.trainer.current_epoch)
            device = next(iter(batch.values())).device
            seed = batch_seed(self._noise_seed, self.trainer.current_epoch, index, self.trainer.global_rank)
            batch = self.add_noise(batch, torch.Generator(device=device).manual_seed(seed))
        return batch
