r"""Ridge with intercept on standardised inputs, solved exactly from sufficient statistics.

For one group with statistics from :mod:`moe.experts.stats`:

- StandardScaler semantics: ``mean = shift + sx / n``; ``var = diag(S) / n`` with the centred
  scatter ``S = xtx - sx sx^T / n``; constant features get scale 1 (scikit-learn's rule).
- Noise marginalisation: averaging the squared loss over the noise
  ``x -> x + noise_level * error * N(0, 1)`` adds ``noise_level^2 * sum_i error_i^2`` to the
  scatter's diagonal (and to ``var``): the exact limit of training on endless noise
  augmentation, in closed form. ``noise_var = 0`` gives ordinary Ridge on the rows given.
- ``Z^T Z = S' / (scale scale^T)``, ``Z^T y = (xty - sx * ybar) / scale``; the coefficients
  ``w_a = (Z^T Z + a I)^{-1} (Z^T y + a m)`` for every ``a`` of the sweep, where ``m`` is an
  optional prior mean (shrinkage toward a parent expert; 0 for plain Ridge).
- Labels: ``y`` has L columns (log g, T_eff, [M/H], ...). ``Z^T Z`` is shared, so every
  factorisation below serves all L right-hand sides; each label's solution follows exactly the
  path its own one-label solve would (the same factors at the same alphas, the same steps), so
  a label's experts do not depend on which other labels were fitted with it.
- The sweep costs either float32 Cholesky factors used as preconditioners of a float64 CG
  (:func:`_pcg`; float64 accuracy, falling back to a float64 Cholesky when float32 cannot
  carry the system) -- alphas in ascending order, each factor reused for the next alphas
  while they converge in a few steps (alphas well below the Gram's smallest eigenvalue,
  where the noise-marginalised diagonal dominates, share one factor) -- or one
  eigendecomposition per group (``Z^T Z = V L V^T``, then ``w_a = V (V^T b + a V^T m) / (L + a)``);
  ``method='auto'`` takes whichever is cheaper for the number of alphas.
- Raw units: ``weight = w / scale``, ``bias = ybar - weight . mean``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
from scipy.linalg.blas import dger, strsv

from moe.experts.stats import CellStats

# below 1 too: in the marginal noise mode the noise variance already sits on the Gram's diagonal
DEFAULT_ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6)
# One eigh of a D x D matrix costs about as much as this many alphas of the Cholesky path
# (measured at D = 4096 on 2 cores: 8.7 s vs 0.15-0.25 s per alpha, factor reuse included).
EIGH_BREAKEVEN = 40
METHODS = ("auto", "cholesky", "eigh")


def best_alpha_index(val_sse: np.ndarray) -> int:
    """The alpha a validation chooses: the least squared error (the highest R^2) -- ``val_sse`` [A] -> index,
    the first of equals. The expert fit applies it per group, the in-memory sweep (:mod:`moe.experts.sklearn_ridge`)
    to its one model."""
    return int(np.argmin(val_sse))


@dataclass
class Standardized:
    """A group's problem in standardised coordinates."""

    n: float
    mean: np.ndarray  # [D] raw-unit feature mean
    scale: np.ndarray  # [D] raw-unit feature std (1 for constant features)
    gram: np.ndarray  # [D, D] Z^T Z
    zty: np.ndarray  # [L, D] Z^T (y - ybar), one row per label
    ybar: np.ndarray  # [L]
    syy: np.ndarray  # [L] sum (y - ybar)^2


def standardize(stats: CellStats, noise_var: float = 0.0) -> Standardized:
    """Standardised normal equations of a single group (``stats`` with one cell)."""
    if stats.n.shape != (1,):
        raise ValueError("standardize() takes one group: use CellStats.group(cells) first")
    n = float(stats.n[0])
    if n < 1:
        raise ValueError("group has no samples")
    sx = stats.sx[0]
    mu_s = sx / n
    # centred scatter S = xtx - sx mu^T, built in place (BLAS rank-1 update on a transposed view)
    gram = stats.gram(0)  # a new full symmetric [D, D], C order
    dger(-1.0, mu_s, sx, a=gram.T, overwrite_a=1)
    diag = np.diag_indices_from(gram)
    if noise_var:
        gram[diag] += noise_var * stats.se2[0]
    mean = stats.shift + mu_s
    var = np.clip(gram[diag] / n, 0.0, None)
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    scale = np.where(constant, 1.0, np.sqrt(var))
    ybar = stats.sy[0] / n  # [L]
    inv = 1.0 / scale
    gram *= inv[:, None]
    gram *= inv[None, :]
    zty = (stats.xty[0] - ybar[:, None] * sx[None, :]) / scale  # [L, D]
    syy = stats.syy[0] - n * ybar**2
    return Standardized(n, mean, scale, gram, zty, ybar, syy)


