"""Lightning callbacks of the gate module: the per-star catalogue written by ``predict``, the run's
TensorBoard summary (clean hyperparameters, ``hp_metric`` = best ``val/r2``) and its validation figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.loggers import TensorBoardLogger
from tables import HDF5ExtError

from moe.data import bins
from moe.gates.catalogue_join import join_parts, part_path
from moe.shared.atomic import AtomicFile

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
HDF5_KEY = "catalogue"


class CatalogueWriter(BasePredictionWriter):
    """Writes ``predict`` output as a catalogue, one row per star, chunk by chunk (memory stays flat).

    Columns: ``shard`` (file), ``row`` (within the shard), the shard's numeric id columns
    (``objid``, ``mag``, ... when present), ``snr``, ``snr_bin``, ``log_g_pred``, ``log_g_sigma``,
    ``w_<expert>`` (gate weights), ``pred_<expert>`` (each expert's prediction) and ``log_g_true``
    when the shards carry labels. CSV, or an HDF5 table readable with ``pandas.read_hdf(path)``
    when ``output`` ends in ``.h5``. Written to a temporary name (:class:`moe.shared.atomic.AtomicFile`: stale
    ones of interrupted runs removed first) and renamed when prediction ends; a write that fails (disk full,
    quota, read-only) is one :class:`~moe.shared.errors.WriteError` naming the catalogue, and nothing is left.

    Under DDP each rank writes its share of the rows as a part (:mod:`moe.gates.catalogue_join`) and rank 0
    joins the parts, in rank order -- the input order -- into the one catalogue (the output folder must be
    one every rank sees).

    Args:
        output: catalogue path; default ``<log_dir>/predictions.csv``.
    """

    def __init__(self, output: str | None = None):
        super().__init__(write_interval="batch")
        self.output = output
        self._path: Path | None = None
        self._file: AtomicFile | None = None  # the catalogue being written (its temporary file)
        self._labelled: bool | None = None

    def _target(self, trainer: pl.Trainer) -> Path:
        """The catalogue's path (one file, whatever the number of ranks)."""
        return (
            Path(self.output) if self.output else Path(trainer.log_dir or trainer.default_root_dir) / "predictions.csv"
        )

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._path = self._target(trainer)
        if trainer.world_size > 1:  # this rank's share, joined by rank 0 at the end
            self._path = part_path(self._path, trainer.global_rank)
        # removes the temporary files of this target that earlier, interrupted runs (or this process) left
        self._file = AtomicFile(self._path, "the catalogue", body_failures=(OSError, HDF5ExtError))
        dm = trainer.datamodule
        self._shards = dm.predict_set() if hasattr(dm, "predict_set") else None
        self._names = list(pl_module.mixture.experts.names)
        self._labelled = None

    def frame(self, prediction: dict) -> pd.DataFrame:
        """One batch of predictions as catalogue rows."""
        p = {k: v.detach().cpu().numpy() for k, v in prediction.items()}
        cols: dict[str, np.ndarray] = {}
        if self._shards is not None:
            shard, row = self._shards.locate(p["row"])
            cols["shard"] = np.asarray([str(path) for path in self._shards.paths], dtype=object)[shard]
            cols["row"] = row
        else:
            cols["row"] = p["row"]
        cols |= {k[3:]: v for k, v in p.items() if k.startswith("id_")}
        cols |= {
            "snr": p["snr"],
            "snr_bin": np.asarray(bins.SNR_BIN_NAMES)[p["snr_bin"]],
            "log_g_pred": p["log_g_pred"],
            "log_g_sigma": p["log_g_sigma"],
        }
        cols |= {f"w_{n}": p["weights"][:, i] for i, n in enumerate(self._names)}
        cols |= {f"pred_{n}": p["expert_preds"][:, i] for i, n in enumerate(self._names)}
        if self._labelled is None:
            self._labelled = bool(np.isfinite(p["log_g_true"]).any())
        if self._labelled:
            cols["log_g_true"] = p["log_g_true"]
        return pd.DataFrame(cols)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        df = self.frame(prediction)
        tmp = self._file.tmp
        try:
            if self._path.suffix.lower() in HDF5_SUFFIXES:
                longest = max((len(str(p)) for p in self._shards.paths), default=1) if self._shards is not None else 1
                with pd.HDFStore(tmp, mode="a") as store:
                    store.append(
                        HDF5_KEY,
                        df,
                        format="table",
                        index=False,
                        min_itemsize={"shard": longest, "snr_bin": 1} if "shard" in df else {"snr_bin": 1},
                    )
            else:
                df.to_csv(tmp, mode="a", header=not tmp.exists(), index=False, float_format="%.7g")
        except self._file.body_failures as exc:
            self._file.abort()
            raise self._file.error(exc) from exc

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._file is not None and self._file.tmp.exists():
            self._file.commit()
            if trainer.world_size == 1:
                print(f"catalogue written to {self._path}")
        self._file = None
        if trainer.world_size > 1:
            trainer.strategy.barrier("catalogue parts")
            if trainer.is_global_zero:
                target = self._target(trainer)
                rows = join_parts([part_path(target, r) for r in range(trainer.world_size)], target)
                print(f"catalogue written to {target} ({rows} rows from {trainer.world_size} ranks)")
            trainer.strategy.barrier("catalogue joined")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._file is not None:
            self._file.abort()
        self._file = None


def plain_hparams(model: pl.LightningModule, datamodule: pl.LightningDataModule | None) -> dict:
    """The run's settings as plain values for TensorBoard: the model's arguments (without the CLI's private
    ``_instantiator`` / ``_class_path``) and the dataset actually used (folder, rows, fingerprint)."""
    params = {k: v for k, v in model.hparams.items() if not k.startswith("_")}
    if datamodule is not None and hasattr(datamodule, "describe"):
        params |= {f"data/{k}": v for k, v in datamodule.describe().items() if k != "synth"}
        params["data/fingerprint"] = datamodule.fingerprint_hash()
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}


