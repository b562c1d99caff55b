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

import numpy as np
import pandas as pd
import torch

from moe.data import bins
from moe.data.quality import QUALITY_NAMES, QUALITY_SUBSET5
from moe.experiments.common import (
    ExperimentSettings,
    Report,
    Verdict,
    bootstrap_delta_r2,
    seed_mean_std,
)
from moe.experiments.gates import (
    PATIENCE,
    GateRun,
    prepare_families,
    test_rows,
    train_gate,
)
from moe.experts.fit import FitConfig
from moe.experts.scores import r2
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


def run(settings: ExperimentSettings) -> dict:
    dm = settings.datamodule()
    rep = Report(
        settings.out or "reports/dual-tower",
        EXPERIMENT_ID,
        "Dual-tower gates: physics + quality",
        "Does a gate that sees the quality statistics (SNR axis) next to the physics-window features "
        "(T_eff x [M/H] axis) beat the physics-only gate over the same 9 frozen Ridge experts, "
        "especially at low SNR, and which fusion works best?",
    )
    fit = FitConfig(families=FAMILIES)
    prepared = prepare_families(dm, FAMILIES, fit, settings.progress)
    test = test_rows(dm)
    y = test["log_g"].astype(np.float64)
    n_train = dm.train_set.n_rows

    results: dict[str, list[GateRun]] = {label: [] for label, _, _ in METHODS}
    for seed in settings.seeds:
        for label, fusion, family in METHODS:
            results[label].append(train_gate(dm, prepared[family], label, fusion, seed, settings.epochs))
    oracle = np.mean([r.pred for r in results["Oracle (9 bins)"]], 0)
    glob = np.mean([r.pred for r in results["Global Ridge"]], 0)
    r2_oracle, r2_global = r2(y, oracle), r2(y, glob)

    # ---- headline and slices -------------------------------------------------------------------
    rows, snr_rows, phys_rows, ent_rows = [], [], [], []
    edge = bins.edge_distance(test["T_eff"], test["M_H"]) < BOUNDARY
    sb, pb = test["snr_bin"], test["phys_bin"]
    for label, fusion, family in METHODS:
        res = results[label]
        per_seed = [r2(y, r.pred) for r in res]
        pred = np.mean([r.pred for r in res], 0)
        rows.append(
            {
                "method": label,
                "experts": family,
                "r2": float(np.mean(per_seed)),
                "r2_seeds": seed_mean_std(per_seed),
                "rho": (float(np.mean(per_seed)) - r2_global) / (r2_oracle - r2_global),
                "r2_boundary": r2(y[edge], pred[edge]),
                "r2_interior": r2(y[~edge], pred[~edge]),
                "mae": float(np.abs(pred - y).mean()),
                "val_r2": float(np.mean([r.val_r2 for r in res])),
                "best_epoch": float(np.mean([r.best_epoch for r in res])),
                "epochs_run": float(np.mean([r.epochs_run for r in res])),
            }
        )
        snr_rows.append(
            {
                "method": label,
                **{f"r2_{n}": r2(y[sb == i], pred[sb == i]) for i, n in reversed(list(enumerate(bins.SNR_BIN_NAMES)))},
                "r2_snr<=4": r2(y[sb <= 1], pred[sb <= 1]),
            }
        )
        phys_rows.append(
            {
                "method": label,
                **{bins.PHYS_BIN_NAMES[k]: r2(y[pb == k], pred[pb == k]) for k in range(bins.N_PHYS_BINS)},
            }
        )
        if fusion not in ("global", "oracle"):
            ent = np.mean([r.entropy for r in res], 0)
            conf = np.mean([r.weights.max(1) for r in res], 0)
            ent_rows.append(
                {
                    "method": label,
                    "K": res[0].weights.shape[1],
                    **{
                        f"entropy_{n}": float(ent[sb == i].mean())
                        for i, n in reversed(list(enumerate(bins.SNR_BIN_NAMES)))
                    },
                    **{
                        f"confidence_{n}": float(conf[sb == i].mean())
                        for i, n in reversed(list(enumerate(bins.SNR_BIN_NAMES)))
                    },
                }
            )
    table, snr_table, phys_table, ent_table = map(pd.DataFrame, (rows, snr_rows, phys_rows, ent_rows))
    counts = {n: int((sb == i).sum()) for i, n in enumerate(bins.SNR_BIN_NAMES)}

    # ---- ablation of the concat gate --------------------------------------------------------------
    full = [r2(y, r.pred) for r in results[DUAL]]
    abl_rows = []
    for name, drop in ABLATIONS.items():
        vals = [
            r2(y, train_gate(dm, prepared["phys"], f"concat, {name}", "concat", s, settings.epochs, drop).pred)
            for s in settings.seeds
        ]
        abl_rows.append(
            {"ablation": name, "r2": float(np.mean(vals)), "delta_r2": float(np.mean(vals) - np.mean(full))}
        )
    abl = pd.DataFrame(abl_rows)

    # ---- the two towers of logit-add -----------------------------------------------------------------
    towers = _tower_analysis(results["Dual-tower logit-add"][0], dm, y)

    dual, phys_only = results[DUAL], results["Phys-only gate"]
    d_all = [r2(y, a.pred) - r2(y, b.pred) for a, b in zip(dual, phys_only)]
    low = sb <= 1
    d_low = [r2(y[low], a.pred[low]) - r2(y[low], b.pred[low]) for a, b in zip(dual, phys_only)]
    ci = bootstrap_delta_r2(y, [r.pred for r in dual], [r.pred for r in phys_only])
    best_dual = table[table.method.str.startswith("Dual")].sort_values("r2").iloc[-1]
    why = inconclusive_reason(results, r2_global, y)
    verdicts = [
        Verdict(
            "Dual tower beats the phys-only gate by >= 0.005?",
            float(np.mean(d_all)),
            ">=",
            0.005,
            "continue to factorised gates",
            "no stacking gain at the 0.005 level",
            why,
        ),
        Verdict(
            "Low SNR (<= 4) improves by >= 0.01?",
            float(np.mean(d_low)),
            ">=",
            0.01,
            "the quality gate is useful where it should be",
            "no low-SNR gain from the quality tower",
            why,
        ),
        Verdict(
            "Dual tower at least as good as phys-only (Delta R2 >= 0)?",
            float(np.mean(d_all)),
            ">=",
            0.0,
            "keep the dual tower",
            "fall back to the single physics tower",
            why,
        ),
    ]
    rep.verdicts(verdicts)
    rep.text(
        "Headline",
        f"Delta R^2 (dual concat - phys-only) = {seed_mean_std(d_all)}; paired bootstrap 95% CI "
        f"[{ci[0]:+.4f}, {ci[1]:+.4f}]. At SNR <= 4: {seed_mean_std(d_low)}. Best dual-tower fusion: "
        f"{best_dual.method} (R^2 {best_dual.r2:.4f}, rho {best_dual.rho:.3f}). rho = (R2 - R2_global) / "
        f"(R2_oracle - R2_global) with R2_oracle = {r2_oracle:.4f} ({bins.N_PHYS_BINS} bins) and R2_global = {r2_global:.4f}.",
    )
    rep.table(
        "comparison",
        table,
        "All methods on the test split",
        f"Boundary: within {BOUNDARY:.0%} of a bin width of a T_eff or M_H edge ({int(edge.sum())} of {edge.size} spectra). "
        f"Training: {n_train} spectra, a fresh noise draw every epoch, up to {settings.epochs} epochs "
        f"(early stopping after {PATIENCE} epochs without a better val R^2; best_epoch / epochs_run: mean over seeds).",
    )
    rep.table(
        "per_snr",
        snr_table,
        "R^2 per SNR bin",
        "Test counts: " + ", ".join(f"{k} {v}" for k, v in reversed(counts.items())) + ".",
    )
    rep.table("per_phys", phys_table, "R^2 per physical bin")
    rep.table(
        "entropy_confidence",
        ent_table,
        "Gate entropy [nats] and confidence (max weight) per SNR bin",
        "Lower SNR should mean flatter gates (higher entropy) if the quality tower acts as a temperature.",
    )
    rep.table(
        "ablation",
        abl,
        "Feature ablation of the dual-tower concat gate",
        f"Delta R^2 against the full gate (R^2 {np.mean(full):.4f}); dropped standardised features are set to their training mean.",
    )
    rep.table("towers", towers, "The two towers of the logit-add gate")
    first_dual = dual[0]
    z = (first_dual.pred - y) / first_dual.sigma
    rep.table(
        "calibration",
        calibration_table(z, sb),
        f"Calibration of the per-star sigma ({DUAL}, seed {first_dual.seed})",
        "z = (predicted - true log g) / sigma on the test split; a calibrated Gaussian sigma gives z std 1, "
        "68.3% of |z| <= 1 and 95.4% of |z| <= 2.",
    )

    labels = [m[0] for m in METHODS]
    rep.figure(
        "dual_tower_comparison.png",
        bar(
            [s.replace("Dual-tower ", "").replace(" gate", "") for s in labels],
            list(table.r2),
            "test R²",
            "Gates over frozen Ridge experts",
            colors=[method_colour(m) for m in labels],
            hline=r2_oracle,
            hline_label=f"oracle R² {r2_oracle:.3f}",
        ),
        "Test R² per method (concat, logit-add, product, temperature: the dual-tower fusions).",
    )
    show = ["Global Ridge", "Phys-only gate", "Quality-only gate", DUAL, "Oracle (9 bins)"]
    snr_order = "HMLX"
    snr_groups = [bins.SNR_BIN_LABELS[bins.SNR_BIN_NAMES.index(n)] for n in snr_order]
    rep.figure(
        "dual_tower_persnr_r2.png",
        grouped_bar(
            snr_groups,
            {m: [float(snr_table.set_index("method").loc[m, f"r2_{n}"]) for n in snr_order] for m in show},
            "test R² within the bin",
            "R² per SNR bin",
            counts=[counts[n] for n in snr_order],
            xlabel="SNR bin",
            figsize=(7.5, 5.2),
        ),
        "R² inside each SNR bin for the key methods; n = test spectra per bin.",
    )
    dual_pred = np.mean([r.pred for r in dual], 0)
    rep.figure(
        "dual_tower_pred_vs_true.png",
        pred_vs_true(y, dual_pred, r2(y, dual_pred), test["snr"], "SNR", f"{DUAL}: predicted vs true", log_color=True),
        f"{DUAL} predictions (mean over seeds) against true log g, coloured by SNR.",
    )
    n_experts = dual[0].weights.shape[1]
    rep.figure(
        "dual_tower_entropy_vs_snr.png",
        entropy_vs_snr(test["snr"], np.mean([r.entropy for r in dual], 0), n_experts, f"{DUAL} gate: entropy vs SNR"),
        f"Gate entropy against SNR for the {DUAL} gate (mean over seeds): density of test spectra, median per "
        f"SNR bin, SNR-bin edges, and the maximum ln {n_experts}.",
    )
    rep.figure(
        "dual_tower_ablation.png",
        bar(
            list(abl.ablation),
            list(abl.delta_r2),
            "ΔR² vs full dual-tower gate",
            "Feature ablation",
            colors=[LOSS if v < 0 else GAIN for v in abl.delta_r2],
            annotate=[f"{v:+.4f}" for v in abl.delta_r2],
            legend={"R² rises without the group": GAIN, "R² falls without the group": LOSS},
        ),
        f"Change in test R² when a feature group is dropped (or quality reduced to {len(QUALITY_SUBSET5)} statistics).",
    )
    rep.figure(
        "dual_tower_calibration.png",
        calibration(z, sb, f"{DUAL}: calibration of sigma (test)"),
        "Observed against nominal coverage of the intervals ±q(p)·σ on the test split, overall and per SNR bin; "
        "the diagonal is perfect calibration.",
    )
    rep.write(settings, dm, {"methods": [m[0] for m in METHODS], "n_train_rows": n_train, "fit": fit.key_dict()})
    return {
        "report": rep.out,
        "headline": table[["method", "r2", "rho"]],
        "verdicts": verdicts,
        "delta_r2": float(np.mean(d_all)),
        "ci": ci,
    }


