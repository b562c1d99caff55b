"""Where training stands inside an epoch, so a run stopped mid-epoch continues at its next batch.

Lightning saves the ``state_dict`` of a resumable training DataLoader with every checkpoint and
hands it back before the first ``iter`` of a resumed run. :class:`TrainLoader` is that loader:
its state is the epoch and the number of batches already trained on (counted when a batch
reaches the model, not when it is prefetched). On resume the stream redraws the same block
and row order for that epoch (it is seeded by the epoch, not by how often it was iterated)
and skips the batches already used; the training noise of a batch is seeded by (seed, epoch,
batch, rank) (:func:`batch_seed`), so the continued run sees the same batches with the same
noise as one that never stopped.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch.utils.data import DataLoader


class EpochPosition:
    """The epoch and how many of its batches have been trained on."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batches = 0
        self.pending: dict | None = None  # a restored position, applied at the next iter()

    def advance(self, epoch: int) -> int:
        """Count one training batch of ``epoch``; returns its index within the epoch."""
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, 0
        self.batches += 1
        return self.batches - 1

    def start(self, epoch: int) -> int:
        """Begin iterating ``epoch``: the batches to skip (those a restored checkpoint already trained on)."""
        restored, self.pending = self.pending, None
        if restored is not None and restored["epoch"] == epoch:
            self.epoch, self.batches = epoch, int(restored["batches"])
            return self.batches
        self.epoch, self.batches = epoch, 0
        return 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.pending = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}


class TrainLoader(DataLoader):
    """The training DataLoader of a :class:`~moe.data.stream.SpectraStream` (batches assembled by the
    stream), resumable mid-epoch. ``epoch`` returns the trainer's current epoch."""

    def __init__(self, stream, position: EpochPosition, epoch: Callable[[], int], **kwargs):
        super().__init__(stream, batch_size=None, **kwargs)
        self.position = position
        self.epoch = epoch

    def __iter__(self):
        epoch = self.epoch()
        self.dataset.set_epoch(epoch, skip_batches=self.position.start(epoch))
        return super().__iter__()

    def state_dict(self) -> dict:
        return self.position.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.position.load_state_dict(state)


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The training-noise seed of one batch: a function of where the batch is, not of what ran before."""
    return int(np.random.SeedSequence([seed % 2**63, epoch, batch, rank]).generate_state(1, np.uint64)[0] >> 1)
