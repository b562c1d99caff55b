"""Per-star sigma: the model-error variance estimate against a closed form, the z metrics against numpy,
the recalibration (sigma map, validation check, row rings) on synthetic residuals against the full-size
targets, and calibration of a trained gate at small N (looser bounds than the README's full-size table)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moe.cli import cli_main
from moe.data import bins
from moe.experts.model_error import model_error_variance
from moe.gates.metrics import LatestRows, SplitMetrics
from moe.gates.sigma_map import coverage_scale, sigma_map, validation_check

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_model_error_variance_recovers_the_bias_variance():
    rng = np.random.default_rng(0)
    n, k = 40_000, 3
    group = rng.integers(0, k, n)
    snr_bin = rng.integers(0, bins.N_SNR_BINS, n)
    true_m = np.array([[0.01, 0.02, 0.04, 0.08], [0.05, 0.05, 0.05, 0.05], [0.2, 0.1, 0.0, 0.1]])
    noise_var = rng.uniform(0.01, 0.2, (n, k))
    y = rng.uniform(1, 5, n)
    err = rng.normal(0, 1, (n, k)) * np.sqrt(noise_var + true_m[:, snr_bin].T)  # noise + model error
    est = model_error_variance(y, y[:, None] + err, noise_var, group, snr_bin)
    np.testing.assert_allclose(np.maximum(est, 0), true_m, atol=0.012)
    assert (est > 0).all()  # floored, never negative
    # a cell without stars takes the expert's estimate over all SNR bins
    sparse = model_error_variance(
        y[snr_bin > 0],
        (y[:, None] + err)[snr_bin > 0],
        noise_var[snr_bin > 0],
        group[snr_bin > 0],
        snr_bin[snr_bin > 0],
    )
    keep = snr_bin > 0
    resid2 = (err[keep][np.arange(keep.sum()), group[keep]]) ** 2 - noise_var[keep][np.arange(keep.sum()), group[keep]]
    pooled = [max(resid2[group[keep] == j].mean(), 1e-6) for j in range(k)]
    np.testing.assert_allclose(sparse[:, 0], pooled, rtol=1e-12)


def test_z_metrics_match_numpy():
    rng = np.random.default_rng(1)
    y = torch.from_numpy(rng.uniform(1, 5, 3000)).float()
    sigma = torch.from_numpy(rng.uniform(0.1, 0.5, 3000)).float()
    pred = y + sigma * torch.from_numpy(rng.standard_t(5, 3000)).float()
    snr_bin = torch.from_numpy(rng.integers(0, 4, 3000))
    m = SplitMetrics()
    for s in torch.arange(3000).split(700):
        m.update(pred[s], pred[s], pred[s], y[s], torch.zeros(len(s)), snr_bin[s], snr_bin[s] * 0, None, sigma[s])
    out = m.compute()
    z = ((pred - y) / sigma).double().numpy()
    for name, sel in bins.snr_slices(snr_bin.numpy()):  # all, then every SNR bin, each against numpy
        suffix = "" if name == "all" else f"_snr_{name}"
        np.testing.assert_allclose(out[f"z_std{suffix}"], z[sel].std(), rtol=1e-5)
        np.testing.assert_allclose(out[f"coverage_1sigma{suffix}"], (np.abs(z[sel]) <= 1).mean(), rtol=1e-6)
        np.testing.assert_allclose(out[f"coverage_2sigma{suffix}"], (np.abs(z[sel]) <= 2).mean(), rtol=1e-6)


def test_snr_slices_give_the_same_rows_for_numpy_and_torch():
    idx = np.array([3, 0, 1, 1, 2, 3, 0])
    for high_first in (False, True):
        as_numpy = bins.snr_slices(idx, high_first=high_first, prefix="SNR ")
        as_torch = bins.snr_slices(torch.from_numpy(idx), high_first=high_first, prefix="SNR ")
        assert [n for n, _ in as_numpy] == [n for n, _ in as_torch]
        assert [n for n, _ in as_numpy][:2] == (["all", "SNR H"] if high_first else ["all", "SNR X"])
        for (_, a), (_, b) in zip(as_numpy, as_torch):
            assert isinstance(b, torch.Tensor) and b.dtype == torch.bool
            np.testing.assert_array_equal(a, b.numpy())
        assert as_numpy[0][1].all() and sum(m.sum() for _, m in as_numpy[1:]) == len(idx)


def test_trained_gate_sigma_is_calibrated_at_small_n(tmp_path, tiny_dir):
    cli = cli_main(
        [
            "fit",
            "--config",
            str(CONFIGS / "dual_tower.yaml"),
            "--data.data_dir",
            tiny_dir,
            "--data.synth",
            "null",
            "--data.batch_size",
            "64",
            "--model.expert_min_samples",
            "10",
            "--model.feature_rows",
            "600",
            "--trainer.max_epochs",
            "6",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
            "--test_after_fit",
            "true",
        ]
    )
    m = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert 0.75 <= m["test/z_std"] <= 1.3, m  # 300 test stars: looser than the full-size [0.9, 1.1]
    assert 0.55 <= m["test/coverage_1sigma"] <= 0.82, m
    # tiny experts (R^2 about 0.3) leave nearly uniform residuals, lighter-tailed than any Gaussian: 2 sigma
    # covers 97-99% of these 300 stars (the full-size targets are met at 5k stars, see test_sigma_map_*)
    assert 0.88 <= m["test/coverage_2sigma"] <= 0.995, m
    assert cli.model.mixture.calibration.scale.min() > 0 and not torch.equal(
        cli.model.mixture.calibration.scale, torch.ones(4)
    )
    assert torch.isfinite(cli.model.mixture.calibration.ref).all() and (cli.model.mixture.calibration.power > 0).all()


def test_coverage_scale_is_exact_for_gaussian_z_and_balances_heavy_tails():
    from moe.gates.sigma_map import GAUSS_1SIGMA, GAUSS_2SIGMA, coverage_scale

    rng = np.random.default_rng(2)
    z = rng.normal(0, 2.5, 200_000)
    assert abs(coverage_scale(np.abs(z)) - 2.5) < 0.03  # Gaussian: the std itself
    t = rng.standard_t(6, 200_000)  # heavy tails: RMS-scaling would over-cover 1 sigma

    def miss(scale):
        cov1, cov2 = (np.abs(t / scale) <= 1).mean(), (np.abs(t / scale) <= 2).mean()
        return (cov1 - GAUSS_1SIGMA) ** 2 + (cov2 - GAUSS_2SIGMA) ** 2, cov1

    (loss, cov1), (rms_loss, rms_cov1) = miss(coverage_scale(np.abs(t))), miss(np.sqrt(np.mean(t**2)))
    assert loss < rms_loss and abs(cov1 - GAUSS_1SIGMA) < abs(rms_cov1 - GAUSS_1SIGMA)
    assert coverage_scale(np.array([1.0, 3.0])) == np.sqrt(5.0)  # too few values: the RMS


def _targets_met(z: np.ndarray) -> bool:
    """The calibration targets: std of z in [0.9, 1.1], 65-71% of |z| <= 1, 93-97% of |z| <= 2."""
    return 0.9 <= z.std() <= 1.1 and 0.65 <= np.mean(np.abs(z) <= 1) <= 0.71 and 0.93 <= np.mean(np.abs(z) <= 2) <= 0.97


def _residuals(shape: str, seed: int = 4, n: int = 24_000):
    """Heteroscedastic residuals in 4 groups whose raw sigma is off by a factor per group."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 4, n)
    sigma_true = np.exp(rng.normal(0, 0.4, n)) * np.array([0.3, 0.5, 0.8, 1.2])[group]
    e = rng.normal(size=n) if shape == "gauss" else rng.uniform(-np.sqrt(3), np.sqrt(3), n)
    raw = sigma_true / np.array([0.7, 1.0, 1.3, 2.0])[group]
    return np.abs(sigma_true * e), raw, group


