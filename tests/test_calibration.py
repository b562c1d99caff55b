"""Per-star sigma: the model-error variance estimate against a closed form, the z metrics against numpy,
and calibration of a trained gate at small N (looser bounds than the README's full-size table)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moe.cli import cli_main
from moe.data import bins
from moe.experts.calibration import model_error_variance
from moe.gates.metrics import SplitMetrics

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
    np.testing.assert_allclose(out["z_std"], z.std(), rtol=1e-5)
    np.testing.assert_allclose(out["coverage_1sigma"], (np.abs(z) <= 1).mean(), rtol=1e-6)
    np.testing.assert_allclose(out["coverage_2sigma"], (np.abs(z) <= 2).mean(), rtol=1e-6)
    sel = snr_bin.numpy() == 2
    np.testing.assert_allclose(out["z_std_snr_M"], z[sel].std(), rtol=1e-5)


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
    assert 0.88 <= m["test/coverage_2sigma"] <= 0.99, m
    assert cli.model.sigma_scale.min() > 0 and not torch.equal(cli.model.sigma_scale, torch.ones(4))


def test_coverage_scale_is_exact_for_gaussian_z_and_balances_heavy_tails():
    from moe.experts.calibration import GAUSS_1SIGMA, GAUSS_2SIGMA, coverage_scale

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
