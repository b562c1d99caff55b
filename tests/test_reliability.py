"""Reliability: generated data only in new folders, bad rows named (or dropped) before any work, writes
that are whole or absent, preparation once under concurrent first use, and a property test of the validator."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from moe.data import row_check, shards
from moe.data.datamodule import SpectraDataModule
from moe.data.folder import SpectraFolder, ensure_dataset
from moe.data.noise_cache import ensure_noisy
from moe.data.shards import ERROR_KEY, FLUX_KEY, PARAMS_KEY, WAVE_KEY, read_block, read_params, write_shard
from moe.data.synth import MANIFEST, SpectrumModel, SynthConfig, create_dataset, write_dataset
from moe.experts.bundle import ExpertBundle
from moe.experts.fit import FitConfig
from moe.shared.atomic import HOST, remove_stale_temps
from moe.shared.errors import ShardError, WriteError

REPO = Path(__file__).resolve().parents[1]
SMALL = SynthConfig(n_train=200, n_val=60, n_test=60, shard_size=100, n_pixels=64, seed=7)


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) -> sha1 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def _copy(src: str | Path, dst: Path, edit=None) -> Path:
    """A user-style copy of a dataset's shards (no synth.json, no caches); ``edit(name, flux, error, params)``
    may change a shard's arrays in place before it is written."""
    for shard in sorted(Path(src).glob("*/dataset.h5")):
        with h5py.File(shard, "r") as f:
            wave, flux, error = f[WAVE_KEY][()], f[FLUX_KEY][()], f[ERROR_KEY][()]
        params = read_params(shard)
        if edit is not None:
            edit(shard.parent.name, flux, error, params)
        write_shard(dst / shard.parent.name / "dataset.h5", wave, flux, error, params)
    return dst


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("small") / "data", SMALL, progress=False)


# ---- 1. data safety: generated data only in a folder the project creates ---------------------------------------


def test_user_folder_missing_test_split_is_left_byte_identical(small, tmp_path):
    user = _copy(small, tmp_path / "mine")
    shutil.rmtree(user / "test_000")
    before, around = _tree(user), sorted(p.name for p in tmp_path.iterdir())
    match = r"mine: no test split \(test\*/dataset.h5\); the folder has no synth.json marker"
    with pytest.raises(ShardError, match=match):
        SpectraFolder(str(user))  # default synth settings: still nothing generated into it
    with pytest.raises(ShardError, match=match):
        SpectraDataModule(str(user), synth=SynthConfig(n_train=10, n_val=10, n_test=10, shard_size=10, n_pixels=64))
    from moe.experts.__main__ import main as experts_main

    with pytest.raises(ShardError, match=match):
        experts_main(["fit", "--data", str(user)])
    assert _tree(user) == before  # same files, same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == around  # no lock or partial folder next to it


def test_missing_folder_is_generated_whole_and_reused_with_an_info_line(tmp_path, caplog):
    root = tmp_path / "gen" / "synth"  # parents created too
    assert ensure_dataset(root, SMALL) == root
    assert json.loads((root / MANIFEST).read_text())["seed"] == SMALL.seed
    assert not (tmp_path / "gen" / ".synth.partial").exists() and not _temps(tmp_path)
    caplog.set_level(logging.INFO, logger="moe")
    other = SynthConfig(**{**SMALL.__dict__, "seed": 8})
    SpectraFolder(str(root), synth=other)
    assert "using it as it is, not the synth settings" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert json.loads((root / MANIFEST).read_text())["seed"] == SMALL.seed  # the manifest's settings are used