def _mapped(fit, raw, group):
    scale, ref, gamma = fit
    return scale[group] * ref[group] * (raw / ref[group]) ** gamma


def test_sigma_map_rescales_each_group_and_leaves_gaussian_tails():
    abs_r, raw, group = _residuals("gauss")
    half = np.arange(len(abs_r)) < len(abs_r) // 2
    scale, ref, gamma = sigma_map(abs_r[half], raw[half], group[half])
    assert abs(gamma - 1) <= 0.1, gamma  # Gaussian residuals need no exponent
    np.testing.assert_allclose(scale, [0.7, 1.0, 1.3, 2.0], rtol=0.06)
    z = abs_r / _mapped((scale, ref, gamma), raw, group)  # held-out half, |z|
    for g in range(4):
        zg = z[~half & (group == g)]
        assert _targets_met(np.concatenate([zg, -zg])), g


def test_sigma_map_fattens_light_tails_to_the_targets():
    abs_r, raw, group = _residuals("uniform")  # bounded residuals: no factor alone gives both coverages
    half = np.arange(len(abs_r)) < len(abs_r) // 2
    fit = sigma_map(abs_r[half], raw[half], group[half])
    assert fit[2] > 1.5, fit[2]
    z = abs_r / _mapped(fit, raw, group)
    scale_only = np.array([coverage_scale(abs_r[half & (group == g)] / raw[half & (group == g)]) for g in range(4)])
    z_scale = abs_r / (scale_only[group] * raw)
    for g in range(4):
        sel = ~half & (group == g)
        assert _targets_met(np.concatenate([z[sel], -z[sel]])), g
        assert not _targets_met(np.concatenate([z_scale[sel], -z_scale[sel]])), g


