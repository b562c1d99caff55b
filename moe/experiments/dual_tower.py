"""LOGG-DUAL-TOWER-01: does a quality tower add to the physics gate over 9 frozen Ridge experts?

Methods: Global Ridge, phys-only gate, quality-only gate (4 SNR experts), the dual-tower
fusions concat / logit-add / product / temperature, a 36-expert (physical x SNR) concat
gate and the 9-bin oracle. Slices: per SNR bin, per physical bin, boundary samples (within
10% of a bin width of a T_eff or M_H edge). Gate entropy and confidence against SNR; feature
ablation (each feature group dropped; 10 quality statistics against a 5-statistic subset);
how the two towers of the logit-add gate agree and which contributes more. Every gate answers log g
questions; one more, the concat gate trained for every label (log g, T_eff, [M/H]; first seed), reports each
label's R^2 and calibration of sigma and how its log g compares with the log-g-only concat gate (no verdict
reads it).

Every gate is a ``GatedMoE`` trained through ``pl.Trainer`` exactly as ``train.py fit`` trains
it (:mod:`moe.experiments.gates`): fresh noise every epoch, MSE, Adam with a linear warm-up,
early stopping and the best epoch on validation R^2.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moe.data import bins
from moe.data.datamodule import SpectraDataModule
from moe.data.error_stats import QUALITY_NAMES, QUALITY_SUBSET5
from moe.data.shards import LABEL_COLUMNS
from moe.experiments.common import (
    SEED_RULE,
    DataSummary,
    Experiment,
    ExperimentSettings,
    Report,
    Results,
    Verdict,
    bootstrap_ci,
    bootstrap_delta_r2,
    require_train_rows,
    seed_interval,
    seed_interval_text,
    seed_mean_std,
)
from moe.experiments.gates import (
    LABELS,
    GateRun,
    GateTraining,
    prepare_families,
    test_rows,
    train_gate,
)
from moe.experts.fit import FitConfig
from moe.experts.scores import r2, z_calibration
from moe.features import PHYSICS_NAMES
from moe.plots import (
    GAIN,
    LOSS,
    bar,
    calibration,
    differences,
    entropy_vs_snr,
    grouped_bar,
    method_colour,
    pred_vs_true,
)
from moe.prepare import Prepared
from moe.shared.atomic import write_text

EXPERIMENT_ID = "LOGG-DUAL-TOWER-01"
# (label, fusion, expert family)
METHODS = (
    ("Global Ridge", "global", "global"),
    ("Phys-only gate", "phys_only", "phys"),
    ("Quality-only gate", "quality_only", "snr"),
    ("Dual-tower concat", "concat", "phys"),
    ("Dual-tower logit-add", "logit_add", "phys"),
    ("Dual-tower product", "product", "phys"),
    ("Dual-tower temperature", "temperature", "phys"),
    ("36-expert gate", "concat", "cells"),
    ("Oracle (9 bins)", "oracle", "phys"),
)
DUAL = "Dual-tower concat"
PHYS = "Phys-only gate"
LOW_SNR = "SNR <= 4"
# the compared pairs of trained gates the verdicts read: key -> (a, b, test stars); a verdict reads R^2(a) - R^2(b)
THRESHOLDS = {
    "dual": 0.005,
    "dual_low_snr": 0.01,
    "logit_add": 0.005,
    "product": 0.005,
    "temperature": 0.005,
    "cells": 0.005,
}
COMPARISONS = {
    "dual": (DUAL, PHYS, "all"),
    "dual_low_snr": (DUAL, PHYS, LOW_SNR),
    "logit_add": ("Dual-tower logit-add", PHYS, "all"),
    "product": ("Dual-tower product", PHYS, "all"),
    "temperature": ("Dual-tower temperature", PHYS, "all"),
    "cells": ("36-expert gate", DUAL, "all"),
}
FAMILIES = ("global", "phys", "snr", "cells")
# feature groups dropped (held at their training mean) for the ablation of the concat gate
_GROUPS = {
    "CaT": [n for n in PHYSICS_NAMES if n.startswith("CaT")],
    "Na I": [n for n in PHYSICS_NAMES if n.startswith("NaI")],
    "PCA": [n for n in PHYSICS_NAMES if n.startswith("PCA")],
    "quality": list(QUALITY_NAMES),
}
ABLATIONS = {f"drop {group} ({len(names)})": names for group, names in _GROUPS.items()} | {
    f"quality {len(QUALITY_SUBSET5)}-subset": [n for n in QUALITY_NAMES if n not in QUALITY_SUBSET5]
}
# run with the first seed only, to fit the budget: the global expert and the oracle learn nothing (every seed
# gives the same numbers), and no verdict reads the quality-only gate (the verdicts compare the fusions, the
# phys-only and the 36-expert gates, each trained with every seed)
ONE_SEED = ("Global Ridge", "Oracle (9 bins)", "Quality-only gate")
ABLATION_SEEDS = 1  # the ablation's retrained gates: an exploratory table, one seed
LONGER = 4  # the convergence check retrains the first seed's phys-only gate with this many times the patience
BOUNDARY = 0.1
# the concat gate trained for every label the data carry (the default of --model.labels), first seed only: its
# section reports each label; the log g questions stay with the log-g-only gates
EVERY_LABEL = LABEL_COLUMNS
EVERY_LABEL_GATE = f"{DUAL} [every label]"
# the families fitted for EVERY_LABEL: the every-label gate's physical experts and the global expert every gate
# projects on; the others answer log g questions only and are fitted for log g alone (no solves, and no alpha
# warnings, for labels nothing reads)
EVERY_LABEL_FAMILIES = ("global", "phys")
LOG_G_TOLERANCE = 0.005  # how far the every-label gate's log g test R^2 may lie from the log-g-only gate's
# calibration targets of sigma (docs/training.md): z std, share of |z| <= 1, share of |z| <= 2
CALIBRATION_TARGETS = {"z_std": (0.9, 1.1), "coverage_1sigma": (0.65, 0.71), "coverage_2sigma": (0.93, 0.97)}
MIN_TRAIN = 2  # training spectra the gate-feature standardisation needs (fewer make no run at all)
SNR_HIGH_TO_LOW = tuple(reversed(list(enumerate(bins.SNR_BIN_NAMES))))  # (index, name) of each SNR bin, H first
TITLE = "Dual-tower gates: physics + quality"
QUESTION = (
    "Does a gate that sees the quality statistics (SNR axis) next to the physics-window features "
    "(T_eff x [M/H] axis) beat the physics-only gate over the same 9 frozen Ridge experts, "
    "especially at low SNR, and which fusion works best?"
)


@dataclass(frozen=True)
class Difference:
    """A compared pair of trained gates: R^2(a) - R^2(b) per training seed and its paired bootstrap 95% CI
    over test stars (both gates averaged over seeds)."""

    a: str
    b: str
    seeds: tuple[float, ...]
    ci: tuple[float, float]
    slice: str = "all"  # test stars compared: "all" or "SNR <= 4"

    @property
    def mean(self) -> float:
        return float(np.mean(self.seeds))


@dataclass
class EveryLabel:
    """The concat gate over the physical experts trained for every label at once (one seed) on the test split
    (N stars): per label its predictions, sigma and the truth, the per-label table and its log g against the
    log-g-only concat gate of the same seed."""

    seed: int
    table: pd.DataFrame  # per label and slice (all, H, M, L, X): n, r2, z_std, coverage_1sigma, coverage_2sigma
    true: dict[str, np.ndarray]  # label -> [N]
    pred: dict[str, np.ndarray]  # label -> [N]
    sigma: dict[str, np.ndarray]  # label -> [N]
    log_g_only_r2: float  # test log g R^2 of the log-g-only concat gate of the same seed
    ended: str  # how the run ended (GateRun.ended)
    best_epoch: int
    epochs_run: int
    seconds: float  # the gate run's wall time (preparation not counted)
    prepare_s: float  # its gate-input caches and standardisation (the experts are the dual tower's one fit)
    routing: str = "per_label"  # GatedMoE's routing: per_label (each label its own gate weights) or shared

    @property
    def log_g_r2(self) -> float:
        return r2(self.true["log_g"], self.pred["log_g"])

    @property
    def log_g_delta(self) -> float:
        """Test log g R^2 of the every-label gate minus the log-g-only gate's."""
        return self.log_g_r2 - self.log_g_only_r2


