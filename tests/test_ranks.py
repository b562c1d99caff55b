"""Preparation split over ranks (2 gloo ranks on CPU): each rank reads only its own rows, the experts equal
the one-process fit (1e-9 relative, the same alphas), the caches equal the one-process caches, and two runs
on one folder at once still prepare once."""

from __future__ import annotations

import logging
import shutil
import socket
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from moe.data import noise_cache, ranks, row_cache, stream
from moe.data.folder import SpectraFolder
from moe.experts.fit import FitConfig, fit_families
from moe.prepare import PrepareConfig, prepare

FIT = FitConfig(min_samples=10, block_rows=100)
CONFIG = PrepareConfig(fit=FIT, feature_rows=600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Recorder:
    """Records, in this process, every block of spectra read from a shard, every cache file written and every
    'fitting experts' line."""

    def __init__(self, monkeypatch=None):
        self.reads: dict[str, list[tuple[str, int, int]]] = {}
        self.writes: list[str] = []
        self.fits = 0
        self.phase = "prepare"
        for module in (stream, noise_cache):
            original = module.read_block

            def read_block(path, start, stop, *args, _original=original, _name=module.__name__, **kwargs):
                self.reads.setdefault(f"{self.phase} {_name}", []).append((str(path), int(start), int(stop)))
                return _original(path, start, stop, *args, **kwargs)

            module.read_block = read_block
        write = row_cache._write

        def _write(path, *args, **kwargs):
            self.writes.append(str(path))
            return write(path, *args, **kwargs)

        row_cache._write = _write
        recorder = self

        class Fits(logging.Handler):
            def emit(self, record):
                recorder.fits += record.getMessage().startswith("fitting experts")

        logging.getLogger("moe").addHandler(Fits())
        logging.getLogger("moe").setLevel(logging.INFO)


def _rank(rank: int, world: int, port: int, data: str, out: str, concurrent: bool) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rec = _Recorder()
        folder = SpectraFolder(data, block_rows=100, synth=None)
        prepared = prepare(folder, CONFIG, progress=False)
        result = {
            "reads": rec.reads,
            "writes": rec.writes,
            "fits": rec.fits,
            "inputs": {s: {k: str(p) for k, p in v.items()} for s, v in prepared.inputs.items()},
            "scalers": (prepared.phys_scaler.mean.clone(), prepared.qual_scaler.mean.clone()),
            "model_var": prepared.model_var,
        }
        if not concurrent:  # the fit in this process too: its reads are recorded here
            rec.phase = "fit"
            fits, pca, _ = fit_families(folder, FIT, progress=False)
            result |= {
                "reads": rec.reads,
                "fit": {(lab, f): (v.weight, v.bias, v.alpha) for lab, fams in fits.items() for f, v in fams.items()},
                "pca": pca[1],
            }
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _alone(data: str, out: str) -> None:
    """One process (no process group) preparing the same folder as the ranks, at the same time."""
    rec = _Recorder()
    prepare(SpectraFolder(data, block_rows=100, synth=None), CONFIG, progress=False)
    torch.save({"writes": rec.writes, "fits": rec.fits}, f"{out}/alone.pt")


def _launch(kind: int, port: int, data: str, out: str) -> None:
    """Process ``kind`` of the concurrent case: ranks 0 and 1 of one run, or (2) a run of its own."""
    if kind == 2:
        _alone(data, out)
    else:
        _rank(kind, 2, port, data, out, concurrent=True)


def _rows(reads, path_part: str) -> list[int]:
    return [r for path, a, b in reads if path_part in path for r in range(a, b)]


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.fixture
def two_copies(tiny_dir, tmp_path) -> tuple[Path, Path]:
    """Two fresh copies of the tiny dataset (no caches): one for the ranks, one for the one-process reference."""
    copies = []
    for name in ("ranks", "alone"):
        shutil.copytree(tiny_dir, tmp_path / name, ignore=shutil.ignore_patterns("experts", "noisy_*", "gate_inputs_*"))
        copies.append(tmp_path / name)
    return copies[0], copies[1]


def test_two_ranks_split_the_preparation_and_give_the_one_process_answer(two_copies, tmp_path):
    data, alone = two_copies
    out = tmp_path / "out"
    out.mkdir()
    torch.multiprocessing.spawn(_rank, args=(2, _free_port(), str(data), str(out), False), nprocs=2, join=True)
    got = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    # the one-process answer, on a fresh copy of the same data
    folder = SpectraFolder(str(alone), block_rows=100, synth=None)
    ref = prepare(folder, CONFIG, progress=False)
    single = ref.bundle.fits

    # each rank read only its own rows: building the caches and fitting, every row exactly once
    assert {"prepare moe.data.stream", "fit moe.data.stream"} <= set(got[0]["reads"]) & set(got[1]["reads"])
    assert "prepare moe.data.noise_cache" in set(got[0]["reads"]) | set(got[1]["reads"])
    for what in set(got[0]["reads"]) | set(got[1]["reads"]):
        reads = [g["reads"].get(what, []) for g in got]
        for shard in sorted({p for r in reads for p, _, _ in r}):
            rows = [set(_rows(r, shard)) for r in reads]  # (rank 0 reads its first block twice: the shift)
            assert not rows[0] & rows[1], f"{what}: both ranks read rows of {shard}"
            assert rows[0] | rows[1] == set(range(len(rows[0]) + len(rows[1]))), f"{what}: {shard} rows missed"
    for split in ("train", "val"):  # the fit's share of rank r: its contiguous slot of the split
        shards = folder.split_set(split)
        for r, g in enumerate(got):
            seen = []
            for k, path in enumerate(shards.paths):
                rel = str(Path(path).relative_to(alone))
                seen += [int(shards.offsets[k]) + i for i in _rows(g["reads"]["fit moe.data.stream"], rel)]
            assert set(seen) == set(range(*shards.slot_range(r, 2))), f"rank {r} read {split} rows of another"

    # the prepared experts equal the one-process fit: 1e-9 relative, the same alphas; the PCA too
    for g in got:
        assert {lab for lab, _ in g["fit"]} == set(FIT.labels) == {"log_g", "T_eff", "M_H"}
        for (lab, fam), (w, b, alpha) in g["fit"].items():  # every label's sums all-reduced, alphas chosen alike
            np.testing.assert_array_equal(alpha, single[lab][fam].alpha)
            assert _relative(w, single[lab][fam].weight) <= 1e-9, (lab, fam)
            assert _relative(b, single[lab][fam].bias) <= 1e-9, (lab, fam)
        assert _relative(np.abs(g["pca"]), np.abs(ref.bundle.pca_components)) <= 1e-9
    for key in got[0]["fit"]:  # one answer on all ranks
        np.testing.assert_array_equal(got[0]["fit"][key][0], got[1]["fit"][key][0])
    ranked = torch.load(next((data / "experts").glob("experts-*.pt")), weights_only=True)["fits"]
    for lab, fams in ref.bundle.fits.items():
        for fam, fit in fams.items():
            np.testing.assert_array_equal(ranked[lab][fam]["alpha"].numpy(), fit.alpha)
            assert _relative(ranked[lab][fam]["weight"].numpy(), fit.weight) <= 1e-9, (lab, fam)

    # the caches equal the one-process caches (float tolerance), and both ranks hold the same scalers
    for split, paths in ref.inputs.items():
        for k, path in paths.items():
            with h5py.File(got[0]["inputs"][split][k], "r") as a, h5py.File(path, "r") as b:
                assert set(a) == set(b)
                for name in a:
                    np.testing.assert_allclose(a[name][...], b[name][...], rtol=1e-5, atol=1e-6, err_msg=name)
    for split in ("val", "test"):
        for k, info in enumerate(folder.split_set(split).infos):
            rel = info.path.relative_to(alone)
            noisy_ranked = noise_cache.cache_path(data / rel, 1.0, folder.seeds[split])
            with h5py.File(noisy_ranked, "r") as a, h5py.File(folder.noisy_caches(split)[k], "r") as b:
                np.testing.assert_array_equal(a["flux"][...], b["flux"][...])
    assert all(torch.equal(x, y) for x, y in zip(got[0]["scalers"], got[1]["scalers"]))
    torch.testing.assert_close(got[0]["scalers"][0], ref.phys_scaler.mean, rtol=1e-5, atol=1e-6)
    parts = [w for g in got for w in g["writes"] if ".part" in Path(w).name]
    assert parts, "no cache was split between the ranks"
    assert not list(data.rglob(".*.part*")), "part files left behind"
    assert sum(g["fits"] for g in got) == 1  # rank 0 says it fits, for both


@pytest.mark.slow
def test_two_runs_at_once_on_one_folder_prepare_once(tiny_dir, tmp_path):
    """A two-rank run and a one-process run start together on one fresh folder: the experts are fitted once
    and every cache written once (parts included), whichever run takes the lock first."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dir, data, ignore=shutil.ignore_patterns("experts", "noisy_*", "gate_inputs_*"))
    out = tmp_path / "out"
    out.mkdir()
    torch.multiprocessing.spawn(_launch, args=(_free_port(), str(data), str(out)), nprocs=3, join=True)
    runs = [torch.load(out / name, weights_only=False) for name in ("rank0.pt", "rank1.pt", "alone.pt")]
    assert sum(r["fits"] for r in runs) == 1
    writes = [w for r in runs for w in r["writes"]]
    assert len(writes) == len(set(writes)), "a cache was built twice"
    assert len(list((data / "experts").glob("experts-*.pt"))) == 1


def test_split_rows_covers_every_row_once_on_aligned_cuts():
    sizes, align = [1000, 300, 2500, 7], [1024, 1024, 100, 100]
    for world in (1, 2, 3, 5, 8):
        shares = ranks.split_rows(sizes, world, align)
        seen = {k: [] for k in range(len(sizes))}
        for share in shares:
            for k, start, stop in share:
                assert start % align[k] == 0 or start == 0
                seen[k] += range(start, stop)
        assert all(sorted(seen[k]) == list(range(n)) for k, n in enumerate(sizes)), world
    assert ranks.split_rows([10, 10], 1) == [[(0, 0, 10), (1, 0, 10)]]
    assert [len(s) for s in ranks.split_rows([4000], 2)] == [1, 1]  # one shard, cut in two halves


def _concat_rank(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:

        def all_gather(t: torch.Tensor) -> torch.Tensor:  # what LightningModule.all_gather returns: [W, ...]
            box = [torch.empty_like(t) for _ in range(2)]
            torch.distributed.all_gather(box, t.contiguous())
            return torch.stack(box)

        n = (3, 5)[rank]  # shares of unequal length
        rows = np.arange(n) + 10 * rank
        mine = (np.c_[rows, -rows] / 4, rows.astype(np.int64) % 4)
        empty = (np.zeros((0, 2)), np.zeros(0, np.int64))
        torch.save((ranks.concat_ranks(mine, all_gather), ranks.concat_ranks(empty, all_gather)), f"{out}/{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_concat_ranks_joins_each_ranks_rows_in_rank_order(tmp_path):
    """Sigma's calibration sample split over 2 gloo ranks comes back whole on each: rows in rank order,
    dtypes and shapes kept, shares of unequal length (and none at all) allowed."""
    torch.multiprocessing.spawn(_concat_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    rows = np.r_[np.arange(3), np.arange(5) + 10]
    for rank in (0, 1):
        (table, bins), (none, no_bins) = torch.load(tmp_path / f"{rank}.pt", weights_only=False)
        np.testing.assert_array_equal(table, np.c_[rows, -rows] / 4)
        assert bins.dtype == np.int64 and list(bins) == list(rows % 4)
        assert none.shape == (0, 2) and no_bins.shape == (0,)
