"""LOGG-ERR-BASE-01: does the error vector alone predict log g?

Models on the 1-sigma error vector only: OLS, Ridge (alpha 1e-3 ... 100, standardised) and
LightGBM (100 trees, depth 6, lr 0.1). Sanity checks: a shuffle test (error vectors permuted
among stars of the same SNR bin, labels kept: what survives is what the SNR level explains),
a mask-only test (binary mask of flagged pixels, error > 3x the row median), the aggregate
test (the quality statistics of ``moe.data.quality``) and those statistics' own R^2 for log10 SNR. Feature
importance against wavelength and the share of the top-40 pixels.

About the noise levels 0 / 0.5 / 1: the error vector is the same at every noise level (it
is the 1-sigma of the noise, not a draw of it) and standardised models are blind to its
scale, so the error-only R^2 does not depend on the level; what changes is the SNR, hence
the shuffle test's groups and the SNR that the statistics predict. Both are reported per level.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.linalg as sla
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from moe.data import bins
from moe.data.check import ridge_sweep
from moe.data.quality import QUALITY_NAMES, quality_stats
from moe.experiments.common import (
    ExperimentSettings,
    Report,
    Verdict,
    load_splits,
    seed_mean_std,
)
from moe.experts.nonlinear import fit_lgbm
from moe.experts.scores import r2, regression_metrics
from moe.features.physics import LINES
from moe.plots import PALETTE, SAND, bar, importance_hist, importance_spectrum

EXPERIMENT_ID = "LOGG-ERR-BASE-01"
RIDGE_ALPHAS = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
NOISE_LEVELS = (0.0, 0.5, 1.0)
LGBM_PARAMS = {"n_estimators": 100, "max_depth": 6, "learning_rate": 0.1}
LEAK_THRESHOLD = 0.05
TOP_K = 40
N_STATS = len(QUALITY_NAMES)
AGGREGATES = f"{N_STATS} aggregate statistics"
TELLURIC_BANDS = ((7160.0, 7340.0), (7594.0, 7700.0), (8130.0, 8350.0))  # H2O, O2 A band, H2O [Å]
SPLITS = ("train", "val", "test")


def _ridge_sweep(z_train, y_train, z_by_split: dict[str, np.ndarray], alphas=RIDGE_ALPHAS) -> tuple[dict, np.ndarray]:
    """Standardised Ridge for every alpha from one X^T X: predictions per split [N, A] and coefs [A, D]."""
    model = ridge_sweep(z_train, y_train, alphas)
    return {k: model.predict(z) for k, z in z_by_split.items()}, model.coef_


def _ols(z_train, y_train, z_by_split: dict[str, np.ndarray]) -> dict:
    """OLS via the normal equations (minimum-norm least squares on Z^T Z, which handles rank deficiency)."""
    centred = z_train - z_train.mean(0)
    coef = sla.lstsq(
        centred.T @ centred, centred.T @ (y_train - y_train.mean()), lapack_driver="gelsy", check_finite=False
    )[0]
    intercept = y_train.mean() - z_train.mean(0) @ coef
    return {k: z @ coef + intercept for k, z in z_by_split.items()}


def _errors_only(y_test: np.ndarray, pred_test: np.ndarray) -> dict:
    """MAE and RMSE on the test split (the R^2 columns are per split)."""
    m = regression_metrics(y_test, pred_test)
    return {"mae": m["mae"], "rmse": m["rmse"]}


def _shuffled_within(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation of row indices that only swaps rows of the same group."""
    perm = np.arange(len(groups))
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        perm[idx] = rng.permutation(idx)
    return perm


