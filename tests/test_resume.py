"""True resume: a fit stopped mid-epoch (a pre-empted job) continues in a new process, in the same run
folder, at its next batch, and ends where an uninterrupted run ends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe.cli import cli_main
from moe.data.resume import EpochPosition

CONFIG = str(Path(__file__).resolve().parents[1] / "moe" / "configs" / "logit_add.yaml")
# the stopped run: a callback saves last.ckpt after batch STOP_BATCH of epoch STOP_EPOCH and kills the process
PREEMPTED = """
import os, sys
from pathlib import Path
import pytorch_lightning as pl
import moe.cli

class Preempt(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == {epoch} and batch_idx == {batch}:
            trainer.save_checkpoint(Path(trainer.log_dir) / "checkpoints" / "last.ckpt")
            os._exit(17)

original = moe.cli.MoECLI._instantiate_trainer
def with_preempt(self, config, callbacks):
    return original(self, config, callbacks + [Preempt()])
moe.cli.MoECLI._instantiate_trainer = with_preempt
moe.cli.cli_main(sys.argv[1:])
"""


def _args(root: Path, tiny_dir: str) -> list[str]:
    return [
        "fit",
        "--config",
        CONFIG,
        "--data.data_dir",
        tiny_dir,
        "--data.batch_size",
        "128",
        "--model.expert_min_samples",
        "10",
        "--model.feature_rows",
        "600",
        "--trainer.max_epochs",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
    ]


def _final(cli) -> tuple[dict, float]:
    """The model's tensors and the last val R^2 of a finished fit."""
    state = {k: v.detach().clone() for k, v in cli.model.state_dict().items() if torch.is_tensor(v)}
    return state, float(cli.trainer.callback_metrics["val/r2"])


def test_epoch_position_skips_only_the_restored_epoch():
    pos = EpochPosition()
    assert pos.start(0) == 0 and [pos.advance(0) for _ in range(3)] == [0, 1, 2]
    pos.load_state_dict({"epoch": 1, "batches": 4})
    assert pos.start(1) == 4 and pos.advance(1) == 4
    pos.load_state_dict({"epoch": 1, "batches": 9})  # an end-of-epoch checkpoint: the next epoch starts fresh
    assert pos.start(2) == 0


def test_fit_resumes_mid_epoch_in_a_new_process(tmp_path, tiny_dir):
    whole = cli_main(_args(tmp_path / "whole", tiny_dir))
    steps = whole.trainer.global_step
    expected, expected_r2 = _final(whole)

    root = tmp_path / "stopped"
    script = tmp_path / "preempted.py"
    script.write_text(PREEMPTED.format(epoch=1, batch=2))
    stopped = subprocess.run([sys.executable, str(script), *_args(root, tiny_dir)[0:]], capture_output=True, text=True)
    assert stopped.returncode == 17, stopped.stderr[-2000:]
    run = root / "lightning_logs" / "logit_add-phys" / "version_0"
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 1 and 0 < saved["global_step"] < steps

    resumed = cli_main([*_args(root, tiny_dir), "--ckpt_path", "last"])
    assert Path(resumed.trainer.log_dir) == run  # the same run folder, not a new version
    assert resumed.trainer.global_step == steps
    got, got_r2 = _final(resumed)
    # the same batches, noise, optimiser and schedule: every learned weight, the sigma recalibration and the error
    # correlations (refitted on the same calibration stars and noise) and R^2 equal to float32 round-off (stated tolerance 1e-5)
    assert got_r2 == pytest.approx(expected_r2, abs=1e-5)
    calibration = {f"mixture.calibration.{n}" for n in ("scale", "ref", "power", "cell_edges", "cell_scale", "rho")}
    assert {n for n in expected if n.startswith("mixture.calibration.")} == calibration
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=name)
