"""The correlation of the labels' errors: rho per SNR bin against numpy's corrcoef, its dependence on the predicted
labels recovered, its calibration on z by SigmaCalibration, the 2-D (Mahalanobis) coverage against scipy's chi2,
and checkpoints saved before rho."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from moe.gates.calibration import SigmaCalibration
from moe.gates.checkpoints import upgrade_state
from moe.gates.error_correlation import (
    RHO_MAX,
    bin_correlation,
    correlation_fit,
    correlation_of,
    label_pairs,
    mahalanobis_coverage,
    pair_names,
)

# the true correlation of the three label pairs (log g - T_eff, log g - M_H, T_eff - M_H) in SNR bins X L M H
TRUE_RHO = np.array([[-0.1, -0.05, 0.0, 0.1], [-0.4, -0.3, -0.25, -0.2], [0.3, 0.0, -0.1, 0.2]])


def _correlated(n: int, rho: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal z [n, 3] whose pairs correlate by ``rho`` [3, 4] in each of 4 groups, and the groups."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 4, n)
    z = np.empty((n, 3))
    for g in range(4):
        cov = np.eye(3)
        for p, (a, b) in enumerate(label_pairs(3)):
            cov[a, b] = cov[b, a] = rho[p, g]
        sel = group == g
        z[sel] = rng.multivariate_normal(np.zeros(3), cov, sel.sum())
    return z, group


def test_pairs_and_names_follow_combinations_order():
    assert label_pairs(3) == [(0, 1), (0, 2), (1, 2)] and label_pairs(1) == []
    assert pair_names(["log_g", "T_eff", "M_H"]) == ["rho_log_g_T_eff", "rho_log_g_M_H", "rho_T_eff_M_H"]


def test_bin_correlation_is_numpys_corrcoef_per_bin_and_finds_the_true_rho():
    z, group = _correlated(40_000, TRUE_RHO)
    z[:, 1] = 3.0 * z[:, 1] + 0.5  # Pearson's r ignores scale and offset
    rho = bin_correlation(z, group, 4)
    assert rho.shape == (3, 4)
    for p, (a, b) in enumerate(label_pairs(3)):
        for g in range(4):
            sel = group == g
            assert rho[p, g] == pytest.approx(np.corrcoef(z[sel, a], z[sel, b])[0, 1], abs=1e-12)
    # about 10k stars a bin: r's standard error is below 0.01
    np.testing.assert_allclose(rho, TRUE_RHO, atol=0.035)


def test_bin_correlation_of_small_empty_or_constant_bins_is_zero_and_skips_nan():
    z, group = _correlated(2_000, TRUE_RHO)
    group[group == 3] = 2  # bin H empty
    keep = np.flatnonzero(group == 0)[:15]
    group[(group == 0) & ~np.isin(np.arange(len(group)), keep)] = 1  # bin X: 15 stars, too few
    z[group == 1, 2] = 0.7  # bin L: M_H constant
    z[np.flatnonzero(group == 2)[:5], 0] = np.nan  # NaN rows are left out
    rho = bin_correlation(z, group, 4)
    assert (rho[:, 0] == 0).all() and (rho[:, 3] == 0).all() and (rho[1:, 1] == 0).all()
    sel = (group == 2) & np.isfinite(z[:, 0])
    assert rho[0, 2] == pytest.approx(np.corrcoef(z[sel, 0], z[sel, 1])[0, 1], abs=1e-12)


def test_mahalanobis_coverage_is_chi2_of_two_degrees():
    """Bivariate normal z with correlation rho: the share within the chi2(2) 68.3% / 95.4% quantiles is those
    levels with the true rho and off with rho 0; the quantile is scipy's, and the distance scipy's."""
    from scipy.spatial.distance import mahalanobis

    for p in (0.682689, 0.9545):
        assert -2 * np.log1p(-p) == pytest.approx(stats.chi2.ppf(p, 2), rel=1e-12)
    rng = np.random.default_rng(1)
    rho = -0.6
    z = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], 50_000)
    inner, outer = mahalanobis_coverage(z[:, 0], z[:, 1], rho)
    assert inner == pytest.approx(0.6827, abs=0.006) and outer == pytest.approx(0.9545, abs=0.003)
    wrong = mahalanobis_coverage(z[:, 0], z[:, 1], 0.0)
    assert abs(wrong[0] - 0.6827) > 0.02  # ignoring the correlation: the wrong ellipse
    vi = np.linalg.inv([[1, rho], [rho, 1]])
    d2 = mahalanobis(z[0], [0, 0], vi) ** 2
    assert (d2 <= stats.chi2.ppf(0.682689, 2)) == bool(mahalanobis_coverage(z[:1, 0], z[:1, 1], rho)[0])


def test_correlation_fit_without_dependence_is_each_bins_corrcoef():
    """Predictions that carry no information: the intercept is the bin's Pearson r (numpy's corrcoef), the slopes
    about 0, and the mean of the stars' rho in a bin is that r exactly."""
    z, group = _correlated(40_000, TRUE_RHO)
    x = np.random.default_rng(5).normal(size=z.shape)
    coef = correlation_fit(z, x, group, 4)
    assert coef.shape == (3, 4, 4) and np.abs(coef[..., 1:]).max() < 0.03
    rho = correlation_of(coef, group, x)  # [N, P]
    for p, (a, b) in enumerate(label_pairs(3)):
        for g in range(4):
            sel = group == g
            assert rho[sel, p].mean() == pytest.approx(np.corrcoef(z[sel, a], z[sel, b])[0, 1], abs=1e-12)
    np.testing.assert_allclose(coef[..., 0], TRUE_RHO, atol=0.035)


