"""Each expert's model-error variance, so that its predictive variance covers more than the noise.

An expert's error on a star is its noise part -- exactly ``noise_level^2 sum_i (w_ki error_i)^2``
-- plus its model error (bias from a linear model of a non-linear sky, label interactions),
which does not shrink with the noise. On the pre-noised validation split the model-error
variance of expert k in SNR bin s is estimated from the stars routed to it (its own group):

    m_ks = max(mean((y - mu_k)^2) - mean(v_k), floor)

with ``v_k`` the noise variance; a (k, s) cell with fewer than ``min_rows`` stars takes
expert k's estimate over all SNR bins. Shapes: N stars, K experts, S = 4 SNR bins.

The gate mixes these terms into each star's spread; its recalibration of that spread lives with the
gates (:mod:`moe.gates.sigma_map`).
"""

from __future__ import annotations

import numpy as np

from moe.data import bins

MIN_ROWS = 20
FLOOR = 1e-6


def model_error_variance(
    y: np.ndarray,
    pred: np.ndarray,
    noise_var: np.ndarray,
    group: np.ndarray,
    snr_bin: np.ndarray,
    min_rows: int = MIN_ROWS,
) -> np.ndarray:
    """Model-error variance [K, S] of K experts from validation stars.

    y [N] truth; pred, noise_var [N, K] every expert's prediction and noise variance;
    group [N] each star's own expert; snr_bin [N].
    """
    y, pred, noise_var = (np.asarray(a, np.float64) for a in (y, pred, noise_var))
    keep = np.isfinite(y) & (np.asarray(group) >= 0)  # stars without labels have no residual
    y, pred, noise_var, group, snr_bin = (
        y[keep],
        pred[keep],
        noise_var[keep],
        np.asarray(group)[keep],
        np.asarray(snr_bin)[keep],
    )
    k_experts = pred.shape[1]
    out = np.full((k_experts, bins.N_SNR_BINS), np.nan)
    rows = np.arange(len(y))
    resid2 = (y - pred[rows, group]) ** 2
    v = noise_var[rows, group]
    pooled_all = max(float(np.mean(resid2 - v)), FLOOR) if len(y) else FLOOR
    for k in range(k_experts):
        own = group == k
        pooled = max(float(np.mean(resid2[own] - v[own])), FLOOR) if own.sum() >= min_rows else pooled_all
        for s in range(bins.N_SNR_BINS):
            cell = own & (snr_bin == s)
            out[k, s] = max(float(np.mean(resid2[cell] - v[cell])), FLOOR) if cell.sum() >= min_rows else pooled
    return out
