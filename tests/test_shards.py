"""Shard layout: round trip, simulator-style files, the validator's every complaint."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from moe.data import shards
from moe.data.shards import (
    ERROR_KEY,
    FLUX_KEY,
    PARAM_COLUMNS,
    WAVE_KEY,
    ShardError,
    fill_nan_nearest,
    find_split,
    inspect_shard,
    read_block,
    read_params,
    validate_shard,
    write_shard,
)

N, D = 12, 32


def _arrays(rng=np.random.default_rng(0)):
    wave = np.linspace(7100.0, 8850.0, D)
    flux = rng.uniform(0.5, 1.5, (N, D)).astype(np.float32)
    error = rng.uniform(0.05, 0.2, (N, D)).astype(np.float32)
    params = pd.DataFrame({c: rng.uniform(0, 1, N) for c in PARAM_COLUMNS})
    params["T_eff"], params["log_g"], params["M_H"] = (
        rng.uniform(3750, 6000, N),
        rng.uniform(1, 5, N),
        rng.uniform(-2, 0.5, N),
    )
    return wave, flux, error, params


def _simulator_file(path, wave, flux, error, params, key="params"):
    """A file written the way the PFS simulator does: h5py datasets, then DataFrame.to_hdf."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset(WAVE_KEY, data=wave)
        f.create_dataset(FLUX_KEY, data=flux)
        f.create_dataset(ERROR_KEY, data=error)
    params.to_hdf(path, key=key, mode="a")


def test_round_trip(tmp_path):
    wave, flux, error, params = _arrays()
    path = tmp_path / "train_0" / "dataset.h5"
    write_shard(path, wave, flux, error, params)
    info = inspect_shard(path)
    assert (info.n_rows, info.n_pixels) == (N, D)
    f, e = read_block(path, 3, 9)
    np.testing.assert_array_equal(f, flux[3:9])
    np.testing.assert_array_equal(e, error[3:9])
    none, e_only = read_block(path, 3, 9, flux=False)  # error only (pre-noised val/test reads)
    assert none is None and np.array_equal(e_only, e)
    pd.testing.assert_frame_equal(read_params(path), params)
    assert pd.read_hdf(path).shape == (N, len(PARAM_COLUMNS))  # no key needed, as on real files
    assert not list(path.parent.glob(".*tmp*"))


def test_simulator_style_file_loads(tmp_path):
    wave, flux, error, params = _arrays()
    flux[0, 0] = -0.3  # negative flux exists in real files; clipped at 0 on load
    error[1, :4] = np.nan  # NaN at the edges, as in real files
    error[1, -2:] = np.nan
    path = tmp_path / "test_10k" / "dataset.h5"
    _simulator_file(path, wave, flux, error, params, key="fixed_params")
    summary = validate_shard(path)
    assert summary.n_rows == N and summary.wave_min == 7100.0
    f, e = read_block(path, 0, N)
    assert f[0, 0] == 0.0
    np.testing.assert_array_equal(e[1, :4], np.full(4, error[1, 4]))
    np.testing.assert_array_equal(e[1, -2:], np.full(2, error[1, -3]))
    assert find_split(tmp_path, "test") == [path]


def test_fill_nan_nearest_matches_loop():
    rng = np.random.default_rng(1)
    e = rng.uniform(1, 2, (20, 15))
    e[rng.uniform(size=e.shape) < 0.4] = np.nan
    e[:, 0] = np.where(np.isnan(e[:, 1:]).all(1), 1.0, e[:, 0])  # no all-NaN rows
    got = fill_nan_nearest(e)
    for i in range(e.shape[0]):
        finite = np.flatnonzero(np.isfinite(e[i]))
        for j in range(e.shape[1]):
            if np.isnan(e[i, j]):
                d = np.abs(finite - j)
                src = finite[np.flatnonzero(d == d.min())[0]]  # ties: the left one
                assert got[i, j] == e[i, src]
            else:
                assert got[i, j] == e[i, j]


