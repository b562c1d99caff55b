"""LOGG-SNR-ORACLE-01: how much do 4 SNR-binned Ridge experts gain over one global Ridge
when each test spectrum is routed to the expert of its true SNR bin?

Experts come from the streamed fit (:mod:`moe.experts`), so ``--n-train`` may go to the
full 1M. With several seeds, the test split is re-noised with each seed; the headline
Delta R^2 gets mean +- std and a paired bootstrap 95% CI.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moe.data import bins
from moe.experiments.common import (
    DataSummary,
    Experiment,
    ExperimentSettings,
    Report,
    Results,
    Verdict,
    bootstrap_delta_r2,
    seed_mean_std,
)
from moe.experts.cache import load_or_fit
from moe.experts.evaluate import oracle_predictions, regression_metrics
from moe.experts.groups import FAMILY_SIZES
from moe.plots import bar, delta_r2_column, grouped_bar, method_colour, pred_vs_true

EXPERIMENT_ID = "LOGG-SNR-ORACLE-01"
GAIN_THRESHOLD = 0.02
HYPOTHESIS = (
    "H1: splitting by SNR has headroom, oracle Delta R^2 >= 0.02 over one global model; below it MoE is not "
    "worth it, turn to whitening / conditional models (002: «Oracle ΔR² ≥ 0.02（相对 Global 单模型）»)"
)
GLOBAL = "Global Ridge"
ORACLE = f"Oracle SNR-MoE ({FAMILY_SIZES['snr']} experts)"
FAMILIES = ("global", "phys", "snr")  # the expert families fitted (one bundle with the gates' fits)
USES = ("global", "snr")  # the families the oracle routes: only these must meet --min-samples
TITLE = "Oracle SNR-binned Ridge experts vs global Ridge"
QUESTION = (
    f"Does splitting the Ridge experts by SNR ({bins.SNR_BIN_RULE}) leave headroom: "
    f"is the oracle-routed R^2 at least {GAIN_THRESHOLD} above one global Ridge?"
)


@dataclass
class SnrOracleResults(Results):
    """Every number of the SNR-oracle report (N test spectra)."""

    headline: pd.DataFrame  # global, oracle and their Delta R^2 over the whole test split
    slices: pd.DataFrame  # global vs oracle overall ("all") and per SNR bin
    alphas: pd.DataFrame  # Ridge alpha and training rows per expert
    delta_r2: list[float]  # oracle - global per seed
    delta_ci: tuple[float, float]  # paired bootstrap 95% CI of the Delta R^2
    log_g: np.ndarray  # [N] true test log g
    snr: np.ndarray  # [N] test SNR (first seed)
    oracle_pred: np.ndarray  # [N] oracle prediction, first seed's test noise
    oracle_r2: float  # R^2 of ``oracle_pred``


def _slice_row(name: str, n_train: int, log_g: np.ndarray, pred_global: np.ndarray, pred_oracle: np.ndarray) -> dict:
    """Global vs oracle metrics on one slice of the test split."""
    on_global, on_oracle = regression_metrics(log_g, pred_global), regression_metrics(log_g, pred_oracle)
    return {
        "slice": name,
        "n_train": n_train,
        "n_test": on_global["n"],
        "r2_global": on_global["r2"],
        "r2_oracle": on_oracle["r2"],
        "delta_r2": on_oracle["r2"] - on_global["r2"],
        "mae_global": on_global["mae"],
        "mae_oracle": on_oracle["mae"],
        "rmse_global": on_global["rmse"],
        "rmse_oracle": on_oracle["rmse"],
    }


def compute(settings: ExperimentSettings) -> SnrOracleResults:
    """Route every test spectrum to its SNR bin's expert: on the shared pre-noised test split (the one every
    command and report scores), then once more per further seed on that seed's test noise; no file is written."""
    started = time.time()
    runs = []
    for i, seed in enumerate(settings.seeds):
        dm = settings.datamodule() if i == 0 else settings.datamodule(test_seed=seed)
        bundle = load_or_fit(dm, settings.fit_config(FAMILIES, USES), progress=settings.progress)
        runs.append(oracle_predictions(dm, bundle, "test", ("global", "snr")))
    first = runs[0]
    log_g = first.y
    delta_r2 = [
        regression_metrics(log_g, r.pred["snr"])["r2"] - regression_metrics(log_g, r.pred["global"])["r2"] for r in runs
    ]
    delta_ci = bootstrap_delta_r2(log_g, [r.pred["snr"] for r in runs], [r.pred["global"] for r in runs])
    pred_global = np.mean([r.pred["global"] for r in runs], 0)
    pred_oracle = np.mean([r.pred["snr"] for r in runs], 0)
    snr_family, global_family = bundle.family("snr"), bundle.family("global")
    n_train = snr_family.n_train
    n_rows = [int(n_train.sum()), *map(int, n_train)]  # training rows of the global expert, then of each bin's
    slices = [
        _slice_row(name, n, log_g[rows], pred_global[rows], pred_oracle[rows])
        for (name, rows), n in zip(bins.snr_slices(first.snr_bin, prefix="SNR "), n_rows)
    ]
    overall = slices[0]
    headline = pd.DataFrame(
        [
            {"model": GLOBAL, "r2": overall["r2_global"], "mae": overall["mae_global"], "rmse": overall["rmse_global"]},
            {"model": ORACLE, "r2": overall["r2_oracle"], "mae": overall["mae_oracle"], "rmse": overall["rmse_oracle"]},
            {"model": "Delta R2", "r2": float(np.mean(delta_r2)), "mae": np.nan, "rmse": np.nan},
        ]
    )
    alphas = pd.DataFrame(
        {
            "expert": ["global"] + snr_family.names,
            "alpha": [global_family.alpha[0], *snr_family.alpha],
            "n_train": [int(global_family.n_train[0]), *map(int, n_train)],
        }
    )
    return SnrOracleResults(
        headline=headline,
        slices=pd.DataFrame(slices),
        alphas=alphas,
        delta_r2=delta_r2,
        delta_ci=delta_ci,
        log_g=log_g,
        snr=first.snr,
        oracle_pred=first.pred["snr"],
        oracle_r2=regression_metrics(log_g, first.pred["snr"])["r2"],
        data=DataSummary.of(dm),
        compute_s=time.time() - started,
    )