@dataclass
class DualTowerResults(Results):
    """Every number of the dual-tower report (N test spectra, K experts of the concat gate, S seeds)."""

    comparison: pd.DataFrame  # every method on the test split, mean and sd over seeds
    runs: pd.DataFrame  # every gate run: method, seed, test and val R^2, best epoch, epochs run, how it stopped
    per_snr: pd.DataFrame  # R^2 per method and SNR bin
    per_phys: pd.DataFrame  # R^2 per method and physical bin
    entropy_confidence: pd.DataFrame  # gate entropy and max weight per method and SNR bin
    ablation: pd.DataFrame  # R^2 of the concat gate with a feature group dropped
    convergence: pd.DataFrame  # the first seed's phys-only gate as stopped and trained LONGER x longer
    towers: pd.DataFrame  # agreement and contribution of the logit-add gate's two towers
    calibration: pd.DataFrame  # z std and coverage of the concat gate's sigma (first seed)
    every_label: EveryLabel  # the concat gate trained for every label (first seed)
    r2_global: float
    r2_oracle: float
    r2_concat: float  # the concat gate with every feature (mean over seeds), the ablation's reference
    differences: dict[str, Difference]  # the compared pairs the verdicts read, by key (see ``COMPARISONS``)
    entropy_gap: tuple[float, ...]  # concat gate: mean entropy at SNR X minus at SNR H [nats], per seed
    entropy_gap_ci: tuple[float, float]  # its bootstrap 95% CI over test stars (within each SNR bin)
    inconclusive: str  # why the gate runs cannot decide ('' when they can)
    n_train: int
    n_boundary: int  # test spectra near a T_eff or M_H bin edge
    snr_counts: dict[str, int]  # test spectra per SNR bin
    log_g: np.ndarray  # [N] true test log g
    snr: np.ndarray  # [N]
    snr_bin: np.ndarray  # [N]
    concat_pred: np.ndarray  # [N] concat gate, mean over seeds
    concat_r2: float  # R^2 of ``concat_pred``
    concat_entropy: np.ndarray  # [N] concat gate entropy [nats], mean over seeds
    n_experts: int  # K
    z: np.ndarray  # [N] (predicted - true) / sigma of the concat gate, first seed
    z_seed: int
    fit: dict  # the expert fit's key


def _training(settings: ExperimentSettings) -> GateTraining:
    """How the gates train: the experiments' convergence rule, capped at ``--epochs``."""
    return GateTraining(max_epochs=settings.epochs)


def _train_methods(
    dm: SpectraDataModule, prepared: dict[str, Prepared], settings: ExperimentSettings, log: RunLog
) -> dict[str, list[GateRun]]:
    """Every method of ``METHODS`` trained once per seed (those of ``ONE_SEED`` with the first seed only), by label;
    each run recorded in ``log`` as it ends."""
    runs: dict[str, list[GateRun]] = {label: [] for label, _, _ in METHODS}
    for i, seed in enumerate(settings.seeds):
        for label, fusion, family in METHODS:
            if i == 0 or label not in ONE_SEED:
                run = train_gate(dm, prepared[family], label, fusion, seed, _training(settings))
                runs[label].append(log.add(label, run))
    return runs


def _mean_pred(runs: list[GateRun]) -> np.ndarray:
    return np.mean([r.pred for r in runs], 0)


def _comparison_row(
    label: str,
    family: str,
    runs: list[GateRun],
    log_g: np.ndarray,
    near_edge: np.ndarray,
    r2_global: float,
    r2_oracle: float,
) -> dict:
    per_seed = [r2(log_g, r.pred) for r in runs]
    pred = _mean_pred(runs)
    learned = runs[0].best_epoch > 0
    return {
        "method": label,
        "experts": family,
        "r2": float(np.mean(per_seed)),
        "r2_sd": float(np.std(per_seed, ddof=1)) if len(runs) > 1 else np.nan,
        "seeds": len(runs),
        "rho": (float(np.mean(per_seed)) - r2_global) / (r2_oracle - r2_global),
        "r2_boundary": r2(log_g[near_edge], pred[near_edge]),
        "r2_interior": r2(log_g[~near_edge], pred[~near_edge]),
        "mae": float(np.abs(pred - log_g).mean()),
        "val_r2": float(np.mean([r.val_r2 for r in runs])),
        "best / run epochs": " ".join(f"{r.best_epoch}/{r.epochs_run}" for r in runs) if learned else "–",
    }


