"""Oracle-routed evaluation of expert families on a pre-noised split.

Each sample is sent to the expert of its true group (global / physical bin / SNR bin /
cell), for one label of the bundle (log g by default). Reports R^2, MAE, RMSE overall and per group
with counts, and the spread of the z-scores ``(prediction - label) / sqrt(Var_k)`` where ``Var_k = noise_level^2 sum_i (w_ki error_i)^2``
is the expert's predictive variance under the noise. The spread exceeds 1 because the
experts are biased (the variance covers the noise only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from moe.data import bins
from moe.data.folder import SpectraFolder
from moe.experts import groups
from moe.experts.bundle import ExpertBundle, fit_bundle
from moe.experts.scores import regression_metrics


@dataclass
class OracleResult:
    """Per-sample oracle predictions of each family on one split."""

    y: np.ndarray  # [N] the label's true values
    snr: np.ndarray  # [N]
    snr_bin: np.ndarray  # [N]
    phys_bin: np.ndarray  # [N]
    pred: dict[str, np.ndarray]  # family -> [N]
    var: dict[str, np.ndarray]  # family -> [N] predictive variance of the routed expert


def oracle_predictions(
    folder: SpectraFolder,
    bundle: ExpertBundle,
    split: str = "test",
    families: tuple[str, ...] | None = None,
    label: str = "log_g",
) -> OracleResult:
    """One pass over ``split``: each family's oracle-routed prediction of ``label`` and predictive variance (by
    default every family fitted for ``label``)."""
    families = families or tuple(f for f in bundle.family_names if label in bundle.family_labels(f))
    experts = {f: bundle.experts(f, label).double() for f in families}
    ys, snr, sb, pb, preds, vars_ = [], [], [], [], {f: [] for f in families}, {f: [] for f in families}
    with torch.no_grad():
        for batch in folder.stream(split, batch_size=1024, labels=bundle.labels):
            flux, err = batch["flux"].double(), batch["error"].double()
            for f, module in experts.items():
                g = groups.group_of(f, batch["phys_bin"], batch["snr_bin"])
                rows = torch.arange(len(g))
                preds[f].append(module(flux)[rows, g, 0].numpy())
                vars_[f].append(module.predictive_variance(err, folder.noise_level)[rows, g, 0].numpy())
            ys.append(batch[label].double().numpy())
            snr.append(batch["snr"].double().numpy())
            sb.append(batch["snr_bin"].numpy())
            pb.append(batch["phys_bin"].numpy())
    cat = np.concatenate
    return OracleResult(
        cat(ys),
        cat(snr),
        cat(sb),
        cat(pb),
        {f: cat(v) for f, v in preds.items()},
        {f: cat(v) for f, v in vars_.items()},
    )


def oracle_table(res: OracleResult) -> pd.DataFrame:
    """Rows: family x slice (all, each SNR bin, each physical bin); columns n, r2, mae, rmse."""
    rows = []
    slices = bins.snr_slices(res.snr_bin, prefix="SNR ")
    slices += [(bins.PHYS_BIN_NAMES[k], res.phys_bin == k) for k in range(bins.N_PHYS_BINS)]
    for fam, pred in res.pred.items():
        for name, m in slices:
            rows.append({"experts": fam, "slice": name, **regression_metrics(res.y[m], pred[m])})
    return pd.DataFrame(rows)


def zscore_table(res: OracleResult) -> pd.DataFrame:
    """Spread of (pred - y) / sigma_k per family and SNR bin: std and the 68% half-width of |z|."""
    rows = []
    for fam, pred in res.pred.items():
        z = (pred - res.y) / np.sqrt(np.maximum(res.var[fam], 1e-300))
        for name, m in bins.snr_slices(res.snr_bin):
            if not m.any():
                continue
            rows.append(
                {
                    "experts": fam,
                    "snr_bin": name,
                    "n": int(m.sum()),
                    "z_std": float(z[m].std()),
                    "z_68": float(np.percentile(np.abs(z[m]), 68.27)),
                    "median_sigma": float(np.median(np.sqrt(res.var[fam][m]))),
                }
            )
    return pd.DataFrame(rows)


def compare_noise_modes(folder: SpectraFolder, base, draws: int = 4, progress: bool = True) -> pd.DataFrame:
    """Fit the families three ways -- noise-marginalised, one draw per spectrum, ``draws`` draws --
    and give oracle R^2 on val (where alpha was chosen) and test for each. ``base``: a FitConfig."""
    rows = []
    for mode, label in (
        ("marginal", "noise-marginalised"),
        ("single", "1 draw / spectrum"),
        ("augment", f"{draws} draws / spectrum"),
    ):
        cfg = replace(base, noise_mode=mode, n_draws=draws)
        t = time.perf_counter()
        bundle = fit_bundle(folder, cfg, progress)
        seconds = time.perf_counter() - t
        for split in ("val", "test"):
            res = oracle_predictions(folder, bundle, split)
            for fam, pred in res.pred.items():
                rows.append(
                    {
                        "training": label,
                        "split": split,
                        "experts": fam,
                        "r2": regression_metrics(res.y, pred)["r2"],
                        "fit_s": seconds,
                    }
                )
    return pd.DataFrame(rows)