def solve_path(
    std: Standardized,
    alphas: Sequence[float],
    prior: np.ndarray | None = None,
    method: str = "auto",
    info: dict | None = None,
) -> np.ndarray:
    """Standardised coefficients for every alpha and label: [A, L, D].

    ``prior`` [L, D] (standardised) is each label's prior mean. ``info`` (a dict, optional) receives
    ``factorizations`` (float32 Cholesky factors made, each serving every label) and ``iterations``
    (CG steps per alpha, summed over the labels, in the order given).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    alphas = np.asarray(alphas, dtype=np.float64)
    if (alphas <= 0).any():
        raise ValueError(f"alphas must be positive, got {alphas.tolist()}")
    n_labels, d = std.zty.shape
    m = np.zeros((n_labels, d)) if prior is None else np.asarray(prior, dtype=np.float64).reshape(n_labels, d)
    if method == "auto":
        method = "eigh" if alphas.size > EIGH_BREAKEVEN else "cholesky"
    out = np.empty((alphas.size, n_labels, d))
    steps = np.zeros((alphas.size, n_labels), dtype=np.int64)
    eigh_labels = list(range(n_labels)) if method == "eigh" else []
    made = 0
    if method == "cholesky":
        # per label the factor it is on and its last solution, exactly as a one-label solve would keep them;
        # a factor made at an alpha serves every label that needs one there (in practice: all, the same ones)
        factor: list[_Float32Cholesky | None] = [None] * n_labels
        prev: list[np.ndarray | None] = [None] * n_labels
        gram_norm = float(np.linalg.norm(std.gram))
        for i in np.argsort(alphas):  # ascending: each factor preconditions the larger alphas after it
            a = alphas[i]
            fresh, f64 = _NOT_MADE, None  # this alpha's float32 factor and float64 Cholesky, made when first needed
            for j in range(n_labels):
                if j in eigh_labels:
                    continue
                rhs = std.zty[j] + a * m[j]
                x = None if factor[j] is None else _pcg(std.gram, gram_norm, a, rhs, factor[j], prev[j], REUSE_STEPS)
                if x is None:
                    if fresh is _NOT_MADE:
                        fresh = _Float32Cholesky.of(std.gram, a)
                        made += fresh is not None
                    factor[j] = fresh
                    x = None if fresh is None else _pcg(std.gram, gram_norm, a, rhs, fresh, prev[j], FRESH_STEPS)
                if x is None:  # float32 cannot carry this system: plain float64 Cholesky
                    factor[j] = None
                    if f64 is None:
                        work = std.gram.copy()
                        work[np.diag_indices(d)] += a
                        try:
                            f64 = sla.cho_factor(work.T, lower=False, overwrite_a=True, check_finite=False)
                        except np.linalg.LinAlgError:
                            f64 = _SINGULAR
                    if f64 is _SINGULAR:  # this label's whole sweep by the eigendecomposition, as alone
                        eigh_labels.append(j)
                        continue
                    x = (sla.cho_solve(f64, rhs, check_finite=False), 0)
                out[i, j], steps[i, j] = x
                prev[j] = out[i, j]
    if eigh_labels:
        lam, vec = sla.eigh(std.gram, driver="evd", check_finite=False)
        lam = np.clip(lam, 0.0, None)
        for j in eigh_labels:
            vb, vm = vec.T @ std.zty[j], vec.T @ m[j]
            coef = (vb[None, :] + alphas[:, None] * vm[None, :]) / (lam[None, :] + alphas[:, None])
            out[:, j] = coef @ vec.T
            steps[:, j] = 0
    if info is not None:
        info.update(factorizations=made, iterations=steps.sum(1).tolist())
    return out


_NOT_MADE = object()  # no float32 factor tried yet at this alpha
_SINGULAR = object()  # the float64 Cholesky failed at this alpha


# A CG step (a float32 triangular solve pair + a float64 mat-vec, 0.008 s at D = 4096 on
# 2 cores) costs about a twentieth of a fresh float32 Cholesky with its own steps (0.19 s):
# reusing a factor pays while the system converges within this many steps.
REUSE_STEPS = 15
FRESH_STEPS = 20
TOL = 1e-13  # normwise backward error (see _pcg); sqrt(D) eps = 1.4e-14 at D = 4096


class _Float32Cholesky:
    """Upper Cholesky factor of ``gram + alpha I`` in float32: an approximate inverse."""

    def __init__(self, upper: np.ndarray):
        self.upper = upper  # [D, D] float32, Fortran order (what BLAS reads without a copy)

    @classmethod
    def of(cls, gram: np.ndarray, alpha: float) -> _Float32Cholesky | None:
        a32 = gram.astype(np.float32)
        a32[np.diag_indices_from(a32)] += np.float32(alpha)
        try:
            return cls(sla.cho_factor(a32.T, lower=False, overwrite_a=True, check_finite=False)[0])
        except np.linalg.LinAlgError:
            return None

    def __call__(self, r: np.ndarray) -> np.ndarray:
        """(U^T U)^{-1} r by two BLAS triangular solves (5x faster than LAPACK potrs for one vector)."""
        y = strsv(self.upper, r.astype(np.float32), trans=1, lower=0)
        return strsv(self.upper, y, trans=0, lower=0, overwrite_x=1).astype(np.float64)


def _pcg(
    gram: np.ndarray,
    gram_norm: float,
    alpha: float,
    rhs: np.ndarray,
    precond: _Float32Cholesky,
    x0: np.ndarray | None,
    max_steps: int,
    tol: float = TOL,
) -> tuple[np.ndarray, int] | None:
    """(gram + alpha I) x = rhs to float64 accuracy by CG preconditioned with a float32 Cholesky.

    With the factor of this alpha it converges like iterative refinement (a step or two);
    with the factor of a smaller alpha' the preconditioned spectrum lies in
    [1, (lam_min + alpha) / (lam_min + alpha')], so nearby alphas take a few steps. The
    preconditioner is applied in float32 (not exactly linear), hence the flexible
    (Polak-Ribiere) update. Stops at a normwise backward error
    ``|r| <= tol (|A|_F |x| + |b|)`` (LAPACK's mixed-precision criterion: what a float64
    Cholesky attains), with ``|A|_F`` bounded by ``gram_norm + alpha sqrt(D)`` (``gram_norm``:
    the Frobenius norm of ``gram``, the same for every alpha). Returns (x, steps), or None when
    that will not happen within ``max_steps`` at the rate seen so far.
    """
    anorm = gram_norm + alpha * np.sqrt(rhs.size)
    norm_b = np.linalg.norm(rhs)

    def matvec(v):
        return gram @ v + alpha * v

    def excess(r, x):  # residual over what the criterion allows (<= 1: converged)
        return np.linalg.norm(r) / max(tol * (anorm * np.linalg.norm(x) + norm_b), np.finfo(float).tiny)

    x = np.zeros_like(rhs) if x0 is None else x0.copy()
    r = rhs - matvec(x)
    e0 = excess(r, x)
    if e0 <= 1.0:
        return x, 0
    z = precond(r)
    p, rz = z.copy(), r @ z
    for step in range(1, max_steps + 1):
        q = matvec(p)
        pq = p @ q
        if not pq > 0:  # preconditioner or system not positive definite in float64 terms
            return None
        x += (rz / pq) * p
        r = r - (rz / pq) * q
        e = excess(r, x)
        if e <= 1.0:
            r = rhs - matvec(x)  # the recurrence drifts: confirm with the true residual
            e = excess(r, x)
            if e <= 1.0:
                return x, step
        rate = (e / e0) ** (1.0 / step)
        if rate >= 1.0 or step + np.log(e) / -np.log(rate) > max_steps + 0.5:
            return None
        z_old, z = z, precond(r)
        beta = (r @ (z - z_old)) / rz
        rz = r @ z
        p = z + beta * p
    return None


def to_raw(coef: np.ndarray, std: Standardized) -> tuple[np.ndarray, np.ndarray]:
    """Standardised coefficients [A, L, D] -> raw-unit (weight [A, L, D], bias [A, L])."""
    weight = coef / std.scale
    return weight, std.ybar - weight @ std.mean


def to_standardized(weight: np.ndarray, std: Standardized) -> np.ndarray:
    """Raw-unit weights [.., D] expressed in ``std``'s standardised coordinates (prior means)."""
    return weight * std.scale


def fit_sweep(
    stats: CellStats,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    noise_var: float = 0.0,
    prior_weight: np.ndarray | None = None,
    method: str = "auto",
    info: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, Standardized]:
    """One group, every alpha and label: raw (weight [A, L, D], bias [A, L]) and its standardised problem.

    ``prior_weight`` [L, D] (raw units) shrinks each label's solution toward a parent expert; ``info``
    as in :func:`solve_path`.
    """
    std = standardize(stats, noise_var)
    prior = None if prior_weight is None else to_standardized(prior_weight, std)
    weight, bias = to_raw(solve_path(std, alphas, prior, method, info), std)
    return weight, bias, std