def calibration_table(z: np.ndarray, snr_bin: np.ndarray) -> pd.DataFrame:
    """z std and 1/2-sigma coverage overall and per SNR bin (rows: all, H, M, L, X)."""
    rows = []
    for name, sel in [("all", np.ones_like(z, dtype=bool))] + [
        (n, snr_bin == i) for i, n in reversed(list(enumerate(bins.SNR_BIN_NAMES)))
    ]:
        rows.append(
            {
                "slice": name,
                "n": int(sel.sum()),
                "z_std": float(z[sel].std()),
                "coverage_1sigma": float((np.abs(z[sel]) <= 1).mean()),
                "coverage_2sigma": float((np.abs(z[sel]) <= 2).mean()),
            }
        )
    return pd.DataFrame(rows)


def inconclusive_reason(results: dict[str, list[GateRun]], r2_global: float, y: np.ndarray) -> str:
    """Why these gate runs cannot decide anything ('' when they can): a learned gate below the
    global expert (the run is degenerate), or a run stopped at its epoch limit while still improving."""
    learned = [(label, run) for label, runs in results.items() for run in runs if run.best_epoch > 0]
    below = sorted({label for label, run in learned if r2(y, run.pred) < r2_global})
    unfinished = sorted({label for label, run in learned if run.still_improving})
    reasons = []
    if below:
        reasons.append(
            f"{', '.join(below)} below the global expert (R^2 {r2_global:.4f}): too little data or too few epochs"
        )
    if unfinished:
        reasons.append(f"{', '.join(unfinished)} still improving at the last epoch: raise --epochs")
    return "; ".join(reasons)