def test_describe_reports_what_the_folder_holds_not_the_synth_request(small, tmp_path):
    """Provenance: a generated folder is described by its manifest's settings, whatever ``synth`` asks for;
    the user's folder has no synth settings at all."""
    asked = SynthConfig(n_train=10, n_val=10, n_test=10, shard_size=10, n_pixels=64, seed=99)
    generated = SpectraFolder(str(small), synth=asked).describe()
    assert generated["source"] == "synthetic"
    assert generated["synth"] == json.loads((small / MANIFEST).read_text())  # seed 7, 200 train rows
    assert generated["synth"]["seed"] == SMALL.seed and generated["n_train"] == SMALL.n_train
    user = SpectraFolder(str(_copy(small, tmp_path / "mine")), synth=asked).describe()
    assert user["source"] == "user data" and "synth" not in user
    assert user["data_dir"] == str(tmp_path / "mine") and (user["n_train"], user["n_test"]) == (200, 60)


def test_interrupted_generation_resumes_in_its_partial_folder(tmp_path, monkeypatch):
    real_flux, calls = SpectrumModel.flux, {"n": 0}

    def flaky(self, labels):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_flux(self, labels)

    monkeypatch.setattr(SpectrumModel, "flux", flaky)
    root = tmp_path / "synth"
    with pytest.raises(KeyboardInterrupt):
        create_dataset(root, SMALL, chunk=50, progress=False)
    partial = tmp_path / ".synth.partial"
    assert not root.exists() and (partial / "train_000" / "dataset.h5").is_file() and not _temps(tmp_path)
    first = (partial / "train_000" / "dataset.h5").stat().st_mtime_ns
    monkeypatch.setattr(SpectrumModel, "flux", real_flux)
    create_dataset(root, SMALL, chunk=50, progress=False)
    assert (root / "train_000" / "dataset.h5").stat().st_mtime_ns == first  # kept, not written again
    assert not partial.exists() and (root / MANIFEST).is_file()
    ref = write_dataset(tmp_path / "ref", SMALL, chunk=50, progress=False)
    for name in ("train_001", "val_000", "test_000"):
        np.testing.assert_array_equal(
            read_block(root / name / "dataset.h5", 0, 50)[0], read_block(ref / name / "dataset.h5", 0, 50)[0]
        )


def test_synth_command_refuses_an_existing_folder(small, tmp_path):
    from moe.data import synth

    user = _copy(small, tmp_path / "mine")
    before = _tree(user)
    with pytest.raises(ShardError, match="holds no synth.json: not a generated dataset"):
        synth.main(["--out", str(user), "--train", "10", "--val", "10", "--test", "10", "--pixels", "64"])
    with pytest.raises(ShardError, match="already holds a synthetic dataset generated with"):
        synth.main(["--out", str(small), "--train", "10", "--val", "10", "--test", "10", "--pixels", "64"])
    assert _tree(user) == before


GENERATE = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from moe.data.synth import SynthConfig, create_dataset
    create_dataset(sys.argv[1], SynthConfig(n_train=200, n_val=60, n_test=60, shard_size=100, n_pixels=64, seed=7),
                   progress=False)