def _broken(tmp_path, mutate):
    wave, flux, error, params = _arrays()
    out = mutate(wave, flux, error, params)
    if out is not None:
        wave, flux, error, params = out
    path = tmp_path / "train_0" / "dataset.h5"
    _simulator_file(path, wave, flux, error, params)
    return path


def _drop(key):
    def go(path):
        with h5py.File(path, "a") as f:
            del f[key]

    return go


@pytest.mark.parametrize(
    "mutate, post, match",
    [
        (None, _drop(FLUX_KEY), "missing dataset 'dataset/arrays/flux/value'"),
        (None, _drop(WAVE_KEY), "missing dataset 'spectrumdataset/wave'"),
        (lambda w, f, e, p: (w, f, e[:, :-1], p), None, "error/value shape .* disagrees"),
        (lambda w, f, e, p: (w[:-1], f, e, p), None, "wave has 31 pixels but .* has 32"),
        (lambda w, f, e, p: (w[::-1].copy(), f, e, p), None, "not strictly increasing"),
        (lambda w, f, e, p: (w, f, e, p.iloc[:-2]), None, "has 10 rows but .* has 12"),
        (lambda w, f, e, p: (w, f, e, p.drop(columns=["log_g"])), None, r"missing columns \['log_g'\]"),
        (
            lambda w, f, e, p: f.__setitem__((5, 7), np.nan),
            None,
            r"flux NaN or Inf in 1 row \(5; first at row 5, pixel 7\)",
        ),
        (
            lambda w, f, e, p: f.__setitem__((2, 0), np.inf),
            None,
            r"flux NaN or Inf in 1 row \(2; first at row 2, pixel 0\)",
        ),
        (
            lambda w, f, e, p: e.__setitem__((4, 2), 0.0),
            None,
            r"error <= 0 in 1 row \(4; first at row 4, pixel 2, value 0\)",
        ),
        (
            lambda w, f, e, p: e.__setitem__((4, 2), -1.0),
            None,
            r"error <= 0 in 1 row \(4; first at row 4, pixel 2, value -1\)",
        ),
        (
            lambda w, f, e, p: e.__setitem__((6, slice(None)), np.nan),
            None,
            r"error NaN or Inf at every pixel in 1 row \(6\)",
        ),
        (
            lambda w, f, e, p: e.__setitem__((3, 10), np.nan),
            None,
            r"error NaN inside the spectrum \(not at its edges\) in 1 row \(3; first at row 3, pixel 10\)",
        ),
        (
            lambda w, f, e, p: e.__setitem__((8, 0), np.inf),
            None,
            r"error infinite in 1 row \(8; first at row 8, pixel 0\)",
        ),
        (
            lambda w, f, e, p: p.__setitem__("log_g", p["log_g"].where(p.index != 3)),
            None,
            r"log_g NaN or Inf in 1 row \(3\)",
        ),
        (
            lambda w, f, e, p: p.__setitem__("T_eff", p["T_eff"].mask(p.index == 2, 7000.0)),
            None,
            r"T_eff outside \[3750, 6000\] in 1 row \(2; first at row 2, value 7000\)",
        ),
        (
            lambda w, f, e, p: p.__setitem__("M_H", p["M_H"].mask(p.index >= 5, -3.0)),
            None,
            r"M_H outside \[-2, 0.5\] in 7 rows \(5, 6, 7, 8, 9, ...; first at row 5, value -3\)",
        ),
        (
            lambda w, f, e, p: p.__setitem__("log_g", p["log_g"].mask(p.index == 0, 5.5)),
            None,
            r"log_g outside \[1, 5\] in 1 row \(0; first at row 0, value 5.5\)",
        ),
        (
            lambda w, f, e, p: p.__setitem__("log_g", "giant"),
            None,
            r"parameter column 'log_g' has dtype \w+, expected numbers",
        ),
        (
            lambda w, f, e, p: (w, f.astype(np.complex64), e, p),
            None,
            "flux/value has dtype complex64, expected real numbers",
        ),
        (lambda w, f, e, p: (w[:0], f[:, :0], e[:, :0], p), None, "has no pixels"),
        (lambda w, f, e, p: (w, f[:0], e[:0], p.iloc[:0]), None, "empty shard"),
    ],
)
def test_validator_names_file_and_problem(tmp_path, mutate, post, match):
    path = _broken(tmp_path, mutate or (lambda *a: None))
    if post is not None:
        post(path)
    with pytest.raises(ShardError, match=match) as info:
        validate_shard(path)
    assert str(path) in str(info.value)


