"""Every label from the one statistics pass: the same log g experts as a one-label fit, each label against
scikit-learn, the bundle's label API, and bad labels as one line naming the flag and the file."""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from moe.data.folder import SpectraFolder
from moe.data.labels import FLAG, LabelError
from moe.data.shards import ERROR_KEY, FLUX_KEY, WAVE_KEY, read_params, write_shard
from moe.experts.bundle import BUNDLE_VERSION, ExpertBundle
from moe.experts.cache import load_or_fit
from moe.experts.fit import FitConfig, accumulate_stats, fit_families, training_blocks
from moe.experts.ridge import Standardized, solve_path
from moe.main import main

LABELS = ("log_g", "T_eff", "M_H")


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def folder(tiny_dir) -> SpectraFolder:
    return SpectraFolder(tiny_dir, block_rows=256, synth=None)


def test_log_g_experts_equal_a_one_label_fit(folder):
    """Fitting T_eff and [M/H] beside log g leaves log g's experts as they were (every family, 1e-10 relative),
    and each label's experts are those of a fit of that label alone."""
    base = FitConfig(("snr", "cells"), min_samples=10, block_rows=256)
    together, _, _ = fit_families(folder, base, progress=False)
    for label in LABELS:
        alone, _, _ = fit_families(folder, replace(base, labels=(label,)), progress=False)
        assert list(alone) == [label]
        for fam in ("global", "phys", "snr", "cells"):
            a, b = alone[label][fam], together[label][fam]
            np.testing.assert_array_equal(a.alpha, b.alpha, err_msg=f"{label} {fam}")
            assert _rel(b.weight, a.weight) <= 1e-10, (label, fam)
            assert _rel(b.bias, a.bias) <= 1e-10, (label, fam)
            assert _rel(b.path_weight, a.path_weight) <= 1e-10, (label, fam)


def test_every_label_matches_sklearn_including_any_numeric_column(folder):
    """A parameter column beyond the three (``mag``) is a label like any: sklearn Ridge on the same rows at the
    chosen alpha gives its experts, with the noise-free 'single' pass (ordinary Ridge on the rows seen)."""
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    cfg = FitConfig(
        ("global", "snr"), noise_mode="single", block_rows=256, labels=("mag", "T_eff"), required=("global",)
    )
    fits, _, _ = fit_families(folder, cfg, progress=False)
    blocks = list(training_blocks(folder, cfg, "snr"))
    x = np.concatenate([b[0] for b in blocks]).astype(np.float64)
    y = np.concatenate([b[2] for b in blocks])
    cell = np.concatenate([b[3] for b in blocks])
    for j, label in enumerate(cfg.labels):
        for fam, rows in (("global", np.ones(len(x), bool)), ("snr", cell == 3)):
            f = fits[label][fam]
            g = 0 if fam == "global" else 3
            sc = StandardScaler().fit(x[rows])
            ref = Ridge(alpha=f.alpha[g]).fit(sc.transform(x[rows]), y[rows, j])
            w = ref.coef_ / sc.scale_
            assert _rel(f.weight[g], w) < 1e-6, (label, fam)
            assert abs(f.bias[g] - (ref.intercept_ - w @ sc.mean_)) < 1e-6 * max(1.0, abs(ref.intercept_)), label


