"""Experiments: each runs on tiny data and writes every named file; verdicts at their thresholds."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from moe.data.synth import SynthConfig, write_dataset
from moe.experiments import EXPERIMENTS
from moe.experiments.__main__ import main as experiments_main
from moe.experiments.common import ExperimentSettings, Verdict, bootstrap_delta_r2

FIGURES = {
    "leakage": ["logg_err_base_01_r2_models.png", "logg_err_base_01_importance_spectrum.png",
                "logg_err_base_01_importance_hist.png", "logg_err_base_01_sanity_checks.png"],
    "snr-oracle": ["snr_oracle_moe_comparison.png", "snr_oracle_moe_perbin_r2.png", "snr_oracle_moe_pred_vs_true.png",
                   "snr_oracle_moe_delta_heatmap.png"],
    "dual-tower": ["dual_tower_comparison.png", "dual_tower_persnr_r2.png", "dual_tower_pred_vs_true.png",
                   "dual_tower_entropy_vs_snr.png", "dual_tower_ablation.png"],
    "ceiling": ["ceiling_perbin_expert_comparison.png", "ceiling_expert_selection_heatmap.png",
                "ceiling_oracle_hybrid_vs_baseline.png", "ceiling_perbin_delta_r2.png", "ceiling_hybrid_pred_vs_true.png"],
}
TABLES = {
    "leakage": ["models.csv", "sanity_checks.csv", "importance_top40.csv"],
    "snr-oracle": ["headline.csv", "per_bin.csv", "alphas.csv"],
    "dual-tower": ["comparison.csv", "per_snr.csv", "per_phys.csv", "entropy_confidence.csv", "ablation.csv", "towers.csv"],
    "ceiling": ["per_bin.csv", "overall.csv", "ridge_alpha_sweep.csv"],
}


@pytest.fixture(scope="module")
def exp_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("exp") / "data"
    write_dataset(root, SynthConfig(n_train=2400, n_val=600, n_test=600, shard_size=1200, n_pixels=256, seed=5), progress=False)
    return str(root)


@pytest.mark.parametrize("value, op, threshold, passed", [
    (0.02, ">=", 0.02, True), (0.0199999, ">=", 0.02, False), (0.05, "<", 0.05, False), (0.0499, "<", 0.05, True),
    (float("nan"), ">=", 0.0, False), (0.7, ">=", 0.70, True), (-0.0001, ">=", 0.0, False),
])
def test_verdict_thresholds(value, op, threshold, passed):
    v = Verdict("q", value, op, threshold, "yes", "no")
    assert v.passed is passed
    assert v.row()["result"] == ("PASS" if passed else "FAIL") and v.row()["decision"] == ("yes" if passed else "no")


def test_inconclusive_verdict_never_passes():
    v = Verdict("q", 0.5, ">=", 0.0, "yes", "no", inconclusive="concat below the global expert")
    assert not v.passed and v.result == "INCONCLUSIVE"
    assert v.row()["decision"] == "no decision: concat below the global expert"


def test_degenerate_or_unfinished_gate_runs_are_inconclusive():
    from moe.experiments.dual_tower import inconclusive_reason
    from moe.experiments.gates import GateRun

    y = np.linspace(1, 5, 200)
    def run(pred, best, ran, most=5):
        return GateRun("x", "concat", "phys", 0, pred, np.ones((200, 1)), np.zeros(200), 0.5, best, ran, most, None)
    good = {"Dual-tower concat": [run(y + 0.1, 3, 5)], "Global Ridge": [run(y + 0.5, 0, 0)]}
    assert inconclusive_reason(good, 0.8, y) == ""
    bad = {"Dual-tower concat": [run(y[::-1], 3, 5)]}
    assert "Dual-tower concat below the global expert" in inconclusive_reason(bad, 0.8, y)
    still = {"Dual-tower concat": [run(y + 0.1, 5, 5)]}
    assert "still improving at the last epoch" in inconclusive_reason(still, 0.8, y)


def test_bootstrap_ci_brackets_the_difference():
    rng = np.random.default_rng(0)
    y = rng.normal(size=2000)
    good, bad = y + rng.normal(0, 0.5, 2000), y + rng.normal(0, 0.7, 2000)
    lo, hi = bootstrap_delta_r2(y, [good], [bad], n_boot=300)
    delta = (1 - ((good - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()) - (1 - ((bad - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    assert lo < delta < hi and lo > 0


def _assert_png_has_data(path):
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] >= 300 and img.shape[1] >= 300, path
    rgb = img[..., :3]
    assert rgb.std() > 0.05, f"{path} looks blank"
    assert (np.abs(rgb - rgb[0, 0]).sum(-1) > 0.1).mean() > 0.02, f"{path} has almost nothing drawn"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_writes_every_file(exp_dir, tmp_path, name):
    out = tmp_path / name
    rc = experiments_main([name, "--data", exp_dir, "--out", str(out), "--seeds", "1", "2", "--epochs", "3",
                           "--cnn-epochs", "2", "--max-memory-rows", "2400"])
    assert rc == 0
    report = (out / "report.md").read_text()
    for fig in FIGURES[name]:
        assert (out / fig).is_file(), fig
        assert f"]({fig})" in report, f"{fig} not embedded"
        _assert_png_has_data(out / fig)
    for table in TABLES[name] + ["verdicts.csv"]:
        assert (out / table).is_file(), table
    assert "## Verdicts (computed from the numbers below)" in report and any(
        r in report for r in ("PASS", "FAIL", "INCONCLUSIVE"))
    config = json.loads((out / "config.json").read_text())
    assert config["data_fingerprint"]["train"] and config["settings"]["seeds"] == [1, 2]
    assert "data_fingerprint_hash" in report


def test_settings_defaults():
    s = ExperimentSettings()
    assert s.data == "data/synth" and s.seeds == (42,)
