"""Lightning messages a user of this project cannot act on, filtered at the entry points."""

from __future__ import annotations

import logging
import warnings


def quiet_lightning() -> None:
    """Filter Lightning's cloud-logger tip and its advice to add DataLoader workers (reading the cached
    gate inputs in the training process is the measured-fastest setting, ``SpectraDataModule.num_workers``)."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: "Tip:" not in record.getMessage()
    )
