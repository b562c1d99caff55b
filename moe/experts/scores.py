"""Regression scores of the whole project: the one R^2 formula, MAE and RMSE, the calibration of sigma (numpy)."""

from __future__ import annotations

import numpy as np


def r2_from_sums(sse, sst, n):
    """R^2 = 1 - SSE / SST from sums (arrays broadcast); NaN below 2 samples or where SST is 0.

    The one R^2 formula of the project: :func:`r2` and :func:`regression_metrics` use it on
    arrays, the expert bundle on streamed validation sums, the bootstrap on resampled sums.
    """
    sse, sst = np.asarray(sse, dtype=float), np.asarray(sst, dtype=float)
    valid = (np.asarray(n) > 1) & (sst > 0)
    return np.where(valid, 1.0 - sse / np.where(valid, sst, 1.0), np.nan)


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination of ``pred`` for ``y`` (NaN below 2 samples or with constant truth)."""
    y, pred = np.asarray(y, dtype=float), np.asarray(pred, dtype=float)
    if y.size == 0:
        return float("nan")
    return float(r2_from_sums(((pred - y) ** 2).sum(), ((y - y.mean()) ** 2).sum(), y.size))


def z_calibration(z: np.ndarray) -> dict[str, float]:
    """How well sigma describes the errors, from z = (pred - true) / sigma [N]: ``z_std`` (1 when calibrated) and
    the shares ``coverage_1sigma`` / ``coverage_2sigma`` with |z| <= 1 and <= 2 (0.683 / 0.954 for a Gaussian)."""
    z = np.asarray(z, dtype=float)
    return {
        "z_std": float(z.std()),
        "coverage_1sigma": float((np.abs(z) <= 1).mean()),
        "coverage_2sigma": float((np.abs(z) <= 2).mean()),
    }


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """R^2, MAE, RMSE and count (R^2 is NaN below 2 samples or with constant truth)."""
    y, pred = np.asarray(y, dtype=float), np.asarray(pred, dtype=float)
    if y.size == 0:
        return {"n": 0, "r2": float("nan"), "mae": float("nan"), "rmse": float("nan")}
    res = pred - y
    return {
        "n": int(y.size),
        "r2": r2(y, pred),
        "mae": float(np.abs(res).mean()),
        "rmse": float(np.sqrt((res**2).mean())),
    }
