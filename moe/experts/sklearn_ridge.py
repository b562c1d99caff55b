"""Ridge in memory with scikit-learn over a sweep of alphas, the alpha chosen on validation.

The in-memory twin of the streamed expert fit (:mod:`moe.experts.fit`) for the studies that hold their rows
(the realism check, the leakage audit): inputs standardised on the training rows, one ``X^T X`` for every
alpha (a multi-target ``Ridge`` whose target column ``a`` uses ``alphas[a]``), and the alpha of the least
validation squared error -- the rule the expert fit applies to each group
(:func:`moe.experts.ridge.best_alpha_index`).
N rows, D features, A alphas.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.linalg import LinAlgWarning
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from moe.experts.ridge import DEFAULT_ALPHAS, best_alpha_index


@dataclass
class RidgeSweep:
    """A fitted sweep: ``predict_sweep`` gives every alpha's predictions, ``predict`` the chosen alpha's."""

    scaler: StandardScaler | None  # None: the inputs came standardised
    model: Ridge  # multi-target; coef_ [A, D] on standardised inputs
    alphas: np.ndarray  # [A]
    best: int  # index of the alpha chosen on validation

    @property
    def alpha(self) -> float:
        return float(self.alphas[self.best])

    @property
    def coef(self) -> np.ndarray:
        """[A, D] coefficients of the standardised inputs, one row per alpha."""
        return self.model.coef_

    def predict_sweep(self, x: np.ndarray) -> np.ndarray:
        """x [N, D] -> predictions [N, A], one column per alpha."""
        return self.model.predict(x if self.scaler is None else self.scaler.transform(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """x [N, D] -> predictions [N] with the alpha chosen on validation."""
        return self.predict_sweep(x)[:, self.best]


def fit_ridge_sweep(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    standardise: bool = True,
) -> RidgeSweep:
    """Ridge of ``y`` on ``x`` [N, D] for every alpha, the alpha chosen on (``x_val``, ``y_val``).

    ``standardise=False`` takes inputs already standardised (the caller's scaler serves other models too)."""
    alphas = np.asarray(alphas, dtype=np.float64)
    scaler = StandardScaler().fit(x_train) if standardise else None
    z_train = x_train if scaler is None else scaler.transform(x_train)
    with warnings.catch_warnings():
        # with fewer rows than features the smallest alphas leave the kernel near-singular (scipy warns once per
        # fit); such an alpha is scored on validation like the others and loses there: nothing for a user to do
        warnings.simplefilter("ignore", LinAlgWarning)
        model = Ridge(alpha=alphas, solver="cholesky").fit(
            z_train, np.repeat(np.asarray(y_train)[:, None], alphas.size, 1)
        )
    sweep = RidgeSweep(scaler, model, alphas, 0)
    val_sse = ((sweep.predict_sweep(x_val) - np.asarray(y_val, dtype=np.float64)[:, None]) ** 2).sum(0)
    sweep.best = best_alpha_index(val_sse)
    return sweep