def _per_snr_row(label: str, pred: np.ndarray, log_g: np.ndarray, snr_bin: np.ndarray) -> dict:
    return {
        "method": label,
        **{f"r2_{n}": r2(log_g[snr_bin == i], pred[snr_bin == i]) for i, n in SNR_HIGH_TO_LOW},
        "r2_snr<=4": r2(log_g[snr_bin <= 1], pred[snr_bin <= 1]),
    }


def _per_phys_row(label: str, pred: np.ndarray, log_g: np.ndarray, phys_bin: np.ndarray) -> dict:
    return {
        "method": label,
        **{bins.PHYS_BIN_NAMES[k]: r2(log_g[phys_bin == k], pred[phys_bin == k]) for k in range(bins.N_PHYS_BINS)},
    }


def _entropy_row(label: str, runs: list[GateRun], snr_bin: np.ndarray) -> dict:
    entropy = np.mean([r.entropy for r in runs], 0)
    confidence = np.mean([r.weights.max(1) for r in runs], 0)
    return {
        "method": label,
        "K": runs[0].weights.shape[1],
        **{f"entropy_{n}": float(entropy[snr_bin == i].mean()) for i, n in SNR_HIGH_TO_LOW},
        **{f"confidence_{n}": float(confidence[snr_bin == i].mean()) for i, n in SNR_HIGH_TO_LOW},
    }


def _method_tables(
    runs: dict[str, list[GateRun]],
    test: dict[str, np.ndarray],
    log_g: np.ndarray,
    near_edge: np.ndarray,
    r2_global: float,
    r2_oracle: float,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The comparison, per-SNR-bin, per-physical-bin and entropy tables, a row per method (entropy: learned gates)."""
    comparison, per_snr, per_phys, entropy = [], [], [], []
    for label, fusion, family in METHODS:
        pred = _mean_pred(runs[label])
        comparison.append(_comparison_row(label, family, runs[label], log_g, near_edge, r2_global, r2_oracle))
        per_snr.append(_per_snr_row(label, pred, log_g, test["snr_bin"]))
        per_phys.append(_per_phys_row(label, pred, log_g, test["phys_bin"]))
        if fusion not in ("global", "oracle"):
            entropy.append(_entropy_row(label, runs[label], test["snr_bin"]))
    return tuple(map(pd.DataFrame, (comparison, per_snr, per_phys, entropy)))


def _ablation(
    dm: SpectraDataModule,
    prepared: Prepared,
    settings: ExperimentSettings,
    log_g: np.ndarray,
    full: list[GateRun],
    log: RunLog,
) -> tuple[pd.DataFrame, dict[str, list[GateRun]]]:
    """The concat gate retrained without each feature group of ``ABLATIONS`` (the first ``ABLATION_SEEDS``
    seeds): its R^2 and the change from the full gate ``full`` of the same seed (mean, sd and 95% interval over
    those seeds); and the runs by label."""
    rows, runs = [], {}
    seeds = settings.seeds[:ABLATION_SEEDS]
    for name, drop in ABLATIONS.items():
        label = f"{DUAL} [{name}]"
        dropped = [
            log.add(label, train_gate(dm, prepared, label, "concat", seed, _training(settings), drop)) for seed in seeds
        ]
        runs[label] = dropped
        r2_per_seed = np.array([r2(log_g, r.pred) for r in dropped])
        delta = r2_per_seed - np.array([r2(log_g, r.pred) for r in full[: len(seeds)]])
        rows.append(
            {
                "ablation": name,
                "r2": float(r2_per_seed.mean()),
                "delta_r2": float(delta.mean()),
                "delta_sd": float(delta.std(ddof=1)) if delta.size > 1 else np.nan,
                "delta_ci95": seed_interval_text(delta),
                "best / run epochs": " ".join(f"{r.best_epoch}/{r.epochs_run}" for r in dropped),
            }
        )
    return pd.DataFrame(rows), runs


def _convergence_check(
    dm: SpectraDataModule,
    prepared: Prepared,
    settings: ExperimentSettings,
    log_g: np.ndarray,
    phys: list[GateRun],
    log: RunLog,
) -> pd.DataFrame:
    """Would training on change a verdict? The first seed's phys-only gate (the slowest to converge, and the
    reference of five verdicts) retrained with ``LONGER`` times the early-stopping patience: its test and val R^2
    against the run as stopped, and the spread of the phys-only gate's test R^2 between seeds."""
    stopped = phys[0]
    training = _training(settings)
    label = f"{PHYS} [patience x{LONGER}]"
    longer = train_gate(
        dm, prepared, label, "phys_only", stopped.seed, replace(training, patience=training.patience * LONGER)
    )
    log.add(label, longer)
    per_seed = [r2(log_g, r.pred) for r in phys]
    sd = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else np.nan
    delta = r2(log_g, longer.pred) - r2(log_g, stopped.pred)
    return pd.DataFrame(
        [
            {
                "gate": PHYS,
                "seed": stopped.seed,
                "epochs (as stopped)": stopped.epochs_run,
                "epochs (longer)": longer.epochs_run,
                "val_r2 (as stopped)": stopped.val_r2,
                "val_r2 (longer)": longer.val_r2,
                "test_r2 (as stopped)": r2(log_g, stopped.pred),
                "test_r2 (longer)": r2(log_g, longer.pred),
                "delta test_r2": delta,
                "seed sd of test_r2": sd,
                "|delta| / seed sd": abs(delta) / sd if sd > 0 else np.nan,
            }
        ]
    )