def test_one_factorisation_serves_every_right_hand_side():
    """Three right-hand sides: the same factorisations as one (not three times as many), and each solution
    exactly the one-label solve's (the same factor, the same CG steps)."""
    rng = np.random.default_rng(0)
    d = 150
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    gram = (q * np.logspace(0, 6, d)) @ q.T
    zty = rng.standard_normal((3, d)) * np.array([[1.0], [1e3], [0.3]])  # label scales differ (T_eff in K)
    alphas = (1e-2, 1.0, 1e2, 1e4)

    def std(rhs):
        return Standardized(3.0 * d, np.zeros(d), np.ones(d), gram, rhs, np.zeros(len(rhs)), np.ones(len(rhs)))

    info: dict = {}
    joint = solve_path(std(zty), alphas, method="cholesky", info=info)
    assert joint.shape == (4, 3, d)
    singles = []
    for j in range(3):
        one: dict = {}
        np.testing.assert_array_equal(
            joint[:, j], solve_path(std(zty[j : j + 1]), alphas, method="cholesky", info=one)[:, 0]
        )
        singles.append(one["factorizations"])
    assert info["factorizations"] == max(singles) >= 1  # shared, not summed
    for a, c in zip(alphas, joint):  # the solver's criterion: normwise backward error 1e-13, whatever the scale
        m = gram + a * np.eye(d)
        for j in range(3):
            backward = np.linalg.norm(zty[j] - m @ c[j]) / (
                np.linalg.norm(m) * np.linalg.norm(c[j]) + np.linalg.norm(zty[j])
            )
            assert backward < 1e-13 and _rel(c[j], np.linalg.solve(m, zty[j])) < 1e-6, (a, j)
    eig = solve_path(std(zty), alphas, method="eigh")
    assert _rel(eig, joint) < 1e-6  # the eigendecomposition path: the same solutions


def test_the_bundle_gives_every_label(folder, tmp_path):
    cfg = FitConfig(("global", "phys"), min_samples=10, block_rows=256)
    bundle = load_or_fit(folder, cfg, tmp_path / "experts.pt", progress=False)
    assert bundle.labels == LABELS and bundle.family_names == ("global", "phys")
    weight, bias = bundle.weights("phys")
    assert weight.shape == (9, 3, folder.n_pixels) and bias.shape == (9, 3) and weight.dtype == np.float64
    for j, label in enumerate(LABELS):
        np.testing.assert_array_equal(weight[:, j], bundle.family("phys", label).weight)
        np.testing.assert_array_equal(bias[:, j], bundle.family("phys", label).bias)
    # experts() is log g's, as the gate takes it
    np.testing.assert_array_equal(bundle.experts("phys").weight[:, 0].numpy(), weight[:, 0].astype(np.float32))
    m_h = bundle.experts("phys", "M_H")  # RidgeExperts of one label: [K, 1, D], named
    assert m_h.labels == ("M_H",) and torch.equal(m_h.weight[:, 0], torch.as_tensor(weight[:, 2], dtype=torch.float32))
    # label_stats: mean and population std over the training rows, as numpy computes them
    stats, _ = accumulate_stats(folder, cfg, progress=False)
    y = np.concatenate([b[2] for b in training_blocks(folder, cfg, "phys")])
    for j, label in enumerate(LABELS):
        mean, std = bundle.label_stats[label]
        assert mean == pytest.approx(y[:, j].mean(), rel=1e-12) and std == pytest.approx(y[:, j].std(), rel=1e-9)
    assert stats.sy.shape == (9, 3)
    # the alpha table: one row per label and expert, each label's alpha its own
    table = bundle.alpha_table()
    assert list(table.columns[:3]) == ["label", "family", "expert"] and len(table) == 3 * 10
    for label in LABELS:
        rows = table[table.label == label]
        np.testing.assert_array_equal(rows.alpha.to_numpy()[1:], bundle.family("phys", label).alpha)
        assert rows.val_r2.notna().all() and rows.val_r2.iloc[0] > 0.2, label  # the global expert predicts it
    # saved and loaded: the same; the file says its version
    loaded = ExpertBundle.load(tmp_path / "experts.pt", folder.fingerprint(), cfg)
    assert loaded.labels == LABELS and loaded.label_stats == bundle.label_stats
    np.testing.assert_array_equal(loaded.weights("phys")[0], weight)
    assert torch.load(tmp_path / "experts.pt", weights_only=True)["version"] == BUNDLE_VERSION == 3
    with pytest.raises(KeyError, match=r"label 'a_M' was not fitted"):
        bundle.family("phys", "a_M")
    # the labels are in the cache key: another label set is another file
    other = load_or_fit(folder, replace(cfg, labels=("log_g",)), tmp_path / "log_g.pt", progress=False)
    assert other.key != bundle.key and other.labels == ("log_g",)
    np.testing.assert_allclose(other.family("phys").weight, bundle.family("phys").weight, rtol=1e-10, atol=0)


