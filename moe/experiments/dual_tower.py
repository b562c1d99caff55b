"""LOGG-DUAL-TOWER-01: does a quality tower add to the physics gate over 9 frozen Ridge experts?

Methods: Global Ridge, phys-only gate, quality-only gate (4 SNR experts), the dual-tower
fusions concat / logit-add / product / temperature, a 36-expert (physical x SNR) concat
gate and the 9-bin oracle. Slices: per SNR bin, per physical bin, boundary samples (within
10% of a bin width of a T_eff or M_H edge). Gate entropy and confidence against SNR; feature
ablation (each feature group dropped; 10 quality statistics against a 5-statistic subset);
how the two towers of the logit-add gate agree and which contributes more.

Every gate is a ``GatedMoE`` trained through ``pl.Trainer`` exactly as ``train.py fit`` trains
it (:mod:`moe.experiments.gates`): fresh noise every epoch, MSE, Adam with a linear warm-up,
early stopping and the best epoch on validation R^2.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from moe.data import bins
from moe.data.datamodule import SpectraDataModule
from moe.data.error_stats import QUALITY_NAMES, QUALITY_SUBSET5
from moe.experiments.common import (
    DataSummary,
    ExperimentSettings,
    Report,
    Results,
    Verdict,
    bootstrap_delta_r2,
    require_train_rows,
    seed_mean_std,
)
from moe.experiments.gates import (
    PATIENCE,
    GateRun,
    prepare_families,
    test_rows,
    train_gate,
)
from moe.experts.scores import r2, z_calibration
from moe.features import PHYSICS_NAMES
from moe.plots import (
    GAIN,
    LOSS,
    bar,
    calibration,
    entropy_vs_snr,
    grouped_bar,
    method_colour,
    pred_vs_true,
)
from moe.prepare import Prepared

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
BOUNDARY = 0.1
MIN_TRAIN = 2  # training spectra the gate-feature standardisation needs (fewer make no run at all)
SNR_HIGH_TO_LOW = tuple(reversed(list(enumerate(bins.SNR_BIN_NAMES))))  # (index, name) of each SNR bin, H first
TITLE = "Dual-tower gates: physics + quality"
QUESTION = (
    "Does a gate that sees the quality statistics (SNR axis) next to the physics-window features "
    "(T_eff x [M/H] axis) beat the physics-only gate over the same 9 frozen Ridge experts, "
    "especially at low SNR, and which fusion works best?"
)


@dataclass
class DualTowerResults(Results):
    """Every number of the dual-tower report (N test spectra, K experts of the concat gate)."""

    comparison: pd.DataFrame  # every method on the test split
    per_snr: pd.DataFrame  # R^2 per method and SNR bin
    per_phys: pd.DataFrame  # R^2 per method and physical bin
    entropy_confidence: pd.DataFrame  # gate entropy and max weight per method and SNR bin
    ablation: pd.DataFrame  # R^2 of the concat gate with a feature group dropped
    towers: pd.DataFrame  # agreement and contribution of the logit-add gate's two towers
    calibration: pd.DataFrame  # z std and coverage of the concat gate's sigma (first seed)
    r2_global: float
    r2_oracle: float
    r2_concat: float  # the concat gate with every feature (mean over seeds), the ablation's reference
    delta_r2: list[float]  # dual concat - phys-only per seed, all test spectra
    delta_r2_low_snr: list[float]  # the same at SNR <= 4
    delta_ci_low_snr: tuple[float, float]  # paired bootstrap 95% CI of ``delta_r2_low_snr``
    delta_ci: tuple[float, float]  # paired bootstrap 95% CI of ``delta_r2``
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


def _train_methods(
    dm: SpectraDataModule, prepared: dict[str, Prepared], settings: ExperimentSettings
) -> dict[str, list[GateRun]]:
    """Every method of ``METHODS`` trained once per seed, by label."""
    runs: dict[str, list[GateRun]] = {label: [] for label, _, _ in METHODS}
    for seed in settings.seeds:
        for label, fusion, family in METHODS:
            runs[label].append(train_gate(dm, prepared[family], label, fusion, seed, settings.epochs))
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
    return {
        "method": label,
        "experts": family,
        "r2": float(np.mean(per_seed)),
        "r2_seeds": seed_mean_std(per_seed),
        "rho": (float(np.mean(per_seed)) - r2_global) / (r2_oracle - r2_global),
        "r2_boundary": r2(log_g[near_edge], pred[near_edge]),
        "r2_interior": r2(log_g[~near_edge], pred[~near_edge]),
        "mae": float(np.abs(pred - log_g).mean()),
        "val_r2": float(np.mean([r.val_r2 for r in runs])),
        "best_epoch": float(np.mean([r.best_epoch for r in runs])),
        "epochs_run": float(np.mean([r.epochs_run for r in runs])),
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
    dm: SpectraDataModule, prepared: Prepared, settings: ExperimentSettings, log_g: np.ndarray, r2_full: float
) -> pd.DataFrame:
    """The concat gate retrained without each feature group of ``ABLATIONS``: its R^2 and the change from ``r2_full``."""
    rows = []
    for name, drop in ABLATIONS.items():
        r2_per_seed = [
            r2(log_g, train_gate(dm, prepared, f"concat, {name}", "concat", seed, settings.epochs, drop).pred)
            for seed in settings.seeds
        ]
        rows.append(
            {"ablation": name, "r2": float(np.mean(r2_per_seed)), "delta_r2": float(np.mean(r2_per_seed) - r2_full)}
        )
    return pd.DataFrame(rows)


def compute(settings: ExperimentSettings) -> DualTowerResults:
    """Train every gate (and the ablations) per seed and evaluate them on the test split; no file is written."""
    started = time.time()
    dm = settings.datamodule()
    require_train_rows(dm.train_set.n_kept, MIN_TRAIN, "dual-tower", "the gate features are standardised on them")
    fit = settings.fit_config(FAMILIES)  # its gates mix every family: each must meet --min-samples
    prepared = prepare_families(dm, FAMILIES, fit, settings.progress)
    test = test_rows(dm)
    log_g = test["log_g"].astype(np.float64)
    snr_bin = test["snr_bin"]
    runs = _train_methods(dm, prepared, settings)
    r2_oracle, r2_global = r2(log_g, _mean_pred(runs["Oracle (9 bins)"])), r2(log_g, _mean_pred(runs["Global Ridge"]))
    near_edge = bins.edge_distance(test["T_eff"], test["M_H"]) < BOUNDARY
    comparison, per_snr, per_phys, entropy_confidence = _method_tables(
        runs, test, log_g, near_edge, r2_global, r2_oracle
    )
    concat, phys_only = runs[DUAL], runs["Phys-only gate"]
    r2_concat = float(np.mean([r2(log_g, r.pred) for r in concat]))
    ablation = _ablation(dm, prepared["phys"], settings, log_g, r2_concat)
    towers = _tower_analysis(runs["Dual-tower logit-add"][0], dm, log_g)
    low = snr_bin <= 1
    z = (concat[0].pred - log_g) / concat[0].sigma
    concat_pred = _mean_pred(concat)
    return DualTowerResults(
        comparison=comparison,
        per_snr=per_snr,
        per_phys=per_phys,
        entropy_confidence=entropy_confidence,
        ablation=ablation,
        towers=towers,
        calibration=calibration_table(z, snr_bin),
        r2_global=r2_global,
        r2_oracle=r2_oracle,
        r2_concat=r2_concat,
        delta_r2=[r2(log_g, a.pred) - r2(log_g, b.pred) for a, b in zip(concat, phys_only)],
        delta_r2_low_snr=[r2(log_g[low], a.pred[low]) - r2(log_g[low], b.pred[low]) for a, b in zip(concat, phys_only)],
        delta_ci=bootstrap_delta_r2(log_g, [r.pred for r in concat], [r.pred for r in phys_only]),
        delta_ci_low_snr=bootstrap_delta_r2(
            log_g[low], [r.pred[low] for r in concat], [r.pred[low] for r in phys_only]
        ),
        inconclusive=inconclusive_reason(runs, r2_global, log_g),
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
    delta, delta_low = float(np.mean(results.delta_r2)), float(np.mean(results.delta_r2_low_snr))
    why = results.inconclusive
    return [
        Verdict(
            "Dual tower beats the phys-only gate by >= 0.005?",
            delta,
            ">=",
            0.005,
            "continue to factorised gates",
            "no stacking gain at the 0.005 level",
            why,
            results.delta_ci,
        ),
        Verdict(
            "Low SNR (<= 4) improves by >= 0.01?",
            delta_low,
            ">=",
            0.01,
            "the quality gate is useful where it should be",
            "no low-SNR gain from the quality tower",
            why,
            results.delta_ci_low_snr,
        ),
        Verdict(
            "Dual tower at least as good as phys-only (Delta R2 >= 0)?",
            delta,
            ">=",
            0.0,
            "keep the dual tower",
            "fall back to the single physics tower",
            why,
            results.delta_ci,
        ),
    ]


def write_report(results: DualTowerResults, settings: ExperimentSettings) -> dict:
    """Write the report folder (verdicts, tables, figures, config); return what ``run`` returns."""
    rep = Report(settings.out or "reports/dual-tower", EXPERIMENT_ID, TITLE, QUESTION, compute_s=results.compute_s)
    judged = verdicts(results)
    rep.verdicts(judged)
    comparison = results.comparison
    best_dual = comparison[comparison.method.str.startswith("Dual")].sort_values("r2").iloc[-1]
    ci = results.delta_ci
    rep.text(
        "Headline",
        f"Delta R^2 (dual concat - phys-only) = {seed_mean_std(results.delta_r2)}; paired bootstrap 95% CI "
        f"[{ci[0]:+.4f}, {ci[1]:+.4f}]. At SNR <= 4: {seed_mean_std(results.delta_r2_low_snr)} (CI [{results.delta_ci_low_snr[0]:+.4f}, {results.delta_ci_low_snr[1]:+.4f}]). Best dual-tower "
        f"fusion: {best_dual.method} (R^2 {best_dual.r2:.4f}, rho {best_dual.rho:.3f}). rho = (R2 - R2_global) / "
        f"(R2_oracle - R2_global) with R2_oracle = {results.r2_oracle:.4f} ({bins.N_PHYS_BINS} bins) and "
        f"R2_global = {results.r2_global:.4f}.",
    )
    rep.table(
        "comparison",
        comparison,
        "All methods on the test split",
        f"Boundary: within {BOUNDARY:.0%} of a bin width of a T_eff or M_H edge ({results.n_boundary} of "
        f"{results.log_g.size} spectra). Training: {results.n_train} spectra, a fresh noise draw every epoch, up to "
        f"{settings.epochs} epochs (early stopping after {PATIENCE} epochs without a better val R^2; best_epoch / "
        "epochs_run: mean over seeds).",
    )
    rep.table(
        "per_snr",
        results.per_snr,
        "R^2 per SNR bin",
        "Test counts: " + ", ".join(f"{k} {v}" for k, v in reversed(results.snr_counts.items())) + ".",
    )
    rep.table("per_phys", results.per_phys, "R^2 per physical bin")
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
        f"Delta R^2 against the full gate (R^2 {results.r2_concat:.4f}); dropped standardised features are set to "
        "their training mean.",
    )
    rep.table("towers", results.towers, "The two towers of the logit-add gate")
    rep.table(
        "calibration",
        results.calibration,
        f"Calibration of the per-star sigma ({DUAL}, seed {results.z_seed})",
        "z = (predicted - true log g) / sigma on the test split; a calibrated Gaussian sigma gives z std 1, "
        "68.3% of |z| <= 1 and 95.4% of |z| <= 2.",
    )
    _figures(rep, results)
    rep.write(
        settings,
        results.data,
        {"methods": [m[0] for m in METHODS], "n_train_rows": results.n_train, "fit": results.fit},
    )
    return {
        "report": rep.out,
        "headline": comparison[["method", "r2", "rho"]],
        "verdicts": judged,
        "delta_r2": float(np.mean(results.delta_r2)),
        "ci": results.delta_ci,
    }


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
        ),
        "Test R² per method (concat, logit-add, product, temperature: the dual-tower fusions).",
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


def run(settings: ExperimentSettings) -> dict:
    """Train and evaluate every gate, then write the report."""
    return write_report(compute(settings), settings)


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
            f"{', '.join(below)} below the global expert (R^2 {r2_global:.4f}): too little data or too few epochs"
        )
    if unfinished:
        reasons.append(f"{', '.join(unfinished)} still improving at the last epoch: raise --epochs")
    return "; ".join(reasons)


@torch.no_grad()
def _tower_analysis(run: GateRun, dm: SpectraDataModule, log_g: np.ndarray) -> pd.DataFrame:
    """How the physics and quality towers of a logit-add gate agree, and what each contributes, on the test split."""
    model = run.model.eval()
    phys_parts, quality_parts, expert_parts = [], [], []
    for batch in dm.stream("test", batch_size=4096, cached=True):
        phys_features, quality_features = model.mixture.standardised_features(batch)
        phys_batch, quality_batch = model.mixture.gate.logits(phys_features, quality_features)
        phys_parts.append(phys_batch)
        quality_parts.append(quality_batch)
        expert_parts.append(batch["proj"][:, : model.mixture.experts.n_experts])
    phys_logits, quality_logits = torch.cat(phys_parts), torch.cat(quality_parts)  # [N, K]
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