def _every_label(
    dm: SpectraDataModule,
    fit: FitConfig,
    settings: ExperimentSettings,
    test: dict[str, np.ndarray],
    log_g_only: GateRun,
    log: RunLog,
) -> EveryLabel:
    """The concat gate over the physical experts trained for ``EVERY_LABEL`` (the seed of ``log_g_only``, the first;
    the experts from the dual tower's fit ``fit``, its own gate-input caches) and evaluated per label."""
    started = time.perf_counter()
    prepared = prepare_families(dm, ("phys",), fit, settings.progress, labels=EVERY_LABEL)["phys"]
    prepare_s = time.perf_counter() - started
    run = log.add(
        EVERY_LABEL_GATE, train_gate(dm, prepared, EVERY_LABEL_GATE, "concat", log_g_only.seed, _training(settings))
    )
    true = {name: test[name].astype(np.float64) for name in EVERY_LABEL}
    return EveryLabel(
        seed=run.seed,
        table=every_label_table(true, run.preds, run.sigmas, test["snr_bin"]),
        true=true,
        pred=run.preds,
        sigma=run.sigmas,
        log_g_only_r2=r2(true["log_g"], log_g_only.pred),
        ended=run.ended,
        best_epoch=run.best_epoch,
        epochs_run=run.epochs_run,
        seconds=run.seconds,
        prepare_s=prepare_s,
        routing=str(run.model.hparams.routing),
    )


def every_label_table(
    true: dict[str, np.ndarray], pred: dict[str, np.ndarray], sigma: dict[str, np.ndarray], snr_bin: np.ndarray
) -> pd.DataFrame:
    """Per label (of ``true``, in its order) and slice (all, then SNR H, M, L, X): test R^2, the calibration of sigma
    (:func:`calibration_table`) and whether all three calibration numbers lie within ``CALIBRATION_TARGETS``."""
    parts = []
    for name, y in true.items():
        part = calibration_table((pred[name] - y) / sigma[name], snr_bin)
        part.insert(0, "label", name)
        part.insert(3, "r2", [r2(y[sel], pred[name][sel]) for _, sel in bins.snr_slices(snr_bin, high_first=True)])
        part["within_targets"] = np.logical_and.reduce(
            [part[k].between(lo, hi) for k, (lo, hi) in CALIBRATION_TARGETS.items()]
        )
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _difference(key: str, runs: dict[str, list[GateRun]], log_g: np.ndarray, low_snr: np.ndarray) -> Difference:
    """The compared pair ``COMPARISONS[key]``: R^2(a) - R^2(b) per seed on its slice, and the paired bootstrap CI."""
    a, b, where = COMPARISONS[key]
    rows = low_snr if where == LOW_SNR else np.ones_like(low_snr)
    y, pa, pb = log_g[rows], [r.pred[rows] for r in runs[a]], [r.pred[rows] for r in runs[b]]
    seeds = tuple(r2(y, x) - r2(y, z) for x, z in zip(pa, pb))
    return Difference(a, b, seeds, bootstrap_delta_r2(y, pa, pb), where)


def _entropy_gap(runs: list[GateRun], snr_bin: np.ndarray) -> tuple[tuple[float, ...], tuple[float, float]]:
    """Mean gate entropy at the lowest SNR bin minus at the highest, per seed, and its bootstrap 95% CI over test
    stars (resampled within each bin; entropy averaged over seeds)."""
    low, high = bins.SNR_BIN_NAMES.index("X"), bins.SNR_BIN_NAMES.index("H")
    rows = np.flatnonzero(np.isin(snr_bin, (low, high)))
    group = snr_bin[rows]
    per_seed = tuple(float(r.entropy[snr_bin == low].mean() - r.entropy[snr_bin == high].mean()) for r in runs)
    entropy = np.mean([r.entropy for r in runs], 0)[rows]

    def gap(idx: np.ndarray) -> float:
        return float(entropy[idx[group[idx] == low]].mean() - entropy[idx[group[idx] == high]].mean())

    return per_seed, bootstrap_ci(gap, rows.size, strata=group)


class RunLog:
    """The runs table as it grows, one row per gate run (test and val R^2, best epoch, epochs run, how the run ended,
    seconds). With a folder, ``runs.csv`` there is rewritten (atomically) as each run ends, so a stopped
    experiment keeps the runs that finished; the report writes the whole table again at the end."""

    def __init__(self, log_g: np.ndarray, out: str | None = None):
        self.log_g, self.rows = log_g, []
        self.path = None if out is None else Path(out) / "runs.csv"

    def add(self, label: str, run: GateRun) -> GateRun:
        self.rows.append(
            {
                "method": label,
                "seed": run.seed,
                "test_r2": r2(self.log_g, run.pred),
                "val_r2": run.val_r2,
                "best_epoch": run.best_epoch,
                "epochs_run": run.epochs_run,
                "ended": run.ended,
                "final_lr": run.lr_history[-1] if run.lr_history else np.nan,
                "seconds": round(run.seconds, 1),
            }
        )
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.path, self.table().to_csv(index=False), "the runs table")
        return run

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def expert_fit(settings: ExperimentSettings) -> FitConfig:
    """The dual tower's one expert fit: its gates mix every family, so each must meet ``--min-samples``; every
    label from the one statistics pass for ``EVERY_LABEL_FAMILIES`` (what the every-label gate uses), log g
    alone for the rest -- log g's experts are the same either way."""
    for_log_g = {f: LABELS for f in FAMILIES if f not in EVERY_LABEL_FAMILIES}
    return settings.fit_config(FAMILIES, labels=EVERY_LABEL, family_labels=for_log_g)


