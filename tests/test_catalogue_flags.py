"""Masked pixels, the OOD score, the flag word and the FITS catalogue (:mod:`moe.catalogue`)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import predict_catalogue

from moe.catalogue.flags import CatalogueFlag, describe
from moe.catalogue.predict import flag_word, label_edges
from moe.data.bins import snr_bin
from moe.data.shards import (
    MASK_KEY,
    ShardError,
    find_split,
    inspect_shard,
    read_block,
    read_observed,
    read_params,
    read_wave,
    write_shard,
)
from moe.features.lowrank import LowRankSpectra

# ---- the low-rank model against closed forms and Monte Carlo --------------------------------------------------------


def _model(d: int = 40, r: int = 3, seed: int = 0) -> LowRankSpectra:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, r)))
    m = LowRankSpectra(d, r)
    m.mean.copy_(torch.from_numpy(1.0 + 0.1 * rng.standard_normal(d)))
    m.components.copy_(torch.from_numpy(q.T))
    m.variance.copy_(torch.tensor([0.5, 0.2, 0.05][:r], dtype=torch.float64))
    m.resid_var.copy_(torch.from_numpy(0.002 * (1 + rng.random(d))))
    return m


def test_imputation_variance_matches_monte_carlo():
    """The variance of a linear map on the filled spectrum about its value on the clean one, drawn from the
    model itself (coefficients, rest and noise): the formula of LowRankSpectra.impute within MC error."""
    d, s = 40, 0.7
    model = _model(d)
    rng = np.random.default_rng(1)
    error = torch.from_numpy(0.05 + 0.1 * rng.random((1, d)))
    usable = torch.ones(1, d, dtype=torch.bool)
    usable[0, 10:22] = False
    maps = torch.from_numpy(rng.standard_normal((3, d)) * 0.3)
    n = 20000
    a = rng.standard_normal((n, 3)) * np.sqrt(model.variance.numpy())
    clean = (
        model.mean.numpy()
        + a @ model.components.numpy()
        + rng.standard_normal((n, d)) * np.sqrt(model.resid_var.numpy())
    )
    noisy = clean + s * error.numpy() * rng.standard_normal((n, d))
    filled, var = model.impute(torch.from_numpy(noisy), error.expand(n, d), usable.expand(n, d), s, maps)
    miss = (filled.numpy() - clean) @ maps.numpy().T  # [n, P]
    np.testing.assert_allclose(miss.var(0), var[0].numpy(), rtol=0.05)
    np.testing.assert_allclose(var.numpy(), var[:1].expand(n, 3).numpy(), rtol=1e-9)  # the same for every draw
    assert np.allclose(filled.numpy()[:, usable[0]], noisy[:, usable[0].numpy()])  # usable pixels untouched
    # without masked pixels: the plain noise variance, the spectrum as it is
    full = torch.ones(1, d, dtype=torch.bool)
    f0, v0 = model.impute(torch.from_numpy(noisy[:1]), error, full, s, maps)
    np.testing.assert_allclose(v0[0].numpy(), (s**2 * error[0].square() * maps.square()).sum(1).numpy(), rtol=1e-12)
    assert torch.equal(f0, torch.from_numpy(noisy[:1]))


def _masks(n: int, d: int, rng) -> torch.Tensor:
    """[n, d] usable pixels: none masked, a few at random, a block, most of the star (more rows than CHUNK)."""
    usable = torch.ones(n, d, dtype=torch.bool)
    for i in range(n):
        kind = i % 4
        if kind == 1:
            usable[i, rng.choice(d, size=1 + i % 5, replace=False)] = False
        elif kind == 2:
            usable[i, 12 + i % 7 : 22 + i % 7] = False
        elif kind == 3:
            usable[i, rng.choice(d, size=d - 6, replace=False)] = False
    return usable


def test_imputation_against_the_closed_form_star_by_star():
    """Filled flux and map variance of a batch of more than ``CHUNK`` stars with every kind of mask (none, a few
    pixels, a block, all but 6) against the module docstring's formula written out per star with numpy's inverse:
    the GEMM forms, the products over each star's masked pixels and the chunking change nothing but rounding."""
    from moe.features.lowrank import CHUNK

    d, s, n = 40, 0.8, 2 * CHUNK + 22
    model = _model(d)
    rng = np.random.default_rng(5)
    flux = torch.from_numpy(1.0 + 0.3 * rng.standard_normal((n, d)))
    error = torch.from_numpy(0.05 + 0.2 * rng.random((n, d)))
    usable = _masks(n, d, rng)
    maps = torch.from_numpy(rng.standard_normal((5, d)) * 0.3)
    filled, var = model.impute(flux, error, usable, s, maps)
    u, mean, rv = model.components.numpy(), model.mean.numpy(), model.resid_var.numpy()
    a_maps = maps.numpy()
    for i in range(n):
        o = usable[i].numpy()
        m, e2 = ~o, s**2 * error[i].numpy() ** 2
        v = rv + e2
        cov = np.linalg.inv((u[:, o] / v[o]) @ u[:, o].T + np.diag(1 / model.variance.numpy()))
        a_hat = cov @ (u[:, o] / v[o]) @ (flux[i].numpy()[o] - mean[o])
        want = np.where(o, flux[i].numpy(), mean + a_hat @ u)
        g = u[:, m] @ a_maps[:, m].T
        h = (u[:, o] * (e2[o] / v[o])) @ a_maps[:, o].T
        want_var = (
            (a_maps[:, o] ** 2) @ e2[o]
            + np.einsum("rp,rq,qp->p", g, cov, g)
            + 2 * np.einsum("rp,rq,qp->p", h, cov, g)
            + (a_maps[:, m] ** 2) @ rv[m]
        )
        np.testing.assert_allclose(filled[i].numpy(), want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(var[i].numpy(), want_var, rtol=1e-7)


def test_ood_parts_of_a_batch_are_those_of_each_star_alone():
    """``ood_parts`` of more than ``CHUNK`` stars with every kind of mask equals the parts of each star alone:
    the chunking and the one-GEMM neighbour search do not mix stars."""
    from moe.features.lowrank import CHUNK

    d, s, n = 40, 1.0, CHUNK + 30
    model = _model(d)
    rng = np.random.default_rng(6)
    model.train_coef = torch.from_numpy(rng.standard_normal((300, 2)))
    flux = torch.from_numpy(0.3 + 0.4 * rng.standard_normal((n, d)))
    error = torch.from_numpy(0.1 + 0.3 * rng.random((n, d)))
    usable = _masks(n, d, rng)
    distance, chi2 = model.ood_parts(flux, error, usable, s)
    for i in range(0, n, 7):
        one = model.ood_parts(flux[i : i + 1], error[i : i + 1], usable[i : i + 1], s)
        np.testing.assert_allclose(distance[i].item(), one[0].item(), rtol=1e-9)
        np.testing.assert_allclose(chi2[i].item(), one[1].item(), rtol=1e-12)


def test_ood_parts_against_numpy_lstsq_and_a_nearest_neighbour_search():
    """chi2 and the distance against numpy's lstsq on the usable pixels (flux clipped at 0, the clipping's bias
    taken out by the same fixed point written with scipy's normal distribution) and a brute-force nearest
    training star, with and without masked pixels; ood_score is the larger ratio to its SNR bin's thresholds."""
    from scipy.stats import norm

    from moe.features.lowrank import DEBIAS_STEPS

    d, s = 40, 1.0
    model = _model(d)
    rng = np.random.default_rng(2)
    model.train_coef = torch.from_numpy(rng.standard_normal((50, 2)))
    scale = torch.tensor([[3.0, 1.5], [2.0, 1.2], [1.0, 1.1], [0.5, 1.05]], dtype=torch.float64)
    model.ood_scale.copy_(scale)
    flux = torch.from_numpy(0.3 + 0.4 * rng.standard_normal((2, d)))  # some pixels below 0: clipped
    error = torch.from_numpy(0.1 + 0.3 * rng.random((2, d)))
    usable = torch.ones(2, d, dtype=torch.bool)
    usable[1, 5:15] = False
    distance, chi2 = (p.numpy() for p in model.ood_parts(flux, error, usable, s))
    for i in range(2):
        o = usable[i].numpy()
        u = model.components.numpy()[:, o].T
        mean, sd = model.mean.numpy()[o], s * error[i].numpy()[o]
        clipped = np.maximum(flux[i].numpy()[o], 0)
        coef = np.linalg.lstsq(u, clipped - mean, rcond=None)[0]
        for _ in range(DEBIAS_STEPS):
            x = mean + u @ coef
            bias = sd * norm.pdf(x / sd) - x * norm.cdf(-x / sd)  # E[max(x + n, 0)] - x
            y = clipped - bias - mean
            coef = np.linalg.lstsq(u, y, rcond=None)[0]
        v = model.resid_var.numpy()[o] + sd**2
        np.testing.assert_allclose(chi2[i], np.mean((y - u @ coef) ** 2 / v), rtol=1e-6)
        nv = sd**2 @ (u[:, :2] ** 2)
        brute = min(np.mean((coef[:2] - t) ** 2 / nv) for t in model.train_coef.numpy())
        np.testing.assert_allclose(distance[i], brute, rtol=1e-6)
    snr = torch.from_numpy(snr_bin(np.array([1.5, 7.5])))  # bins X and H
    score = model.ood_score(flux, error, usable, s, snr).numpy()
    np.testing.assert_allclose(score, np.maximum(distance / [3.0, 0.5], chi2 / [1.5, 1.05]), rtol=1e-6)
    nothing = model.ood_score(flux, error, torch.zeros(2, d, dtype=torch.bool), s, snr)
    assert torch.isnan(nothing).all()


# ---- reading observations -------------------------------------------------------------------------------------------


def test_each_mask_form_and_an_all_masked_star(tiny_dir, tmp_path):
    """NaN / Inf flux, NaN / Inf / <= 0 error and a non-zero mask entry each mask a pixel; an all-masked star
    reads with finite values; the training reader stays strict."""
    src = find_split(tiny_dir, "test")[0]
    flux, error = read_block(src, 0, 6)
    flux[0, 3] = np.nan
    flux[1, 4] = np.inf
    error[2, 5] = 0.0
    error[3, 6] = -1.0
    error[4, 7] = np.inf
    error[4, 8] = np.nan
    mask = np.zeros(flux.shape, np.int32)
    mask[5, 9:12] = 4
    flux[5 - 5] = flux[0]  # keep row 0 as it is
    obs = tmp_path / "obs.h5"
    write_shard(obs, read_wave(src), flux, error, pd.DataFrame({"objid": np.arange(6)}), labelled=False)
    with h5py.File(obs, "a") as f:
        f.create_dataset(MASK_KEY, data=mask)
    inspect_shard(obs, labelled=False)
    values, err, usable = read_observed(obs, 0, 6)
    assert [int((~u).sum()) for u in usable] == [1, 1, 1, 1, 2, 3]
    assert not usable[0, 3] and not usable[1, 4] and not usable[2, 5] and not usable[3, 6]
    assert not usable[4, 7] and not usable[4, 8] and not usable[5, 9:12].any()
    assert np.isfinite(values).all() and np.isfinite(err).all() and (err > 0).all() and (values[~usable] == 0).all()
    assert err[2, 5] in (err[2, 4], err[2, 6])  # the nearest usable pixel's error
    # an all-masked star
    with h5py.File(obs, "a") as f:
        f[MASK_KEY][1] = 1
    values, err, usable = read_observed(obs, 0, 6)
    assert not usable[1].any() and np.isfinite(err[1]).all() and (values[1] == 0).all()
    # a mask of the wrong shape or dtype is a ShardError naming the file
    with h5py.File(obs, "a") as f:
        del f[MASK_KEY]
        f.create_dataset(MASK_KEY, data=np.zeros((6, 3), np.int32))
    with pytest.raises(ShardError, match=r"obs\.h5: dataset/arrays/mask/value shape"):
        inspect_shard(obs, labelled=False)


# ---- the flag word --------------------------------------------------------------------------------------------------


def test_each_flag_bit_set_and_not_set():
    """Row 0 sets nothing; each later row sets exactly one bit (the last two the MASKED window rule and the
    LABEL_EDGE sigma rule)."""
    nan = float("nan")
    snr = torch.tensor([5.0, 2.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0])
    masked = torch.tensor([0.05, 0.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0])
    window = torch.tensor([0.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.8, 0.0])
    predicted = torch.tensor([True, True, True, True, True, False, True, True])
    pred = torch.tensor([3.0, 3.0, 3.0, 5.5, 3.0, nan, 3.0, 4.8])
    sigma = torch.tensor([0.3, 0.3, 0.3, 0.3, 0.3, nan, 0.3, 0.3])
    ood = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, nan, 1.0, 1.0])
    edges = label_edges({"log_g": (pred, sigma)}, {"log_g": (1.0, 5.0)})
    f = flag_word(snr, masked, window, predicted, edges, ood, 1.5)
    F = CatalogueFlag
    assert f.tolist() == [0, F.LOW_SNR, F.MASKED, F.LABEL_EDGE, F.OOD, F.NO_PREDICTION, F.MASKED, F.LABEL_EDGE]
    assert [int(b) for b in F] == [1, 2, 4, 8, 16]  # fixed values: never change
    assert set(describe()) == {"1 LOW_SNR", "2 MASKED", "4 LABEL_EDGE", "8 OOD", "16 NO_PREDICTION"}