def test_sigma_map_small_and_empty_groups():
    abs_r, raw, group = np.array([1.0, 3.0, 2.0, 2.0]), np.ones(4), np.array([0, 0, 2, 2])
    scale, ref, gamma = sigma_map(abs_r, raw, group)
    assert gamma == 1.0  # too few residuals for the exponent
    np.testing.assert_allclose(scale, [np.sqrt(5.0), 1.0, 2.0, 1.0])  # below MIN_ROWS: the RMS; empty: 1
    np.testing.assert_allclose(ref, [1.0, 1.0, 1.0, 1.0])


def test_cell_scales_even_out_the_coverage_across_the_prediction():
    """Residuals shrunk toward the label mean: within a group their sd grows toward the middle of the predictions
    (sd = 1.5 - 0.6 |x|). A factor per group leaves the middle under-covered and the edges over-covered; the cells
    (quintiles of x) bring every cell of held-out stars to the targets, the edges of each group at its x
    quantiles; a group too small for cells keeps one cell and factor 1."""
    from moe.gates.sigma_map import MIN_CELL_ROWS, N_CELLS, apply_cells, cell_scales

    rng = np.random.default_rng(7)
    n = 80_000
    group = rng.integers(0, 2, n)
    x = rng.uniform(-1.5, 1.5, n) + group  # group 1 is shifted: its own quantiles
    sd = 1.5 - 0.6 * np.abs(x - group)
    abs_z = np.abs(rng.normal(size=n) * sd)
    abs_z /= np.array([coverage_scale(abs_z[group == g]) for g in range(2)])[group]  # calibrated per group
    half = np.arange(n) < n // 2
    edges, scale = cell_scales(abs_z[half], x[half], group[half], 3)
    assert edges.shape == (3, N_CELLS - 1) and scale.shape == (3, N_CELLS)
    for g in range(2):
        np.testing.assert_allclose(edges[g], np.quantile(x[half & (group == g)], [0.2, 0.4, 0.6, 0.8]))
    assert np.isinf(edges[2]).all() and (scale[2] == 1).all()  # no stars: one cell, factor 1
    assert scale[0, 2] > 1.2 * scale[0, 0]  # the middle's errors are the larger
    z = abs_z / apply_cells(x, edges[group], scale[group])
    for g in range(2):
        cell = np.digitize(x, edges[g])
        for c in range(N_CELLS):
            sel = ~half & (group == g) & (cell == c)
            before = np.mean(abs_z[sel] <= 1)
            assert _targets_met(np.concatenate([z[sel], -z[sel]])), (g, c, before)
            if c in (0, 2):
                assert not 0.65 <= before <= 0.71, (g, c, before)  # per group only: off in the middle and at edges
    small = cell_scales(abs_z[: N_CELLS * MIN_CELL_ROWS - 1], x[: N_CELLS * MIN_CELL_ROWS - 1], np.zeros(2499, int), 1)
    assert np.isinf(small[0]).all() and (small[1] == 1).all()


def test_validation_check_acts_only_beyond_sampling_noise():
    rng = np.random.default_rng(5)
    z = np.abs(rng.normal(size=5000))
    assert abs(validation_check(z) - 1) < 0.01  # calibrated: left (nearly) alone
    assert abs(validation_check(1.25 * z) - 1.25) < 0.04  # clearly too narrow: rescaled nearly in full
    assert validation_check(1.25 * z[:10]) == 1.0  # too few stars to say


def test_latest_rows_keep_the_newest_rows_per_bin():
    ring = LatestRows(capacity=4, width=2, n_bins=2)
    rows = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    ring.update(rows[:3], torch.zeros(3, dtype=torch.long))
    ring.update(rows[3:], torch.tensor([0, 1, 0]))
    ring.update(torch.tensor([[float("nan"), 1.0]]), torch.tensor([1]))  # skipped
    kept = ring.rows()
    assert sorted(kept[0][:, 0].tolist()) == [2.0, 4.0, 6.0, 10.0]  # the latest 4 of bin 0
    assert kept[1].tolist() == [[8.0, 9.0]]
    both = ring.rows(gather=lambda t: torch.stack([t, t]))  # two ranks' rings
    assert len(both[0]) == 8 and len(both[1]) == 2
    ring.reset()
    assert [len(r) for r in ring.rows()] == [0, 0]