""")


def test_two_processes_generate_a_missing_folder_once(tmp_path):
    root = tmp_path / "synth"
    procs = [
        subprocess.Popen([sys.executable, "-c", GENERATE, str(root)], cwd=REPO, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "".join(logs).count("generated the synthetic dataset") == 1, logs
    assert (root / MANIFEST).is_file() and len(list(root.glob("*/dataset.h5"))) == 4 and not _temps(tmp_path)


# ---- 5. bad rows: named before any work, or dropped -------------------------------------------------------------


def _plant(where: str, row: int, what: str):
    def edit(name, flux, error, params):
        if name != where:
            return
        if what == "flux NaN":
            flux[row, 5] = np.nan
        elif what == "flux Inf":
            flux[row, 0] = np.inf
        elif what == "error 0":
            error[row, 9] = 0.0
        elif what == "error NaN inside":
            error[row, 20:22] = np.nan
        elif what == "log_g NaN":
            params.loc[row, "log_g"] = np.nan
        elif what == "T_eff 7000":
            params.loc[row, "T_eff"] = 7000.0
        elif what == "M_H -3":
            params.loc[row, "M_H"] = -3.0

    return edit


@pytest.mark.parametrize(
    "where, what, match",
    [
        ("train_001", "flux NaN", r"train_001/dataset.h5: flux NaN or Inf in 1 row \(7; first at row 7, pixel 5\)"),
        ("train_000", "flux Inf", r"train_000/dataset.h5: flux NaN or Inf in 1 row \(7; first at row 7, pixel 0\)"),
        ("train_000", "error 0", r"train_000/dataset.h5: error <= 0 in 1 row \(7; first at row 7, pixel 9, value 0\)"),
        (
            "val_000",
            "error NaN inside",
            r"val_000/dataset.h5: error NaN inside the spectrum \(not at its edges\) in 1 row \(7;",
        ),
        ("train_000", "log_g NaN", r"train_000/dataset.h5: log_g NaN or Inf in 1 row \(7\)"),
        (
            "test_000",
            "T_eff 7000",
            r"test_000/dataset.h5: T_eff outside \[3750, 6000\] in 1 row \(7; first at row 7, value 7000\)",
        ),
        (
            "train_001",
            "M_H -3",
            r"train_001/dataset.h5: M_H outside \[-2, 0.5\] in 1 row \(7; first at row 7, value -3\)",
        ),
    ],
)
def test_bad_rows_are_named_before_any_work(small, tmp_path, where, what, match):
    data = _copy(small, tmp_path / "bad", _plant(where, 7, what))
    with pytest.raises(ShardError, match=match) as info:
        SpectraDataModule(str(data), synth=None)  # construction: before any expert, cache or epoch
    assert "\n" not in str(info.value) and "--data.bad_rows drop" in str(info.value)
    assert not list(data.rglob("noisy_*")) and not (data / "experts").exists()  # no work was done


def test_bad_rows_dropped_stay_out_and_caches_stay_aligned(small, tmp_path, caplog):
    from moe.data.row_cache import read_rows
    from moe.prepare import PrepareConfig, prepare

    def edit(name, flux, error, params):
        if name == "train_000":
            flux[5, 3] = np.nan
            error[9, :] = np.nan  # no finite pixel at all
        if name == "train_001":
            params.loc[10, "T_eff"] = 7000.0
        if name == "val_000":
            params.loc[3, "log_g"] = np.nan
            error[4, 30] = -1.0
        if name == "test_000":
            params.loc[7, "M_H"] = -3.0

    data = _copy(small, tmp_path / "bad", edit)
    with pytest.raises(ShardError, match=r"train_000/dataset.h5: .*; 3 more shard\(s\) have bad rows"):
        SpectraFolder(str(data), synth=None)
    caplog.set_level(logging.INFO, logger="moe")
    folder = SpectraDataModule(str(data), synth=None, bad_rows="drop", block_rows=40)
    assert caplog.text.count("bad row(s)") == 4
    dropped = {"train": [5, 9, 110], "val": [3, 4], "test": [7]}
    for split, rows in dropped.items():
        seen = torch.cat([b["row"] for b in folder.stream(split, shuffle=False)]).numpy()
        expect = np.setdiff1d(np.arange(folder.split_set(split).n_rows), rows)
        np.testing.assert_array_equal(seen, expect)
    shuffled = torch.cat([b["row"] for b in folder.stream("train")]).numpy()
    np.testing.assert_array_equal(np.sort(shuffled), np.setdiff1d(np.arange(200), dropped["train"]))
    assert folder.describe()["n_train"] == 197 and folder.fingerprint()["dropped"] == {"train": 3, "val": 2}
    fit = FitConfig(min_samples=5, fallback="global", block_rows=64)
    prepared = prepare(folder, PrepareConfig(fit=fit, feature_rows=150), progress=False)
    assert np.isfinite(prepared.model_var).all() and torch.isfinite(prepared.phys_scaler.mean).all()
    for split, paths in prepared.inputs.items():
        s = folder.split_set(split)
        for k, path in paths.items():
            with h5py.File(path, "r") as f:
                assert all(f[name].shape[0] == s.counts[k] for name in f)  # one cache row per shard row
    batch = next(iter(folder.stream("train", shuffle=False, cached=True)))
    assert torch.equal(batch["row"][:8], torch.tensor([0, 1, 2, 3, 4, 6, 7, 8]))
    cached = read_rows(prepared.inputs["train"][0], 0, 10)["proj"]
    np.testing.assert_array_equal(batch["proj"][5].numpy(), cached[6])  # row 6 is the sixth row streamed
    assert all(torch.isfinite(b["proj"]).all() for b in folder.stream("train", cached=True))


def test_expert_fit_when_the_first_block_keeps_no_row(small, tmp_path, monkeypatch):
    """With ``bad_rows="drop"`` the first block of the training split may keep no row: the statistics' shift
    comes from the first block that keeps one (not a NaN mean of nothing), the fit equals one on the same
    data without those rows, and the progress total counts the kept rows."""
    from moe.experts import fit as fit_module

    first = 8  # FitConfig.block_rows: the whole first block is bad

    def plant(name, flux, error, params):
        if name == "train_000":
            flux[:first, 3] = np.nan

    dropped = SpectraFolder(str(_copy(small, tmp_path / "bad", plant)), synth=None, bad_rows="drop")
    assert dropped.train_set.n_kept == SMALL.n_train - first
    without = tmp_path / "without"  # the same data with those rows removed from the shard
    _copy(small, without)
    shard = without / "train_000" / "dataset.h5"
    with h5py.File(shard, "r") as f:
        wave, flux, error = f[WAVE_KEY][()], f[FLUX_KEY][()], f[ERROR_KEY][()]
    params = read_params(shard).iloc[first:].reset_index(drop=True)
    shard.unlink()
    write_shard(shard, wave, flux[first:], error[first:], params)
    clean = SpectraFolder(str(without), synth=None)

    cfg = FitConfig(("global", "phys"), min_samples=5, fallback="global", block_rows=first)
    shift = fit_module.common_shift(dropped, cfg)
    np.testing.assert_allclose(shift, flux[first : 2 * first].mean(0, dtype=np.float64), rtol=1e-6)
    totals = []
    real = fit_module.accumulate
    monkeypatch.setattr(fit_module, "accumulate", lambda *a, **kw: totals.append(kw["total"]) or real(*a, **kw))
    fits, pca, _ = fit_module.fit_families(dropped, cfg, progress=False)
    assert totals == [SMALL.n_train - first]
    reference, reference_pca, _ = fit_module.fit_families(clean, cfg, progress=False)
    for label in cfg.labels:  # every label's experts, as fitted without those rows
        for family in ("global", "phys"):
            got, ref = fits[label][family], reference[label][family]
            assert np.isfinite(got.weight).all()
            np.testing.assert_array_equal(got.alpha, ref.alpha)
            np.testing.assert_allclose(got.weight, ref.weight, rtol=1e-6, atol=1e-9 * np.abs(ref.weight).max())
    np.testing.assert_allclose(pca[0], reference_pca[0], rtol=1e-6)


def test_equalised_ranks_get_the_same_number_of_kept_rows(tiny_dir):
    from moe.data.stream import ShardSet, SpectraStream

    shards_ = ShardSet(shards.find_split(tiny_dir, "train"))
    shards_.drop(0, np.arange(0, 150))  # slot 0 of 2 loses many rows
    shards_.drop(2, np.array([1, 5, 399]))
    stream = SpectraStream(shards_, batch_size=50, noise_level=1.0, block_rows=97, equalize_ranks=True)
    for n_slots in (2, 3, 4):
        kept = []
        for s in range(n_slots):
            rows = np.concatenate([stream.read(b)["row"] for b in stream.plan(s, n_slots)])
            assert not np.isin(rows, shards_.dropped).any()
            kept.append(rows)
        assert len({len(r) for r in kept}) == 1  # DDP needs the same number of batches on every rank
        assert len(np.unique(np.concatenate(kept))) == sum(map(len, kept))
        assert n_slots * len(kept[0]) > shards_.n_kept - n_slots * 160


def test_row_check_is_remembered_and_redone_after_an_edit(small, tmp_path, monkeypatch):
    data = _copy(small, tmp_path / "d")
    calls = []
    real = row_check.check_rows
    monkeypatch.setattr(row_check, "check_rows", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    SpectraFolder(str(data), synth=None)
    assert len(calls) == 4 and len(list(data.glob("*/row_check_dataset.json"))) == 4
    row_check._memo.clear()  # a new process
    SpectraFolder(str(data), synth=None, max_train_rows=150)
    assert len(calls) == 4  # read from the markers
    shard = data / "val_000" / "dataset.h5"
    with h5py.File(shard, "a") as f:
        f[FLUX_KEY][0, 0] = np.nan  # an in-place edit
    with pytest.raises(ShardError, match=r"val_000/dataset.h5: flux NaN or Inf in 1 row \(0;"):
        SpectraFolder(str(data), synth=None)
    assert calls[-1] == shard


def test_concurrent_row_checks_share_the_shards(small, tmp_path, monkeypatch):
    """A shard another process is checking (its lock held) is left for last, then read from that process's
    marker: processes started together check each shard once between them."""
    import threading

    from filelock import FileLock

    data = _copy(small, tmp_path / "d")
    calls = []
    real = row_check.check_rows
    monkeypatch.setattr(row_check, "check_rows", lambda *a, **k: calls.append(a[0].parent.name) or real(*a, **k))
    shard = data / "train_000" / "dataset.h5"
    marker = row_check.marker_path(shard)
    holding, while_held = threading.Event(), []

    def other():  # "another process" is checking train_000: it writes the marker once this one has done the rest
        with FileLock(str(marker.with_name(f".{marker.name}.lock"))):
            holding.set()
            deadline = time.monotonic() + 30
            while len(calls) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            while_held.extend(calls)
            info = shards.inspect_shard(shard)
            row_check._write_marker(marker, row_check._key(info, True), real(shard, info))

    thread = threading.Thread(target=other)
    thread.start()
    holding.wait()
    SpectraFolder(str(data), synth=None)
    thread.join()
    assert while_held == ["train_001", "val_000", "test_000"]  # checked while the other held train_000
    assert calls == while_held  # and train_000 read from the other's marker


def test_deferred_row_checks_run_when_asked(small, tmp_path):
    """Inside ``deferred_screens`` a folder's rows are checked when the queue is run (the CLI starts the other
    ranks first), and a bad row is named then."""
    data = _copy(small, tmp_path / "bad", _plant("val_000", 3, "flux NaN"))
    with row_check.deferred_screens() as queue:
        folder = SpectraFolder(str(data), synth=None)  # no check yet
    assert len(queue) == 1 and not list(data.glob("*/row_check_dataset.json"))
    with pytest.raises(ShardError, match=r"val_000/dataset.h5: flux NaN or Inf in 1 row \(3;"):
        queue[0]()
    dropped = SpectraFolder(str(data), synth=None, bad_rows="drop")
    assert folder.val_set.n_kept == dropped.val_set.n_kept + 1


def test_predict_spectra_with_bad_pixels_are_masked_not_refused(tiny_dir, tmp_path):
    """Spectra to predict are observations: a NaN flux pixel masks that pixel (moe.catalogue), it stops nothing."""
    src = shards.find_split(tiny_dir, "test")[0]
    flux, error = read_block(src, 0, 20)
    flux[4, 2] = np.nan
    obs = tmp_path / "obs" / "night1.h5"
    with h5py.File(src, "r") as f:
        wave = f[WAVE_KEY][()]
    write_shard(obs, wave, flux, error, pd.DataFrame({"objid": np.arange(20)}), labelled=False)
    dm = SpectraDataModule(tiny_dir, synth=None, predict_path=str(obs))
    batches = list(dm.stream("predict"))
    usable = torch.cat([b["usable"] for b in batches]).numpy()
    np.testing.assert_array_equal(torch.cat([b["row"] for b in batches]).numpy(), np.arange(20))
    assert np.argwhere(~usable).tolist() == [[4, 2]]
    assert all(torch.isfinite(b["flux"]).all() for b in batches)


# ---- 6. writes that clean up --------------------------------------------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_a_shard_is_one_error_and_no_temp(tmp_path, monkeypatch):
    monkeypatch.setattr(h5py.Dataset, "__setitem__", _no_space)
    path = tmp_path / "train_000" / "dataset.h5"
    with pytest.raises(WriteError, match=rf"^{path}: cannot write the shard \(No space left on device \[errno 28\]\)"):
        write_shard(
            path, np.linspace(7100, 8850, 8), np.ones((3, 8)), np.ones((3, 8)), pd.DataFrame({"x": [1, 2, 3]}), False
        )
    assert not path.exists() and not _temps(tmp_path)


def test_disk_full_while_generating_leaves_no_folder_and_no_temp(tmp_path, monkeypatch):
    monkeypatch.setattr(h5py.Dataset, "__setitem__", _no_space)
    root = tmp_path / "synth"
    with pytest.raises(WriteError, match=r"\.synth\.partial/train_000/dataset\.h5: cannot write the shard \(No space"):
        SpectraFolder(str(root), synth=SMALL)
    assert not root.exists() and not _temps(tmp_path)


def test_failed_rename_of_a_cache_or_bundle_is_one_error_and_no_temp(tiny_dir, tmp_path, monkeypatch):
    shard = shards.find_split(tiny_dir, "val")[0]
    bundle = ExpertBundle({}, np.zeros(4), np.zeros((1, 4)), np.zeros(1), np.arange(4.0), {}, FitConfig())
    monkeypatch.setattr(os, "replace", _no_space)
    with pytest.raises(WriteError, match=r"noisy_nl1_seed3.h5: cannot write pre-noised copy \(No space left"):
        ensure_noisy(shard, 300, 256, 1.0, 3, tmp_path / "cache")
    with pytest.raises(WriteError, match=r"experts-x.pt: cannot write the experts file \(No space left"):
        bundle.save(tmp_path / "experts" / "experts-x.pt")
    monkeypatch.undo()
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("unexpected pos 64")))
    with pytest.raises(WriteError, match=r"experts-y.pt: cannot write the experts file \(unexpected pos 64\)"):
        bundle.save(tmp_path / "experts" / "experts-y.pt")
    assert not _temps(tmp_path) and not list((tmp_path / "experts").iterdir())


def test_interrupted_cache_build_leaves_no_temp(tiny_dir, tmp_path, monkeypatch):
    from moe.data import noise_cache

    real = noise_cache.add_noise_np
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(noise_cache, "add_noise_np", flaky)
    shard = shards.find_split(tiny_dir, "val")[0]
    with pytest.raises(KeyboardInterrupt):
        ensure_noisy(shard, 300, 256, 1.0, 3, tmp_path)
    assert not _temps(tmp_path) and not list(tmp_path.rglob("*.h5"))


DISK_FULL = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit: write() fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
    from moe.shared.errors import WriteError
    from moe.data.synth import SynthConfig, create_dataset
    try:
        create_dataset(sys.argv[1], SynthConfig(n_train=400, n_val=100, n_test=100, shard_size=400, n_pixels=512, seed=1),
                       progress=False)
    except WriteError as exc:
        print(exc)
        sys.exit(3)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE stands in for a full disk on Linux")
@pytest.mark.parametrize("limit", [300_000, 1_700_000])  # while writing the arrays; while PyTables writes the table
def test_a_real_failed_write_is_one_error_not_a_segfault(tmp_path, limit):
    root = tmp_path / "synth"
    run = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(root), str(limit)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 3, (run.returncode, run.stderr[-2000:])  # a segfault was -11 (exit 139)
    line = run.stdout.strip()
    assert "\n" not in line and ".synth.partial/train_000/dataset.h5: cannot write the shard" in line, line
    assert not root.exists() and not _temps(tmp_path)


def test_stale_temps_are_removed_before_a_write_live_ones_kept(tmp_path):
    target = tmp_path / "train_000" / "dataset.h5"
    target.parent.mkdir()
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    live = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    try:
        time.sleep(0.5)
        names = {
            "dead": f".dataset.h5.tmp-{HOST}-{dead}",
            "dead_old_style": f".dataset.h5.tmp-{dead}",
            "live": f".dataset.h5.tmp-{HOST}-{live[0].pid}",
            "live_pid_reused": f".dataset.h5.tmp-{HOST}-{live[1].pid}",  # written before that process started
            "other_host_recent": f".dataset.h5.tmp-elsewhere-{dead}",
            "other_host_old": f".dataset.h5.tmp-elsewhere-{live[0].pid}",
        }
        for name in names.values():
            (target.parent / name).write_text("partial")
        for key, age in (("live_pid_reused", 3600), ("other_host_old", 2 * 86400)):
            os.utime(target.parent / names[key], (time.time() - age, time.time() - age))
        write_shard(
            target, np.linspace(7100, 8850, 8), np.ones((3, 8)), np.ones((3, 8)), pd.DataFrame({"x": [1, 2, 3]}), False
        )
        left = sorted(p.name for p in target.parent.iterdir())
        assert left == sorted(["dataset.h5", names["live"], names["other_host_recent"]])
        assert remove_stale_temps(target) == []
    finally:
        for proc in live:
            proc.kill()
            proc.wait()


PREPARE = textwrap.dedent("""
    import logging, sys
    import numpy as np
    import torch
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(1)
    from moe.data.folder import SpectraFolder
    from moe.experts.fit import FitConfig
    from moe.prepare import PrepareConfig, prepare
    folder = SpectraFolder(sys.argv[1], synth=None)
    fit = FitConfig(min_samples=5, fallback="global", block_rows=64)
    p = prepare(folder, PrepareConfig(fit=fit, feature_rows=150), progress=False)
    np.savez(sys.argv[2], weight=p.experts.weight.numpy(), mean=p.phys_scaler.mean.numpy(), var=p.model_var,
             inputs=np.array(sorted(str(v) for d in p.inputs.values() for v in d.values())))