def test_label_edge_per_label_set_and_not_set():
    """Each label's edge column is set by that label alone (outside its range, or within its sigma of either
    edge), never without a prediction or a training range; LABEL_EDGE is their OR."""
    nan = float("nan")
    logg = (torch.tensor([3.0, 0.8, 3.0, 1.2, 3.0, nan]), torch.tensor([0.3, 0.1, 0.3, 0.3, 0.3, nan]))
    teff = (torch.tensor([5000.0, 5000.0, 6100.0, 5000.0, 5950.0, nan]), torch.tensor([90.0] * 5 + [nan]))
    mh = (torch.tensor([9.0] * 6), torch.tensor([0.1] * 6))  # no training range: never an edge
    ranges = {"log_g": (1.0, 5.0), "T_eff": (3750.0, 6000.0)}
    edges = label_edges({"log_g": logg, "T_eff": teff, "M_H": mh}, ranges)
    assert edges["log_g"].tolist() == [False, True, False, True, False, False]
    assert edges["T_eff"].tolist() == [False, False, True, False, True, False]
    assert edges["M_H"].tolist() == [False] * 6
    n = 6
    f = flag_word(
        torch.full((n,), 5.0), torch.zeros(n), torch.zeros(n), torch.isfinite(logg[0]), edges, torch.zeros(n), 1.0
    )
    edge = (f & int(CatalogueFlag.LABEL_EDGE)) > 0
    assert edge.tolist() == [False, True, True, True, True, False]


