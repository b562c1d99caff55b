"""Long end-to-end runs (``pytest -m slow``): realism at full resolution, a learned gate that beats global."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe.cli import cli_main
from moe.data.synth import SpectrumModel, SynthConfig, generate, write_dataset
from moe.experiments.realism import Bounds, Split, run_checks

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_realism_at_4096_pixels():
    model = SpectrumModel(4096)
    mk = lambda s, n: Split(*generate(model, np.random.default_rng(s), n))  # noqa: E731
    lines = run_checks(mk(1, 12_000), mk(2, 2000), mk(3, 2000), bounds=Bounds(oracle_gain=0.02))
    assert all(line.passed for line in lines), [line.row() for line in lines if not line.passed]


def test_learned_gate_beats_global_end_to_end(tmp_path):
    data = tmp_path / "data"
    write_dataset(
        data,
        SynthConfig(n_train=12_000, n_val=2000, n_test=2000, shard_size=4000, n_pixels=1024, seed=3),
        progress=False,
    )
    cli = cli_main(
        [
            "fit",
            "--config",
            str(CONFIGS / "logit_add.yaml"),
            "--data.data_dir",
            str(data),
            "--data.num_workers",
            "0",
            "--trainer.max_epochs",
            "6",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
            "--test_after_fit",
            "true",
        ]
    )
    m = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert m["test/r2"] > m["test/r2_global"] and m["test/rho"] > 0.3, m
    assert m["test/entropy_snr_X"] > m["test/entropy_snr_H"]  # flatter gates at low SNR