def verdicts(results: SnrOracleResults) -> list[Verdict]:
    return [
        Verdict(
            f"Oracle SNR split gains Delta R2 >= {GAIN_THRESHOLD} over global?",
            float(np.mean(results.delta_r2)),
            ">=",
            GAIN_THRESHOLD,
            "headroom: continue to a deployable SNR gate",
            "no headroom: SNR-binned experts are not worth it; try whitening or SNR-conditional models",
            ci=results.delta_ci,
            hypothesis=HYPOTHESIS,
        )
    ]


def sections(rep: Report, results: SnrOracleResults, settings: ExperimentSettings) -> None:
    """The headline, the tables and the figures."""
    lo, hi = results.delta_ci
    rep.text(
        "Headline",
        f"Delta R^2 (oracle - global) = {seed_mean_std(results.delta_r2)} over {len(results.delta_r2)} seed(s); "
        f"paired bootstrap 95% CI [{lo:+.4f}, {hi:+.4f}].",
    )
    rep.table("headline", results.headline, "Global vs oracle SNR-MoE on the test split")
    rep.table("per_bin", results.slices, "Per SNR bin (oracle routing: each spectrum to its own bin's expert)")
    rep.table("alphas", results.alphas, "Ridge alpha per expert (picked on the pre-noised validation split)")
    _figures(rep, results, settings.seeds[0])


def _figures(rep: Report, results: SnrOracleResults, first_seed: int) -> None:
    overall, per_bin = results.slices.iloc[0], results.slices.iloc[1:]
    rep.figure(
        "snr_oracle_moe_comparison.png",
        bar(
            [GLOBAL, ORACLE],
            [overall.r2_global, overall.r2_oracle],
            "test R²",
            f"Oracle vs global (ΔR² = {np.mean(results.delta_r2):+.4f})",
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
            results.log_g,
            results.oracle_pred,
            results.oracle_r2,
            results.snr,
            "SNR",
            f"{ORACLE}: predicted vs true",
            log_color=True,
        ),
        f"Predicted against true log g (seed {first_seed}), coloured by SNR (log scale).",
    )
    rep.figure(
        "snr_oracle_moe_delta_heatmap.png",
        delta_r2_column(
            list(per_bin.slice),
            per_bin.delta_r2,
            per_bin.r2_global,
            per_bin.r2_oracle,
            per_bin.n_test,
            "oracle − global",
            "ΔR² of the SNR oracle by bin",
        ),
        "ΔR² of the oracle SNR experts over the global Ridge in each SNR bin (R² global → oracle, test count).",
    )


class SnrOracle(Experiment):
    """LOGG-SNR-ORACLE-01 in the experiment template."""

    name = "snr-oracle"
    hypothesis = "Q1: SNR-binned experts leave headroom under oracle routing (002: «SNR 分域是否有 headroom？»)"
    experiment_id = EXPERIMENT_ID
    title = TITLE
    question = QUESTION
    compute = staticmethod(compute)
    verdicts = staticmethod(verdicts)
    sections = staticmethod(sections)

    @staticmethod
    def headline(results: SnrOracleResults) -> pd.DataFrame:
        return results.headline

    @staticmethod
    def config(results: SnrOracleResults, settings: ExperimentSettings) -> dict:
        return {"fit": settings.fit_config(FAMILIES, USES).key_dict()}


EXPERIMENT = SnrOracle()
