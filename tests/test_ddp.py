"""DDP on CPU (gloo, 2 ranks): preparation happens once, both ranks hold the same experts, and every
training row is seen exactly once per epoch across the ranks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moe.data.synth import SynthConfig, write_dataset

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import logging, sys
    import torch
    from pytorch_lightning import Callback
    from moe.cli import MoECLI
    from moe.data.datamodule import SpectraDataModule
    from moe.gates import GatedMoE

    OUT = sys.argv[1]

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
            torch.save({"experts": module.mixture.experts.weight.cpu(), "scaler": module.mixture.phys_scaler.mean.cpu()},
                       f"{OUT}/buffers_rank{trainer.global_rank}.pt")

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
    for epoch in (0, 1):
        r0, r1 = (torch.load(out / f"rows_rank{r}_epoch{epoch}.pt") for r in (0, 1))
        assert len(r0) == len(r1) == 600  # same number of batches per rank (DDP would hang otherwise)
        seen = torch.cat([r0, r1])
        assert torch.equal(seen.sort().values, torch.arange(1200)), "a row was skipped or seen twice"
