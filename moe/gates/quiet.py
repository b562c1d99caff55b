"""Lightning messages a user of this project cannot act on, filtered at the entry points."""

from __future__ import annotations

import logging
import warnings


def quiet_lightning() -> None:
    """Filter what Lightning prints that a user of this project cannot act on: its cloud-logger tip,
    its advice to add DataLoader workers (reading the cached gate inputs in the training process is
    the measured-fastest setting, ``SpectraDataModule.num_workers``), its caution about an
    IterableDataset's ``__len__`` (``SpectraStream.__len__`` counts this rank's slots exactly, workers
    included) and a deprecation inside Lightning's own code (``LeafSpec``)."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*`IterableDataset` has `__len__` defined.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: "Tip:" not in record.getMessage()
    )
