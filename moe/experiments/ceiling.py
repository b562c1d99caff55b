"""MOE-CEILING-C1-01: how far can the best expert *per physical bin* lift the oracle?

Per T_eff x [M/H] bin: Ridge with alpha swept over the fit's alphas (from the streamed fit;
alpha picked on validation), LightGBM (``moe.experts.nonlinear.LGBM_PARAMS``) and a 1D-CNN
(channels 32-64-32, kernel 5, pool 4, fc 64, fresh noise each epoch, best validation epoch,
early stop after 5 epochs without improvement) on the metal-poor bins 3 (Mid-Poor) and 6
(Hot-Poor). The
Oracle-Hybrid routes every test spectrum to its bin's best expert type -- chosen on the
validation split, so the test R^2 is not selected on itself -- and is compared with the
Ridge oracle and the global Ridge.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moe.data import bins
from moe.experiments.common import (
    ExperimentSettings,
    Report,
    Verdict,
    bootstrap_delta_r2,
    load_splits,
    seed_mean_std,
)
from moe.experts.bundle import load_or_fit
from moe.experts.fit import FitConfig
from moe.experts.nonlinear import LGBM_PARAMS, CNNExpert, fit_lgbm
from moe.experts.scores import r2
from moe.plots import (
    GAIN,
    GREY,
    LOSS,
    bar,
    grouped_bar,
    heatmap,
    method_colour,
    pred_vs_true,
)

EXPERIMENT_ID = "MOE-CEILING-C1-01"
CNN_BINS = (3, 6)
SMALL_BIN = 1000
TYPES = ("Ridge", "LightGBM", "1D-CNN")
R2_COLUMN = {"Ridge": "r2_ridge", "LightGBM": "r2_lgbm", "1D-CNN": "r2_cnn"}
HYBRID_TARGET = 0.70
GAIN_TARGET = 0.05
GLOBAL, RIDGE_ORACLE, HYBRID = "Global Ridge", f"Ridge-Oracle ({bins.N_PHYS_BINS} bins)", "Oracle-Hybrid"
FIT = FitConfig(families=("global", "phys", "snr"))
BIN_AXIS = (
    f"physical bin (0 {bins.PHYS_BIN_NAMES[0]} … {bins.N_PHYS_BINS - 1} {bins.PHYS_BIN_NAMES[-1]}; T_eff × [M/H])"
)


def run(settings: ExperimentSettings) -> dict:
    dm = settings.datamodule()
    rep = Report(
        settings.out or "reports/ceiling",
        EXPERIMENT_ID,
        "Per-bin best expert: the oracle ceiling",
        f"With oracle routing over the {bins.N_PHYS_BINS} T_eff x [M/H] bins, does choosing the best expert type "
        f"per bin (Ridge with a per-bin alpha, LightGBM, 1D-CNN) lift R^2 to >= {HYBRID_TARGET:.2f} and by >= "
        f"{GAIN_TARGET} over the Ridge oracle, and do the metal-poor bins {' and '.join(map(str, CNN_BINS))} improve?",
    )
    bundle = load_or_fit(dm, FIT, progress=settings.progress)
    phys = bundle.families["phys"]
    alphas = np.asarray(bundle.config.alphas)
    train, val, test = load_splits(dm, settings, keep_clean=True)
    y = test.log_g
    glob = bundle.families["global"]
    pred_global = test.flux.astype(np.float64) @ glob.weight[0] + glob.bias[0]

    # ---- Ridge per bin: every alpha (val from the fit, test here) ------------------------------------
    ridge_rows, preds, val_r2 = [], {t: np.full(y.shape, np.nan) for t in TYPES}, {}
    for k in range(bins.N_PHYS_BINS):
        in_test, in_val = test.phys_bin == k, val.phys_bin == k
        test_path = test.flux[in_test].astype(np.float64) @ phys.path_weight[k].T + phys.path_bias[k]
        val_path = val.flux[in_val].astype(np.float64) @ phys.path_weight[k].T + phys.path_bias[k]
        chosen = int(np.flatnonzero(alphas == phys.alpha[k])[0])
        preds["Ridge"][in_test] = test_path[:, chosen]
        val_r2[(k, "Ridge")] = r2(val.log_g[in_val], val_path[:, chosen])
        ridge_rows.append(
            {
                "bin": k,
                "name": bins.PHYS_BIN_NAMES[k],
                "best_alpha": float(phys.alpha[k]),
                **{f"test_r2_a={alpha:g}": r2(y[in_test], test_path[:, i]) for i, alpha in enumerate(alphas)},
            }
        )
    ridge_table = pd.DataFrame(ridge_rows)

    # ---- LightGBM per bin, CNN on the metal-poor bins ------------------------------------------------------
    lgbm_seed_r2, cnn_seed_r2, cnn_epochs = {}, {}, {}
    for k in range(bins.N_PHYS_BINS):
        in_train, in_val, in_test = train.phys_bin == k, val.phys_bin == k, test.phys_bin == k
        pred_test, pred_val = [], []
        for seed in settings.seeds:
            model = fit_lgbm(train.flux[in_train], train.log_g[in_train], seed, settings.lgbm_device)
            pred_test.append(model.predict(test.flux[in_test]))
            pred_val.append(model.predict(val.flux[in_val]))
        lgbm_seed_r2[k] = [r2(y[in_test], p) for p in pred_test]
        preds["LightGBM"][in_test] = np.mean(pred_test, 0)
        val_r2[(k, "LightGBM")] = r2(val.log_g[in_val], np.mean(pred_val, 0))
        if k in CNN_BINS and settings.cnn_epochs > 0:
            pred_test, pred_val, epochs = [], [], []
            for seed in settings.seeds:
                cnn = CNNExpert(epochs=settings.cnn_epochs, noise_level=dm.noise_level).fit(
                    train.clean[in_train],
                    train.error[in_train],
                    train.log_g[in_train],
                    val.flux[in_val],
                    val.log_g[in_val],
                    seed,
                )
                pred_test.append(cnn.predict(test.flux[in_test]))
                pred_val.append(cnn.predict(val.flux[in_val]))
                epochs.append(len(cnn.history))
            cnn_seed_r2[k], cnn_epochs[k] = [r2(y[in_test], p) for p in pred_test], epochs
            preds["1D-CNN"][in_test] = np.mean(pred_test, 0)
            val_r2[(k, "1D-CNN")] = r2(val.log_g[in_val], np.mean(pred_val, 0))

    # ---- per-bin table and the hybrid -----------------------------------------------------------------
    n_train = np.bincount(train.phys_bin, minlength=bins.N_PHYS_BINS)
    rows, hybrid, choice = [], np.empty_like(y), []
    for k in range(bins.N_PHYS_BINS):
        in_test = test.phys_bin == k
        scores = {t: r2(y[in_test], preds[t][in_test]) for t in TYPES if np.isfinite(preds[t][in_test]).all()}
        best = max(scores, key=lambda t: val_r2[(k, t)])
        choice.append(best)
        hybrid[in_test] = preds[best][in_test]
        rows.append(
            {
                "bin": k,
                "name": bins.PHYS_BIN_NAMES[k],
                "n_train": int(n_train[k]),
                "n_test": int(in_test.sum()),
                "flag": f"< {SMALL_BIN} train" if n_train[k] < SMALL_BIN else "",
                "ridge_alpha": float(phys.alpha[k]),
                "r2_ridge": scores["Ridge"],
                "r2_lgbm": scores["LightGBM"],
                "r2_cnn": scores.get("1D-CNN", np.nan),
                "best (val)": best,
                "r2_best": scores[best],
                "delta_r2_vs_ridge": scores[best] - scores["Ridge"],
                "lgbm_seeds": seed_mean_std(lgbm_seed_r2[k]),
                "cnn_seeds": seed_mean_std(cnn_seed_r2[k]) if k in cnn_seed_r2 else "",
                "cnn_epochs": str(cnn_epochs.get(k, "")),
            }
        )
    per_bin = pd.DataFrame(rows)
    r2_global, r2_ridge_oracle, r2_hybrid = r2(y, pred_global), r2(y, preds["Ridge"]), r2(y, hybrid)
    overall = pd.DataFrame(
        [
            {"method": GLOBAL, "r2": r2_global, "delta_vs_global": 0.0, "note": f"alpha {glob.alpha[0]:g}"},
            {
                "method": RIDGE_ORACLE,
                "r2": r2_ridge_oracle,
                "delta_vs_global": r2_ridge_oracle - r2_global,
                "note": "per-bin alpha",
            },
            {"method": HYBRID, "r2": r2_hybrid, "delta_vs_global": r2_hybrid - r2_global, "note": " / ".join(choice)},
        ]
    )
    ci = bootstrap_delta_r2(y, [hybrid], [preds["Ridge"]])
    metal_poor_gain = per_bin.set_index("bin").loc[list(CNN_BINS), "delta_r2_vs_ridge"]
    verdicts = [
        Verdict(
            f"Oracle-Hybrid R2 >= {HYBRID_TARGET:.2f}?",
            r2_hybrid,
            ">=",
            HYBRID_TARGET,
            f"the per-bin ceiling reaches R^2 {HYBRID_TARGET:.2f}",
            f"the per-bin ceiling stays below R^2 {HYBRID_TARGET:.2f}",
        ),
        Verdict(
            f"Hybrid beats the Ridge oracle by >= {GAIN_TARGET}?",
            r2_hybrid - r2_ridge_oracle,
            ">=",
            GAIN_TARGET,
            "per-bin expert choice is worth it",
            "Ridge experts are close to the per-bin ceiling",
        ),
        Verdict(
            f"Metal-poor bins {' and '.join(map(str, CNN_BINS))} both improve by >= {GAIN_TARGET}?",
            float(metal_poor_gain.min()),
            ">=",
            GAIN_TARGET,
            "the metal-poor bottleneck is lifted",
            f"bins {'/'.join(map(str, CNN_BINS))} remain the bottleneck",
        ),
    ]
    rep.verdicts(verdicts)
    rep.text(
        "Headline",
        f"Oracle-Hybrid R^2 {r2_hybrid:.4f} vs Ridge-Oracle {r2_ridge_oracle:.4f} (Delta "
        f"{r2_hybrid - r2_ridge_oracle:+.4f}, paired bootstrap 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]) vs "
        f"global {r2_global:.4f}. Best type per bin chosen on validation R^2. LightGBM: "
        + ", ".join(f"{k}={v}" for k, v in LGBM_PARAMS.items())
        + ".",
    )
    rep.table(
        "per_bin",
        per_bin,
        "Table 1: per-bin test R^2 by expert type",
        f"Bins with fewer than {SMALL_BIN} training spectra are flagged.",
    )
    rep.table("overall", overall, "Table 2: overall test R^2 (oracle routing)")
    rep.table("ridge_alpha_sweep", ridge_table, "Ridge alpha sweep per bin (test R^2; alpha chosen on validation)")
    _figures(rep, per_bin, choice, overall, y, hybrid, test.phys_bin)
    rep.write(
        settings,
        dm,
        {
            "lgbm": LGBM_PARAMS,
            "cnn_bins": list(CNN_BINS),
            "cnn_epochs_max": settings.cnn_epochs,
            "n_train_rows_in_memory": len(train.log_g),
        },
    )
    return {"report": rep.out, "headline": overall[["method", "r2"]], "verdicts": verdicts, "hybrid_r2": r2_hybrid}


def _figures(
    rep: Report,
    per_bin: pd.DataFrame,
    choice: list[str],
    overall: pd.DataFrame,
    y: np.ndarray,
    hybrid: np.ndarray,
    phys_bin: np.ndarray,
) -> None:
    metal_poor = f"metal-poor bins {' and '.join(map(str, CNN_BINS))} (1D-CNN trained only there)"
    rep.figure(
        "ceiling_perbin_expert_comparison.png",
        grouped_bar(
            [str(k) for k in per_bin.bin],
            {t: per_bin[R2_COLUMN[t]] for t in TYPES},
            "test R² within the bin",
            "Per-bin expert comparison",
            xlabel=BIN_AXIS,
            star=choice,
            star_label="expert type chosen on validation",
            shade=CNN_BINS,
            shade_label=metal_poor,
            figsize=(7.5, 5.2),
        ),
        f"Test R² per bin and expert type; ★ marks the type chosen on validation R²; shaded: {metal_poor}.",
    )
    matrix = per_bin[[R2_COLUMN[t] for t in TYPES]].to_numpy()
    cell_text = np.array(
        [
            [
                ("–" if not np.isfinite(v) else f"{v:.3f}") + (" ★" if TYPES[j] == choice[i] else "")
                for j, v in enumerate(row)
            ]
            for i, row in enumerate(matrix)
        ]
    )
    rep.figure(
        "ceiling_expert_selection_heatmap.png",
        heatmap(
            matrix,
            [f"{k} {name}" for k, name in zip(per_bin.bin, per_bin.name)],
            list(TYPES),
            "Expert selection per bin",
            "test R²",
            annotations=cell_text,
            xlabel="expert type (★ chosen on validation; – not trained)",
            ylabel="physical bin",
        ),
        "Test R² for every bin and expert type; ★ marks the type chosen on validation.",
    )
    rep.figure(
        "ceiling_oracle_hybrid_vs_baseline.png",
        bar(
            list(overall.method),
            list(overall.r2),
            "test R²",
            "Oracle-Hybrid vs baselines",
            colors=[method_colour(m) for m in overall.method],
            hline=HYBRID_TARGET,
            hline_label=f"decision threshold {HYBRID_TARGET:.2f}",
            annotate=[f"{v:.4f}" for v in overall.r2],
        ),
        "Overall test R² with oracle routing.",
    )
    order = per_bin.sort_values("r2_ridge")
    gains = order.delta_r2_vs_ridge.to_numpy()
    rep.figure(
        "ceiling_perbin_delta_r2.png",
        bar(
            [f"{b}\n{name}" for b, name in zip(order.bin, order.name)],
            gains,
            "ΔR² best expert vs Ridge",
            "Per-bin gain over Ridge",
            colors=[GAIN if v > 0 else LOSS if v < 0 else GREY for v in gains],
            hline=GAIN_TARGET,
            hline_label=f"+{GAIN_TARGET} (verdict line)",
            annotate=[f"{v:+.3f}\n{t}" for v, t in zip(gains, np.asarray(choice)[order.index])],
            legend={"gain": GAIN, "loss": LOSS, "no change (Ridge chosen)": GREY},
            xlabel="physical bin, from hardest to easiest for Ridge",
            figsize=(7.5, 5.2),
        ),
        "ΔR² of each bin's chosen expert (named above the bar) over its Ridge expert, hardest bins first.",
    )
    rep.figure(
        "ceiling_hybrid_pred_vs_true.png",
        pred_vs_true(
            y,
            hybrid,
            r2(y, hybrid),
            phys_bin,
            "physical bin",
            "Oracle-Hybrid: predicted vs true",
            categories=[f"{k} {name}" for k, name in enumerate(bins.PHYS_BIN_NAMES)],
        ),
        "Oracle-Hybrid predictions against true log g, coloured by physical bin.",
    )
