"""Bins cover every sample with the stated edges; the SNR and noise definitions."""

from __future__ import annotations

import numpy as np
import torch

from moe.data import bins
from moe.data.noise import add_noise, add_noise_np, snr


def test_phys_bins_edges_and_coverage():
    teff = np.array([3750, 4499.9, 4500, 5249.9, 5250, 6000, 3000, 7000])
    mh = np.array([-2.0, -1.0001, -1.0, -0.0001, 0.0, 0.5, -3.0, 1.0])
    got = bins.phys_bin(teff, mh)
    assert got.tolist() == [0, 3 * 0 + 0, 3 * 1 + 1, 3 * 1 + 1, 3 * 2 + 2, 3 * 2 + 2, 0, 8]
    rng = np.random.default_rng(0)
    t, m = rng.uniform(3750, 6000, 10_000), rng.uniform(-2, 0.5, 10_000)
    b = bins.phys_bin(t, m)
    assert b.min() == 0 and b.max() == 8 and np.bincount(b, minlength=9).sum() == t.size
    assert bins.PHYS_BIN_NAMES[0] == "Cool-Poor" and bins.PHYS_BIN_NAMES[8] == "Hot-Rich"


def test_snr_bins_right_closed():
    s = np.array([0.0, 2.0, 2.0001, 4.0, 4.5, 7.0, 7.0001, np.inf])
    assert bins.snr_bin(s).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [bins.SNR_BIN_NAMES[i] for i in bins.snr_bin(np.array([1.0, 3.0, 5.0, 9.0]))] == ["X", "L", "M", "H"]
    assert bins.cell(np.array([8]), np.array([3])).item() == 35


def test_edge_distance():
    d = bins.edge_distance(np.array([4500.0, 4575.0, 3800.0]), np.array([-1.5, -1.5, 0.25]))
    np.testing.assert_allclose(d, [0.0, 0.1, 0.5])


def test_snr_definition():
    rng = np.random.default_rng(0)
    flux, error = rng.uniform(0.5, 1.5, (5, 40)), rng.uniform(0.1, 0.3, (5, 40))
    for nl in (0.5, 1.0, 2.0):
        expect = np.sqrt((flux**2).sum(1)) / np.sqrt(((nl * error) ** 2).sum(1))
        np.testing.assert_allclose(snr(flux, error, nl), expect, rtol=1e-12)
    assert np.isinf(snr(flux, error, 0.0)).all()


def test_noise_statistics_and_freshness():
    torch.manual_seed(0)
    flux = torch.ones(20_000, 8)
    error = torch.linspace(0.1, 0.8, 8).expand(20_000, 8).contiguous()
    for nl in (0.5, 1.0):
        a = add_noise(flux, error, nl) - flux
        b = add_noise(flux, error, nl) - flux
        assert a.mean(0).abs().max() < 4 * (nl * 0.8) / np.sqrt(20_000)
        np.testing.assert_allclose((a / error).std(0).numpy(), nl, rtol=0.03)
        assert not torch.equal(a, b)  # fresh draws each call (each epoch)
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].abs() < 0.02
    assert add_noise(flux, error, 0.0) is flux
    n = add_noise_np(flux.numpy(), error.numpy(), 1.0, np.random.default_rng(0))
    np.testing.assert_allclose(((n - 1) / error.numpy()).std(0), 1.0, rtol=0.03)
