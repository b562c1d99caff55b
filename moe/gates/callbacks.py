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

from moe.catalogue import writers
from moe.data import bins
from moe.gates.catalogue_join import join_parts, part_path


class CatalogueWriter(BasePredictionWriter):
    """Writes ``predict`` output as a catalogue, one row per star, batch by batch (memory stays flat).

    Columns: ``shard`` (file), ``row`` (within the shard), the shard's numeric id columns
    (``objid``, ``mag``, ... when present), ``snr``, ``snr_bin``, per label ``<label>_pred``, ``<label>_sigma``,
    the gate weights ``w_<expert>`` (shared routing; ``w_<label>_<expert>`` with one set per label), each expert's
    prediction of each label ``pred_<label>_<expert>``, ``<label>_true`` when the shards carry labels (outside the
    training range too), per label ``<label>_edge`` (bool: the labels that set ``LABEL_EDGE``), ``n_masked``,
    ``ood_score`` and ``flags`` (:class:`moe.catalogue.flags.CatalogueFlag`). CSV (meanings in a ``.meta.json`` sidecar), an HDF5 table
    readable with ``pandas.read_hdf(path)`` when ``output`` ends in ``.h5``, or a FITS binary table with units,
    descriptions and provenance when it ends in ``.fits`` (:mod:`moe.catalogue.writers`). Written to a
    temporary name (stale ones of interrupted runs removed first) and renamed when prediction ends; a write
    that fails (disk full, quota, read-only) is one :class:`~moe.shared.errors.WriteError` naming the
    catalogue, and nothing is left.

    Under DDP each rank writes its share of the rows as a part (:mod:`moe.gates.catalogue_join`) and rank 0
    joins the parts, in rank order -- the input order -- into the one catalogue (the output folder must be
    one every rank sees).

    Args:
        output: catalogue path (``.csv``, ``.h5`` or ``.fits``); default ``<log_dir>/predictions.csv``.
    """

    def __init__(self, output: str | None = None):
        super().__init__(write_interval="batch")
        self.output = output
        self._path: Path | None = None
        self._file = None  # the catalogue being written (moe.catalogue.writers)
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
        dm = trainer.datamodule
        self._shards = dm.predict_set() if hasattr(dm, "predict_set") else None
        self._names = list(pl_module.mixture.experts.names)
        self._labels = list(pl_module.mixture.labels)
        self._correlations = list(pl_module.mixture.correlation_names)
        self._shared = pl_module.mixture.routing == "shared" or len(self._labels) == 1
        self._labelled = None
        widths = {"snr_bin": 1}
        if self._shards is not None:
            widths["shard"] = max((len(str(p)) for p in self._shards.paths), default=1)
        # removes the temporary files of this target that earlier, interrupted runs (or this process) left
        self._file = writers.writer_for(self._path, provenance(trainer, pl_module), widths)

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
        cols |= {"snr": p["snr"], "snr_bin": np.asarray(bins.SNR_BIN_NAMES)[p["snr_bin"]].astype(object)}
        labels = self._labels
        for label in labels:
            cols |= {f"{label}_pred": p[f"{label}_pred"], f"{label}_sigma": p[f"{label}_sigma"]}
        cols |= {name: p[name] for name in self._correlations}
        weights = p["weights"]  # [B, L, K]
        if self._shared:  # the same weights for every label
            cols |= {f"w_{n}": weights[:, 0, k] for k, n in enumerate(self._names)}
        else:
            cols |= {
                f"w_{label}_{n}": weights[:, i, k] for i, label in enumerate(labels) for k, n in enumerate(self._names)
            }
        cols |= {
            f"pred_{label}_{n}": p["expert_preds"][:, k, i]
            for i, label in enumerate(labels)
            for k, n in enumerate(self._names)
        }
        if self._labelled is None:
            self._labelled = any(bool(np.isfinite(p[f"{label}_true"]).any()) for label in labels)
        if self._labelled:
            cols |= {f"{label}_true": p[f"{label}_true"] for label in labels}
        cols |= {f"{label}_edge": p[f"{label}_edge"].astype(bool) for label in labels}
        cols |= {
            "n_masked": p["n_masked"].astype(np.int32),
            "ood_score": p["ood_score"],
            "flags": p["flags"].astype(np.int32),
        }
        return pd.DataFrame(cols)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._file.append(self.frame(prediction))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._file is not None and self._file.commit() and trainer.world_size == 1:
            print(f"catalogue written to {self._path}")
        meta = self._file.meta() if self._file is not None else None
        self._file = None
        if trainer.world_size > 1:
            trainer.strategy.barrier("catalogue parts")
            if trainer.is_global_zero:
                target = self._target(trainer)
                rows = join_parts([part_path(target, r) for r in range(trainer.world_size)], target)
                for r in range(trainer.world_size):  # the parts' sidecars; the catalogue gets one
                    writers.sidecar(part_path(target, r)).unlink(missing_ok=True)
                if meta is not None:
                    writers.write_meta(target, meta)
                print(f"catalogue written to {target} ({rows} rows from {trainer.world_size} ranks)")
            trainer.strategy.barrier("catalogue joined")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._file is not None:
            self._file.abort()
        self._file = None


def provenance(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
    """What made a catalogue: moe's version, the checkpoint, the data (folder, fingerprint, noise level), the
    spectra predicted, and the reference the OOD score and flags compare with."""
    import moe

    dm = trainer.datamodule
    ref = getattr(pl_module, "catalogue_reference", None)
    hparams = getattr(pl_module, "hparams", {})
    out = {
        "moe_version": moe.__version__,
        "checkpoint": str(Path(ckpt).resolve()) if (ckpt := getattr(trainer, "ckpt_path", None)) else "none (this run)",
        "data_fingerprint": str(getattr(pl_module, "data_fingerprint", None)),
        "noise_level": float(hparams.get("noise_level", float("nan"))),
        "fusion": str(hparams.get("fusion")),
        "experts": str(getattr(pl_module, "family", None)),
    }
    if dm is not None:
        out["data_dir"] = str(Path(getattr(dm, "data_dir", "")).resolve())
        paths = getattr(dm, "predict_path", None)
        out["predicted"] = ", ".join(str(Path(p).resolve()) for p in paths) if paths else "the test split"
    if ref is not None:
        out["ood_threshold"] = float(ref.ood_threshold)
        for name, (distance, chi2) in zip(bins.SNR_BIN_NAMES, ref.spectra.ood_scale.tolist()):
            out[f"ood_distance_scale_{name}"] = float(distance)
            out[f"ood_chi2_scale_{name}"] = float(chi2)
        for label, (lo, hi) in ref.label_ranges.items():
            out[f"train_{label}_range"] = f"[{lo:.6g}, {hi:.6g}]"
    return out


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
    ``max_rows`` validation stars, of the primary label (log g): the gate weights' histogram (``val/gate_weights``),
    gate entropy against SNR (``val/entropy_vs_snr``) and the calibration of sigma (``val/calibration``: z of the
    epoch's sigma;
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
                    "entropy": outputs.entropy[:, pl_module.primary].detach().cpu(),
                    "weights": outputs.weights[:, pl_module.primary].detach().cpu(),
                    "snr_bin": batch["snr_bin"].detach().cpu(),
                    "z": ((outputs.pred - pl_module.mixture.targets(batch)) / outputs.sigma)[:, pl_module.primary]
                    .detach()
                    .cpu(),
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
