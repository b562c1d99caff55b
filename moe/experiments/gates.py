"""Gates for the experiments, trained the one way ``train.py`` trains them: ``GatedMoE`` through ``pl.Trainer``.

:func:`prepare_families` runs the preparation step once per expert family on one fit of all
families (one bundle, one gate-input cache per family); :func:`train_gate` fits one gate
(early stopping on ``val/r2``, the best checkpoint kept) and predicts the test split with
it. A :class:`GateRun` is the result: test predictions, weights and entropy per star, the
best validation R^2 and how the run ended.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from moe.data.datamodule import SpectraDataModule
from moe.experts.fit import FitConfig
from moe.gates.checkpoints import read_checkpoint
from moe.gates.module import GatedMoE
from moe.gates.schedules import LinearWarmup
from moe.prepare import PrepareConfig, Prepared, prepare

log = logging.getLogger(__name__)
WARMUP_EPOCHS = 1.5  # linear learning-rate warm-up, then constant (5% of the 30 epochs the gates once ran)
PATIENCE = 10  # epochs after warm-up without a val R^2 gain of MIN_DELTA before a run stops
MIN_DELTA = 1e-4  # val R^2 gain that counts as better for early stopping
MAX_EPOCHS = 200  # safety cap on a run's epochs, well above what convergence takes
IMPROVING = 1e-3  # val R^2 gained by the last epoch of a run cut by its epoch limit that calls it unfinished
LABELS = ("log_g",)  # what the experiments' gates predict: their questions are about log g


def convergence_rule(max_epochs: int) -> str:
    """How a gate run ends, in words (for the reports)."""
    return (
        f"linear learning-rate warm-up over the first {WARMUP_EPOCHS:g} epochs, then constant; early stopping once val "
        f"R^2 has not gained {MIN_DELTA:g} for {PATIENCE} epochs, the epoch with the best val R^2 kept; at most "
        f"{max_epochs} epochs (a run cut there while its last epoch still gained more than {IMPROVING:g} is flagged, "
        "and its verdicts stay INCONCLUSIVE)."
    )


@dataclass
class GateRun:
    """One trained gate evaluated on the test split (N test stars, K experts)."""

    label: str
    fusion: str
    family: str
    seed: int
    pred: np.ndarray  # [N]
    sigma: np.ndarray  # [N] per-star uncertainty
    weights: np.ndarray  # [N, K]
    entropy: np.ndarray  # [N] nats
    val_r2: float  # best validation R^2
    best_epoch: int  # 1-based epoch of the kept checkpoint (0: nothing to learn)
    epochs_run: int
    max_epochs: int
    model: GatedMoE
    val_history: tuple[float, ...] = ()  # val R^2 after each epoch

    @property
    def still_improving(self) -> bool:
        """The run hit its epoch limit while its last epoch still raised the best val R^2 by more than
        ``IMPROVING``: more epochs would likely change the result."""
        h = self.val_history
        return self.epochs_run == self.max_epochs and len(h) >= 2 and h[-1] - max(h[:-1]) > IMPROVING


class ValHistory(pl.Callback):
    """Records ``val/r2`` after every validation of a fit (at ``on_validation_end``, as early stopping reads it:
    callbacks' ``on_validation_epoch_end`` runs before the module's, which logs the epoch's value)."""

    def __init__(self):
        self.values: list[float] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and "val/r2" in trainer.callback_metrics:
            self.values.append(float(trainer.callback_metrics["val/r2"]))


def prepare_families(
    dm: SpectraDataModule, families: tuple[str, ...], fit: FitConfig, progress: bool = True
) -> dict[str, Prepared]:
    """One :class:`Prepared` per family, all from the same fit (``fit.families`` must hold them all), for log g
    gates (the experiments ask log g questions, whatever labels the fit holds)."""
    rows = min(PrepareConfig.feature_rows, dm.train_set.n_kept)
    return {f: prepare(dm, PrepareConfig(f, fit, feature_rows=rows, labels=LABELS), progress) for f in families}


def test_rows(dm: SpectraDataModule) -> dict[str, np.ndarray]:
    """Labels, SNR and bins of the test split in stream order: ``log_g, T_eff, M_H, snr, snr_bin, phys_bin``."""
    parts = [
        {k: b[k].numpy() for k in ("log_g", "T_eff", "M_H", "snr", "snr_bin", "phys_bin", "row")}
        for b in dm.stream("test", batch_size=4096)
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def train_gate(
    dm: SpectraDataModule,
    prepared: Prepared,
    label: str,
    fusion: str,
    seed: int,
    epochs: int = MAX_EPOCHS,
    drop_features: list[str] | None = None,
    patience: int = PATIENCE,
) -> GateRun:
    """Train one gate over ``prepared.family`` (seeded), keep its best epoch on val R^2, predict the test split."""
    log.info(
        "gate %-24s %-12s experts %-6s seed %d%s",
        label,
        fusion,
        prepared.family,
        seed,
        f", without {', '.join(drop_features)}" if drop_features else "",
    )
    pl.seed_everything(seed, verbose=False)
    model = GatedMoE(
        fusion,
        experts=prepared.family,
        n_pixels=dm.n_pixels,
        noise_level=dm.noise_level,
        drop_features=drop_features,
        labels=list(LABELS),
        scheduler=partial(LinearWarmup, warmup_fraction=min(WARMUP_EPOCHS / epochs, 0.5)),
    )
    model.load_prepared(prepared)
    prepared.attach(dm)
    learns = any(p.requires_grad for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*Couldn't infer the batch indices.*")
        best = ModelCheckpoint(dirpath=tmp, monitor="val/r2", mode="max", save_top_k=1)
        stop = EarlyStopping(monitor="val/r2", mode="max", patience=patience, min_delta=MIN_DELTA)
        history = ValHistory()
        trainer = pl.Trainer(
            max_epochs=epochs,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[best, stop, history],
            default_root_dir=tmp,
        )
        if learns:
            trainer.fit(model, datamodule=dm)
            # every epoch is validated once: the history counts the epochs trained (``current_epoch`` may
            # run one ahead after early stopping)
            val_r2, epochs_run = float(best.best_model_score), len(history.values)
            best_epoch = int(read_checkpoint(best.best_model_path)["epoch"]) + 1
            ckpt = best.best_model_path
        else:
            val_r2 = float(trainer.validate(model, datamodule=dm, verbose=False)[0]["val/r2"])
            best_epoch = epochs_run = 0
            ckpt = None
        out = trainer.predict(model, datamodule=dm, ckpt_path=ckpt)
    cat = {
        k: torch.cat([o[k] for o in out]).numpy() for k in ("row", "log_g_pred", "log_g_sigma", "weights", "entropy")
    }
    cat["weights"], cat["entropy"] = cat["weights"][:, 0], cat["entropy"][:, 0]  # log g's: [N, K], [N]
    order = np.argsort(cat["row"], kind="stable")  # stream order is file order; sort to be sure
    return GateRun(
        label,
        fusion,
        prepared.family,
        seed,
        cat["log_g_pred"][order],
        cat["log_g_sigma"][order],
        cat["weights"][order],
        cat["entropy"][order],
        val_r2,
        best_epoch,
        epochs_run,
        epochs,
        model,
        tuple(history.values),
    )
