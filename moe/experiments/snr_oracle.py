"""LOGG-SNR-ORACLE-01: how much do 4 SNR-binned Ridge experts gain over one global Ridge
when each test spectrum is routed to the expert of its true SNR bin?

Experts come from the streamed fit (:mod:`moe.experts`), so ``--n-train`` may go to the
full 1M. With several seeds, the test split is re-noised with each seed; the headline
Delta R^2 gets mean +- std and a paired bootstrap 95% CI.
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
    seed_mean_std,
)
from moe.experts.bundle import load_or_fit
from moe.experts.evaluate import oracle_predictions, regression_metrics
from moe.experts.fit import FitConfig
from moe.experts.groups import FAMILY_SIZES
from moe.plots import bar, grouped_bar, heatmap, method_colour, pred_vs_true

EXPERIMENT_ID = "LOGG-SNR-ORACLE-01"
GAIN_THRESHOLD = 0.02
GLOBAL = "Global Ridge"
ORACLE = f"Oracle SNR-MoE ({FAMILY_SIZES['snr']} experts)"
FIT = FitConfig(families=("global", "phys", "snr"))


def run(settings: ExperimentSettings) -> dict:
    rep = Report(
        settings.out or "reports/snr-oracle",
        EXPERIMENT_ID,
        "Oracle SNR-binned Ridge experts vs global Ridge",
        f"Does splitting the Ridge experts by SNR ({bins.SNR_BIN_RULE}) leave headroom: "
        f"is the oracle-routed R^2 at least {GAIN_THRESHOLD} above one global Ridge?",
    )
    runs = []
    for seed in settings.seeds:
        dm = settings.datamodule(test_seed=seed)
        bundle = load_or_fit(dm, FIT, progress=settings.progress)
        runs.append(oracle_predictions(dm, bundle, "test", ("global", "snr")))
    first = runs[0]
    y = first.y
    deltas = [regression_metrics(y, r.pred["snr"])["r2"] - regression_metrics(y, r.pred["global"])["r2"] for r in runs]
    lo, hi = bootstrap_delta_r2(y, [r.pred["snr"] for r in runs], [r.pred["global"] for r in runs])
    n_train = bundle.families["snr"].n_train
    pred_global = np.mean([r.pred["global"] for r in runs], 0)
    pred_oracle = np.mean([r.pred["snr"] for r in runs], 0)

    rows = []
    slices = [("all", None, np.ones_like(y, dtype=bool))]
    slices += [(f"SNR {name}", i, first.snr_bin == i) for i, name in enumerate(bins.SNR_BIN_NAMES)]
    for name, index, mask in slices:
        on_global = regression_metrics(y[mask], pred_global[mask])
        on_oracle = regression_metrics(y[mask], pred_oracle[mask])
        rows.append(
            {
                "slice": name,
                "n_train": int(n_train.sum() if index is None else n_train[index]),
                "n_test": on_global["n"],
                "r2_global": on_global["r2"],
                "r2_oracle": on_oracle["r2"],
                "delta_r2": on_oracle["r2"] - on_global["r2"],
                "mae_global": on_global["mae"],
                "mae_oracle": on_oracle["mae"],
                "rmse_global": on_global["rmse"],
                "rmse_oracle": on_oracle["rmse"],
            }
        )
    table = pd.DataFrame(rows)
    overall = table.iloc[0]
    headline = pd.DataFrame(
        [
            {"model": GLOBAL, "r2": overall.r2_global, "mae": overall.mae_global, "rmse": overall.rmse_global},
            {"model": ORACLE, "r2": overall.r2_oracle, "mae": overall.mae_oracle, "rmse": overall.rmse_oracle},
            {"model": "Delta R2", "r2": float(np.mean(deltas)), "mae": np.nan, "rmse": np.nan},
        ]
    )
    alphas = pd.DataFrame(
        {
            "expert": ["global"] + bundle.families["snr"].names,
            "alpha": [bundle.families["global"].alpha[0], *bundle.families["snr"].alpha],
            "n_train": [int(bundle.families["global"].n_train[0]), *map(int, n_train)],
        }
    )
    verdicts = [
        Verdict(
            f"Oracle SNR split gains Delta R2 >= {GAIN_THRESHOLD} over global?",
            float(np.mean(deltas)),
            ">=",
            GAIN_THRESHOLD,
            "headroom: continue to a deployable SNR gate",
            "no headroom: SNR-binned experts are not worth it; try whitening or SNR-conditional models",
        )
    ]
    rep.verdicts(verdicts)
    rep.text(
        "Headline",
        f"Delta R^2 (oracle - global) = {seed_mean_std(deltas)} over {len(deltas)} seed(s); "
        f"paired bootstrap 95% CI [{lo:+.4f}, {hi:+.4f}].",
    )
    rep.table("headline", headline, "Global vs oracle SNR-MoE on the test split")
    rep.table("per_bin", table, "Per SNR bin (oracle routing: each spectrum to its own bin's expert)")
    rep.table("alphas", alphas, "Ridge alpha per expert (picked on the pre-noised validation split)")

    per_bin = table.iloc[1:]
    rep.figure(
        "snr_oracle_moe_comparison.png",
        bar(
            [GLOBAL, ORACLE],
            [overall.r2_global, overall.r2_oracle],
            "test R²",
            f"Oracle vs global (ΔR² = {np.mean(deltas):+.4f})",
            colors=[method_colour(GLOBAL), method_colour(ORACLE)],
            hline=overall.r2_global + GAIN_THRESHOLD,
            hline_label=f"decision line: global + {GAIN_THRESHOLD}",
        ),
        "Overall test R² of the global Ridge and the oracle-routed SNR experts.",
    )
    rep.figure(
        "snr_oracle_moe_perbin_r2.png",
        grouped_bar(
            list(per_bin.slice),
            {GLOBAL: per_bin.r2_global, ORACLE: per_bin.r2_oracle},
            "test R² within the bin",
            "Per SNR bin",
            counts=list(per_bin.n_test),
            xlabel=f"SNR bin ({bins.SNR_BIN_RULE})",
        ),
        "R² inside each SNR bin; n = test spectra in the bin.",
    )
    rep.figure(
        "snr_oracle_moe_pred_vs_true.png",
        pred_vs_true(
            y,
            first.pred["snr"],
            regression_metrics(y, first.pred["snr"])["r2"],
            first.snr,
            "SNR",
            f"{ORACLE}: predicted vs true",
            log_color=True,
        ),
        f"Predicted against true log g (seed {settings.seeds[0]}), coloured by SNR (log scale).",
    )
    cell_text = np.array(
        [
            [f"ΔR² {d:+.3f}\n{g:.3f} → {o:.3f}\nn = {n}"]
            for d, g, o, n in zip(per_bin.delta_r2, per_bin.r2_global, per_bin.r2_oracle, per_bin.n_test)
        ],
        dtype=object,
    )
    rep.figure(
        "snr_oracle_moe_delta_heatmap.png",
        heatmap(
            per_bin[["delta_r2"]].to_numpy(),
            list(per_bin.slice),
            ["oracle − global"],
            "ΔR² of the SNR oracle by bin",
            "ΔR² (oracle − global)",
            annotations=cell_text,
            cmap="RdBu",
            center=0.0,
        ),
        "ΔR² of the oracle SNR experts over the global Ridge in each SNR bin (R² global → oracle, test count).",
    )
    rep.write(settings, dm, {"fit": FIT.key_dict()})
    return {
        "report": rep.out,
        "headline": headline,
        "verdicts": verdicts,
        "delta_r2": float(np.mean(deltas)),
        "ci": (lo, hi),
    }