class RunSummary(pl.Callback):
    """Writes the run's hyperparameters once per fit (instead of Lightning's, which carry private keys) and
    logs ``hp_metric`` = the best ``val/r2`` so far after every validation (before the ModelCheckpoint
    updates its own best), so TensorBoard's HPARAMS tab
    compares runs by their best epoch (a resumed run starts from the best of its checkpoint)."""

    monitor = "val/r2"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module._log_hyperparams = False
        if trainer.datamodule is not None:
            trainer.datamodule._log_hyperparams = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(trainer.logger, TensorBoardLogger):
            trainer.logger.log_hyperparams(
                plain_hparams(pl_module, trainer.datamodule), {"hp_metric": self._best(trainer) or float("nan")}
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or not isinstance(trainer.logger, TensorBoardLogger):
            return
        best = max(float(value), self._best(trainer) or float("-inf"))
        trainer.logger.log_metrics({"hp_metric": best}, step=trainer.global_step)

    @staticmethod
    def _best(trainer: pl.Trainer) -> float | None:
        score = getattr(trainer.checkpoint_callback, "best_model_score", None)
        return None if score is None else float(score)


class ValidationFigures(pl.Callback):
    """TensorBoard figures of every validation epoch of a run (not the sanity check), from the first
    ``max_rows`` validation stars: the gate weights' histogram (``val/gate_weights``), gate entropy against
    SNR (``val/entropy_vs_snr``) and the calibration of sigma (``val/calibration``: z of the epoch's sigma;
    the recalibration refitted at its end applies from the next epoch on). Reads what
    ``GatedMoE.validation_step`` returns (a ``MoEOutput``); nothing without a TensorBoardLogger."""

    def __init__(self, max_rows: int = 20_000):
        self.max_rows = max_rows
        self._rows: list[dict[str, torch.Tensor]] = []

    @staticmethod
    def _active(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        return isinstance(pl_module.logger, TensorBoardLogger) and not trainer.sanity_checking

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs is None or not self._active(trainer, pl_module):
            return
        if sum(len(r["snr"]) for r in self._rows) < self.max_rows:
            self._rows.append(
                {
                    "snr": batch["snr"].detach().cpu(),
                    "entropy": outputs.entropy.detach().cpu(),
                    "weights": outputs.weights.detach().cpu(),
                    "snr_bin": batch["snr_bin"].detach().cpu(),
                    "z": ((outputs.pred - batch["log_g"]) / outputs.sigma).detach().cpu(),
                }
            )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows, self._rows = self._rows, []
        if not rows or not self._active(trainer, pl_module):
            return
        from moe.plots import calibration, entropy_vs_snr

        step, epoch, fusion = pl_module.global_step, pl_module.current_epoch, pl_module.hparams.fusion
        weights = torch.cat([r["weights"] for r in rows])
        tb = pl_module.logger.experiment
        tb.add_histogram("val/gate_weights", weights.flatten(), global_step=step)
        fig = entropy_vs_snr(
            torch.cat([r["snr"] for r in rows]).numpy(),
            torch.cat([r["entropy"] for r in rows]).numpy(),
            weights.shape[1],
            title=f"Gate entropy vs SNR ({fusion}, epoch {epoch})",
        )
        tb.add_figure("val/entropy_vs_snr", fig, global_step=step, close=True)
        fig = calibration(
            torch.cat([r["z"] for r in rows]).numpy(),
            torch.cat([r["snr_bin"] for r in rows]).numpy(),
            title=f"Calibration of sigma on validation ({fusion}, epoch {epoch})",
        )
        tb.add_figure("val/calibration", fig, global_step=step, close=True)