# ---- predict end to end ---------------------------------------------------------------------------------------------


def _observations(tiny_dir: str, path: Path, masked: bool = True, n: int = 40) -> tuple[Path, np.ndarray]:
    """The first ``n`` test stars, labelled; with ``masked`` rows 1-4 masked in each form and row 5 masked
    whole; the labels of row 6 outside the training range."""
    src = find_split(tiny_dir, "test")[0]
    flux, error = read_block(src, 0, n)
    params = read_params(src).iloc[:n].copy()
    mask = np.zeros(flux.shape, np.uint8)
    if masked:
        flux[1, 100:110] = np.nan
        error[2, 100:110] = 0.0
        error[3, 100:110] = np.inf
        mask[4, 100:110] = 1
        mask[5] = 1
    params.loc[6, "T_eff"] = 7500.0
    write_shard(path, read_wave(src), flux, error, params, labelled=False)
    with h5py.File(path, "a") as f:
        f.create_dataset(MASK_KEY, data=mask)
    return path, params["log_g"].to_numpy()


def test_predict_masked_stars_fits_round_trip_and_sidecars(trained, tiny_dir, tmp_path):
    """Masked stars get a prediction from their usable pixels (n_masked), an all-masked star NaN
    and NO_PREDICTION without stopping the catalogue; labels outside the training range are reported; FITS
    reads back with astropy with units, descriptions, flag bits and provenance, equal to the CSV, whose
    sidecar and the HDF5 attributes carry the same meanings."""
    obs, truth = _observations(tiny_dir, tmp_path / "obs" / "night.h5")
    csv, fits_path, h5 = tmp_path / "cat.csv", tmp_path / "cat.fits", tmp_path / "cat.h5"
    for out in (csv, fits_path, h5):
        predict_catalogue(trained[2], trained[1], str(obs), out)
    cat = pd.read_csv(csv)
    assert list(cat.columns[-3:]) == ["n_masked", "ood_score", "flags"] and len(cat) == 40
    assert cat["n_masked"].tolist()[:7] == [0, 10, 10, 10, 10, 256, 0] and (cat["n_masked"][7:] == 0).all()
    ok = cat.drop(index=5)
    assert np.isfinite(ok["log_g_pred"]).all() and (ok["log_g_sigma"] > 0).all()
    assert np.isnan(cat.loc[5, ["log_g_pred", "log_g_sigma"]].astype(float)).all()
    assert (
        cat.loc[5, "flags"] & int(CatalogueFlag.NO_PREDICTION)
        and not (ok["flags"] & int(CatalogueFlag.NO_PREDICTION)).any()
    )
    np.testing.assert_allclose(cat["log_g_true"], truth, rtol=2e-6)
    # which labels set LABEL_EDGE: one bool column per label, whose OR is the bit
    edge_cols = [f"{label}_edge" for label in ("log_g", "T_eff", "M_H") if f"{label}_pred" in cat]
    assert edge_cols and all(cat[c].dtype == bool for c in edge_cols)
    assert (cat[edge_cols].any(axis=1) == (cat["flags"] & int(CatalogueFlag.LABEL_EDGE) > 0)).all()
    assert not cat.loc[5, edge_cols].any()  # no prediction, no edge
    # unmasked, the same stars: masking costs sigma
    clean, _ = _observations(tiny_dir, tmp_path / "clean" / "night.h5", masked=False)
    predict_catalogue(trained[2], trained[1], str(clean), tmp_path / "clean.csv")
    ref = pd.read_csv(tmp_path / "clean.csv")
    assert (ref["n_masked"] == 0).all() and (ref["flags"] & int(CatalogueFlag.NO_PREDICTION) == 0).all()
    # 10 imputed pixels move a prediction by much less than its sigma (which may even shrink a little: at low
    # SNR the imputation knows a pixel better than its noise does)
    moved = (cat.loc[1:4, "log_g_pred"] - ref.loc[1:4, "log_g_pred"]).abs().to_numpy()
    assert (moved < 0.2 * ref.loc[1:4, "log_g_sigma"].to_numpy()).all()
    assert np.allclose(cat.loc[1:4, "log_g_sigma"], ref.loc[1:4, "log_g_sigma"], rtol=0.1)
    assert (cat.loc[7:, "log_g_pred"].to_numpy() == ref.loc[7:, "log_g_pred"].to_numpy()).all()
    # FITS: astropy reads it, with units and descriptions; the same numbers as the CSV
    from astropy.table import Table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy: 'dex' is no FITS-standard unit
        table = Table.read(fits_path)
    assert str(table["log_g_pred"].unit) == "dex" and str(table["log_g_sigma"].unit) == "dex"
    assert str(table["n_masked"].unit) == "pix" and "masked pixels" in table["n_masked"].description
    assert table["rho_log_g_M_H"].unit is None and "correlation of the errors" in table["rho_log_g_M_H"].description
    np.testing.assert_allclose(np.asarray(table["rho_log_g_M_H"], float), cat["rho_log_g_M_H"], rtol=1e-6)
    assert np.isnan(cat.loc[5, "rho_log_g_M_H"]) and np.isfinite(ok["rho_log_g_M_H"]).all()  # no prediction: NaN
    np.testing.assert_allclose(np.asarray(table["log_g_pred"], float), cat["log_g_pred"], rtol=1e-6)
    assert list(table["flags"]) == cat["flags"].tolist()
    assert table.meta["FLAGBIT4"] == "NO_PREDICTION" and table.meta["MOE NOISE_LEVEL"] == 1.0
    assert table.meta["MOE CHECKPOINT"] == str(trained[2]) and len(table.meta["MOE DATA_FINGERPRINT"]) == 12
    # the CSV's sidecar and the HDF5 attributes
    side = json.loads((tmp_path / "cat.meta.json").read_text())
    assert side["flag_bits"]["8 OOD"].startswith("ood_score > 1") and side["columns"]["log_g_pred"]["unit"] == "dex"
    assert side["columns"]["rho_T_eff_M_H"] == {
        "unit": "",
        "description": "correlation of the errors of T_eff_pred and M_H_pred (per SNR bin, from the predicted labels)",
    }
    with pd.HDFStore(h5, "r") as store:
        attrs = store.get_storer("catalogue").attrs
        assert json.loads(attrs.flag_bits) == side["flag_bits"]
        assert json.loads(attrs.provenance)["checkpoint"] == str(trained[2])
    pd.testing.assert_frame_equal(pd.read_hdf(h5)[["row", "flags"]], cat[["row", "flags"]], check_dtype=False)


def test_synth_draws_labels_outside_the_training_ranges(tmp_path):
    """``moe data synth --teff LO HI`` draws T_eff there and records it in the manifest; the default
    manifest has no range keys (datasets generated before stay valid); LO >= HI is one error."""
    from moe.data.synth import SynthConfig, main, manifest_of, read_manifest, sample_labels

    labels = sample_labels(np.random.default_rng(0), 500, {"T_eff": (6500.0, 8000.0)})
    assert labels["T_eff"].between(6500, 8000).all() and labels["log_g"].between(1, 5).all()
    assert not any(k.endswith("_range") for k in manifest_of(SynthConfig()))
    out = tmp_path / "hot"
    args = ["--out", str(out), "--train", "1", "--val", "1", "--test", "20", "--pixels", "256", "--log-g", "5", "6"]
    assert main(args) == 0
    assert read_manifest(out)["log_g_range"] == [5.0, 6.0]
    assert read_params(find_split(out, "test")[0])["log_g"].between(5, 6).all()
    from moe.shared.arguments import ToolArgumentError

    with pytest.raises(ToolArgumentError, match="--teff: give LO HI with LO below HI"):
        main(["--out", str(tmp_path / "x"), "--teff", "8000", "6500"])