def test_missing_params_table(tmp_path):
    wave, flux, error, _ = _arrays()
    path = tmp_path / "x" / "dataset.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as f:
        f.create_dataset(WAVE_KEY, data=wave)
        f.create_dataset(FLUX_KEY, data=flux)
        f.create_dataset(ERROR_KEY, data=error)
    with pytest.raises(ShardError, match="missing parameter table"):
        inspect_shard(path)


def test_empty_split_and_missing_file(tmp_path):
    with pytest.raises(ShardError, match=r"empty split 'val': no files match val\*/dataset.h5"):
        find_split(tmp_path, "val")
    with pytest.raises(ShardError, match="file not found"):
        inspect_shard(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(ShardError, match="not a readable HDF5 file"):
        inspect_shard(tmp_path / "junk.h5")


def test_read_block_rejects_dead_error_row(tmp_path):
    path = _broken(tmp_path, lambda w, f, e, p: e.__setitem__((3, slice(None)), np.nan))
    with pytest.raises(ShardError, match="error row 3 is all NaN"):
        read_block(path, 0, N)


def test_validate_command(tmp_path, capsys):
    wave, flux, error, params = _arrays()
    good = tmp_path / "train_0" / "dataset.h5"
    write_shard(good, wave, flux, error, params)
    assert shards.main(["validate", str(good)]) == 0
    out = capsys.readouterr().out
    assert "12 rows x 32 px" in out and "log_g [" in out
    bad = _broken(tmp_path / "b", lambda w, f, e, p: e.__setitem__((1, 1), -1.0))
    assert shards.main(["validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "error <= 0 in 1 row (1; first at row 1, pixel 1, value -1)" in err


def test_validator_reports_every_kind_of_bad_value_in_one_line(tmp_path):
    def mutate(w, f, e, p):
        f[1, 3] = np.nan
        e[2, 5] = 0.0
        p.loc[4, "log_g"] = np.nan

    path = _broken(tmp_path, mutate)
    with pytest.raises(ShardError) as info:
        validate_shard(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path))
    assert (
        "log_g NaN or Inf in 1 row (4)" in msg
        and "flux NaN or Inf in 1 row (1;" in msg
        and "error <= 0 in 1 row (2;" in msg
    )


def test_edge_nan_in_error_is_accepted_interior_nan_is_not(tmp_path):
    def edges(w, f, e, p):
        e[0, :3] = np.nan
        e[0, -1] = np.nan
        e[5, -4:] = np.nan

    validate_shard(_broken(tmp_path / "a", edges))
    check = shards.check_rows(_broken(tmp_path / "b", lambda w, f, e, p: e.__setitem__((7, slice(10, 12)), np.nan)))
    assert [(p.field, p.rows.tolist()) for p in check.problems] == [("error", [7])]


def test_writer_is_atomic(tmp_path):
    wave, flux, error, params = _arrays()
    path = tmp_path / "train_0" / "dataset.h5"
    with pytest.raises(RuntimeError):
        with shards.ShardWriter(path, wave, N) as w:
            w.write(0, flux[:5], error[:5])
            raise RuntimeError("interrupted")
    assert not path.exists() and not list(path.parent.iterdir())
