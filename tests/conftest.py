"""Shared fixtures: CPU only, no workers, tiny generated data under pytest's tmp dirs."""

from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from moe.data.synth import SynthConfig, write_dataset  # noqa: E402

torch.set_num_threads(2)

TINY = SynthConfig(n_train=1200, n_val=300, n_test=300, shard_size=400, n_pixels=256, seed=11)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """A tiny synthetic dataset (3 train shards of 400, 300 val, 300 test; 256 pixels)."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    write_dataset(root, TINY, progress=False)
    return str(root)
