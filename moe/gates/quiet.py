"""Lightning messages a user of this project cannot act on, filtered at the entry points."""

from __future__ import annotations

import logging
import warnings


def quiet_lightning() -> None:
    """Filter what Lightning prints that a user of this project cannot act on: its cloud-logger tip,
    its advice to add DataLoader workers (reading the cached gate inputs in the training process is
    the measured-fastest setting, ``SpectraDataModule.num_workers``), its caution about an
    IterableDataset's ``__len__`` (``SpectraStream.__len__`` counts this rank's slots exactly, workers
    included), a deprecation inside Lightning's own code (``LeafSpec``), LightningCLI's caution when
    ``args`` are passed (the ``moe`` command always passes them) and the notes below, each with the
    reason it does not apply."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*`IterableDataset` has `__len__` defined.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", "LightningCLI's args parameter is intended.*")
    # the oracle and global gates learn nothing: fitting them only validates and checkpoints
    warnings.filterwarnings("ignore", ".*configure_optimizers` returned `None`.*")
    warnings.filterwarnings("ignore", ".*`training_step` returned `None`.*")
    # the catalogue writer takes each star's shard and row from the batch, not the loader's indices
    warnings.filterwarnings("ignore", ".*Couldn't infer the batch indices.*")
    # `fit --ckpt_path last` continues a run in its own folder, which holds its earlier checkpoints
    warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")
    # test, validate and predict restore a checkpoint's callbacks too, and the checkpoint callback warns that its
    # best-k list is not reloaded into another folder: those commands use none of it; a `fit --ckpt_path` with a
    # checkpoint of another run's version starts a version of its own, which keeps its own best
    warnings.filterwarnings("ignore", ".*The dirpath has changed from .* won't be reloaded.*")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: "Tip:" not in record.getMessage()
    )


class _OncePerProcess(logging.Filter):
    """Lets each of the trainer's hardware lines ("GPU available: ...", "LOCAL_RANK: 0 -
    CUDA_VISIBLE_DEVICES: [0]") through once, and drops the lines about restoring a run's own best
    checkpoint from its temporary folder and Lightning's note that the module's callbacks replace the
    trainer's: a gate's trainer predicts after it fits, and at predict the module's own callback
    (``ValidationFigures``, attached at fit) only replaces itself."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(
            (
                "Restoring states from the checkpoint",
                "Loaded model weights from the checkpoint",
                "The following callbacks returned in `LightningModule.configure_callbacks` will override",
            )
        ):
            return False
        if message.startswith(("GPU available", "TPU available", "LOCAL_RANK:")):
            if message in self.seen:
                return False
            self.seen.add(message)
        return True


HARDWARE_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda")


def quiet_repeated_trainers() -> None:
    """For commands that train many gates in one process (``moe experiments``): each trainer's hardware
    lines once, not once per gate, and not the restore of each gate's best checkpoint from a temporary
    folder (the experiment's own lines say which gate it trains and evaluates)."""
    for name in HARDWARE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OncePerProcess) for f in logger.filters):
            logger.addFilter(_OncePerProcess())
