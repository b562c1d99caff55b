"""Features against independent references: scipy/numpy statistics, a per-spectrum numpy loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe.data.error_stats import quality_stats
from moe.data.synth import SpectrumModel, generate
from moe.features import PhysicsFeatures, Standardizer, quality_features
from moe.features.physics import LINES


def test_quality_matches_scipy():
    rng = np.random.default_rng(0)
    e = np.abs(rng.standard_t(3, (50, 4096))) * 0.1 + 0.05  # heavy tails like sky lines
    e[0] = np.linspace(0.1, 0.2, 4096)  # symmetric row: skew ~ 0
    got = quality_features(torch.from_numpy(e.astype(np.float32))).double().numpy()
    ref = quality_stats(e.astype(np.float32))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    odd = rng.uniform(0.1, 0.3, (4, 257))  # odd length: median/quantiles on exact ranks
    np.testing.assert_allclose(quality_features(torch.from_numpy(odd)).numpy(), quality_stats(odd), rtol=1e-10)
    const = quality_features(torch.full((2, 10), 0.3))
    assert torch.isfinite(const).all() and const[0, 8] == 0 and const[0, 9] == 0


def _sorted_reference(error: torch.Tensor) -> torch.Tensor:
    """The statistics from a full sort of each row, all rows at once (the definition before the partial sort)."""
    e, s = error.double(), error.sort(dim=-1).values.double()
    n = error.shape[-1]

    def quantile(q):
        lo = int(q * (n - 1))
        hi, frac = min(lo + 1, n - 1), q * (n - 1) - lo
        return s[:, lo] * (1 - frac) + s[:, hi] * frac

    mean = e.mean(-1)
    c2 = (e - mean[:, None]).square()
    m2, m3, m4 = c2.mean(-1), (c2 * (e - mean[:, None])).mean(-1), c2.square().mean(-1)
    ok = m2 > torch.finfo(torch.float64).tiny
    safe = torch.where(ok, m2, torch.ones_like(m2))
    skew = torch.where(ok, m3 / safe.pow(1.5), torch.zeros_like(m2))
    kurt = torch.where(ok, m4 / safe.square() - 3.0, torch.zeros_like(m2))
    cols = [mean, m2.sqrt(), s[:, 0], s[:, -1], quantile(0.5), e.sum(-1), quantile(0.25), quantile(0.75), skew, kurt]
    return torch.stack(cols, dim=-1).to(error.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape", [(200, 4096), (64, 4096), (65, 257), (3, 2), (5, 1), (0, 4096)])
def test_quality_pieces_and_partial_sort_equal_a_full_sort(shape, dtype):
    """Rows in pieces of 64 and the quantiles from a partial sort give exactly the values of a full sort of all
    rows at once, masked (NaN, inf) and constant rows included."""
    g = torch.Generator().manual_seed(1)
    error = (torch.rand(*shape, generator=g) * 0.2 + 0.05).to(dtype)
    if shape[0] > 3 and shape[1] > 3:
        error[1, ::3] = float("nan")
        error[2, 1] = float("inf")
        error[3] = 0.3
    got = quality_features(error)
    assert got.dtype == dtype and got.shape == (shape[0], 10)
    torch.testing.assert_close(got, _sorted_reference(error), rtol=0, atol=0, equal_nan=True)


def _band_mean(f, wave, lo, hi):
    m = (wave >= lo) & (wave <= hi)
    return f[m].mean() if m.any() else f[np.argmin(np.abs(wave - 0.5 * (lo + hi)))]


def _continuum(lam, lb, lr, cb, cr, floor):
    return max(cb + (cr - cb) * (lam - lb) / (lr - lb), floor)


def _reference(flux, wave, core_half=0.8, floor=0.05):
    """Straightforward per-spectrum implementation of the documented definitions."""
    width = np.gradient(wave)
    out = []
    for f in flux:
        row = {}
        for line in LINES:
            cb, cr = _band_mean(f, wave, *line.blue), _band_mean(f, wave, *line.red)
            ends = (np.mean(line.blue), np.mean(line.red), cb, cr, floor)
            depths = []
            for c in line.centres:
                m = (wave >= c - core_half) & (wave <= c + core_half)
                if not m.any():
                    m = np.zeros_like(m)
                    m[np.argmin(np.abs(wave - c))] = True
                depths.append(1 - f[m].mean() / _continuum(wave[m].mean(), *ends))
            win = (wave >= line.window[0]) & (wave <= line.window[1])
            ew = sum((1 - f[j] / _continuum(wave[j], *ends)) * width[j] for j in np.flatnonzero(win))
            row[line.name] = (np.mean(depths), ew)
        out.append(
            [
                row["CaT8498"][0],
                row["CaT8498"][1],
                row["CaT8542"][0],
                row["CaT8542"][1],
                row["CaT8662"][0],
                row["CaT8662"][1],
                row["CaT8498"][1] + row["CaT8542"][1] + row["CaT8662"][1],
                row["NaI"][0],
                row["NaI"][1],
            ]
        )
    return np.array(out)


@pytest.mark.parametrize("n_pixels", [4096, 256])
def test_physics_features_match_reference(n_pixels):
    model = SpectrumModel(n_pixels)
    flux, error, _ = generate(model, np.random.default_rng(0), 20)
    noisy = flux + error * np.random.default_rng(1).standard_normal(flux.shape).astype(np.float32)
    feats = PhysicsFeatures(n_pixels)
    feats.set_wave(model.wave)
    rng = np.random.default_rng(2)
    mean, comps = rng.normal(1, 0.1, n_pixels), np.linalg.qr(rng.normal(size=(n_pixels, 4)))[0].T
    feats.set_pca(mean, comps)
    got = feats(torch.from_numpy(noisy).double()).numpy()
    # window weights are float32 buffers: agreement to ~1e-6 (A for EWs)
    np.testing.assert_allclose(got[:, :9], _reference(noisy.astype(np.float64), model.wave), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(got[:, 9:], (noisy - mean) @ comps.T, rtol=1e-5, atol=1e-6)
    assert feats(torch.from_numpy(noisy)).dtype == torch.float32


def test_physics_features_respond_to_gravity():
    model = SpectrumModel(4096)
    import pandas as pd

    base = {
        "T_eff": 4000.0,
        "M_H": 0.0,
        "mag": 21.0,
        "seeing": 0.8,
        "airmass": 1.2,
        "s_sky": 1.0,
        "s_oh": 1.0,
        "eta_field": 0.9,
        "r_tell": 0.1,
        "a_M": 0.0,
        "C_M": 0.0,
        "redshift": 0.0,
    }
    df = pd.DataFrame([base | {"log_g": 1.5}, base | {"log_g": 4.5}])
    feats = PhysicsFeatures(4096)
    feats.set_wave(model.wave)
    f = feats(torch.from_numpy(model.flux(df))).numpy()
    assert f[1, 8] > f[0, 8] + 1.0  # Na I EW much larger in the dwarf


def test_wave_validation():
    feats = PhysicsFeatures(10)
    with pytest.raises(ValueError, match="shape"):
        feats.set_wave(np.linspace(7100, 8850, 11))
    with pytest.raises(ValueError, match="strictly increasing"):
        feats.set_wave(np.linspace(8850, 7100, 10))
    with pytest.raises(ValueError, match="outside the wavelength grid"):
        PhysicsFeatures(10).set_wave(np.linspace(6000, 7000, 10))


def test_standardizer():
    x = torch.randn(1000, 3, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.0]) + torch.tensor([2.0, -1.0, 7.0])
    s = Standardizer(3).double().fit(x.split(100))
    z = s(x)
    np.testing.assert_allclose(z[:, :2].mean(0).numpy(), 0, atol=1e-12)
    np.testing.assert_allclose(z[:, :2].std(0, unbiased=False).numpy(), 1, rtol=1e-12)
    assert torch.all(z[:, 2] == 0)  # constant feature: scale 1
    with pytest.raises(ValueError, match="at least 2 rows"):
        Standardizer(3).fit([x[:1]])
