"""Lightning callbacks of the gate module: the per-star prediction CSV."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter

from moe.data import bins


class CSVPredictionWriter(BasePredictionWriter):
    """Writes ``predict`` output as CSV: one row per star with log g, sigma, truth, SNR, bins and gate weights.

    Args:
        output: CSV path; default ``<log_dir>/predictions.csv`` (``.rank{r}`` added under DDP).
            Written to a temp name and renamed when prediction ends.
    """

    def __init__(self, output: str | None = None):
        super().__init__(write_interval="batch")
        self.output = output
        self._file = None
        self._writer = None
        self._path: Path | None = None

    def _target(self, trainer: pl.Trainer) -> Path:
        base = Path(self.output) if self.output else Path(trainer.log_dir or trainer.default_root_dir) / "predictions.csv"
        if trainer.world_size > 1:
            base = base.with_suffix(f".rank{trainer.global_rank}.csv")
        return base

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._path = self._target(trainer)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self._path.with_name(f".{self._path.name}.tmp-{os.getpid()}")
        self._file = open(self._tmp, "w", newline="")
        self._writer = csv.writer(self._file)
        names = [f"w_{n}" for n in pl_module.experts.names]
        self._writer.writerow(["row", "log_g_pred", "log_g_sigma", "log_g_true", "snr", "snr_bin", "phys_bin", *names])

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        p = {k: v.detach().cpu() for k, v in prediction.items()}
        w = p["weights"].tolist()
        for i in range(len(p["row"])):
            self._writer.writerow([int(p["row"][i]), f"{float(p['log_g_pred'][i]):.6f}", f"{float(p['log_g_sigma'][i]):.6f}",
                                   f"{float(p['log_g_true'][i]):.6f}", f"{float(p['snr'][i]):.4f}",
                                   bins.SNR_BIN_NAMES[int(p["snr_bin"][i])], bins.PHYS_BIN_NAMES[int(p["phys_bin"][i])],
                                   *(f"{x:.6f}" for x in w[i])])

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            os.replace(self._tmp, self._path)
            self._file = None
            print(f"predictions written to {self._path}")
