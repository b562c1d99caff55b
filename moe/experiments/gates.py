"""Gates for the experiments, trained the one way ``train.py`` trains them: ``GatedMoE`` through ``pl.Trainer``.

:func:`prepare_families` runs the preparation step once per expert family on one fit of all
families (one bundle, one gate-input cache per family); :func:`train_gate` fits one gate
(early stopping on ``val/r2``, the best checkpoint kept) and predicts the test split with
it. A :class:`GateRun` is the result: test predictions, weights and entropy per star, the
best validation R^2 and how the run ended.

The experiments' gates predict log g (:data:`LABELS`): their questions are about log g. Both functions take the
labels a gate predicts, so a gate can be prepared and trained for several (the dual tower's every-label gate);
its runs keep every label's predictions, and early stopping still watches log g's val R^2 (``GatedMoE``'s
primary label).
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
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
MAX_EPOCHS = 200  # safety cap on a run's epochs, well above what convergence takes
IMPROVING = 1e-3  # val R^2 gained by the last epoch of a run cut by its epoch limit that calls it unfinished
LABELS = ("log_g",)  # what the experiments' gates predict: their questions are about log g


@dataclass(frozen=True)
class GateTraining:
    """How an experiment trains a gate until it converges (the evidence: docs/experiments.md, "Gates train to
    convergence").

    Adam with a linear warm-up, then a learning rate cut by ``decay_factor`` each time val R^2 has not gained
    ``min_delta`` for ``decay_patience`` epochs, and early stopping once val R^2 has not gained ``min_delta`` for
    ``patience`` epochs (two cuts of the rate without a gain); the epoch with the best val R^2 is kept. At a constant rate
    the phys-only gate crept up by ~1e-4 per epoch for 100 epochs; with the cuts it settles (val R^2 flat to 1e-4
    once the rate is small) in ~60 epochs at the same test R^2. ``min_delta`` is a tenth of the smallest
    difference a verdict tests (0.005).
    """

    batch_size: int = 1024  # spectra per optimiser step (20 steps per epoch at 20k training spectra)
    lr: float = 1e-2  # Adam's learning rate after the warm-up
    warmup_epochs: float = 1.5  # linear learning-rate warm-up
    decay_factor: float = 0.3  # learning rate multiplied by this on a plateau
    decay_patience: int = 5  # epochs without a gain of min_delta before the learning rate is cut
    patience: int = 15  # epochs without a gain of min_delta before the run stops
    min_delta: float = 5e-4  # val R^2 gain that counts as better
    max_epochs: int = MAX_EPOCHS  # safety cap
    # torch threads while a gate trains: its steps are too small to gain from a second thread, whose OpenMP
    # spin-waits cost up to 10x per epoch when another process shares the cores
    threads: int = 1

    def rule(self) -> str:
        """How a gate run ends, in words (for the reports)."""
        return (
            f"Adam, batch {self.batch_size}, learning rate {self.lr:g} after a linear warm-up over the first "
            f"{self.warmup_epochs:g} epochs, cut by x{self.decay_factor:g} whenever val R^2 has not gained "
            f"{self.min_delta:g} for {self.decay_patience} epochs; early stopping once val R^2 has not gained "
            f"{self.min_delta:g} for {self.patience} epochs, the epoch with the best val R^2 kept; at most "
            f"{self.max_epochs} epochs (a run cut there while its last epoch still gained more than {IMPROVING:g} is "
            "flagged, and its verdicts stay INCONCLUSIVE)."
        )


@dataclass
class GateRun:
    """One trained gate evaluated on the test split (N test stars, K experts). ``pred``, ``sigma``, ``weights`` and
    ``entropy`` are the primary label's (log g's, when the gate predicts it); ``preds`` / ``sigmas`` hold every
    label's the gate predicts."""

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
    lr_history: tuple[float, ...] = ()  # learning rate during each epoch (after its warm-up steps)
    seconds: float = 0.0  # wall time of the run: training, the best checkpoint's reload and the test prediction
    preds: dict[str, np.ndarray] = field(default_factory=dict)  # label -> [N] prediction, every label predicted
    sigmas: dict[str, np.ndarray] = field(default_factory=dict)  # label -> [N] per-star uncertainty

    @property
    def still_improving(self) -> bool:
        """The run hit its epoch limit while its last epoch still raised the best val R^2 by more than
        ``IMPROVING``: more epochs would likely change the result."""
        h = self.val_history
        return self.epochs_run == self.max_epochs and len(h) >= 2 and h[-1] - max(h[:-1]) > IMPROVING

    @property
    def ended(self) -> str:
        """How the run ended, in words (``runs.csv``)."""
        if self.best_epoch == 0:
            return "nothing to learn"
        if self.epochs_run < self.max_epochs:
            return "converged (early stopping)"
        return "epoch cap, still improving" if self.still_improving else "epoch cap"


