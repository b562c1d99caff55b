"""``predict`` as a catalogue: any shards, labels optional, CSV or HDF5, the checkpoint's grid enforced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import fits_table, predict_catalogue

from moe.data import bins
from moe.data.shards import LABEL_COLUMNS, ShardError, find_split, read_block, read_params, read_wave, write_shard
from moe.gates.error_correlation import correlation_of


def _unlabelled_copy(src: Path, dst: Path, wave: np.ndarray | None = None) -> Path:
    """The shard at ``src`` without labels, with an ``objid`` column (and optionally another grid)."""
    flux, error = read_block(src, 0, read_params(src).shape[0])
    params = read_params(src).drop(columns=["log_g", "T_eff", "M_H"])
    params.insert(0, "objid", np.arange(len(params), dtype=np.int64) + 10_000)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_shard(dst, read_wave(src) if wave is None else wave, flux, error, params, labelled=False)
    return dst


def test_catalogue_of_unlabelled_shards_as_hdf5(trained, tiny_dir, tmp_path):
    root, args, ckpt, names = trained
    shard = _unlabelled_copy(find_split(tiny_dir, "test")[0], tmp_path / "obs" / "night1.h5")
    out = tmp_path / "catalogue.h5"
    predict_catalogue(ckpt, args, str(shard.parent), str(out))
    cat = pd.read_hdf(out)
    assert len(cat) == 300 and list(cat["row"]) == list(range(300)) and set(cat["shard"]) == {str(shard)}
    assert list(cat.columns) == [
        "shard",
        "row",
        "objid",
        "mag",
        "snr",
        "snr_bin",
        *(f"{label}_{s}" for label in LABEL_COLUMNS for s in ("pred", "sigma")),
        "rho_log_g_T_eff",
        "rho_log_g_M_H",
        "rho_T_eff_M_H",
        *(f"w_{label}_{n}" for label in LABEL_COLUMNS for n in names),
        *(f"pred_{label}_{n}" for label in LABEL_COLUMNS for n in names),
        *(f"{label}_edge" for label in LABEL_COLUMNS),
        "n_masked",
        "ood_score",
        "flags",
    ]  # no labels: no truth
    assert (cat["objid"] == np.arange(300) + 10_000).all()
    # each star's error correlations: the checkpoint's of its SNR bin at its standardised predictions
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    coef = state["mixture.calibration.rho"].double().numpy()  # [P, S, 1 + L]
    snr_bin = cat["snr_bin"].map({name: i for i, name in enumerate(bins.SNR_BIN_NAMES)}).to_numpy()
    pred = cat[[f"{label}_pred" for label in LABEL_COLUMNS]].to_numpy()
    x = (pred - state["mixture.label_mean"].numpy()) / state["mixture.label_std"].numpy()
    rho = correlation_of(coef, snr_bin, x)
    np.testing.assert_allclose(cat[["rho_log_g_T_eff", "rho_log_g_M_H", "rho_T_eff_M_H"]], rho, atol=2e-6)
    assert coef.any() and (np.abs(rho) < 1).all()  # fitted: the errors of the tiny set's labels correlate
    assert np.isfinite(cat["log_g_pred"]).all() and (cat["log_g_sigma"] > 0).all()
    for label in LABEL_COLUMNS:
        np.testing.assert_allclose(cat[[f"w_{label}_{n}" for n in names]].sum(1), 1, atol=1e-5)
    assert not list(out.parent.glob(".*tmp*"))


def test_catalogue_csv_of_labelled_shard_files(trained, tiny_dir, tmp_path):
    root, args, ckpt, names = trained
    shards = find_split(tiny_dir, "train")[:2]
    out = tmp_path / "cat.csv"
    predict_catalogue(ckpt, args, f"[{shards[0]}, {shards[1]}]", str(out))
    cat = pd.read_csv(out)
    assert len(cat) == 800 and cat["shard"].nunique() == 2 and "log_g_true" in cat
    truth = read_params(shards[1])["log_g"].to_numpy()
    second = cat[cat["shard"] == str(shards[1])]
    np.testing.assert_allclose(second["log_g_true"], truth[second["row"]], rtol=2e-6)  # float32, 7 digits


def test_catalogue_refuses_another_pixel_grid(trained, tiny_dir, tmp_path):
    root, args, ckpt, _ = trained
    src = find_split(tiny_dir, "test")[0]
    shifted = _unlabelled_copy(src, tmp_path / "other.h5", read_wave(src) + 5.0)
    with pytest.raises(ShardError, match=r"other\.h5: wavelength grid .* differs from"):
        predict_catalogue(ckpt, args, str(shifted), str(tmp_path / "x.csv"))


def _writer_batch(n: int, start: int = 0) -> dict:
    import torch

    rows = torch.arange(start, start + n)
    return {
        "row": rows,
        "snr": torch.full((n,), 5.0),
        "snr_bin": torch.zeros(n, dtype=torch.long),
        "log_g_pred": torch.full((n,), 3.0),
        "log_g_sigma": torch.full((n,), 0.2),
        "weights": torch.full((n, 1, 2), 0.5),  # [B, L, K]
        "expert_preds": torch.full((n, 2, 1), 3.0),  # [B, K, L]
        "log_g_true": torch.full((n,), float("nan")),
        "log_g_edge": torch.zeros(n, dtype=torch.bool),
        "n_masked": torch.zeros(n, dtype=torch.long),
        "ood_score": torch.ones(n),
        "flags": torch.zeros(n, dtype=torch.long),
    }


def test_catalogue_temp_is_atomic_stale_ones_removed_and_a_full_disk_is_one_error(tmp_path, monkeypatch):
    """The catalogue is appended batch by batch to a temporary file of moe.shared.atomic's naming, renamed at
    the end; a temporary file an interrupted predict left is removed first; a write that fails is one
    WriteError naming the catalogue, and neither the catalogue nor a temporary file is left."""
    import errno
    import subprocess
    import sys
    from types import SimpleNamespace

    from moe.gates.callbacks import CatalogueWriter
    from moe.shared.atomic import HOST
    from moe.shared.errors import WriteError

    out = tmp_path / "cat.csv"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".cat.csv.tmp-{HOST}-{int(gone.stdout)}"
    stale.write_text("half a catalogue of a killed run\n")
    trainer = SimpleNamespace(
        world_size=1, global_rank=0, log_dir=None, default_root_dir=str(tmp_path), datamodule=None
    )
    module = SimpleNamespace(
        mixture=SimpleNamespace(
            experts=SimpleNamespace(names=["a", "b"]), labels=("log_g",), routing="shared", correlation_names=[]
        )
    )
    writer = CatalogueWriter(str(out))
    writer.on_predict_start(trainer, module)
    assert not stale.exists()
    for start in (0, 4):
        writer.write_on_batch_end(trainer, module, _writer_batch(4, start), None, None, 0)
    assert not out.exists() and writer._file.tmp.name.startswith(".cat.csv.tmp-")
    writer.on_predict_end(trainer, module)
    assert list(pd.read_csv(out)["row"]) == list(range(8)) and not list(tmp_path.glob(".*tmp*"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    failing = tmp_path / "full.csv"
    writer = CatalogueWriter(str(failing))
    writer.on_predict_start(trainer, module)
    writer.write_on_batch_end(trainer, module, _writer_batch(4), None, None, 0)
    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    with pytest.raises(WriteError, match=r"full\.csv: cannot write the catalogue \(No space left on device") as info:
        writer.write_on_batch_end(trainer, module, _writer_batch(4, 4), None, None, 0)
    writer.on_exception(trainer, module, info.value)  # what Lightning calls next
    assert "\n" not in str(info.value) and not failing.exists() and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("suffix", [".csv", ".h5"])
def test_catalogue_parts_of_ranks_join_into_one_file_in_rank_order(tmp_path, suffix):
    """The parts ranks write (rank r: the r-th share of the rows) become one catalogue, rows in rank order,
    columns the union (a part of unlabelled shards has no *_true column), the parts removed; a rank without
    rows wrote no part."""
    from moe.gates.catalogue_join import HDF5_KEY, join_parts, part_path

    target = tmp_path / f"catalogue{suffix}"
    frames = [
        pd.DataFrame({"shard": ["a/x.h5"] * 3, "row": [0, 1, 2], "log_g_pred": [1.5, 2.25, 3.0], "log_g_true": 1.0}),
        pd.DataFrame({"shard": ["a/longer_name.h5"] * 2, "row": [0, 1], "log_g_pred": [4.5, 0.125]}),
    ]
    parts = [part_path(target, r) for r in range(3)]  # rank 2 had no rows
    for frame, part in zip(frames, parts):
        if suffix == ".h5":
            width = {"shard": int(frame["shard"].str.len().max())}  # as narrow as the writer makes each part
            frame.to_hdf(part, key=HDF5_KEY, format="table", index=False, min_itemsize=width)
        else:
            frame.to_csv(part, index=False)
    assert join_parts(parts, target) == 5
    cat = pd.read_hdf(target) if suffix == ".h5" else pd.read_csv(target)
    expected = pd.concat(frames, ignore_index=True)
    pd.testing.assert_frame_equal(cat.reset_index(drop=True), expected, check_dtype=False)
    assert not any(p.exists() for p in parts)
    # parts with one header are joined as they are, byte for byte
    for r, frame in enumerate(frames):
        frame.assign(log_g_true=float("nan")).to_csv(part_path(tmp_path / "b.csv", r), index=False)
    texts = [part_path(tmp_path / "b.csv", r).read_text() for r in range(2)]
    join_parts([part_path(tmp_path / "b.csv", r) for r in range(2)], tmp_path / "b.csv")
    assert (tmp_path / "b.csv").read_text() == texts[0] + texts[1].split("\n", 1)[1]


def test_fits_parts_of_ranks_join_into_the_one_rank_catalogue(tmp_path, monkeypatch):
    """FITS parts of the ranks (each written by the FITS writer, rank 1's from unlabelled shards: no *_true
    column) joined by rank 0: the same table and header, card for card (DATE aside), as one process writing
    every row; chunked reads give the same file; the parts are removed, nothing temporary is left."""
    from moe.catalogue.writers import FITSCatalogue
    from moe.gates import catalogue_join
    from moe.gates.catalogue_join import join_parts, part_path

    def frame(rows, shard, truth):
        out = pd.DataFrame({"shard": [shard] * len(rows), "row": np.asarray(rows, dtype=np.int64)})
        out["snr"] = np.linspace(1, 9, len(rows), dtype=np.float32)
        out["snr_bin"] = np.asarray(["X", "L", "M", "H"] * 3, dtype=object)[: len(rows)]
        out["log_g_pred"] = np.float32(2.5) + np.arange(len(rows), dtype=np.float32) / 8
        out["log_g_sigma"] = np.full(len(rows), 0.25, dtype=np.float32)
        if truth:
            out["log_g_true"] = np.float32(3.0)
        out["n_masked"] = np.arange(len(rows), dtype=np.int32)
        out["flags"] = np.asarray(rows, dtype=np.int32) % 4
        return out

    provenance = {"moe_version": "0.test", "checkpoint": "/ckpt/last.ckpt", "noise_level": 1.0}
    widths = {"snr_bin": 1, "shard": 9}
    batches = [
        [frame(range(5), "a/x.h5", True), frame(range(5, 7), "a/x.h5", True)],
        [frame(range(3), "b/y.h5", False)],
    ]
    for rank, frames in enumerate(batches):  # what each rank's CatalogueWriter does
        writer = FITSCatalogue(part_path(tmp_path / "two.fits", rank), provenance, widths)
        for f in frames:
            writer.append(f)
        assert writer.commit()
    one = FITSCatalogue(tmp_path / "one.fits", provenance, widths)  # one process: every row, labelled first batch
    for f in [*batches[0], batches[1][0].assign(log_g_true=np.float32("nan"))[list(batches[0][0].columns)]]:
        one.append(f)
    one.commit()

    parts = [part_path(tmp_path / "two.fits", r) for r in range(3)]  # rank 2 had no rows
    assert join_parts(parts, tmp_path / "two.fits") == 10
    assert not any(p.exists() for p in parts) and not list(tmp_path.glob(".*tmp*"))
    (a, cards), (b, one_cards) = fits_table(tmp_path / "two.fits"), fits_table(tmp_path / "one.fits")
    assert cards == one_cards
    assert a.colnames == b.colnames and list(a["row"]) == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    for name in a.colnames:
        np.testing.assert_array_equal(a[name], b[name])
        assert a[name].unit == b[name].unit and a[name].description == b[name].description
    assert np.isnan(a["log_g_true"][7:]).all()

    for rank, frames in enumerate(batches):  # again, read back 4 rows at a time: the same bytes
        writer = FITSCatalogue(part_path(tmp_path / "chunked.fits", rank), provenance, widths)
        for f in frames:
            writer.append(f)
        writer.commit()
    monkeypatch.setattr(catalogue_join, "CHUNK_ROWS", 4)
    join_parts([part_path(tmp_path / "chunked.fits", r) for r in range(2)], tmp_path / "chunked.fits")
    c, chunked_cards = fits_table(tmp_path / "chunked.fits")
    assert chunked_cards == cards
    for name in a.colnames:
        np.testing.assert_array_equal(c[name], a[name])


def test_fits_header_of_a_three_label_catalogue_warns_nothing(tmp_path):
    """Long column names at two-digit column numbers (pred_T_eff_Cool-Rich as TTYPE53): each TTYPE comment is
    cut to what fits its card, so astropy has nothing to truncate (a VerifyWarning the user cannot act on);
    the whole description is read back from TCOMM."""
    import warnings

    from astropy.table import Table

    from moe.catalogue.writers import FITSCatalogue
    from moe.experts import groups

    cols = {"row": np.arange(3), "snr": np.ones(3)}
    for label in LABEL_COLUMNS:
        cols |= {f"{label}_pred": np.ones(3), f"{label}_sigma": np.ones(3)}
    cols |= {name: np.zeros(3) for name in ("rho_log_g_T_eff", "rho_log_g_M_H", "rho_T_eff_M_H")}
    for prefix in ("w", "pred"):
        cols |= {f"{prefix}_{label}_{n}": np.ones(3) for label in LABEL_COLUMNS for n in groups.group_names("phys")}
    out = tmp_path / "cat.fits"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        writer = FITSCatalogue(out, {"checkpoint": "x"}, {})
        writer.append(pd.DataFrame(cols))
        writer.commit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy: 'dex' is no FITS-standard unit
        table = Table.read(out)
    assert table["pred_T_eff_Cool-Rich"].description == "effective temperature predicted by expert Cool-Rich"
