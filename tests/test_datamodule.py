"""Streaming DataModule: exact rank x worker split, reshuffling, noise, pre-noised caches."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from moe.data import stream as stream_module
from moe.data.datamodule import SpectraDataModule
from moe.data.noise_cache import ensure_noisy
from moe.data.shards import ShardError, find_split, read_block
from moe.data.stream import ShardSet, SpectraStream


@pytest.fixture()
def dm(tiny_dir):
    return SpectraDataModule(tiny_dir, batch_size=64, num_workers=0, block_rows=150, synth=None)


def _rows(stream):
    return torch.cat([b["row"] for b in stream]).numpy()


@pytest.mark.parametrize("world, workers", [(1, 1), (2, 3), (3, 2), (4, 4)])
def test_rank_worker_split_covers_each_row_once(tiny_dir, world, workers):
    shards = ShardSet(find_split(tiny_dir, "train"), max_rows=1111)  # odd count, crosses shards
    stream = SpectraStream(shards, batch_size=50, noise_level=1.0, block_rows=97)
    n_slots = world * workers
    seen = np.concatenate(
        [np.arange(b.offset, b.offset + b.stop - b.start) for s in range(n_slots) for b in stream.plan(s, n_slots)]
    )
    assert np.array_equal(np.sort(seen), np.arange(1111))
    stream.equalize_ranks = True
    lens = [sum(b.stop - b.start for b in stream.plan(s, n_slots)) for s in range(n_slots)]
    assert len(set(lens)) == 1 and 1111 - sum(lens) < n_slots
    for s in range(n_slots):
        for b in stream.plan(s, n_slots):
            assert b.stop - b.start <= 97 and 0 <= b.start < b.stop <= shards.counts[b.shard]


def test_workers_cover_each_row_once(dm):
    dm.num_workers = 2
    loader = dm.train_dataloader()
    rows = _rows(loader)
    assert np.array_equal(np.sort(rows), np.arange(1200))
    assert len(loader) == sum(1 for _ in loader)


def test_epochs_reshuffle_blocks_and_rows(dm):
    stream = dm.stream("train")
    a, b = _rows(stream), _rows(stream)
    assert np.array_equal(np.sort(a), np.sort(b)) and not np.array_equal(a, b)
    first = next(iter(stream))["row"].numpy()
    assert not np.array_equal(first, np.sort(first))  # rows shuffled inside a block
    assert np.array_equal(_rows(dm.stream("val")), np.arange(300))  # val: file order


def test_batch_contents_match_shards(dm, tiny_dir):
    batch = next(iter(dm.stream("train", shuffle=False)))
    flux, error = read_block(find_split(tiny_dir, "train")[0], 0, 64)
    np.testing.assert_array_equal(batch["flux"].numpy(), flux)
    np.testing.assert_array_equal(batch["error"].numpy(), error)
    assert set(batch) == {"flux", "error", "log_g", "T_eff", "M_H", "snr", "phys_bin", "snr_bin", "row"}
    assert batch["phys_bin"].dtype == torch.int64 and batch["flux"].shape == (64, 256)
    expect = np.linalg.norm(flux, axis=1) / np.linalg.norm(error, axis=1)
    np.testing.assert_allclose(batch["snr"].numpy(), expect, rtol=1e-5)


def test_train_noise_added_after_transfer_only_when_training(dm):
    batch = next(iter(dm.stream("train", shuffle=False)))
    clean = batch["flux"].clone()

    class T:  # the bits of a Trainer the hook reads
        training = True
        current_epoch = 0
        global_rank = 0

    dm.trainer = T()
    noisy1 = dm.on_after_batch_transfer(dict(batch, flux=clean.clone()), 0)["flux"]
    noisy2 = dm.on_after_batch_transfer(dict(batch, flux=clean.clone()), 0)["flux"]
    z = ((noisy1 - clean) / batch["error"]).flatten()
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1.0) < 0.02
    assert not torch.equal(noisy1, noisy2)  # the next batch of the epoch: other noise
    dm.position.load_state_dict({"epoch": 0, "batches": 0})  # back to the start of the epoch (a resume)
    dm.position.start(0)
    again = dm.on_after_batch_transfer(dict(batch, flux=clean.clone()), 0)["flux"]
    assert torch.equal(again, noisy1)  # the noise of a batch depends on its place, not on what ran before
    T.training = False
    assert torch.equal(dm.on_after_batch_transfer(dict(batch, flux=clean.clone()), 0)["flux"], clean)
    dm.trainer = None


def test_val_test_noise_identical_across_runs(tiny_dir, tmp_path):
    a = SpectraDataModule(tiny_dir, batch_size=100, num_workers=0, synth=None, cache_dir=str(tmp_path / "c1"))
    b = SpectraDataModule(tiny_dir, batch_size=70, num_workers=0, synth=None, cache_dir=str(tmp_path / "c2"))
    for split in ("val", "test"):
        fa = torch.cat([x["flux"] for x in a.stream(split)])
        fb = torch.cat([x["flux"] for x in b.stream(split)])
        assert torch.equal(fa, fb)
        clean, err = read_block(find_split(tiny_dir, split)[0], 0, 300)
        z = (fa.numpy() - clean) / err
        assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert not torch.equal(
        torch.cat([x["flux"] for x in a.stream("val")]), torch.cat([x["flux"] for x in a.stream("test")])[:300]
    )


def test_noise_cache_rebuilt_when_stale(tiny_dir, tmp_path):
    shard = find_split(tiny_dir, "val")[0]
    p = ensure_noisy(shard, 300, 256, 1.0, 9, tmp_path)
    first = h5py.File(p, "r")["flux"][:5]
    with h5py.File(p, "a") as f:
        f.attrs["n_rows"] = 12  # pretend it came from another file
        f["flux"][0] = 0
    p2 = ensure_noisy(shard, 300, 256, 1.0, 9, tmp_path)
    assert p2 == p
    np.testing.assert_array_equal(h5py.File(p2, "r")["flux"][:5], first)


def test_construction_exposes_pixels_and_wave(dm):
    assert dm.n_pixels == 256 and dm.wave.shape == (256,) and dm.wave[0] == 7100.0
    assert len(dm.fingerprint_hash()) == 12


def test_real_folder_without_synth_config(tmp_path):
    with pytest.raises(ShardError, match=r"no train split \(train_\*/dataset.h5\), no val split"):
        SpectraDataModule(str(tmp_path), synth=None)
    with pytest.raises(ShardError, match="no such dataset folder"):
        SpectraDataModule(str(tmp_path / "absent"), synth=None)


def test_max_train_rows(tiny_dir):
    dm = SpectraDataModule(tiny_dir, batch_size=64, num_workers=0, max_train_rows=500, synth=None)
    assert dm.train_set.n_rows == 500
    assert np.array_equal(np.sort(_rows(dm.stream("train"))), np.arange(500))


def test_loader_in_workers_reshuffles_each_epoch(dm):
    dm.num_workers = 2
    loader = DataLoader(dm.stream("train"), batch_size=None, num_workers=2)
    torch.manual_seed(0)
    a = _rows(loader)
    b = _rows(loader)
    assert not np.array_equal(a, b) and np.array_equal(np.sort(a), np.sort(b))


def test_rank_blocks_prefetched_equal_plain_and_cover_the_split(dm):
    stream = dm.stream("train", shuffle=False)
    plain, fetched = list(stream.rank_blocks(prefetch=False)), list(stream.rank_blocks(prefetch=True))
    assert len(plain) == len(fetched) == len(stream.plan(0, 1))
    for a, b in zip(plain, fetched):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert np.array_equal(np.concatenate([b["row"] for b in fetched]), np.arange(1200))
    gen = stream.rank_blocks()
    next(gen)
    gen.close()  # abandoning the generator waits for the pending read and returns


def test_calibration_sample_is_the_same_random_blocks_on_every_rank(dm, monkeypatch):
    stream = dm.stream("train", shuffle=False)
    rows = _rows(stream.sample_batches(400, seed=3))
    assert 400 <= len(rows) < 400 + 150 and len(np.unique(rows)) == len(rows)  # whole blocks of 150 rows
    assert np.all(np.diff(rows) > 0) and not np.array_equal(rows, np.arange(len(rows)))  # file order, not the head
    assert not np.array_equal(rows, _rows(stream.sample_batches(400, seed=4)))
    for module in ("moe.data.stream", "moe.data.folder"):  # rank 1 of 2: the stream equalises ranks
        monkeypatch.setattr(f"{module}.rank_world", lambda: (1, 2))
    monkeypatch.setattr("moe.data.stream._slot", lambda: (3, 4, 0))  # and reads as worker 1 of 2
    on_rank_1 = dm.stream("train", shuffle=False)
    assert on_rank_1.equalize_ranks and len(_rows(on_rank_1)) < 1200  # its own share of the split...
    assert np.array_equal(rows, _rows(on_rank_1.sample_batches(400, seed=3)))  # ...but the same sample
    assert len(_rows(stream.sample_batches(10**6, seed=3))) == 1200  # more than the split: all of it


def test_calibration_batches_repeat_their_noise_and_draw_it_twice(dm):
    from moe.data.folder import CALIBRATION_SALT

    (clean,) = dm.stream("train", shuffle=False, batch_size=4096).sample_batches(300, CALIBRATION_SALT)
    first, again = list(dm.calibration_batches(300, 2)), list(dm.calibration_batches(300, 2))
    assert len(first) == 2 and all(torch.equal(b["row"], clean["row"]) for b in first)
    for a, b in zip(first, again):  # the same stars and noise every time (every epoch, a resumed run)
        assert torch.equal(a["flux"], b["flux"])
    assert not torch.equal(first[0]["flux"], first[1]["flux"])  # two draws of the same stars
    for noisy in first:
        z = (noisy["flux"] - clean["flux"]) / (dm.noise_level * clean["error"])
        assert abs(float(z.std()) - 1) < 0.02 and abs(float(z.mean())) < 0.02


def test_calibration_shares_of_ranks_are_the_whole_sample_in_rank_order(dm, monkeypatch):
    """Each rank's share of the calibration batches (sigma's sample split over the ranks) is a contiguous run
    of the whole sample's batches with the same noise; the shares in rank order are the sample, and a rank
    reads none of the blocks before its share."""
    whole = list(dm.calibration_batches(700, 2, batch_size=100))
    assert len(whole) == 2 * 8  # 750 rows (whole blocks of 150) in 8 batches, two draws each
    reads = []
    original = stream_module.read_block

    def read_block(path, start, stop, *args, **kwargs):
        reads.append(int(start))
        return original(path, start, stop, *args, **kwargs)

    monkeypatch.setattr(stream_module, "read_block", read_block)
    shares = []
    for rank in range(3):
        reads.clear()
        shares.append(list(dm.calibration_batches(700, 2, batch_size=100, share=(rank, 3))))
        if rank == 2:
            rank_2_reads = len(reads)
    assert [len(s) // 2 for s in shares] == [2, 3, 3]
    joined = [b for s in shares for b in s]
    for a, b in zip(joined, whole, strict=True):
        assert torch.equal(a["row"], b["row"]) and torch.equal(a["flux"], b["flux"])
    assert 0 < rank_2_reads < 5  # batches 5-7 (rows 500-749 of the sample): the blocks before them not read
