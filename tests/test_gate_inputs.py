"""Cached, per-epoch-noised gate inputs against the dense reference computed from the noisy spectra."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import torch
from reference_gate import dense_physics, reference_inputs

from moe.data.datamodule import SpectraDataModule
from moe.data.noise import NOISE_KEYS, add_input_noise, noisy_inputs
from moe.data.row_cache import read_rows
from moe.data.synth import SpectrumModel, generate
from moe.features import PhysicsFeatures
from moe.features.gate_inputs import row_inputs
from moe.gates import GatedMoE
from moe.prepare import ensure_inputs, prepare


@pytest.fixture(scope="module")
def prepared(tiny_dir, tmp_path_factory):
    dm = SpectraDataModule(
        tiny_dir, batch_size=128, num_workers=0, synth=None, cache_dir=str(tmp_path_factory.mktemp("inputs_cache"))
    )
    model = GatedMoE(
        fusion="concat", n_pixels=dm.n_pixels, noise_level=dm.noise_level, expert_min_samples=10, feature_rows=600
    )
    model.load_prepared(prepare(dm, model.prepare_config(), progress=False))
    return dm, model


def _full_draw_parts(model, error, z, noise_level):
    """The window normals and the rest-pixel projection noise of one full-spectrum draw z [B, D]."""
    weight, _ = model.mixture.projection()
    pixels = model.mixture.physics.pixels
    n_rest = error * z
    n_rest[:, pixels] = 0
    return z[:, pixels], n_rest @ weight.T


@pytest.mark.parametrize("n_pixels", [4096, 256])
def test_window_features_equal_dense_reference(n_pixels):
    model = SpectrumModel(n_pixels)
    flux, error, _ = generate(model, np.random.default_rng(0), 32)
    noisy = torch.from_numpy(flux + error * np.random.default_rng(1).standard_normal(flux.shape).astype(np.float32))
    feats = PhysicsFeatures(n_pixels)
    feats.set_wave(model.wave)
    rng = np.random.default_rng(2)
    feats.set_pca(rng.normal(1, 0.1, n_pixels), np.linalg.qr(rng.normal(size=(n_pixels, 4)))[0].T)
    assert 0 < feats.n_window_pixels < n_pixels if n_pixels == 4096 else feats.n_window_pixels > 0
    torch.testing.assert_close(feats(noisy), dense_physics(feats, noisy), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats(noisy.double()), dense_physics(feats, noisy.double()), rtol=1e-12, atol=1e-12)
    # the window pixels are derived state: rebuilt when a state dict is loaded
    fresh = PhysicsFeatures(n_pixels)
    fresh.load_state_dict(feats.state_dict())
    assert torch.equal(fresh.pixels, feats.pixels)
    torch.testing.assert_close(fresh(noisy), feats(noisy))


@pytest.mark.parametrize("noise_level", [1.0, 0.5])
def test_noised_cached_inputs_equal_reference_on_the_same_draw(prepared, noise_level):
    dm, model = prepared
    spectra = next(iter(dm.stream("train", shuffle=False, batch_size=200)))
    cached = next(iter(dm.stream("train", shuffle=False, batch_size=200, cached=True)))
    assert torch.equal(spectra["row"], cached["row"]) and "flux" not in cached
    torch.manual_seed(3)
    z = torch.randn(spectra["flux"].shape)
    ref = reference_inputs(model.mixture, spectra["flux"] + noise_level * spectra["error"] * z, spectra["error"])
    weight, _ = model.mixture.projection()
    z_w, u = _full_draw_parts(model, spectra["error"], z, noise_level)
    got = add_input_noise(cached, weight[:, model.mixture.physics.pixels], noise_level, z_w, u)
    phys, qual = model.mixture.raw_features(got)
    k, n = model.mixture.experts.n_experts, len(model.mixture.labels)
    torch.testing.assert_close(phys, ref["phys"], rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(qual, ref["quality"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["proj"][:, : k * n].unflatten(1, (k, n)), ref["experts"], rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(got["proj"][:, k * n : k * n + n], ref["global"], rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(got["var"][:, : k * n].unflatten(1, (k, n)), ref["var"], rtol=1e-5, atol=1e-9)
    assert torch.equal(got["snr"], spectra["snr"]) and torch.equal(got["snr_bin"], spectra["snr_bin"])


def test_forward_on_cached_and_on_spectra_agree(prepared):
    dm, model = prepared
    for split in ("val", "test"):
        spectra = next(iter(dm.stream(split, batch_size=150)))
        cached = next(iter(dm.stream(split, batch_size=150, cached=True)))
        a, b = model(spectra), model(cached)
        for name in ("pred", "sigma", "weights", "expert_preds", "global_pred"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-4, atol=1e-4)
    clean = next(iter(dm.stream("train", batch_size=8, cached=True)))
    with pytest.raises(ValueError, match="noise them first"):
        model(clean)


def test_rest_noise_factor_matches_closed_form_covariance(prepared):
    dm, model = prepared
    cached = next(iter(dm.stream("train", shuffle=False, batch_size=5, cached=True)))
    spectra = next(iter(dm.stream("train", shuffle=False, batch_size=5)))
    weight = model.mixture.projection()[0].double().numpy()
    rest = np.ones(dm.n_pixels, bool)
    rest[model.mixture.physics.pixels.numpy()] = False
    e = spectra["error"].double().numpy()
    for i in range(5):  # numpy closed form: A_r diag(e_r^2) A_r^T
        cov = (weight[:, rest] * e[i, rest] ** 2) @ weight[:, rest].T
        c = cached["chol"][i].double().numpy()
        np.testing.assert_allclose(c @ c.T, cov, rtol=1e-4, atol=1e-6 * np.abs(cov).max())
    # drawn noise has that covariance (empirically, 40k draws of one row)
    one = {
        k: v[:1].expand(40_000, *v.shape[1:]) for k, v in cached.items() if k in ("chol", "win_error", "win", "proj")
    }
    out = noisy_inputs(one, torch.zeros(weight.shape[0], one["win"].shape[1]), 1.0, torch.Generator().manual_seed(0))
    emp = np.cov((out["proj"] - one["proj"]).double().numpy().T)
    cov0 = (weight[:, rest] * e[0, rest] ** 2) @ weight[:, rest].T
    sd = np.sqrt(np.diag(cov0))
    np.testing.assert_allclose(emp / np.outer(sd, sd), cov0 / np.outer(sd, sd), atol=0.03)
    assert not any(k in out for k in NOISE_KEYS)


def test_caches_equal_recomputed_inputs(prepared):
    dm, model = prepared
    weight, bias = model.mixture.projection()
    for split in ("train", "val"):
        spectra = next(iter(dm.stream(split, shuffle=False, batch_size=300)))
        cached = next(iter(dm.stream(split, shuffle=False, batch_size=300, cached=True)))
        fresh = row_inputs(
            spectra["flux"], spectra["error"], weight, bias, model.mixture.physics.pixels, noise_factor=split == "train"
        )
        for name, v in fresh.items():
            torch.testing.assert_close(cached[name], v, rtol=0, atol=0)


def test_stale_input_cache_is_rebuilt(tiny_dir, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(tiny_dir, data, ignore=shutil.ignore_patterns("*.h5.tmp*", "noisy_*", "gate_inputs_*", "experts"))
    dm = SpectraDataModule(str(data), num_workers=0, synth=None)
    weight = torch.randn(6, dm.n_pixels) * 0.01
    pixels = torch.arange(10, 40)
    first = ensure_inputs(dm, "val", weight, torch.zeros(6), pixels, progress=False)[0]
    before = read_rows(first, 0, 300)
    assert ensure_inputs(dm, "val", weight, torch.zeros(6), pixels, progress=False)[0] == first
    shard = dm.val_set.paths[0]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the source changed
    caplog.set_level(logging.INFO, logger="moe")
    again = ensure_inputs(dm, "val", weight, torch.zeros(6), pixels, progress=False)[0]
    assert again == first and "rebuilding val gate inputs" in caplog.text and "source_mtime_ns" in caplog.text
    after = read_rows(again, 0, 300)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    # other experts: another cache file, not an overwrite
    other = ensure_inputs(dm, "val", weight * 2, torch.zeros(6), pixels, progress=False)[0]
    assert other != first and first.is_file()