@torch.no_grad()
def _tower_analysis(run: GateRun, dm, y: np.ndarray) -> pd.DataFrame:
    """How the physics and quality towers of a logit-add gate agree, and what each contributes, on the test split."""
    model = run.model.eval()
    a_parts, b_parts, mu_parts = [], [], []
    for batch in dm.stream("test", batch_size=4096, cached=True):
        phys, qual = model.standardised_features(batch)
        a, b = model.gate.logits(phys, qual)
        a_parts.append(a), b_parts.append(b), mu_parts.append(batch["proj"][:, : model.experts.n_experts])
    a, b, mu = torch.cat(a_parts), torch.cat(b_parts), torch.cat(mu_parts)
    p, q = torch.softmax(a, -1), torch.softmax(b, -1)
    pc, qc = p - p.mean(-1, keepdim=True), q - q.mean(-1, keepdim=True)
    corr = (pc * qc).sum(-1) / (pc.norm(dim=-1) * qc.norm(dim=-1)).clamp_min(1e-12)

    def r2_of(logits):
        return r2(y, (torch.softmax(logits, -1) * mu).sum(-1).double().numpy())

    return pd.DataFrame(
        [
            {"quantity": "mean per-spectrum correlation of softmax(a) and softmax(b)", "value": float(corr.mean())},
            {
                "quantity": "argmax agreement of the two towers",
                "value": float((p.argmax(-1) == q.argmax(-1)).float().mean()),
            },
            {"quantity": "logit spread (std across experts), physics tower", "value": float(a.std(-1).mean())},
            {"quantity": "logit spread (std across experts), quality tower", "value": float(b.std(-1).mean())},
            {"quantity": "test R2, both towers", "value": r2_of(a + b)},
            {"quantity": "test R2, physics tower only (quality logits removed)", "value": r2_of(a)},
            {"quantity": "test R2, quality tower only (physics logits removed)", "value": r2_of(b)},
        ]
    )