def compute(settings: ExperimentSettings) -> DualTowerResults:
    """Train every gate (and the ablations) per seed and evaluate them on the test split; no file is written."""
    started = time.time()
    dm = settings.datamodule()
    require_train_rows(dm.train_set.n_kept, MIN_TRAIN, "dual-tower", "the gate features are standardised on them")
    fit = expert_fit(settings)
    prepared = prepare_families(dm, FAMILIES, fit, settings.progress)
    test = test_rows(dm)
    log_g = test["log_g"].astype(np.float64)
    snr_bin = test["snr_bin"]
    log = RunLog(log_g, settings.out)
    runs = _train_methods(dm, prepared, settings, log)
    r2_oracle, r2_global = r2(log_g, _mean_pred(runs["Oracle (9 bins)"])), r2(log_g, _mean_pred(runs["Global Ridge"]))
    near_edge = bins.edge_distance(test["T_eff"], test["M_H"]) < BOUNDARY
    comparison, per_snr, per_phys, entropy_confidence = _method_tables(
        runs, test, log_g, near_edge, r2_global, r2_oracle
    )
    concat = runs[DUAL]
    r2_concat = float(np.mean([r2(log_g, r.pred) for r in concat]))
    ablation, ablation_runs = _ablation(dm, prepared["phys"], settings, log_g, concat, log)
    convergence = _convergence_check(dm, prepared["phys"], settings, log_g, runs[PHYS], log)
    towers = _tower_analysis(runs["Dual-tower logit-add"][0], prepared["phys"], dm, log_g)
    every_label = _every_label(dm, fit, settings, test, concat[0], log)
    low = snr_bin <= 1
    z = (concat[0].pred - log_g) / concat[0].sigma
    concat_pred = _mean_pred(concat)
    entropy_gap, entropy_gap_ci = _entropy_gap(concat, snr_bin)
    all_runs = runs | ablation_runs
    return DualTowerResults(
        comparison=comparison,
        runs=log.table(),
        per_snr=per_snr,
        per_phys=per_phys,
        entropy_confidence=entropy_confidence,
        ablation=ablation,
        convergence=convergence,
        towers=towers,
        calibration=calibration_table(z, snr_bin),
        every_label=every_label,
        r2_global=r2_global,
        r2_oracle=r2_oracle,
        r2_concat=r2_concat,
        differences={key: _difference(key, runs, log_g, low) for key in COMPARISONS},
        entropy_gap=entropy_gap,
        entropy_gap_ci=entropy_gap_ci,
        inconclusive=inconclusive_reason(all_runs, r2_global, log_g),
        n_train=dm.train_set.n_kept,
        n_boundary=int(near_edge.sum()),
        snr_counts={n: int((snr_bin == i).sum()) for i, n in enumerate(bins.SNR_BIN_NAMES)},
        log_g=log_g,
        snr=test["snr"],
        snr_bin=snr_bin,
        concat_pred=concat_pred,
        concat_r2=r2(log_g, concat_pred),
        concat_entropy=np.mean([r.entropy for r in concat], 0),
        n_experts=concat[0].weights.shape[1],
        z=z,
        z_seed=concat[0].seed,
        fit=fit.key_dict(),
        data=DataSummary.of(dm),
        compute_s=time.time() - started,
    )


def verdicts(results: DualTowerResults) -> list[Verdict]:
    """The decision rules of the research notes; each difference between trained gates is judged against both the
    test stars' bootstrap interval and the spread between seeds."""
    why, d = results.inconclusive, results.differences

    def gain(key: str, question: str, threshold: float, if_pass: str, if_fail: str, hypothesis: str) -> Verdict:
        diff = d[key]
        return Verdict(question, diff.mean, ">=", threshold, if_pass, if_fail, why, diff.ci, diff.seeds, hypothesis)

    stack = "«双塔 > 单塔 phys gate? ΔR² ≥ +0.005 → 继续 MVP-4.1/4.2»"
    return [
        gain(
            "dual",
            "Dual tower (concat) beats the phys-only gate by >= 0.005?",
            0.005,
            "continue to factorised gates",
            "no stacking gain at the 0.005 level",
            f"the quality axis stacks on the physics axis: dual tower over phys-only by Delta R^2 >= +0.005 (000: {stack})",
        ),
        gain(
            "dual_low_snr",
            "Low SNR (<= 4) improves by >= 0.01?",
            0.01,
            "the quality gate is useful where it should be",
            "no low-SNR gain from the quality tower",
            "the gain sits at low SNR: Delta R^2 >= +0.01 on SNR <= 4 (000: «低 SNR 子集改善? per-SNR ΔR² ≥ +0.01 → "
            "quality gate 有效»)",
        ),
        gain(
            "dual",
            "Dual tower at least as good as phys-only (Delta R2 >= 0)?",
            0.0,
            "keep the dual tower",
            "fall back to the single physics tower",
            "below the single tower the dual tower is dropped (000: «无叠加增益 ΔR² < 0 → fallback 单塔»)",
        ),
        *(
            gain(
                key,
                f"{label} beats the phys-only gate by >= 0.005?",
                0.005,
                f"the {label} fusion stacks the two axes",
                f"no stacking gain from the {label} fusion",
                f"MVP-{mvp} ({label}) passes the same stacking rule as MVP-4.0 (001 §5: «{what}»; 000: {stack})",
            )
            for key, label, mvp, what in (
                ("logit_add", "logit-add", "4.1", "因子分解：logit-add / prob-prod"),
                ("product", "product", "4.1", "因子分解：logit-add / prob-prod"),
                ("temperature", "temperature", "4.2", "温度控制：quality → τ"),
            )
        ),
        gain(
            "cells",
            "36 experts (physical x SNR) beat the 9-expert dual tower by >= 0.005?",
            0.005,
            "experts split by SNR too are worth their 4x count",
            "9 experts suffice: the SNR split of the experts adds no 0.005",
            "MVP-4.3 (optional): 36 experts, one per physical bin x SNR bin (001 §5: «36 experts (可选)»; no "
            "threshold given: the series' +0.005 stacking rule)",
        ),
        Verdict(
            "Dual-tower gates flatter at low SNR (entropy X - H > 0)?",
            float(np.mean(results.entropy_gap)),
            ">",
            0.0,
            "the quality tower softens the routing where the data are poor (an ensemble at low SNR)",
            "the gate is not flatter at low SNR",
            why,
            results.entropy_gap_ci,
            results.entropy_gap,
            "Q6.2: the quality gate acts as a temperature (000: «Gate 熵随 SNR 变化？ — 低 SNR 应该更'平'（更 ensemble）»)",
        ),
    ]


