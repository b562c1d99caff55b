"""DDP on CPU (gloo, 2 ranks): preparation happens once, split over both ranks, both ranks hold the same
experts, and every training row is seen exactly once per epoch across the ranks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import fits_table

from moe.data.synth import SynthConfig, write_dataset

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import logging, sys
    import torch
    from pytorch_lightning import Callback
    from moe.cli import MoECLI
    from moe.data import stream
    from moe.data.datamodule import SpectraDataModule
    from moe.gates import GatedMoE

    OUT = sys.argv[1]
    READ = []  # blocks of training spectra this rank read (the preparation: caches; the fit is a child)
    _read_block = stream.read_block

    def read_block(path, start, stop, *args, **kwargs):
        if "train" in str(path):
            READ.append((str(path), start, stop))
        return _read_block(path, start, stop, *args, **kwargs)

    stream.read_block = read_block

    class RecordRows(Callback):
        """Saves, per rank and epoch, the training rows it saw; and its expert buffers at the end."""

        def __init__(self):
            self.rows = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.rows.append(batch["row"].cpu())

        def on_train_epoch_end(self, trainer, module):
            torch.save(torch.cat(self.rows), f"{OUT}/rows_rank{trainer.global_rank}_epoch{trainer.current_epoch}.pt")
            self.rows = []

        def on_fit_end(self, trainer, module):
            torch.save({"experts": module.mixture.experts.weight.cpu(), "scaler": module.mixture.phys_scaler.mean.cpu(),
                        "read": READ}, f"{OUT}/buffers_rank{trainer.global_rank}.pt")

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    MoECLI(GatedMoE, SpectraDataModule, seed_everything_default=42, save_config_kwargs={"overwrite": True},
           trainer_defaults={"callbacks": [RecordRows()]}, args=sys.argv[2:])
''')


@pytest.mark.slow
def test_ddp_two_ranks_prepare_once_and_split_rows_exactly(tmp_path):
    data = tmp_path / "data"
    write_dataset(
        data, SynthConfig(n_train=1200, n_val=300, n_test=300, shard_size=400, n_pixels=256, seed=11), progress=False
    )
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    args = [
        "fit",
        "--data.data_dir",
        str(data),
        "--data.synth",
        "null",
        "--data.batch_size",
        "100",
        "--model.expert_min_samples",
        "10",
        "--model.feature_rows",
        "600",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_epochs",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path / "logs"),
        "--trainer.enable_progress_bar",
        "false",
    ]
    run = subprocess.run(
        [sys.executable, str(script), str(out), *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert log.count("fitting experts") == 1, log[-3000:]  # one rank fitted, the other loaded its files
    a, b = (torch.load(out / f"buffers_rank{r}.pt") for r in (0, 1))
    assert torch.equal(a["experts"], b["experts"]) and torch.equal(a["scaler"], b["scaler"])
    # the ranks built the training caches together, each from its own rows
    rows = [{(p, r) for p, start, stop in x["read"] for r in range(start, stop)} for x in (a, b)]
    assert rows[0] and rows[1] and not rows[0] & rows[1] and len(rows[0] | rows[1]) == 1200
    for epoch in (0, 1):
        r0, r1 = (torch.load(out / f"rows_rank{r}_epoch{epoch}.pt") for r in (0, 1))
        assert len(r0) == len(r1) == 600  # same number of batches per rank (DDP would hang otherwise)
        seen = torch.cat([r0, r1])
        assert torch.equal(seen.sort().values, torch.arange(1200)), "a row was skipped or seen twice"

    # predict over 2 ranks: one catalogue per format, the rows in input order, equal to one rank's
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    common = args[1:11] + args[15:17] + args[19:]  # data, model, accelerator, root dir, no progress bar
    catalogues = {}
    for name, ranks in (("two.csv", 2), ("two.h5", 2), ("two.fits", 2), ("one.csv", 1), ("one.fits", 1)):
        extra = ["--trainer.strategy", "ddp"] if ranks > 1 else []
        run = subprocess.run(
            [sys.executable, str(script), str(out), "predict", *common, "--ckpt_path", str(ckpt),
             "--trainer.devices", str(ranks), *extra, "--predict_writer.output", str(out / name)],
            cwd=REPO, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        if name.endswith(".fits"):
            catalogues[name] = fits_table(out / name)
        else:
            catalogues[name] = pd.read_hdf(out / name) if name.endswith(".h5") else pd.read_csv(out / name)
    assert not list(out.glob(".two*")) and not list(out.glob("two*rank*")), "part files left"
    one = catalogues["one.csv"]
    assert list(one["row"]) == list(range(300))
    pd.testing.assert_frame_equal(catalogues["two.csv"], one)
    h5 = catalogues["two.h5"].reset_index(drop=True)
    assert list(h5.columns) == list(one.columns) and list(h5["row"]) == list(range(300))
    np.testing.assert_allclose(h5["log_g_pred"], one["log_g_pred"], rtol=1e-6)
    # FITS: the same table, row for row, and the same header, card for card (DATE aside), as one rank's
    (two_fits, two_cards), (one_fits, one_cards) = catalogues["two.fits"], catalogues["one.fits"]
    assert two_cards == one_cards and two_fits.colnames == list(one.columns)
    assert list(two_fits["row"]) == list(range(300))
    for column in two_fits.colnames:  # floats to float32 rounding: a rank's batches start elsewhere
        a, b = np.asarray(two_fits[column]), np.asarray(one_fits[column])
        assert a.dtype == b.dtype, column
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=column)
        else:
            np.testing.assert_array_equal(a, b, err_msg=column)


@pytest.mark.slow
def test_ddp_bad_row_is_one_error_line(tmp_path):
    """The row checks run after Lightning starts the other rank (so they overlap its start-up); a bad row still
    stops the run with one line, the other rank stopped before it says it again."""
    import h5py

    from moe.data.shards import FLUX_KEY

    data = write_dataset(
        tmp_path / "d",
        SynthConfig(n_train=200, n_val=60, n_test=60, shard_size=100, n_pixels=64, seed=7),
        progress=False,
    )
    with h5py.File(data / "val_000" / "dataset.h5", "a") as f:
        f[FLUX_KEY][3, 5] = np.nan
    args = ["fit", "--data.data_dir", str(data), "--data.synth", "null", "--trainer.accelerator", "cpu"]
    args += [
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.default_root_dir",
        str(tmp_path / "logs"),
    ]
    run = subprocess.run(
        [sys.executable, "-m", "moe.main", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 2
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("moe: error")]
    assert len(errors) == 1 and "val_000/dataset.h5: flux NaN or Inf in 1 row (3;" in errors[0], run.stderr[-2000:]
