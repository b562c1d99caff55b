"""The Gram-based OLS / Ridge of the leakage audit against scikit-learn's StandardScaler + Ridge, and the
shuffle identity (rows permuted, labels kept == labels permuted the other way) against a fit on the rows."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from moe.experiments import gram_ridge
from moe.experiments.gram_ridge import Gram


@pytest.fixture
def rows(monkeypatch):
    monkeypatch.setattr(gram_ridge, "BLOCK", 64)  # several blocks and a short last one
    rng = np.random.default_rng(3)
    x = (rng.gamma(2.0, 1.0, (300, 40)) + 5).astype(np.float32)
    x[:, 7] = 2.5  # a constant column: StandardScaler keeps its scale at 1
    y = x[:, :5].astype(np.float64) @ rng.normal(size=5) + rng.normal(0, 0.3, 300)
    return x, y, rng.gamma(2.0, 1.0, (50, 40)).astype(np.float32) + 5


@pytest.mark.parametrize("alpha", [1e-3, 1.0, 100.0])
def test_ridge_matches_standard_scaler_and_sklearn_ridge(rows, alpha):
    x, y, x_test = rows
    scaler = StandardScaler().fit(x.astype(np.float64))
    ref = Ridge(alpha=alpha, solver="cholesky").fit(scaler.transform(x.astype(np.float64)), y)
    gram = Gram.of(x)
    coef = gram.ridge(gram.xty(y), [alpha])
    np.testing.assert_allclose(gram.scale, scaler.scale_, rtol=1e-10)
    np.testing.assert_allclose(coef[0], ref.coef_, rtol=1e-7, atol=1e-10)
    ours = gram.predict(x_test, coef[0], float(y.mean()))
    np.testing.assert_allclose(ours, ref.predict(scaler.transform(x_test.astype(np.float64))), rtol=1e-9)
    assert gram.predict(x_test, coef, float(y.mean())).shape == (50, 1)


def test_ols_is_least_squares_on_the_standardised_rows(rows):
    x, y, x_test = rows
    z = StandardScaler().fit_transform(x.astype(np.float64))
    design = np.column_stack([np.ones(len(z)), np.delete(z, 7, 1)])  # the constant column carries nothing
    ref = sla.lstsq(design, y)[0]
    gram = Gram.of(x)
    coef = gram.ols(gram.xty(y))
    np.testing.assert_allclose(gram.predict(x, coef, float(y.mean())), design @ ref, rtol=1e-8)
    assert coef[7] == 0.0  # minimum norm: nothing on the constant column


def test_a_shuffle_of_the_rows_is_a_permutation_of_the_labels(rows):
    x, y, x_test = rows
    perm = np.random.default_rng(0).permutation(len(y))
    shuffled = x[perm].astype(np.float64)  # row perm[i] paired with label i
    scaler = StandardScaler().fit(shuffled)
    ref = Ridge(alpha=0.1, solver="cholesky").fit(scaler.transform(shuffled), y)
    gram = Gram.of(x)
    y_other_way = np.empty_like(y)
    y_other_way[perm] = y
    coef = gram.ridge(gram.xty(y_other_way), [0.1])[0]
    np.testing.assert_allclose(
        gram.predict(x_test, coef, float(y.mean())), ref.predict(scaler.transform(x_test.astype(np.float64))), rtol=1e-9
    )


def test_a_block_transform_is_applied_to_training_and_predicted_rows(rows):
    x, y, x_test = rows

    def flagged(b):
        return (b > 3 * np.median(b, 1, keepdims=True)).astype(np.float64) + (b > 6)

    scaler = StandardScaler().fit(flagged(x.astype(np.float64)))
    ref = Ridge(alpha=1.0).fit(scaler.transform(flagged(x.astype(np.float64))), y)
    gram = Gram.of(x, transform=flagged)
    coef = gram.ridge(gram.xty(y), [1.0])[0]
    expected = ref.predict(scaler.transform(flagged(x_test.astype(np.float64))))
    np.testing.assert_allclose(gram.predict(x_test, coef, float(y.mean())), expected, rtol=1e-8, atol=1e-10)
