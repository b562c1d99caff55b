"""The generator: determinism, atomic shards, resume, physics it promises, realism at small N."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from moe.data.shards import find_split, read_block, read_params, validate_shard
from moe.data.synth import SpectrumModel, SynthConfig, generate, make_wave, write_dataset
from moe.experiments.realism import Bounds, Split, run_checks, spectra_figure


def test_wave_grid():
    w = make_wave(4096)
    assert w.size == 4096 and w[0] == 7100.0 and abs(w[-1] - 8850.0) < 1e-9
    dw = np.diff(w)
    assert (dw > 0).all() and dw.max() / dw.min() > 1.05  # non-uniform


def test_deterministic_and_valid(tmp_path, tiny_dir):
    cfg = SynthConfig(n_train=300, n_val=100, n_test=100, shard_size=200, n_pixels=128, seed=3)
    a = write_dataset(tmp_path / "a", cfg, progress=False)
    b = write_dataset(tmp_path / "b", cfg, progress=False)
    for split in ("train", "val", "test"):
        for pa, pb in zip(find_split(a, split), find_split(b, split)):
            validate_shard(pa)
            np.testing.assert_array_equal(read_block(pa, 0, 100)[0], read_block(pb, 0, 100)[0])
            pd.testing.assert_frame_equal(read_params(pa), read_params(pb))
    other = write_dataset(tmp_path / "c", SynthConfig(**{**cfg.__dict__, "seed": 4}), progress=False)
    assert not np.array_equal(
        read_block(find_split(a, "val")[0], 0, 10)[0], read_block(find_split(other, "val")[0], 0, 10)[0]
    )
    assert json.loads((a / "synth.json").read_text())["seed"] == 3
    with pytest.raises(ValueError, match="synth.json: dataset was generated with"):
        write_dataset(a, SynthConfig(**{**cfg.__dict__, "n_train": 301}), progress=False)


def test_interrupted_run_leaves_no_half_shard_and_resumes(tmp_path, monkeypatch):
    cfg = SynthConfig(n_train=400, n_val=100, n_test=100, shard_size=200, n_pixels=64, seed=5)
    real_flux = SpectrumModel.flux
    calls = {"n": 0}

    def flaky(self, labels):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_flux(self, labels)

    monkeypatch.setattr(SpectrumModel, "flux", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path, cfg, chunk=100, progress=False)
    assert (tmp_path / "train_000" / "dataset.h5").is_file()
    assert not (tmp_path / "train_001" / "dataset.h5").exists()
    assert not list(tmp_path.glob("**/.*tmp*")) and not (tmp_path / "synth.json").exists()
    monkeypatch.setattr(SpectrumModel, "flux", real_flux)
    write_dataset(tmp_path, cfg, chunk=100, progress=False)
    ref = write_dataset(tmp_path / "ref", cfg, chunk=100, progress=False)
    for split in ("train", "val", "test"):
        for pa, pb in zip(find_split(tmp_path, split), find_split(ref, split)):
            np.testing.assert_array_equal(read_block(pa, 0, 100)[0], read_block(pb, 0, 100)[0])


def _stars(model, **labels):
    n = len(labels["log_g"])
    base = {
        "T_eff": 4300.0,
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
    df = pd.DataFrame(
        {k: np.broadcast_to(np.asarray(labels.get(k, v), float), (n,)) for k, v in base.items()}
        | {"log_g": labels["log_g"]}
    )
    return model.flux(df), model.error(model.flux(df), df), df


def _depth(model, flux, centre, half=1.5):
    m = np.abs(model.wave - centre) < half
    return 1 - flux[:, m].min(1)


def _band_ew(model, flux, lo, hi):
    m = (model.wave > lo) & (model.wave < hi)
    return ((1 - flux[:, m]) * np.gradient(model.wave)[m]).sum(1)


def test_physics_directions():
    model = SpectrumModel(4096)
    f, e, _ = _stars(model, log_g=[1.5, 4.5], T_eff=[4000, 4000], M_H=[0.0, 0.0])
    assert _depth(model, f, 8190.0, 8)[1] > _depth(model, f, 8190.0, 8)[0] + 0.05  # Na I: dwarfs
    wings = _band_ew(model, f, 8525, 8535) + _band_ew(model, f, 8549, 8560)
    assert wings[1] > wings[0]  # CaT damping wings grow with log g
    f, _, _ = _stars(model, log_g=[2.0, 2.0], M_H=[-1.8, 0.4], T_eff=[5000, 5000])
    assert _depth(model, f, 8542.09)[1] > _depth(model, f, 8542.09)[0] + 0.1  # CaT grows with M_H
    f, _, _ = _stars(model, log_g=[4.5, 4.5], T_eff=[3800, 5500])
    assert _band_ew(model, f, 7589, 7640)[0] > _band_ew(model, f, 7589, 7640)[1] + 1.0  # TiO: cool
    # photon term: the error follows the flux (smaller in line cores than nearby continuum)
    f, e, _ = _stars(model, log_g=[4.5], T_eff=[4000], mag=[20.5], seeing=[0.6])
    core = np.argmin(np.abs(model.wave - 8542.09))
    assert e[0, core] < e[0, core - 40]


def test_realism_small_n():
    """The realism check's claims, at small N and 512 pixels, with looser bounds."""
    model = SpectrumModel(512)
    mk = lambda s, n: Split(*generate(model, np.random.default_rng(s), n))  # noqa: E731
    lines = run_checks(
        mk(1, 4000),
        mk(2, 1000),
        mk(3, 1000),
        noise_level=1.0,
        seed=0,
        bounds=Bounds(
            min_bin_share=0.02, global_r2=(0.2, 0.85), oracle_gain=0.0, error_only_min=0.35, quality_max=0.25
        ),
    )
    failed = [line.row() for line in lines if not line.passed]
    assert not failed, failed


def test_spectra_figure(tmp_path):
    model = SpectrumModel(1024)
    split = Split(*generate(model, np.random.default_rng(0), 1500))
    out = spectra_figure(split, model.wave, tmp_path / "spectra_by_logg.png")
    import matplotlib.image as mpimg

    img = mpimg.imread(out)
    assert img.shape[0] > 300 and img[..., :3].std() > 0.05