def _with_columns(tiny_dir: str, dst: Path, columns: dict) -> str:
    """A copy of the tiny dataset whose train and val parameter tables carry ``columns`` (name -> f(n) -> values)."""
    for shard in sorted(Path(tiny_dir).glob("*_*/dataset.h5")):
        out = dst / shard.parent.name / "dataset.h5"
        out.parent.mkdir(parents=True)
        params = read_params(shard)
        if not shard.parent.name.startswith("test"):
            for name, make in columns.items():
                params[name] = make(len(params))
        with h5py.File(shard, "r") as f:
            write_shard(out, f[WAVE_KEY][()], f[FLUX_KEY][()], f[ERROR_KEY][()], params)
    shutil.copy(Path(tiny_dir) / "synth.json", dst / "synth.json")
    return str(dst)


def _nan_at_7(n: int) -> np.ndarray:
    v = np.linspace(0.0, 1.0, n)
    v[7] = np.nan
    return v


@pytest.fixture(scope="module")
def odd_dir(tiny_dir, tmp_path_factory) -> str:
    cols = {"spectype": lambda n: np.array(["K", "G"] * (n // 2)), "v_los": _nan_at_7}
    return _with_columns(tiny_dir, tmp_path_factory.mktemp("labels") / "data", cols)


@pytest.mark.parametrize(
    ("label", "where", "problem"),
    [
        ("Vmag", "train_000/dataset.h5", r"the parameter table has no column 'Vmag' \(it has T_eff, log_g, M_H, "),
        ("a_M", "", r"column 'a_M' is constant \(0\) over the 1200 training rows of 3 shard\(s\)"),
        ("spectype", "train_000/dataset.h5", r"column 'spectype' has dtype \w+, a label must be numeric"),
        ("v_los", "train_000/dataset.h5", r"1 train row\(s\) have NaN or Inf in column 'v_los' \(first: row 7\)"),
        ("snr", "train_000/dataset.h5", r"that name is a batch field"),
    ],
)
def test_a_bad_label_is_one_line_naming_the_flag_and_the_file(odd_dir, label, where, problem, capsys):
    assert main(["experts", "fit", "--data", odd_dir, "--min-samples", "10", "--labels", "log_g", label]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # INFO lines of the row check, then the error
    errors = [line for line in err if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0] == err[-1], err
    line = err[-1]
    assert line.startswith(f"moe: error: {Path(odd_dir) / where}: "), line  # the shard, or the folder
    assert f"--labels (moe experts) / --model.labels (moe fit) {label}: " in line, line
    assert re.search(problem, line), line
    assert not list(Path(odd_dir).glob("experts/*.pt"))  # stopped before any fit
    folder = SpectraFolder(odd_dir, synth=None)  # the same check in the fit itself, before the pass
    with pytest.raises(LabelError, match=re.escape(FLAG)):
        fit_families(folder, FitConfig(labels=("log_g", label)), progress=False)


def test_the_stream_yields_the_labels_asked_for(odd_dir):
    folder = SpectraFolder(odd_dir, synth=None, labels=("v_los", "mag"))
    batch = next(iter(folder.stream("val", batch_size=16)))
    assert {"log_g", "T_eff", "M_H", "v_los", "mag"} <= set(batch)
    assert batch["v_los"].dtype == torch.float32 and batch["v_los"].shape == (16,)
    np.testing.assert_allclose(batch["v_los"].numpy()[:7], np.linspace(0.0, 1.0, 300)[:7], rtol=1e-6)
    assert "spectype" not in batch and "v_los" not in next(iter(folder.stream("val", batch_size=4, labels=())))