def sections(rep: Report, results: DualTowerResults, settings: ExperimentSettings) -> None:
    """The headline, the tables and the figures."""
    comparison, d = results.comparison, results.differences
    best_dual = comparison[comparison.method.str.startswith("Dual")].sort_values("r2").iloc[-1]
    dual, low = d["dual"], d["dual_low_snr"]
    n_seeds = len(dual.seeds)
    rep.text(
        "Headline",
        f"Delta R^2 (dual concat - phys-only) = {seed_mean_std(dual.seeds)} over {n_seeds} seed(s) (95% interval of "
        f"the seed mean {seed_interval_text(dual.seeds)}); paired bootstrap 95% CI over test stars "
        f"[{dual.ci[0]:+.4f}, {dual.ci[1]:+.4f}]. At SNR <= 4: {seed_mean_std(low.seeds)} (seeds "
        f"{seed_interval_text(low.seeds)}, bootstrap [{low.ci[0]:+.4f}, {low.ci[1]:+.4f}]). Best dual-tower fusion: "
        f"{best_dual.method} (R^2 {best_dual.r2:.4f}, rho {best_dual.rho:.3f}). rho = (R2 - R2_global) / "
        f"(R2_oracle - R2_global) with R2_oracle = {results.r2_oracle:.4f} ({bins.N_PHYS_BINS} bins) and "
        f"R2_global = {results.r2_global:.4f}.",
    )
    rep.text(
        "How a difference is decided",
        f"{SEED_RULE}\n\nEvery gate trains until it converges: {_training(settings).rule()}",
    )
    rep.table(
        "differences",
        _differences_table(results),
        "Compared pairs of gates (Delta R^2 = R^2(a) - R^2(b))",
        "delta: mean over seeds; seeds: each seed's Delta; seed_ci95: 95% interval of the seed mean "
        "(t distribution); bootstrap_ci95: paired bootstrap over test stars of the seed-averaged Delta.",
    )
    rep.figure(
        "dual_tower_differences.png",
        differences(
            [
                f"{x.a.replace('Dual-tower ', '')} − {x.b.replace(' gate', '')}"
                + ("" if x.slice == "all" else f" ({x.slice.replace('<=', '≤')})")
                for x in d.values()
            ],
            [x.seeds for x in d.values()],
            [x.ci for x in d.values()],
            [seed_interval(x.seeds) for x in d.values()],
            [THRESHOLDS[k] for k in d],
            "ΔR² (test)",
            f"Gate differences: {n_seeds} seed(s), test-star and seed intervals",
            notes=_figure_notes(results, settings.quick),
        ),
        "Each compared pair: every seed's ΔR² (dots), the 95% interval of their mean (thin bar), the paired "
        "bootstrap 95% CI over test stars (thick bar) and the verdict's threshold (dashed); a verdict decides only "
        "when both bars lie on one side of its threshold.",
    )
    rep.table(
        "comparison",
        comparison,
        "All methods on the test split",
        f"r2: mean over seeds, r2_sd: sd between seeds. Boundary: within {BOUNDARY:.0%} of a bin width of a T_eff "
        f"or M_H edge ({results.n_boundary} of {results.log_g.size} spectra). Training: {results.n_train} spectra, a "
        f"fresh noise draw every epoch. best / run epochs: per seed.",
    )
    rep.table(
        "runs",
        results.runs,
        "Every gate run: epochs to convergence",
        f"best_epoch: the epoch kept (best val R^2); epochs_run: when the run stopped ({_training(settings).rule()})",
    )
    rep.table(
        "per_snr",
        results.per_snr,
        "R^2 per SNR bin (mean prediction over seeds)",
        "Test counts: " + ", ".join(f"{k} {v}" for k, v in reversed(results.snr_counts.items())) + ".",
    )
    rep.table("per_phys", results.per_phys, "R^2 per physical bin (mean prediction over seeds)")
    rep.table(
        "entropy_confidence",
        results.entropy_confidence,
        "Gate entropy [nats] and confidence (max weight) per SNR bin",
        "Lower SNR should mean flatter gates (higher entropy) if the quality tower acts as a temperature.",
    )
    rep.table(
        "ablation",
        results.ablation,
        "Feature ablation of the dual-tower concat gate",
        f"Delta R^2 against the full gate of the same seed (full gate R^2 {results.r2_concat:.4f}, mean over seeds); "
        "dropped standardised features are set to their training mean; delta_ci95: 95% interval of the seed mean. "
        f"Exploratory, no verdict reads it: the ablated gates train with the first {ABLATION_SEEDS} seed(s) only "
        "(the budget of the default run), so a delta smaller than the spread between seeds of the comparison "
        "table is not a finding.",
    )
    rep.table(
        "convergence",
        results.convergence,
        f"Converged? The first seed's phys-only gate trained with {LONGER}x the patience",
        _convergence_note(results.convergence, settings.quick),
    )
    rep.table("towers", results.towers, "The two towers of the logit-add gate (first seed)")
    rep.table(
        "calibration",
        results.calibration,
        f"Calibration of the per-star sigma ({DUAL}, seed {results.z_seed})",
        "z = (predicted - true log g) / sigma on the test split; a calibrated Gaussian sigma gives z std 1, "
        "68.3% of |z| <= 1 and 95.4% of |z| <= 2.",
    )
    rep.table(
        "every_label",
        results.every_label.table,
        f"Every label ({DUAL.lower()} gate)",
        _every_label_note(results.every_label, results.n_experts),
    )
    _figures(rep, results)


def _every_label_note(every: EveryLabel, n_experts: int) -> str:
    """What the every-label table holds, how its gate was trained and its log g against the log-g-only gate."""
    targets = CALIBRATION_TARGETS
    delta, within = every.log_g_delta, abs(every.log_g_delta) <= LOG_G_TOLERANCE
    return (
        f"The {DUAL} gate over the {n_experts} physical experts trained for {', '.join(EVERY_LABEL)} at once "
        f"(seed {every.seed}, the first only; routing {every.routing}; loss: the mean of the labels' squared "
        f"errors on standardised labels; early stopping and the kept epoch on log g's val R^2, as every other gate: best epoch "
        f"{every.best_epoch} of {every.epochs_run}, {every.ended}; {every.seconds:.0f} s, preparation "
        f"{every.prepare_s:.0f} s). Its experts come from the dual tower's one expert fit, which fits the "
        f"{' and '.join(EVERY_LABEL_FAMILIES)} experts for every label from the same statistics pass (the other "
        "families for log g only). Per label, on the test split: R^2 and the calibration of sigma, "
        "z = (predicted - true) / sigma, overall and per SNR bin; within_targets: z std in "
        f"{targets['z_std'][0]:g}–{targets['z_std'][1]:g}, |z| <= 1 for "
        f"{targets['coverage_1sigma'][0]:.0%}–{targets['coverage_1sigma'][1]:.0%} and |z| <= 2 for "
        f"{targets['coverage_2sigma'][0]:.0%}–{targets['coverage_2sigma'][1]:.0%}, all three. Log g: test R^2 "
        f"{every.log_g_r2:.4f} against {every.log_g_only_r2:.4f} for the log-g-only {DUAL} gate of the same seed "
        f"(Delta {delta:+.4f}: {'within' if within else 'NOT within'} the {LOG_G_TOLERANCE:g} a gate that "
        "predicts every label may lose on log g). No verdict reads this table: the questions are log g's, answered "
        "by the log-g-only gates."
    )


