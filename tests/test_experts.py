"""Experts against independent references: scikit-learn Ridge/PCA, the augmentation limit, Monte Carlo."""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import scipy.linalg as sla
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from moe.data import bins
from moe.data.datamodule import SpectraDataModule
from moe.data.synth import SpectrumModel, generate
from moe.experts import fit as fit_module
from moe.experts import groups
from moe.experts.bundle import ExpertBundle, ExpertsMismatchError
from moe.experts.cache import load_or_fit
from moe.experts.fit import FitConfig, GroupTooSmallError, accumulate_stats, fit_families, pca_basis, training_blocks
from moe.experts.ridge import Standardized, fit_sweep, solve_path
from moe.experts.ridge_experts import RidgeExperts
from moe.experts.stats import accumulate, in_memory_blocks

RTOL = 1e-6


LABELS = ("log_g", "T_eff", "M_H")


@pytest.fixture(scope="module")
def small():
    """3000 noisy spectra at 96 pixels with labels [N, 3] (log g, T_eff, [M/H]) and cells (in memory)."""
    model = SpectrumModel(96)
    flux, error, p = generate(model, np.random.default_rng(0), 3000)
    x = flux + error * np.random.default_rng(1).standard_normal(flux.shape).astype(np.float32)
    y = p[list(LABELS)].to_numpy(np.float64)
    cell = bins.cell(bins.phys_bin(p["T_eff"], p["M_H"]), bins.snr_bin(p["snr"]))
    return x, error, y, cell, flux


def _sklearn(x, y, alpha):
    sc = StandardScaler().fit(x.astype(np.float64))
    r = Ridge(alpha=alpha).fit(sc.transform(x.astype(np.float64)), y)
    w = r.coef_ / sc.scale_
    return w, r.intercept_ - w @ sc.mean_