class ValHistory(pl.Callback):
    """Records ``val/r2`` and the learning rate after every validation of a fit (at ``on_validation_end``, as early
    stopping reads it: callbacks' ``on_validation_epoch_end`` runs before the module's, which logs the epoch's
    value)."""

    def __init__(self):
        self.values: list[float] = []
        self.lrs: list[float] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and "val/r2" in trainer.callback_metrics:
            self.values.append(float(trainer.callback_metrics["val/r2"]))
            self.lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else 0.0)


class DecayOnPlateau(pl.Callback):
    """Cuts the learning rate by ``factor`` once ``val/r2`` has not gained ``min_delta`` for ``patience`` validations
    (the rule of ``torch.optim.lr_scheduler.ReduceLROnPlateau`` with an absolute threshold), by scaling the base
    rates of the module's per-step schedule, so a warm-up and a cut compose."""

    def __init__(self, factor: float, patience: int, min_delta: float):
        self.factor, self.patience, self.min_delta = factor, patience, min_delta
        self.best, self.stale, self.cuts = -float("inf"), 0, 0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or "val/r2" not in trainer.callback_metrics or self.factor >= 1:
            return
        value = float(trainer.callback_metrics["val/r2"])
        if value > self.best + self.min_delta:
            self.best, self.stale = value, 0
            return
        self.stale += 1
        if self.stale < self.patience:
            return
        self.stale, self.cuts = 0, self.cuts + 1
        for config in trainer.lr_scheduler_configs:
            config.scheduler.base_lrs = [lr * self.factor for lr in config.scheduler.base_lrs]
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= self.factor


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepare_families(
    dm: SpectraDataModule,
    families: tuple[str, ...],
    fit: FitConfig,
    progress: bool = True,
    labels: Sequence[str] = LABELS,
) -> dict[str, Prepared]:
    """One :class:`Prepared` per family, all from the same fit (``fit.families`` must hold them all; its one
    statistics pass fits every label of ``fit.labels``), for gates that predict ``labels`` (by default log g: the
    experiments ask log g questions, whatever labels the fit holds). Each (family, labels) has its own gate-input
    cache; the expert bundle is loaded, not refitted, once the fit is cached."""
    rows = min(PrepareConfig.feature_rows, dm.train_set.n_kept)
    return {f: prepare(dm, PrepareConfig(f, fit, feature_rows=rows, labels=tuple(labels)), progress) for f in families}


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
    training: GateTraining = GateTraining(),  # noqa: B008 (frozen)
    drop_features: list[str] | None = None,
) -> GateRun:
    """Train one gate over ``prepared.family`` (seeded) for the labels ``prepared`` was made for (its ``labels``) as
    ``training`` says, keep its best epoch on val R^2 (log g's when it predicts log g), predict the test split."""
    log.info(
        "gate %-24s %-12s experts %-6s seed %d%s%s",
        label,
        fusion,
        prepared.family,
        seed,
        f", without {', '.join(drop_features)}" if drop_features else "",
        "" if tuple(prepared.labels) == LABELS else f", labels {', '.join(prepared.labels)}",
    )
    started = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    epochs = training.max_epochs
    model = GatedMoE(
        fusion,
        experts=prepared.family,
        n_pixels=dm.n_pixels,
        noise_level=dm.noise_level,
        drop_features=drop_features,
        labels=list(prepared.labels),
        optimizer=partial(torch.optim.Adam, lr=training.lr),
        scheduler=partial(LinearWarmup, warmup_fraction=min(training.warmup_epochs / epochs, 0.5)),
    )
    model.load_prepared(prepared)
    prepared.attach(dm)
    dm.batch_size = training.batch_size
    learns = any(p.requires_grad for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch_threads(training.threads):
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*Couldn't infer the batch indices.*")
        best = ModelCheckpoint(dirpath=tmp, monitor="val/r2", mode="max", save_top_k=1)
        stop = EarlyStopping(monitor="val/r2", mode="max", patience=training.patience, min_delta=training.min_delta)
        decay = DecayOnPlateau(training.decay_factor, training.decay_patience, training.min_delta)
        history = ValHistory()
        trainer = pl.Trainer(
            max_epochs=epochs,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[best, stop, decay, history],
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
    labels = model.labels
    keys = ("row", "weights", "entropy", *(f"{name}_{k}" for name in labels for k in ("pred", "sigma")))
    cat = {k: torch.cat([o[k] for o in out]).numpy() for k in keys}
    order = np.argsort(cat["row"], kind="stable")  # stream order is file order; sort to be sure
    primary = model.primary  # log g's index when the gate predicts it
    preds = {name: cat[f"{name}_pred"][order] for name in labels}
    sigmas = {name: cat[f"{name}_sigma"][order] for name in labels}
    return GateRun(
        label,
        fusion,
        prepared.family,
        seed,
        preds[labels[primary]],
        sigmas[labels[primary]],
        cat["weights"][order, primary],  # [N, L, K] -> the primary label's [N, K]
        cat["entropy"][order, primary],  # [N, L] -> [N]
        val_r2,
        best_epoch,
        epochs_run,
        epochs,
        model,
        tuple(history.values),
        tuple(history.lrs),
        time.perf_counter() - started,
        preds,
        sigmas,
    )