def _convergence_note(check: pd.DataFrame, quick: bool) -> str:
    """What the convergence check says, in words."""
    row = check.iloc[0]
    delta, sd = row["delta test_r2"], row["seed sd of test_r2"]
    what = (
        f"Training on from where the run stopped ({row['epochs (as stopped)']} epochs) to where the same rule with "
        f"{LONGER}x the patience stops ({row['epochs (longer)']} epochs) moves the test R^2 by {delta:+.4f}"
    )
    if quick or not np.isfinite(sd):
        return what + " (no seed spread to compare it with)."
    verdict = "much less than" if abs(delta) <= sd / 3 else ("less than" if abs(delta) < sd else "NOT less than")
    return (
        f"{what}, {verdict} the sd of the phys-only gate's test R^2 between seeds ({sd:.4f}), and against the "
        f"smallest difference a verdict tests, 0.005: "
        + (
            "further epochs would not change a verdict."
            if abs(delta) < min(sd, 0.005)
            else "a verdict near its threshold may move with more epochs."
        )
    )


def _figure_notes(results: DualTowerResults, quick: bool) -> list[str]:
    """Per compared pair, the result of the verdict that reads it at its plotted threshold."""
    if quick:
        return ["smoke run"] * len(results.differences)
    judged = verdicts(results)
    return [
        next(v.result for v in judged if v.seeds == x.seeds and v.threshold == THRESHOLDS[key])
        for key, x in results.differences.items()
    ]


def _differences_table(results: DualTowerResults) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "a": x.a,
                "b": x.b,
                "test stars": x.slice,
                "delta": x.mean,
                "seeds": " ".join(f"{v:+.4f}" for v in x.seeds),
                "seed_ci95": seed_interval_text(x.seeds),
                "bootstrap_ci95": f"[{x.ci[0]:+.4f}, {x.ci[1]:+.4f}]",
                "threshold": THRESHOLDS[key],
            }
            for key, x in results.differences.items()
        ]
    )


def _figures(rep: Report, results: DualTowerResults) -> None:
    labels = [m[0] for m in METHODS]
    rep.figure(
        "dual_tower_comparison.png",
        bar(
            [s.replace("Dual-tower ", "").replace(" gate", "") for s in labels],
            list(results.comparison.r2),
            "test R²",
            "Gates over frozen Ridge experts",
            colors=[method_colour(m) for m in labels],
            hline=results.r2_oracle,
            hline_label=f"oracle R² {results.r2_oracle:.3f}",
            annotate=[
                f"{r:.4f}" + ("" if not np.isfinite(sd) or sd == 0 else f"\n±{sd:.4f}")
                for r, sd in zip(results.comparison.r2, results.comparison.r2_sd)
            ],
            errors=list(results.comparison.r2_sd),
            errors_label="sd between seeds",
        ),
        "Test R² per method, mean over seeds, with its sd between seeds (concat, logit-add, product, temperature: "
        "the dual-tower fusions).",
    )
    show = ["Global Ridge", "Phys-only gate", "Quality-only gate", DUAL, "Oracle (9 bins)"]
    snr_order = "HMLX"
    r2_per_snr = results.per_snr.set_index("method")
    rep.figure(
        "dual_tower_persnr_r2.png",
        grouped_bar(
            [bins.SNR_BIN_LABELS[bins.SNR_BIN_NAMES.index(n)] for n in snr_order],
            {m: [float(r2_per_snr.loc[m, f"r2_{n}"]) for n in snr_order] for m in show},
            "test R² within the bin",
            "R² per SNR bin",
            counts=[results.snr_counts[n] for n in snr_order],
            xlabel="SNR bin",
            figsize=(7.5, 5.2),
        ),
        "R² inside each SNR bin for the key methods; n = test spectra per bin.",
    )
    rep.figure(
        "dual_tower_pred_vs_true.png",
        pred_vs_true(
            results.log_g,
            results.concat_pred,
            results.concat_r2,
            results.snr,
            "SNR",
            f"{DUAL}: predicted vs true",
            log_color=True,
        ),
        f"{DUAL} predictions (mean over seeds) against true log g, coloured by SNR.",
    )
    n_experts = results.n_experts
    rep.figure(
        "dual_tower_entropy_vs_snr.png",
        entropy_vs_snr(results.snr, results.concat_entropy, n_experts, f"{DUAL} gate: entropy vs SNR"),
        f"Gate entropy against SNR for the {DUAL} gate (mean over seeds): density of test spectra, median per "
        f"SNR bin, SNR-bin edges, and the maximum ln {n_experts}.",
    )
    ablation = results.ablation
    rep.figure(
        "dual_tower_ablation.png",
        bar(
            list(ablation.ablation),
            list(ablation.delta_r2),
            "ΔR² vs full dual-tower gate",
            "Feature ablation",
            colors=[LOSS if v < 0 else GAIN for v in ablation.delta_r2],
            annotate=[f"{v:+.4f}" for v in ablation.delta_r2],
            legend={"R² rises without the group": GAIN, "R² falls without the group": LOSS},
        ),
        f"Change in test R² when a feature group is dropped (or quality reduced to {len(QUALITY_SUBSET5)} statistics).",
    )
    rep.figure(
        "dual_tower_calibration.png",
        calibration(results.z, results.snr_bin, f"{DUAL}: calibration of sigma (test)"),
        "Observed against nominal coverage of the intervals ±q(p)·σ on the test split, overall and per SNR bin; "
        "the diagonal is perfect calibration.",
    )


