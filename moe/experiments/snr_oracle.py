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
from moe.experiments.common import ExperimentSettings, Report, Verdict, bootstrap_delta_r2, metrics, seed_mean_std
from moe.experts.bundle import load_or_fit
from moe.experts.evaluate import oracle_predictions
from moe.experts.fit import FitConfig
from moe.plots import bar, grouped_bar, heatmap, pred_vs_true

EXPERIMENT_ID = "LOGG-SNR-ORACLE-01"
GAIN_THRESHOLD = 0.02


def run(settings: ExperimentSettings) -> dict:
    rep = Report(settings.out or "reports/snr-oracle", EXPERIMENT_ID, "Oracle SNR-binned Ridge experts vs global Ridge",
                 "Does splitting the Ridge experts by SNR (X <= 2 < L <= 4 < M <= 7 < H) leave headroom: "
                 f"is the oracle-routed R^2 at least {GAIN_THRESHOLD} above one global Ridge?")
    runs = []
    for seed in settings.seeds:
        dm = settings.datamodule(test_seed=seed)
        bundle = load_or_fit(dm, FitConfig(families=("global", "phys", "snr")), progress=settings.progress)
        runs.append(oracle_predictions(dm, bundle, "test", ("global", "snr")))
    res = runs[0]
    y = res.y
    deltas = [metrics(y, r.pred["snr"])["r2"] - metrics(y, r.pred["global"])["r2"] for r in runs]
    lo, hi = bootstrap_delta_r2(y, [r.pred["snr"] for r in runs], [r.pred["global"] for r in runs])
    n_train = bundle.families["snr"].n_train

    rows = []
    for name, mask in [("all", np.ones_like(y, dtype=bool))] + [(b, res.snr_bin == i) for i, b in enumerate(bins.SNR_BIN_NAMES)]:
        g = metrics(y[mask], np.mean([r.pred["global"][mask] for r in runs], 0))
        o = metrics(y[mask], np.mean([r.pred["snr"][mask] for r in runs], 0))
        i = bins.SNR_BIN_NAMES.index(name) if name != "all" else None
        rows.append({"slice": name if name == "all" else f"SNR {name}",
                     "n_train": int(n_train.sum() if i is None else n_train[i]), "n_test": g["n"],
                     "r2_global": g["r2"], "r2_oracle": o["r2"], "delta_r2": o["r2"] - g["r2"],
                     "mae_global": g["mae"], "mae_oracle": o["mae"], "rmse_global": g["rmse"], "rmse_oracle": o["rmse"]})
    table = pd.DataFrame(rows)
    headline = pd.DataFrame([{"model": "Global Ridge", "r2": table.r2_global[0], "mae": table.mae_global[0], "rmse": table.rmse_global[0]},
                             {"model": "Oracle SNR-MoE (4 experts)", "r2": table.r2_oracle[0], "mae": table.mae_oracle[0],
                              "rmse": table.rmse_oracle[0]},
                             {"model": "Delta R2", "r2": float(np.mean(deltas)), "mae": np.nan, "rmse": np.nan}])
    alphas = pd.DataFrame({"expert": ["global"] + bundle.families["snr"].names,
                           "alpha": [bundle.families["global"].alpha[0], *bundle.families["snr"].alpha],
                           "n_train": [int(bundle.families["global"].n_train[0]), *map(int, n_train)]})
    verdicts = [Verdict("Oracle SNR split gains Delta R2 >= 0.02 over global?", float(np.mean(deltas)), ">=", GAIN_THRESHOLD,
                        "headroom: continue to a deployable SNR gate (MVP-2.0)",
                        "no headroom: SNR-binned experts are not worth it; go to whitening/conditional models (Gate-4)")]
    rep.verdicts(verdicts)
    rep.text("Headline", f"Delta R^2 (oracle - global) = {seed_mean_std(deltas)} over {len(deltas)} seed(s); "
                         f"paired bootstrap 95% CI [{lo:+.4f}, {hi:+.4f}].")
    rep.table("headline", headline, "Global vs oracle SNR-MoE on the test split")
    rep.table("per_bin", table, "Per SNR bin (oracle routing: each spectrum to its own bin's expert)")
    rep.table("alphas", alphas, "Ridge alpha per expert (picked on the pre-noised validation split)")

    rep.figure("snr_oracle_moe_comparison.png",
               bar(["Global Ridge", "Oracle SNR-MoE"], [table.r2_global[0], table.r2_oracle[0]], "test R²",
                   f"Oracle vs global (ΔR² = {np.mean(deltas):+.4f})", hline=table.r2_global[0] + GAIN_THRESHOLD,
                   hline_label=f"decision line: global + {GAIN_THRESHOLD}", colors=["tab:gray", "tab:blue"]),
               "Overall test R² of the global Ridge and the oracle-routed SNR experts.")
    per = table.iloc[1:]
    rep.figure("snr_oracle_moe_perbin_r2.png",
               grouped_bar(list(per.slice), {"Global Ridge": per.r2_global, "SNR expert (oracle)": per.r2_oracle},
                           "test R² within the bin", "Per SNR bin", counts=list(per.n_test)),
               "R² inside each SNR bin; n = test spectra in the bin.")
    rep.figure("snr_oracle_moe_pred_vs_true.png",
               pred_vs_true(y, res.pred["snr"], res.snr, "SNR", "Oracle SNR-MoE: predicted vs true", log_color=True),
               "Predicted against true log g, coloured by SNR (log scale).")
    ann = np.array([[f"ΔR² {d:+.3f}\n{g:.3f} → {o:.3f}\nn = {n}"] for d, g, o, n in
                    zip(per.delta_r2, per.r2_global, per.r2_oracle, per.n_test)], dtype=object)
    rep.figure("snr_oracle_moe_delta_heatmap.png",
               heatmap(per[["delta_r2"]].to_numpy(), list(per.slice), ["oracle − global"], "ΔR² of the SNR oracle by bin",
                       "ΔR² (oracle − global)", annotations=ann, cmap="RdBu", center=0.0),
               "ΔR² of the oracle SNR experts over the global Ridge in each SNR bin (R² global → oracle, test count).")
    rep.write(settings, dm, {"fit": FitConfig(families=("global", "phys", "snr")).key_dict()})
    return {"report": rep.out, "headline": headline, "verdicts": verdicts, "delta_r2": float(np.mean(deltas)), "ci": (lo, hi)}