def test_correlation_fit_recovers_a_dependence_on_the_predictions_and_clips():
    """rho = 0.2 - 0.3 x_0 in one bin (x_0 a standardised prediction): the fit finds it; stars far out are clipped
    at RHO_MAX."""
    rng = np.random.default_rng(6)
    n = 60_000
    x = rng.uniform(-1.5, 1.5, (n, 3))
    true = 0.2 - 0.3 * x[:, 0]
    e = rng.normal(size=(n, 2))
    z = np.stack([e[:, 0], true * e[:, 0] + np.sqrt(1 - true**2) * e[:, 1], rng.normal(size=n)], 1)
    coef = correlation_fit(z, x, np.zeros(n, np.int64), 1)
    np.testing.assert_allclose(coef[0, 0], [0.2, -0.3, 0.0, 0.0], atol=0.02)
    assert np.abs(coef[1:, 0]).max() < 0.03  # the third label correlates with neither
    far = correlation_of(coef, np.zeros(2, np.int64), np.array([[-10.0, 0, 0], [10.0, 0, 0]]))
    assert far[:, 0].tolist() == [RHO_MAX, -RHO_MAX]
    t = correlation_of(
        torch.from_numpy(coef), torch.zeros(2, dtype=torch.long), torch.tensor([[1.0, 0, 0]] * 2).double()
    )
    assert torch.allclose(t[:, 0], torch.tensor(coef[0, 0, 0] + coef[0, 0, 1]).double())


def test_refit_calibrates_rho_of_z_per_bin():
    """Residuals whose sd is c_l * spread and whose standardised errors correlate by TRUE_RHO: after the refit
    rho holds each bin's correlation of z under the fitted sigma (= the true one within sampling error), and
    each star's rho is its bin's."""
    rng = np.random.default_rng(2)
    z, group = _correlated(60_000, TRUE_RHO, seed=3)
    spread = rng.uniform(0.5, 2.0, (len(z), 3))
    x = rng.normal(size=z.shape)
    resid = z * np.array([1.0, 300.0, 0.5]) * spread
    calibration = SigmaCalibration(n_labels=3)
    assert calibration.rho.shape == (3, 4, 4) and not calibration.rho.any()
    calibration.refit(resid, spread, group, x)
    sigma = calibration(torch.from_numpy(spread).float(), torch.from_numpy(group), torch.from_numpy(x).float())
    sigma = sigma.double().numpy()
    np.testing.assert_allclose(calibration.rho.double().numpy(), correlation_fit(resid / sigma, x, group, 4), atol=1e-6)
    star = calibration.correlation(torch.from_numpy(group), torch.from_numpy(x).float()).double().numpy()  # [N, P]
    for g in range(4):
        np.testing.assert_allclose(star[group == g].mean(0), TRUE_RHO[:, g], atol=0.035)
    calibration.reset()
    assert not calibration.rho.any()


def test_refit_without_a_sample_takes_rho_from_the_validation_residuals():
    z, group = _correlated(20_000, TRUE_RHO, seed=4)
    spread = np.ones_like(z)
    calibration = SigmaCalibration(rows=0, n_labels=3)
    calibration.observe(
        *(torch.from_numpy(v).float() for v in (z, spread)), torch.from_numpy(group), torch.zeros(len(z), 3)
    )
    checks = calibration.refit(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0, np.int64), np.zeros((0, 3)))
    assert all(c is not None for c in checks)
    np.testing.assert_allclose(calibration.rho[..., 0].double().numpy(), TRUE_RHO, atol=0.05)


def test_one_label_has_no_pairs_and_a_checkpoint_before_rho_gets_zero_and_no_cells():
    one = SigmaCalibration(n_labels=1)
    assert one.rho.shape == (0, 4, 2)
    one.refit(np.ones((300, 1)), np.ones((300, 1)), np.zeros(300, np.int64), np.zeros((300, 1)))
    assert one.correlation(torch.tensor([0, 1]), torch.zeros(2, 1)).shape == (2, 0)
    # a three-label state saved before the error correlations: rho 0 for every star (no refit without the data)
    state = {f"mixture.calibration.{n}": torch.ones(3, 4) for n in ("scale", "ref", "power")}
    upgrade_state(state)
    assert torch.equal(state["mixture.calibration.rho"], torch.zeros(3, 4, 4))
    # and before the cells of the prediction: one cell, factor 1 (sigma as that checkpoint computed it)
    assert torch.equal(state["mixture.calibration.cell_scale"], torch.ones(3, 4, 5))
    assert torch.isinf(state["mixture.calibration.cell_edges"]).all()
    three = SigmaCalibration(n_labels=3)
    three.load_state_dict({k.removeprefix("mixture.calibration."): v for k, v in state.items()})
    saved = {"mixture.calibration.rho": torch.full((3, 4, 4), 0.5), "mixture.calibration.scale": torch.ones(3, 4)}
    upgrade_state(saved)  # a saved rho is kept
    assert torch.equal(saved["mixture.calibration.rho"], torch.full((3, 4, 4), 0.5))