def run(settings: ExperimentSettings) -> dict:
    dm = settings.datamodule()
    rep = Report(
        settings.out or "reports/leakage",
        EXPERIMENT_ID,
        "Error-vector leakage audit",
        "Does the per-pixel error vector alone predict log g (leakage), and do its "
        f"{AGGREGATES} (the gate's quality features) stay blind to log g while keeping the SNR?",
    )
    train, val, test = load_splits(dm, settings)
    data = dict(zip(SPLITS, (train, val, test)))
    wave = dm.wave
    scaler = StandardScaler().fit(train.error.astype(np.float64))
    z = {k: scaler.transform(a.error.astype(np.float64)) for k, a in data.items()}
    y = {k: a.log_g for k, a in data.items()}

    rows = []
    ols = _ols(z["train"], y["train"], z)
    rows.append({"model": "OLS", **{f"r2_{k}": r2(y[k], ols[k]) for k in y}, **_errors_only(y["test"], ols["test"])})
    ridge_preds, ridge_coefs = _ridge_sweep(z["train"], y["train"], z)
    for i, a in enumerate(RIDGE_ALPHAS):
        rows.append(
            {
                "model": f"Ridge a={a:g}",
                **{f"r2_{k}": r2(y[k], ridge_preds[k][:, i]) for k in y},
                **_errors_only(y["test"], ridge_preds["test"][:, i]),
            }
        )
    best = int(np.argmax([r2(y["val"], ridge_preds["val"][:, i]) for i in range(len(RIDGE_ALPHAS))]))
    best_alpha = RIDGE_ALPHAS[best]
    lgbm_r2, lgbm_importance, lgbm_pred = [], [], None
    for seed in settings.seeds:
        model = fit_lgbm(
            train.error, y["train"], seed, settings.lgbm_device, params=LGBM_PARAMS, importance_type="gain"
        )
        pred_test = model.predict(test.error)
        lgbm_r2.append(r2(y["test"], pred_test))
        lgbm_importance.append(model.feature_importances_.astype(float))
        if lgbm_pred is None:
            lgbm_pred = {"train": model.predict(train.error), "val": model.predict(val.error), "test": pred_test}
    rows.append(
        {
            "model": "LightGBM",
            **{f"r2_{k}": r2(y[k], lgbm_pred[k]) for k in y},
            **_errors_only(y["test"], lgbm_pred["test"]),
            "note": f"test R2 over seeds {seed_mean_std(lgbm_r2)}",
        }
    )
    models = pd.DataFrame(rows).fillna("")
    best_error_r2 = max(float(models["r2_test"].max()), 0.0)

    # ---- sanity checks --------------------------------------------------------------------------
    sanity = []
    ridge_best = Ridge(alpha=best_alpha, solver="cholesky")
    for level in NOISE_LEVELS:
        snr_train = train.snr * dm.noise_level / level if level > 0 else np.full_like(train.snr, np.inf)
        snr_test = test.snr * dm.noise_level / level if level > 0 else np.full_like(test.snr, np.inf)
        snr_groups = bins.snr_bin(snr_train)
        shuffled_r2 = []
        for seed in settings.seeds:
            shuffled = train.error[_shuffled_within(snr_groups, np.random.default_rng(seed))].astype(np.float64)
            shuffled_scaler = StandardScaler().fit(shuffled)
            ridge_best.fit(shuffled_scaler.transform(shuffled), y["train"])
            shuffled_r2.append(
                r2(y["test"], ridge_best.predict(shuffled_scaler.transform(test.error.astype(np.float64))))
            )
        sanity.append(
            {
                "check": f"shuffle within SNR bins (noise {level:g})",
                "noise_level": level,
                "target": "log g",
                "r2_test": float(np.mean(shuffled_r2)),
                "seeds": seed_mean_std(shuffled_r2),
                "groups": " / ".join(
                    f"{bins.SNR_BIN_NAMES[g]}:{int((snr_groups == g).sum())}" for g in np.unique(snr_groups)
                ),
            }
        )
        if level > 0:
            stats_train, stats_test = quality_stats(train.error), quality_stats(test.error)
            stats_scaler = StandardScaler().fit(stats_train)
            snr_model = Ridge(alpha=1.0).fit(stats_scaler.transform(stats_train), np.log10(snr_train))
            sanity.append(
                {
                    "check": f"{AGGREGATES} -> log10 SNR (noise {level:g})",
                    "noise_level": level,
                    "target": "log10 SNR",
                    "r2_test": r2(np.log10(snr_test), snr_model.predict(stats_scaler.transform(stats_test))),
                    "seeds": "",
                    "groups": "",
                }
            )
    mask_train = (train.error > 3 * np.median(train.error, 1, keepdims=True)).astype(np.float64)
    mask_test = (test.error > 3 * np.median(test.error, 1, keepdims=True)).astype(np.float64)
    mask_scaler = StandardScaler().fit(mask_train)
    mask_model = Ridge(alpha=best_alpha).fit(mask_scaler.transform(mask_train), y["train"])
    r2_mask = r2(y["test"], mask_model.predict(mask_scaler.transform(mask_test)))
    sanity.append(
        {
            "check": "mask-only (flagged pixels: error > 3x row median)",
            "noise_level": np.nan,
            "target": "log g",
            "r2_test": r2_mask,
            "seeds": "",
            "groups": f"{mask_train.mean() * 100:.1f}% of pixels flagged",
        }
    )
    stats = {k: quality_stats(a.error) for k, a in data.items()}
    stats_scaler = StandardScaler().fit(stats["train"])
    stats_preds, _ = _ridge_sweep(
        stats_scaler.transform(stats["train"]), y["train"], {k: stats_scaler.transform(v) for k, v in stats.items()}
    )
    stats_alpha = int(np.argmax([r2(y["val"], stats_preds["val"][:, i]) for i in range(len(RIDGE_ALPHAS))]))
    r2_aggregates = r2(y["test"], stats_preds["test"][:, stats_alpha])
    sanity.append(
        {
            "check": f"{AGGREGATES} -> log g",
            "noise_level": np.nan,
            "target": "log g",
            "r2_test": r2_aggregates,
            "seeds": "",
            "groups": "",
        }
    )
    sanity_df = pd.DataFrame(sanity)

    # ---- importance -------------------------------------------------------------------------------
    importance = {"Ridge": np.abs(ridge_coefs[best]), "LightGBM": np.mean(lgbm_importance, 0)}
    top_share = {
        name: float(np.sort(v)[::-1][:TOP_K].sum() / v.sum()) if v.sum() > 0 else float("nan")
        for name, v in importance.items()
    }
    top = pd.DataFrame(
        [
            {"model": label, f"top{TOP_K}_share": top_share[name], "uniform_share": TOP_K / len(wave)}
            for name, label in (("Ridge", "Ridge |coef|"), ("LightGBM", "LightGBM gain"))
        ]
    )

    shuffle_r2_at_1 = float(
        sanity_df.loc[sanity_df.check.str.startswith("shuffle") & (sanity_df.noise_level == 1.0), "r2_test"].iloc[0]
    )
    verdicts = [
        Verdict(
            "Error-only R2 below the leakage line?",
            best_error_r2,
            "<",
            LEAK_THRESHOLD,
            "no leakage: the error vector may feed the gate as it is",
            "leakage: the error vector predicts log g; de-leak it (use aggregate statistics) before any gate sees it",
        ),
        Verdict(
            "Aggregate statistics blind to log g?",
            r2_aggregates,
            "<",
            LEAK_THRESHOLD,
            f"the {AGGREGATES} are safe quality features",
            "even the aggregates leak log g",
        ),
        Verdict(
            "Shuffle within SNR bins destroys the signal? (R2 at noise 1)",
            shuffle_r2_at_1,
            "<",
            LEAK_THRESHOLD,
            "the leak rides on wavelength-aligned, star-specific detail, not on the SNR level",
            "the SNR level itself carries log g",
        ),
    ]
    rep.verdicts(verdicts)
    rep.table(
        "models",
        models,
        f"Error-only models (input: the {len(wave)}-pixel error vector)",
        f"Train {len(train.log_g)} / val {len(val.log_g)} / test {len(test.log_g)} spectra. "
        f"Best Ridge alpha on val: {best_alpha:g}. "
        "The error vector does not depend on the noise level (see the module docstring).",
    )
    rep.table("sanity_checks", sanity_df, "Sanity checks")
    rep.table("importance_top40", top, f"How concentrated is the importance? (share of the top-{TOP_K} pixels)")

    model_type = ["Ridge" if m.startswith("Ridge") else m for m in models["model"]]
    rep.figure(
        "logg_err_base_01_r2_models.png",
        bar(
            list(models["model"]),
            list(models["r2_test"]),
            "test R² (log g from the error vector)",
            "Error-only models",
            colors=[PALETTE[t] for t in model_type],
            hline=LEAK_THRESHOLD,
            hline_label=f"leakage line R² = {LEAK_THRESHOLD}",
            legend={t: PALETTE[t] for t in dict.fromkeys(model_type)},
        ),
        "Test R² of log g predicted from the error vector alone, per model.",
    )
    rep.figure(
        "logg_err_base_01_importance_spectrum.png",
        importance_spectrum(
            wave,
            importance,
            {"Ridge": f"|coef| (alpha {best_alpha:g})", "LightGBM": "gain"},
            [c for line in LINES for c in line.centres],
            TELLURIC_BANDS,
            "Which pixels of the error vector predict log g",
        ),
        f"Feature importance against wavelength: |standardised Ridge coefficient| (alpha {best_alpha:g}) "
        "and LightGBM gain.",
    )
    rep.figure(
        "logg_err_base_01_importance_hist.png",
        importance_hist(importance, top_share, TOP_K),
        f"Distribution of per-pixel importance (Ridge |coefficient|, LightGBM gain) and the share held by the "
        f"top-{TOP_K} pixels.",
    )
    best_type = model_type[int(np.argmax(models["r2_test"].to_numpy(float)))]
    rep.figure(
        "logg_err_base_01_sanity_checks.png",
        _sanity_figure(best_error_r2, best_type, sanity_df),
        "Sanity checks: test R² of each variant (log g, or log10 SNR where the bar says so).",
    )
    rep.write(settings, dm, {"best_ridge_alpha": best_alpha, "lgbm": LGBM_PARAMS, "n_train_rows": len(train.log_g)})
    return {
        "report": rep.out,
        "headline": models[["model", "r2_train", "r2_val", "r2_test"]],
        "verdicts": verdicts,
        "error_only_r2": best_error_r2,
        "aggregate_r2": r2_aggregates,
    }


def _sanity_figure(best_error_r2: float, best_type: str, sanity: pd.DataFrame):
    labels = ["error vector (best model)"] + [c.replace(AGGREGATES, "aggregates") for c in sanity["check"]]
    target_colour = {"log g": PALETTE["Ridge"], "log10 SNR": SAND}
    colours = [PALETTE[best_type]] + [target_colour[t] for t in sanity["target"]]
    return bar(
        labels,
        [best_error_r2, *sanity["r2_test"]],
        "test R²",
        "Leakage sanity checks",
        colors=colours,
        hline=LEAK_THRESHOLD,
        hline_label=f"leakage line R² = {LEAK_THRESHOLD}",
        legend={
            f"best error-only model ({best_type}; R² floored at 0)": PALETTE[best_type],
            "Ridge -> log g": target_colour["log g"],
            "Ridge -> log10 SNR": target_colour["log10 SNR"],
        },
        wrap=14,
        figsize=(10, 5.2),
    )