""")


def test_two_processes_on_a_fresh_folder_prepare_once(small, tmp_path):
    data = _copy(small, tmp_path / "data")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PREPARE, str(data), str(tmp_path / f"out{i}.npz")],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [log[-2000:] for log in logs]
    text = "".join(logs)
    assert text.count("fitting experts") == 1, text[-3000:]  # the other process waited and loaded
    assert text.count("caching train gate inputs of") == 2  # two train shards, cached once each
    a, b = (np.load(tmp_path / f"out{i}.npz") for i in range(2))
    for key in ("weight", "mean", "var", "inputs"):
        np.testing.assert_array_equal(a[key], b[key])
    assert len(list((data / "experts").glob("experts-*.pt"))) == 1 and not _temps(data)


# ---- 7. the validator over random shards: accepts, or raises ShardError ------------------------------------------

KINDS = ["valid", "valid", "layout", "dtype", "values", "table"]  # what is wrong with a drawn shard
LAYOUT_FAULTS = [
    "no wave",
    "no flux",
    "no error",
    "1-D flux",
    "error shape",
    "wave length",
    "wave NaN",
    "wave order",
    "empty",
]
TABLE_FAULTS = ["none", "short", "strings", "no log_g", "no snr", "NaN T_eff", "M_H 2", "key other", "fixed"]
GOOD_DTYPES, BAD_DTYPES = ["float32", "float64", "float16"], ["int16", "uint8", "bool", "complex64", "S4"]
SPECIALS = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -1.0])


@st.composite
def shard_files(draw, root: Path):
    """A shard file, valid or with one kind of fault: layout, dtype, values (NaN/Inf/0/negative) or table."""
    kind = draw(st.sampled_from(KINDS))
    layout = draw(st.sampled_from(LAYOUT_FAULTS)) if kind == "layout" else "ok"
    table = draw(st.sampled_from(TABLE_FAULTS)) if kind == "table" else "fixed" if draw(st.booleans()) else "ok"
    n, d = (0, draw(st.integers(0, 6))) if layout == "empty" else (draw(st.integers(1, 5)), draw(st.integers(1, 6)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    arrays = {}
    for key, lo in ((FLUX_KEY, 0.5), (ERROR_KEY, 0.05)):
        shape = {
            "1-D flux": (n,) if key == FLUX_KEY else (n, d),
            "error shape": (n, d + 1) if key == ERROR_KEY else (n, d),
        }
        a = rng.uniform(lo, 2 * lo, shape.get(layout, (n, d)))
        for _ in range(draw(st.integers(1, 3)) if kind == "values" else 0):  # NaN / Inf / 0 / negative anywhere
            a.flat[draw(st.integers(0, a.size - 1))] = draw(SPECIALS)
        if key == ERROR_KEY and a.ndim == 2 and a.size and draw(st.booleans()):  # NaN runs at the edges (real files)
            row, width = (
                draw(st.integers(0, a.shape[0] - 1)),
                a.shape[1] if kind == "values" else max(a.shape[1] - 1, 0),
            )
            a[row, : draw(st.integers(0, width))] = np.nan
            a[row, a.shape[1] - draw(st.integers(0, max(a.shape[1] - 1, 0))) :] = np.nan
        dtypes = BAD_DTYPES if kind == "dtype" and draw(st.booleans()) else GOOD_DTYPES
        with np.errstate(invalid="ignore"):
            arrays[key] = a.astype(draw(st.sampled_from(dtypes)))
    wave = np.linspace(7100.0, 8850.0, d + 1 if layout == "wave length" else d)
    if wave.size and layout in ("wave NaN", "wave order"):
        wave[draw(st.integers(0, wave.size - 1))] = np.nan if layout == "wave NaN" else 9000.0
    path = root / f"s{draw(st.integers(0, 10**9))}" / "dataset.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    faults = {WAVE_KEY: "no wave", FLUX_KEY: "no flux", ERROR_KEY: "no error"}
    with h5py.File(path, "w") as f:
        for key, a in ((WAVE_KEY, wave), *arrays.items()):
            if layout != faults[key]:
                f.create_dataset(key, data=a)
    if table == "none":
        return path
    rows = n + (table == "short")
    params = pd.DataFrame({c: rng.uniform(0, 1, rows) for c in shards.PARAM_COLUMNS})
    params["T_eff"], params["log_g"], params["M_H"] = rng.uniform(3750, 6000, rows), 3.0, -0.5
    if table == "strings":
        params["log_g"] = "giant"
    elif table.startswith("no "):
        params = params.drop(columns=[table[3:]])
    elif table == "NaN T_eff" and rows:
        params.loc[0, "T_eff"] = np.nan
    elif table == "M_H 2" and rows:
        params.loc[rows - 1, "M_H"] = 2.0
    key = "other" if table == "key other" else PARAMS_KEY
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty table is not written: one more fault
        params.to_hdf(path, key=key, mode="a", format="fixed" if table == "fixed" else "table")
    return path


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_validator_accepts_or_raises_shard_error_only(tmp_path, data):
    path = data.draw(shard_files(tmp_path))
    try:
        summary = shards.validate_shard(path, block_rows=data.draw(st.integers(1, 4)))
    except ShardError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        event("rejected: " + exc.problem.split(" (")[0].split(" in ")[0][:40])
        return
    event("accepted")
    assert summary.n_rows > 0 and summary.n_pixels > 0
    flux, error = read_block(path, 0, summary.n_rows)  # what it accepts, the loader reads finite
    assert np.isfinite(flux).all() and np.isfinite(error).all() and (error > 0).all()
