"""``predict`` as a catalogue: any shards, labels optional, CSV or HDF5, the checkpoint's grid enforced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import predict_catalogue

from moe.data.shards import LABEL_COLUMNS, ShardError, find_split, read_block, read_params, read_wave, write_shard


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
        *(f"w_{label}_{n}" for label in LABEL_COLUMNS for n in names),
        *(f"pred_{label}_{n}" for label in LABEL_COLUMNS for n in names),
        *(f"{label}_edge" for label in LABEL_COLUMNS),
        "n_masked",
        "ood_score",
        "flags",
    ]  # no labels: no truth
    assert (cat["objid"] == np.arange(300) + 10_000).all()
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
        mixture=SimpleNamespace(experts=SimpleNamespace(names=["a", "b"]), labels=("log_g",), routing="shared")
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