def calibration_table(z: np.ndarray, snr_bin: np.ndarray) -> pd.DataFrame:
    """z std and 1/2-sigma coverage overall and per SNR bin (rows: all, H, M, L, X)."""
    return pd.DataFrame(
        [
            {"slice": name, "n": int(sel.sum()), **z_calibration(z[sel])}
            for name, sel in bins.snr_slices(snr_bin, high_first=True)
        ]
    )


def inconclusive_reason(results: dict[str, list[GateRun]], r2_global: float, y: np.ndarray) -> str:
    """Why these gate runs cannot decide anything ('' when they can): the global expert no better than the
    mean log g (the experts learned nothing), a learned gate below the global expert (the run is
    degenerate), or a run stopped at its epoch limit while still improving."""
    learned = [(label, run) for label, runs in results.items() for run in runs if run.best_epoch > 0]
    below = sorted({label for label, run in learned if r2(y, run.pred) < r2_global})
    unfinished = sorted({label for label, run in learned if run.still_improving})
    reasons = []
    if not r2_global > 0:
        reasons.append(
            f"the global expert has test R^2 {r2_global:.4f} <= 0: the experts learned nothing "
            "(too few training spectra: raise --n-train)"
        )
    if below:
        reasons.append(
            f"{_some(below)} below the global expert (R^2 {r2_global:.4f}): too little data or too few epochs"
        )
    if unfinished:
        reasons.append(f"{_some(unfinished)} still improving at the last epoch: raise --epochs")
    return "; ".join(reasons)


def _some(labels: list[str], most: int = 3) -> str:
    """``labels`` joined, the first ``most`` named and the rest counted."""
    named = ", ".join(labels[:most])
    return named if len(labels) <= most else f"{named} and {len(labels) - most} more gate(s)"


@torch.no_grad()
def _tower_analysis(run: GateRun, prepared: Prepared, dm: SpectraDataModule, log_g: np.ndarray) -> pd.DataFrame:
    """How the physics and quality towers of a logit-add gate (trained on ``prepared``) agree, and what each
    contributes, on the test split."""
    model = run.model.eval()
    prepared.attach(dm)  # its gate-input caches, whichever gate ran last
    phys_parts, quality_parts, expert_parts = [], [], []
    for batch in dm.stream("test", batch_size=4096, cached=True):
        phys_features, quality_features = model.mixture.standardised_features(batch)
        phys_batch, quality_batch = model.mixture.gate.logits(phys_features, quality_features)
        phys_parts.append(phys_batch)
        quality_parts.append(quality_batch)
        expert_parts.append(batch["proj"][:, : model.mixture.experts.n_experts])
    # the towers' logits are [N, S, K], a set per label routed; the experiments' gates route log g alone: [N, K]
    phys_logits, quality_logits = torch.cat(phys_parts)[:, 0], torch.cat(quality_parts)[:, 0]
    expert_pred = torch.cat(expert_parts)  # [N, K]
    p_phys, p_quality = torch.softmax(phys_logits, -1), torch.softmax(quality_logits, -1)
    phys_centred = p_phys - p_phys.mean(-1, keepdim=True)
    quality_centred = p_quality - p_quality.mean(-1, keepdim=True)
    corr = (phys_centred * quality_centred).sum(-1) / (
        phys_centred.norm(dim=-1) * quality_centred.norm(dim=-1)
    ).clamp_min(1e-12)

    def r2_of(logits):
        return r2(log_g, (torch.softmax(logits, -1) * expert_pred).sum(-1).double().numpy())

    return pd.DataFrame(
        [
            {"quantity": "mean per-spectrum correlation of softmax(a) and softmax(b)", "value": float(corr.mean())},
            {
                "quantity": "argmax agreement of the two towers",
                "value": float((p_phys.argmax(-1) == p_quality.argmax(-1)).float().mean()),
            },
            {
                "quantity": "logit spread (std across experts), physics tower",
                "value": float(phys_logits.std(-1).mean()),
            },
            {
                "quantity": "logit spread (std across experts), quality tower",
                "value": float(quality_logits.std(-1).mean()),
            },
            {"quantity": "test R2, both towers", "value": r2_of(phys_logits + quality_logits)},
            {"quantity": "test R2, physics tower only (quality logits removed)", "value": r2_of(phys_logits)},
            {"quantity": "test R2, quality tower only (physics logits removed)", "value": r2_of(quality_logits)},
        ]
    )


class DualTower(Experiment):
    """LOGG-DUAL-TOWER-01 in the experiment template: its gates trained with three seeds by default."""

    name = "dual-tower"
    hypothesis = (
        "the physics axis (T_eff x [M/H]: what the spectrum looks like) and the quality axis (SNR: how much of it we "
        "see) are orthogonal, so a gate on both stacks their gains (000: «核心思路：物理轴与质量轴正交»)"
    )
    experiment_id = EXPERIMENT_ID
    title = TITLE
    question = QUESTION
    default_seeds = (42, 123, 456)
    compute = staticmethod(compute)
    verdicts = staticmethod(verdicts)
    sections = staticmethod(sections)

    @staticmethod
    def headline(results: DualTowerResults) -> pd.DataFrame:
        return results.comparison[["method", "r2", "r2_sd", "rho", "best / run epochs"]]

    @staticmethod
    def answer(results: DualTowerResults, verdicts: list[Verdict]) -> str:
        """The stacking verdict's answer and the best fusion by mean test R^2."""
        fusions = results.comparison[results.comparison.method.str.startswith("Dual")].sort_values("r2")
        best = fusions.iloc[-1]
        spread = "" if not np.isfinite(best.r2_sd) else f" ± {best.r2_sd:.4f}"
        return f"{verdicts[0].answer[:-1]}; best fusion by mean test R^2: {best.method} ({best.r2:.4f}{spread})."

    @staticmethod
    def config(results: DualTowerResults, settings: ExperimentSettings) -> dict:
        return {
            "methods": [m[0] for m in METHODS],
            "n_train_rows": results.n_train,
            "fit": results.fit,
            "gate_training": asdict(_training(settings)),
            "convergence_check_patience_factor": LONGER,
            "every_label_gate": {"labels": list(EVERY_LABEL), "seed": results.every_label.seed},
        }


EXPERIMENT = DualTower()