def _rel(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_every_group_matches_sklearn(small, method):
    """Every label's experts of every group and alpha from the one pass = scikit-learn Ridge on that label alone."""
    x, error, y, cell, _ = small
    stats = accumulate(in_memory_blocks(x, error, y, cell, 700), bins.N_CELLS, x.shape[1], progress=False)
    alphas = (0.5, 10.0, 1e4)
    for family in ("global", "phys", "snr"):
        for g, cells in enumerate(groups.members(family, "joint")):
            mask = np.isin(cell, cells)
            w, b, _ = fit_sweep(stats.group(cells), alphas, 0.0, None, method)
            assert w.shape == (len(alphas), len(LABELS), x.shape[1]) and b.shape == (len(alphas), len(LABELS))
            for j, label in enumerate(LABELS):
                for i, a in enumerate(alphas):
                    wr, br = _sklearn(x[mask], y[mask, j], a)
                    assert _rel(w[i, j], wr) < RTOL, (label, family, g, a)
                    assert abs(b[i, j] - br) < RTOL * max(1.0, abs(br)), (label, family, g, a)


def test_streamed_statistics_equal_in_memory(small):
    x, error, y, cell, _ = small
    for block in (1, 333, 5000):
        s = accumulate(in_memory_blocks(x, error, y, cell, block), bins.N_CELLS, x.shape[1], progress=False)
        for c in (0, 17, 35):
            m = cell == c
            xs = x[m].astype(np.float64) - s.shift
            np.testing.assert_allclose(s.gram(c), xs.T @ xs, rtol=1e-10, atol=1e-9)
            np.testing.assert_allclose(s.sx[c], xs.sum(0), rtol=1e-10, atol=1e-9)
            np.testing.assert_allclose(s.xty[c], y[m].T @ xs, rtol=1e-10, atol=1e-6)  # [L, D]
            np.testing.assert_allclose(
                s.se2[c], (error[m].astype(np.float64) ** 2).sum(0), rtol=1e-6
            )  # float32 products
            assert s.n[c] == m.sum()
            np.testing.assert_allclose(s.sy[c], y[m].sum(0), rtol=1e-12)
            np.testing.assert_allclose(s.syy[c], (y[m] ** 2).sum(0), rtol=1e-12)


def test_float32_products_error_is_small(small):
    x, error, y, cell, _ = small
    z = np.zeros_like(cell)
    s64 = accumulate(in_memory_blocks(x, error, y, z, 1000), 1, x.shape[1], "float64", progress=False)
    s32 = accumulate(in_memory_blocks(x, error, y, z, 1000), 1, x.shape[1], "float32", progress=False)
    w64, _, _ = fit_sweep(s64, (100.0,))
    w32, _, _ = fit_sweep(s32, (100.0,))
    assert _rel(w32, w64) < 1e-4  # measured ~1e-6 with the shift; this is the stated bound


def test_noise_marginalised_is_the_augmentation_limit():
    """Ridge on K noisy copies -> the closed-form marginalised solution as K grows."""
    rng = np.random.default_rng(0)
    n, d = 300, 24
    flux = rng.normal(1.0, 0.2, (n, d)) + np.linspace(0, 1, d)
    error = rng.uniform(0.05, 0.4, (n, d))
    y = flux @ rng.normal(size=d) + rng.normal(0, 0.1, n)
    nl, alpha = 1.0, 5.0
    s = accumulate(in_memory_blocks(flux, error, y, np.zeros(n, int)), 1, d, progress=False)
    w_marg, b_marg, _ = fit_sweep(s, (alpha,), noise_var=nl**2)
    w_marg = w_marg[:, 0]  # one label (y given as [N])
    errs = []
    for k in (10, 160):
        xs = np.concatenate([flux + nl * error * rng.standard_normal((n, d)) for _ in range(k)])
        # the sum of squares over K copies scales the data term by K: alpha scales with it
        w_aug, b_aug = _sklearn(xs, np.tile(y, k), alpha * k)
        errs.append(_rel(w_aug, w_marg[0]))
    assert errs[1] < 0.03  # stated tolerance at K = 160
    assert errs[1] < errs[0] / 2.5  # and it shrinks ~ 1/sqrt(K)


def test_small_group_error_and_fallback(tiny_dir, monkeypatch):
    dm = SpectraDataModule(tiny_dir, num_workers=0, synth=None, max_train_rows=400)
    cfg = FitConfig(families=("global", "phys"), min_samples=60, block_rows=128)

    def no_solve(*args, **kwargs):
        raise AssertionError("a solve ran before the group sizes were checked")

    with monkeypatch.context() as m:
        m.setattr(fit_module, "fit_sweep", no_solve)
        with pytest.raises(
            GroupTooSmallError,
            match=r"expert group\(s\) have fewer than 60 training rows: phys/\w+-\w+ \(\d+\).*"
            r"--model\.expert_min_samples N / --model\.expert_fallback global.*--min-samples N / --fallback global",
        ):
            fit_families(dm, cfg, progress=False)
    fits, _, _ = fit_families(dm, replace(cfg, fallback="global"), progress=False)
    fell = [g for g, note in enumerate(fits["log_g"]["phys"].fallback) if note == "global"]
    assert fell and all(fits["log_g"]["phys"].n_train[g] < 60 for g in fell)
    stats, _ = accumulate_stats(dm, cfg, progress=False)
    w_global, _, _ = fit_sweep(stats.group(np.arange(stats.n.size)), cfg.alphas, dm.noise_level**2)
    for j, label in enumerate(cfg.labels):  # every label: the global expert at the global expert's alpha
        phys = fits[label]["phys"]
        for g in fell:
            a = list(cfg.alphas).index(phys.alpha[g])
            np.testing.assert_allclose(phys.weight[g], w_global[a, j], rtol=1e-12)
            assert phys.alpha[g] == fits[label]["global"].alpha[0]


def test_a_short_group_of_a_family_not_relied_on_takes_the_global_expert(tiny_dir, tmp_path, caplog, monkeypatch):
    """At noise level 0.5 the tiny set's SNR-X bin holds 2 training rows, every physical bin at least 72.
    A fit for a gate over the physical experts trains (SNR-X is the global expert, said in one INFO line,
    marked in the alpha table); a fit relying on the SNR or cell experts stops before any solve, and the
    cached bundle is refused to it with the same line."""
    dm = SpectraDataModule(tiny_dir, noise_level=0.5, num_workers=0, synth=None)
    phys, snr = (FitConfig(("phys", "snr"), block_rows=256, required=groups.relies_on(f)) for f in ("phys", "snr"))
    cells = FitConfig(("snr", "cells"), block_rows=256, required=groups.relies_on("cells"))
    assert cells.required == ("global", "phys", "snr", "cells") and phys.required == ("global", "phys")
    assert phys.key_dict() == snr.key_dict() == replace(phys, required=None).key_dict()  # one cached fit serves all
    message = (
        r"^1 expert group\(s\) have fewer than 50 training rows: snr/SNR-X \(2\); use more training rows, .*"
        r"--model\.expert_fallback global; moe experiments: --min-samples N / --fallback global\)$"
    )
    with monkeypatch.context() as m:
        m.setattr(
            fit_module, "fit_sweep", lambda *a, **k: pytest.fail("a solve ran before the group sizes were checked")
        )
        for relying in (snr, cells):
            with pytest.raises(GroupTooSmallError, match=message):
                fit_families(dm, relying, progress=False)
    caplog.set_level(logging.INFO, logger="moe")
    bundle = load_or_fit(dm, phys, tmp_path / "experts.pt", progress=False)
    stand_in = "expert snr/SNR-X has 2 training rows, fewer than 50: the global expert stands in for it"
    assert caplog.text.count(stand_in) == 1 and "cells/" not in caplog.text
    assert bundle.stand_ins() == [("snr", "SNR-X", 2)]
    table = bundle.alpha_table().set_index(["label", "family", "expert"])["fallback"]
    stand_ins = [(label, "snr", "SNR-X") for label in bundle.labels]  # the same group for every label
    assert (table[stand_ins] == "global").all() and (table.drop(stand_ins) != "global").all()
    snr_fit, x, glob = bundle.family("snr"), bundle.family("snr").names.index("SNR-X"), bundle.family("global")
    assert snr_fit.alpha[x] == glob.alpha[0]  # the global expert itself, not an alpha picked on SNR-X's few rows
    np.testing.assert_array_equal(snr_fit.weight[x], glob.weight[0])
    assert snr_fit.bias[x] == glob.bias[0]
    with pytest.raises(GroupTooSmallError, match=message):  # the cached fit made for the physical gate
        load_or_fit(dm, snr, tmp_path / "experts.pt", progress=False)


def test_fit_in_single_mode_matches_sklearn_on_the_same_rows(tiny_dir):
    dm = SpectraDataModule(tiny_dir, num_workers=0, synth=None)
    cfg = FitConfig(
        families=("global", "phys", "snr"),
        noise_mode="single",
        min_samples=10,
        block_rows=256,
        alphas=(1.0, 100.0, 1e4),
    )
    fits, _, _ = fit_families(dm, cfg, progress=False)
    blocks = list(training_blocks(dm, cfg, "joint"))
    x = np.concatenate([b[0] for b in blocks])
    y = np.concatenate([b[2] for b in blocks])  # [N, L]
    cell = np.concatenate([b[3] for b in blocks])
    assert cfg.labels == LABELS and y.shape == (len(x), 3)
    for j, label in enumerate(cfg.labels):  # every label's experts: sklearn on that label, at its chosen alpha
        for family in ("global", "phys", "snr"):
            f = fits[label][family]
            for g, cells in enumerate(groups.members(family, "joint")):
                m = np.isin(cell, cells)
                wr, br = _sklearn(x[m], y[m, j], f.alpha[g])
                assert _rel(f.weight[g], wr) < RTOL, (label, family, g)
                assert abs(f.bias[g] - br) < RTOL * max(1, abs(br)), (label, family, g)


def test_alpha_selection_minimises_val_error(tiny_dir):
    dm = SpectraDataModule(tiny_dir, num_workers=0, synth=None)
    fits, _, _ = fit_families(dm, FitConfig(min_samples=10, block_rows=256), progress=False)
    val = dm.stream("val", batch_size=10_000, labels=LABELS)
    batch = next(iter(val))
    for label, fams in fits.items():
        for fam, f in fams.items():
            for g in range(len(f.names)):
                if f.n_val[g] > 0:
                    assert f.val_sse[g, list(FitConfig().alphas).index(f.alpha[g])] == f.val_sse[g].min()
            # each label's validation sums are that label's: SSE of its global expert recomputed directly
            if fam == "global":
                x, y = batch["flux"].double().numpy(), batch[label].double().numpy()
                a = list(FitConfig().alphas).index(f.alpha[0])
                sse = ((x @ f.path_weight[0, a] + f.path_bias[0, a] - y) ** 2).sum()
                np.testing.assert_allclose(f.val_sse[0, a], sse, rtol=1e-9)
                np.testing.assert_allclose(f.val_sst[0], ((y - y.mean()) ** 2).sum(), rtol=1e-9)


def test_cells_shrink_toward_phys(tiny_dir):
    """Each label's cell experts: their own fit at a tiny alpha, their physical expert at a huge one (to 1e-6 of
    an expert's size)."""
    dm = SpectraDataModule(tiny_dir, num_workers=0, synth=None)
    stats, _ = accumulate_stats(dm, FitConfig(("cells",), block_rows=256), progress=False)
    weak = fit_families(dm, FitConfig(("cells",), alphas=(1e-3,), min_samples=10, block_rows=256), progress=False)[0]
    w_own, _, _ = fit_sweep(stats.group(np.array([13])), (1e-3,), dm.noise_level**2)
    for j, label in enumerate(LABELS):
        assert _rel(weak[label]["cells"].weight[13], w_own[0, j]) < 0.05  # tiny alpha: the prior barely matters
    strong = fit_families(dm, FitConfig(("cells",), alphas=(1e12,), min_samples=10, block_rows=256), progress=False)[0]
    for label in LABELS:
        size = np.abs(weak[label]["cells"].weight).max()
        for c in range(bins.N_CELLS):
            cell_w, phys_w = strong[label]["cells"].weight[c], strong[label]["phys"].weight[c // 4]
            np.testing.assert_allclose(cell_w, phys_w, rtol=0, atol=1e-6 * size, err_msg=f"{label} cell {c}")


def test_pca_basis_matches_sklearn(small):
    x, error, y, cell, _ = small
    s = accumulate(in_memory_blocks(x, error, y[:, 0], cell, 512), bins.N_CELLS, x.shape[1], progress=False)
    mean, comps, var = pca_basis(s, 0.0, 4)
    ref = PCA(4).fit(x.astype(np.float64))
    np.testing.assert_allclose(mean, ref.mean_, rtol=1e-9)
    np.testing.assert_allclose(np.abs(comps @ ref.components_.T), np.eye(4), atol=1e-6)
    np.testing.assert_allclose(var, ref.explained_variance_ * (len(x) - 1) / len(x), rtol=1e-6)


def test_in_memory_ridge_sweep_chooses_the_alpha_sklearn_scores_best_on_validation():
    """fit_ridge_sweep against one scikit-learn pipeline (StandardScaler + Ridge) per alpha, scored with
    sklearn's r2_score: the same chosen alpha, the same predictions and coefficients."""
    from sklearn.metrics import r2_score

    from moe.experts.sklearn_ridge import fit_ridge_sweep

    rng = np.random.default_rng(7)  # 40 features, 100 training rows: the validation wants an interior alpha
    x = rng.normal(size=(300, 40)) * rng.uniform(0.1, 10, 40)
    y = x @ (rng.normal(size=40) / np.arange(1, 41)) + rng.normal(scale=3.0, size=300)
    alphas = (1e-2, 1.0, 30.0, 1e3, 1e5)
    sweep = fit_ridge_sweep(x[:100], y[:100], x[100:200], y[100:200], alphas)
    scaler = StandardScaler().fit(x[:100])
    refs = [Ridge(alpha=a).fit(scaler.transform(x[:100]), y[:100]) for a in alphas]
    z_val, z_test = scaler.transform(x[100:200]), scaler.transform(x[200:])
    best = int(np.argmax([r2_score(y[100:200], m.predict(z_val)) for m in refs]))
    assert 0 < best < len(alphas) - 1 and sweep.alpha == alphas[best]  # an interior alpha: the choice matters
    np.testing.assert_allclose(sweep.predict(x[200:]), refs[best].predict(z_test), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(sweep.coef, [m.coef_ for m in refs], rtol=1e-8, atol=1e-10)


def test_in_memory_ridge_sweep_with_fewer_rows_than_features_warns_nothing(recwarn):
    """A sweep whose smallest alpha leaves the kernel near-singular (the realism check's per-bin fits: ~3k rows,
    4096 pixels) prints no scipy LinAlgWarning: the alpha is scored on validation, the user can do nothing."""
    from moe.experts.sklearn_ridge import fit_ridge_sweep

    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 200)).astype(np.float32)  # float32 like the spectra: its precision sets the limit
    y = rng.normal(size=60)
    sweep = fit_ridge_sweep(x[:40], y[:40], x[40:], y[40:], (1e-6, 1.0, 1e3))
    assert np.isfinite(sweep.predict(x[40:])).all()
    assert not [w for w in recwarn if "ill-conditioned" in str(w.message)]


def test_cnn_expert_predicts_a_batch_at_a_time():
    """The 1D-CNN expert's predict runs at most ``batch_size`` rows through the network per pass (its activations,
    not the rows asked for, bound the memory) and gives the same numbers as one row at a time."""
    from moe.experts.nonlinear import CNNExpert

    rng = np.random.default_rng(0)
    clean = rng.normal(size=(200, 64)).astype(np.float32)
    error = np.full_like(clean, 0.1)
    y = clean[:, :8].sum(1)
    cnn = CNNExpert(epochs=1, batch_size=32).fit(clean, error, y, clean[:50], y[:50])
    passes = []
    cnn.model.register_forward_hook(lambda module, args, out: passes.append(len(args[0])))
    x = rng.normal(size=(150, 64)).astype(np.float32)
    whole = cnn.predict(x)
    assert max(passes) == 32 and sum(passes) == 150
    one = np.concatenate([cnn.predict(x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(whole, one, rtol=1e-5, atol=1e-6)


def test_ridge_experts_module_and_variance():
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, 10)), rng.normal(size=3)
    m = RidgeExperts.from_arrays(w, b, ["a", "b", "c"]).double()  # [K, D]: one label, log g -> [B, K, 1]
    x = torch.from_numpy(rng.normal(size=(5, 10)))
    assert m.labels == ("log_g",)
    np.testing.assert_allclose(m(x)[..., 0].numpy(), x.numpy() @ w.T + b, rtol=1e-5, atol=1e-6)  # float32 buffers
    assert not list(m.parameters()) and {n for n, _ in m.named_buffers()} == {"weight", "bias"}
    err = torch.from_numpy(rng.uniform(0.1, 0.5, (1, 10)))
    draws = torch.from_numpy(rng.standard_normal((200_000, 10)))
    mc = (m(x[:1] + 0.7 * err * draws)[..., 0]).var(0).numpy()
    np.testing.assert_allclose(m.predictive_variance(err, 0.7)[0, :, 0].numpy(), mc, rtol=0.02)
    sd = m.state_dict()
    m2 = RidgeExperts(3, 10).double()
    m2.load_state_dict(sd)
    assert m2.names == ["a", "b", "c"] and torch.equal(m2.weight, m.weight)


def test_bundle_cache_and_fingerprint(tiny_dir, tmp_path):
    dm = SpectraDataModule(tiny_dir, num_workers=0, synth=None)
    cfg = FitConfig(min_samples=10, block_rows=256)
    path = tmp_path / "experts.pt"
    b1 = load_or_fit(dm, cfg, path, progress=False)
    assert path.is_file() and path.with_suffix(".alphas.csv").is_file()
    b2 = load_or_fit(dm, cfg, path, progress=False)  # loaded, not refitted
    np.testing.assert_array_equal(b1.family("phys").weight, b2.family("phys").weight)
    assert b2.experts("snr").names == ["SNR-X", "SNR-L", "SNR-M", "SNR-H"]
    torch.load(path, weights_only=True)
    other = SpectraDataModule(tiny_dir, num_workers=0, synth=None, noise_level=0.5)
    with pytest.raises(
        ExpertsMismatchError, match=r"fitted on other data \(fingerprint differs in \['noise_level'\]\)"
    ):
        load_or_fit(other, cfg, path, progress=False)
    with pytest.raises(ExpertsMismatchError, match=r"another config \(differs in \['alphas'\]\)"):
        ExpertBundle.load(path, dm.fingerprint(), replace(cfg, alphas=(1.0,)))
    (tmp_path / "junk.pt").write_bytes(b"nope")
    with pytest.raises(ExpertsMismatchError, match="not a readable experts file"):
        ExpertBundle.load(tmp_path / "junk.pt")


def _ddp_worker(rank, world, tiny_dir, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dm = SpectraDataModule(tiny_dir, num_workers=0, synth=None)
        stats, _ = accumulate_stats(dm, FitConfig(block_rows=100), progress=False)
        fits, _, _ = fit_families(dm, FitConfig(block_rows=100, min_samples=10), progress=False)
        np.savez(
            f"{out}.rank{rank}.npz",
            n=stats.n,
            xtx=stats.xtx,
            sx=stats.sx,
            sy=stats.sy,
            syy=stats.syy,
            xty=stats.xty,
            shift=stats.shift,
            alpha=np.stack([fits[label]["phys"].alpha for label in LABELS]),
            weight=np.stack([fits[label]["phys"].weight for label in LABELS]),
        )
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_statistics_all_reduce(tiny_dir, tmp_path):
    """Two gloo ranks each read half the rows; the all-reduced sums equal one process's."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, tiny_dir, port, out), nprocs=2, join=True)
    got, other = np.load(f"{out}.rank0.npz"), np.load(f"{out}.rank1.npz")
    dm = SpectraDataModule(tiny_dir, num_workers=0, synth=None)
    ref, _ = accumulate_stats(dm, FitConfig(block_rows=100), progress=False)
    single, _, _ = fit_families(dm, FitConfig(block_rows=100, min_samples=10), progress=False)
    # both ranks choose the same alphas (validation reads every row on every rank) = single process
    np.testing.assert_array_equal(got["alpha"], other["alpha"])
    np.testing.assert_array_equal(got["alpha"], np.stack([single[label]["phys"].alpha for label in LABELS]))
    for j, label in enumerate(LABELS):
        assert _rel(got["weight"][j], single[label]["phys"].weight) < 1e-7, label
    np.testing.assert_array_equal(got["weight"], other["weight"])
    np.testing.assert_array_equal(got["n"], ref.n)
    np.testing.assert_array_equal(got["shift"], ref.shift)
    np.testing.assert_allclose(got["sx"], ref.sx, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got["xtx"], ref.xtx, rtol=1e-9, atol=1e-9)
    assert ref.sy.shape == (ref.n.size, 3) and ref.xty.shape == (ref.n.size, 3, ref.n_pixels)
    for key in ("sy", "syy", "xty"):  # every label's sums, all-reduced
        np.testing.assert_allclose(got[key], getattr(ref, key), rtol=1e-9, atol=1e-9 * np.abs(getattr(ref, key)).max())


def test_single_cell_stats_solve_without_group(small):
    """Accumulators hold one triangle; solving straight from them must still be exact."""
    x, error, y, _, _ = small
    s = accumulate(in_memory_blocks(x, error, y[:, 0], np.zeros(len(y), int), 500), 1, x.shape[1], progress=False)
    assert s.xtx.shape == (1, x.shape[1] * (x.shape[1] + 1) // 2)  # packed lower triangle
    assert s.sy.shape == (1, 1)  # labels given as [N]: one label
    for method in ("cholesky", "eigh"):
        w, b, _ = fit_sweep(s, (3.0,), method=method)
        wr, br = _sklearn(x, y[:, 0], 3.0)
        assert _rel(w[0, 0], wr) < RTOL and abs(b[0, 0] - br) < RTOL * max(1, abs(br))


def _spd(d: int, floor: float, top: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An SPD Gram with eigenvalues log-spread over [floor, top] in a random basis, and a rhs."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.logspace(np.log10(floor), np.log10(top), d)) @ q.T, rng.standard_normal(d)


def _backward(a, x, b):
    """Normwise backward error of x as a solution of a x = b (a float64 Cholesky gets ~1e-16)."""
    return np.linalg.norm(b - a @ x) / (np.linalg.norm(a) * np.linalg.norm(x) + np.linalg.norm(b))


def _std(gram, zty):
    """A standardised problem with right-hand sides ``zty`` [D] (one label) or [L, D]."""
    d, zty = gram.shape[0], np.atleast_2d(zty)
    return Standardized(3.0 * d, np.zeros(d), np.ones(d), gram, zty, np.zeros(len(zty)), np.ones(len(zty)))


def test_factor_reused_for_alphas_below_the_noise_floor():
    """Alphas far below lambda_min share one float32 factor; alphas a factor 100 apart inside a
    spectrum spread over 1..1e7 each get theirs; every solution equals a float64 direct solve."""
    for floor, alphas, factors in [(50.0, (1e-3, 1e-2, 1e-1, 1.0), 1), (1.0, (1e2, 1e4, 1e6), 3)]:
        gram, b = _spd(200, floor, 1e7)
        info = {}
        coef = solve_path(_std(gram, b), alphas, method="cholesky", info=info)[:, 0]
        assert info["factorizations"] == factors, info
        for a, c in zip(alphas, coef):
            m = gram + a * np.eye(200)
            assert _backward(m, c, b) < 1e-13 and _rel(c, np.linalg.solve(m, b)) < 1e-8, a  # cond <= 2e5


def test_prior_and_unsorted_alphas_keep_their_order():
    gram, b = _spd(60, 1.0, 1e5, seed=1)
    prior = np.random.default_rng(2).standard_normal(60)
    alphas = (1e3, 0.1, 10.0)
    coef = solve_path(_std(gram, b), alphas, prior[None], method="cholesky")[:, 0]
    for a, c in zip(alphas, coef):
        m = gram + a * np.eye(60)
        assert _backward(m, c, b + a * prior) < 1e-13 and _rel(c, np.linalg.solve(m, b + a * prior)) < 1e-8


def test_float32_unusable_falls_back_to_float64():
    """cond ~ 1e12: a float32 factor cannot precondition it; the float64 Cholesky answers."""
    gram, b = _spd(80, 1.0, 1e12, seed=3)
    info = {}
    coef = solve_path(_std(gram, b), (1e-3,), method="cholesky", info=info)[:, 0]
    a = gram + 1e-3 * np.eye(80)
    assert info["iterations"] == [0]  # answered by the float64 factorisation
    assert _backward(a, coef[0], b) < 1e-15  # backward stable; the forward error is cond x eps ~ 1e-4 here
    assert _rel(coef[0], sla.solve(a, b, assume_a="pos")) < 1e-3


def test_heap_setting_is_made_only_in_the_child_that_fits(tiny_dir, tmp_path, monkeypatch):
    """load_or_fit fits in a child process: the same experts as an in-process fit; the child starts with glibc's
    malloc thresholds in its environment, the calling process's own environment stays as it was."""
    from moe.experts import isolated
    from moe.experts.bundle import ExpertBundle
    from moe.experts.cache import load_or_fit

    started, popen = [], subprocess.Popen
    monkeypatch.setattr(isolated.subprocess, "Popen", lambda *a, **kw: started.append(kw["env"]) or popen(*a, **kw))
    for name in isolated.HEAP_ENV:
        monkeypatch.delenv(name, raising=False)
    dm = SpectraDataModule(tiny_dir, num_workers=0, synth=None)
    cfg = FitConfig(("global", "phys"), min_samples=10, block_rows=256)
    bundle = load_or_fit(dm, cfg, path=tmp_path / "experts.pt", progress=False)
    assert len(started) == 1 and started[0]["MALLOC_MMAP_THRESHOLD_"] == str(1 << 30)
    assert started[0]["MALLOC_TRIM_THRESHOLD_"] == str(2**31 - 1)
    assert not set(isolated.HEAP_ENV) & set(os.environ)  # the parent never set them for itself
    here, _, _ = fit_families(dm, cfg, progress=False)
    for label in LABELS:
        for fam in ("global", "phys"):
            np.testing.assert_allclose(
                bundle.family(fam, label).weight,
                here[label][fam].weight,
                rtol=1e-10,
                atol=1e-12 * abs(here[label][fam].weight).max(),
            )
    assert isinstance(ExpertBundle.load(tmp_path / "experts.pt", dm.fingerprint(), cfg), ExpertBundle)


def test_an_error_in_the_child_fit_is_raised_by_the_caller(tiny_dir, tmp_path):
    from moe.experts.cache import load_or_fit

    dm = SpectraDataModule(tiny_dir, num_workers=0, synth=None, max_train_rows=400)
    with pytest.raises(GroupTooSmallError, match=r"fewer than 60 training rows"):
        load_or_fit(
            dm, FitConfig(("global", "phys"), min_samples=60, block_rows=128), tmp_path / "e.pt", progress=False
        )
    assert not (tmp_path / "e.pt").exists()


def test_alpha_at_the_edge_of_the_sweep_is_named_in_a_warning(tiny_dir, caplog):
    dm = SpectraDataModule(tiny_dir, num_workers=0, synth=None)
    caplog.set_level(logging.WARNING, logger="moe")
    fit_families(dm, FitConfig(("global",), alphas=(1e3, 1e4, 1e5), block_rows=256), progress=False)
    assert (
        "expert global/global for log_g: the validation chose alpha 1000, the smallest of the sweep, and R^2 still gains"
        in caplog.text
    )
    caplog.clear()
    fit_families(dm, FitConfig(("global",), alphas=(1e-6, 1e-5), block_rows=256), progress=False)
    assert "of the sweep" not in caplog.text  # alphas far below the noise variance: a plateau, no warning
    caplog.clear()
    fit_families(dm, FitConfig(("global",), alphas=(1e9,), block_rows=256), progress=False)
    assert "of the sweep" not in caplog.text  # a single alpha is no sweep
    assert min(FitConfig().alphas) < 1  # the default sweep reaches below 1


def test_in_place_edit_of_a_train_shard_refits_the_experts(tiny_dir, tmp_path, caplog):
    import shutil

    import h5py

    from moe.data.shards import FLUX_KEY

    data = tmp_path / "data"
    shutil.copytree(tiny_dir, data, ignore=shutil.ignore_patterns("noisy_*", "gate_inputs_*", "experts", ".*"))
    cfg = FitConfig(("global",), min_samples=10, block_rows=256)
    first = SpectraDataModule(str(data), num_workers=0, synth=None)
    load_or_fit(first, cfg, progress=False)
    before = first.fingerprint_hash()
    shard = first.train_set.paths[0]
    st = shard.stat()
    with h5py.File(shard, "r+") as f:  # a re-run of the simulator over the same file: same shape, same size
        f[FLUX_KEY][:5] = f[FLUX_KEY][:5] * 1.5
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime (cp -p, rsync -t)
    assert shard.stat().st_size == st.st_size
    edited = SpectraDataModule(str(data), num_workers=0, synth=None)
    assert edited.fingerprint_hash() != before
    caplog.set_level(logging.INFO, logger="moe")
    load_or_fit(edited, cfg, progress=False)
    assert "fitting experts" in caplog.text  # not the cached bundle of the old content
