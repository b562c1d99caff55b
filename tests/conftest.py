"""Shared fixtures: CPU only, no workers, tiny generated data under pytest's tmp dirs."""

from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import DUAL_TOWER_CONFIG  # noqa: E402

from moe.cli import cli_main  # noqa: E402
from moe.data.synth import SynthConfig, write_dataset  # noqa: E402

torch.set_num_threads(2)

TINY = SynthConfig(n_train=1200, n_val=300, n_test=300, shard_size=400, n_pixels=256, seed=11)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """A tiny synthetic dataset (3 train shards of 400, 300 val, 300 test; 256 pixels)."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    write_dataset(root, TINY, progress=False)
    return str(root)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_dir):
    """One dual-tower gate fitted for 1 epoch on the tiny data, shared by the catalogue tests (predict only reads
    it): (run root, the fit's data/model/trainer args, best checkpoint path, expert names)."""
    root = tmp_path_factory.mktemp("catalogue")
    args = [
        "--data.data_dir",
        tiny_dir,
        "--data.synth",
        "null",
        "--model.expert_min_samples",
        "10",
        "--model.feature_rows",
        "600",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
    ]
    cli = cli_main(["fit", "--config", DUAL_TOWER_CONFIG, "--trainer.max_epochs", "1", *args])
    return root, args, Path(cli.trainer.checkpoint_callback.best_model_path), cli.model.mixture.experts.names
