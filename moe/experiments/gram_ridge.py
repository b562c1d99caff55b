"""OLS and Ridge of standardised inputs from one centred Gram matrix, accumulated in row blocks.

What ``StandardScaler`` + ``Ridge(solver="cholesky")`` (and the normal-equation OLS) compute, without
ever holding a float64 copy of the inputs: the float32 rows [N, D] are read ``BLOCK`` rows at a time,
cast to float64 block by block, and summed into the column means and the centred Gram ``Xc^T Xc``
[D, D]. Standardising is then a rescaling of the Gram (``Z^T Z = S^-1 Xc^T Xc S^-1``), and every
alpha, the OLS fit and any right-hand side ``Z^T y`` reuse it. A model of 20k x 4096 error vectors
then holds 2 x 134 MB of Gram instead of three 655 MB float64 copies plus scikit-learn's centring copy.

Because the Gram does not depend on the order of the rows, a Ridge on the rows permuted (the
leakage audit's shuffle test: rows permuted, labels kept) is the same Gram with the labels permuted
the other way: :meth:`Gram.xty` of ``y[inverse]``.
N rows, D features, A alphas.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

BLOCK = 2048  # rows cast to float64 at a time (2048 x 4096 x 8 B = 67 MB)


def float64_blocks(x: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None = None):
    """float64 blocks of ``BLOCK`` rows of ``x`` [N, D], through ``transform`` when given."""
    for start in range(0, len(x), BLOCK):
        block = np.asarray(x[start : start + BLOCK], dtype=np.float64)
        yield transform(block) if transform is not None else block


@dataclass
class Gram:
    """The centred, standardised Gram of training rows: ``Z^T Z`` [D, D] with ``Z = (X - mean) / scale``."""

    x: np.ndarray  # [N, D] the training rows as given (float32 is fine; not copied)
    transform: Callable[[np.ndarray], np.ndarray] | None  # applied to each float64 block (e.g. a mask)
    mean: np.ndarray  # [D]
    scale: np.ndarray  # [D] population sd, 1 where a column is constant (as StandardScaler)
    zz: np.ndarray  # [D, D]

    @classmethod
    def of(cls, x: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> Gram:
        """Two passes over ``x`` [N, D]: the column means, then the centred Gram (no cancellation)."""
        n = len(x)
        mean = sum(b.sum(0) for b in float64_blocks(x, transform)) / n
        gram = np.zeros((x.shape[1], x.shape[1]))
        for b in float64_blocks(x, transform):
            b -= mean
            gram += b.T @ b
        var = np.diag(gram) / n
        scale = np.where(var > 0, np.sqrt(var), 1.0)
        gram /= scale[:, None]
        gram /= scale[None, :]
        return cls(x, transform, mean, scale, gram)

    def xty(self, y: np.ndarray) -> np.ndarray:
        """``Z^T (y - mean(y))`` [D] for labels ``y`` [N] of the training rows in their order."""
        yc = np.asarray(y, np.float64) - np.mean(y)
        out = np.zeros(len(self.mean))
        for start, b in zip(range(0, len(self.x), BLOCK), float64_blocks(self.x, self.transform)):
            out += (b - self.mean).T @ yc[start : start + BLOCK]
        return out / self.scale

    def ridge(self, zty: np.ndarray, alphas: Sequence[float]) -> np.ndarray:
        """Coefficients [A, D] on the standardised inputs: ``(Z^T Z + alpha I)^-1 Z^T y`` per alpha (Cholesky)."""
        eye = np.eye(len(zty))
        return np.stack([sla.solve(self.zz + a * eye, zty, assume_a="pos", check_finite=False) for a in alphas])

    def ols(self, zty: np.ndarray) -> np.ndarray:
        """Minimum-norm least-squares coefficients [D] on the normal equations (handles rank deficiency)."""
        return sla.lstsq(self.zz, zty, lapack_driver="gelsy", check_finite=False)[0]

    def predict(self, x: np.ndarray, coef: np.ndarray, intercept: float) -> np.ndarray:
        """Predictions [N] or [N, A] of rows ``x`` [N, D] for standardised coefficients ``coef`` [D] or [A, D]
        (``intercept``: the training labels' mean), in blocks."""
        w = (np.atleast_2d(coef) / self.scale).T  # [D, A] on the raw inputs
        shift = self.mean @ w
        out = np.concatenate([b @ w - shift for b in float64_blocks(x, self.transform)]) + intercept
        return out[:, 0] if np.ndim(coef) == 1 else out
