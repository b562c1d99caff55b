"""Experiments: each computes its results on tiny data, judges them and writes every named file; verdicts at
their thresholds."""

from __future__ import annotations

import importlib
import json
import logging
import re
import typing

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from moe.data.synth import SynthConfig, write_dataset
from moe.experiments import EXPERIMENTS
from moe.experiments.__main__ import main as experiments_main
from moe.experiments.common import ExperimentSettings, Results, Verdict, bootstrap_delta_r2
from moe.experts.fit import FitConfig
from moe.gates.quiet import quiet_lightning

# ``moe experiments`` runs each experiment in a child process; the tests here patch experiments, which a child would
# not see, so they run them in the test's process (the fixture below); the default is read before any patch
ISOLATED_BY_DEFAULT = importlib.import_module("moe.experiments.__main__").ISOLATE

FIGURES = {
    "leakage": [
        "logg_err_base_01_r2_models.png",
        "logg_err_base_01_importance_spectrum.png",
        "logg_err_base_01_importance_hist.png",
        "logg_err_base_01_sanity_checks.png",
    ],
    "snr-oracle": [
        "snr_oracle_moe_comparison.png",
        "snr_oracle_moe_perbin_r2.png",
        "snr_oracle_moe_pred_vs_true.png",
        "snr_oracle_moe_delta_heatmap.png",
    ],
    "dual-tower": [
        "dual_tower_comparison.png",
        "dual_tower_persnr_r2.png",
        "dual_tower_pred_vs_true.png",
        "dual_tower_entropy_vs_snr.png",
        "dual_tower_ablation.png",
        "dual_tower_calibration.png",
        "dual_tower_differences.png",
    ],
    "ceiling": [
        "ceiling_perbin_expert_comparison.png",
        "ceiling_expert_selection_heatmap.png",
        "ceiling_oracle_hybrid_vs_baseline.png",
        "ceiling_perbin_delta_r2.png",
        "ceiling_hybrid_pred_vs_true.png",
    ],
}
TABLES = {
    "leakage": ["models.csv", "sanity_checks.csv", "importance_top40.csv"],
    "snr-oracle": ["headline.csv", "per_bin.csv", "alphas.csv"],
    "dual-tower": [
        "differences.csv",
        "runs.csv",
        "comparison.csv",
        "per_snr.csv",
        "per_phys.csv",
        "entropy_confidence.csv",
        "ablation.csv",
        "convergence.csv",
        "towers.csv",
        "calibration.csv",
        "every_label.csv",
    ],
    "ceiling": ["per_bin.csv", "overall.csv", "ridge_alpha_sweep.csv"],
}


@pytest.fixture(autouse=True)
def in_process(monkeypatch):
    """Experiments run in the test's process, where the test's patches apply."""
    monkeypatch.setattr(importlib.import_module("moe.experiments.__main__"), "ISOLATE", False)


@pytest.fixture(scope="module")
def exp_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("exp") / "data"
    write_dataset(
        root, SynthConfig(n_train=2400, n_val=600, n_test=600, shard_size=1200, n_pixels=256, seed=5), progress=False
    )
    return str(root)


@pytest.mark.parametrize(
    "value, op, threshold, passed",
    [
        (0.02, ">=", 0.02, True),
        (0.0199999, ">=", 0.02, False),
        (0.05, "<", 0.05, False),
        (0.0499, "<", 0.05, True),
        (float("nan"), ">=", 0.0, False),
        (0.7, ">=", 0.70, True),
        (-0.0001, ">=", 0.0, False),
    ],
)
def test_verdict_thresholds(value, op, threshold, passed):
    v = Verdict("q", value, op, threshold, "yes", "no")
    assert v.passed is passed
    assert v.row()["result"] == ("PASS" if passed else "FAIL") and v.row()["decision"] == ("yes" if passed else "no")


def test_inconclusive_verdict_never_passes():
    v = Verdict("q", 0.5, ">=", 0.0, "yes", "no", inconclusive="concat below the global expert")
    assert not v.passed and v.result == "INCONCLUSIVE"
    assert v.row()["decision"] == "no decision: concat below the global expert"


@pytest.mark.parametrize(
    ("op", "ci", "result"),
    [
        (">=", (0.031, 0.043), "PASS"),  # wholly above the threshold 0.02
        (">=", (0.02, 0.043), "PASS"),  # the rule holds on the whole interval, its end included
        (">=", (0.001, 0.019), "FAIL"),  # wholly below
        (">=", (0.012, 0.034), "INCONCLUSIVE"),  # straddles it: the data cannot tell the value from the threshold
        (">", (0.02, 0.043), "INCONCLUSIVE"),  # '>' fails at the lower end only
        (">=", (0.02, 0.02), "PASS"),  # a zero-width interval at the threshold: the rule holds
        ("<", (0.001, 0.019), "PASS"),
        ("<", (0.02, 0.043), "FAIL"),  # '<' fails at both ends
        ("<", (0.012, 0.034), "INCONCLUSIVE"),
        ("<=", (0.001, 0.02), "PASS"),
        (">=", (float("nan"), float("nan")), "INCONCLUSIVE"),  # e.g. an empty slice
        (">=", None, "PASS"),  # no interval: the value alone decides
    ],
)
def test_a_confidence_interval_decides_only_off_the_threshold(op, ci, result):
    value = 0.025 if ci is None else float(np.mean(ci))
    v = Verdict("gain vs 0.02?", value, op, 0.02, "yes", "no", ci=ci)
    assert v.result == result and v.passed is (result == "PASS")
    assert v.decision == {"PASS": "yes", "FAIL": "no"}.get(result, f"no decision: {v.reason}")
    if ci == (0.012, 0.034):
        assert (
            v.reason
            == "its 95% CI [+0.0120, +0.0340] straddles the threshold 0.02: more test spectra or seeds would decide"
        )
    assert v.row()["ci95"] == ("–" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]")


def test_a_degenerate_run_stays_inconclusive_for_its_own_reason_whatever_the_interval():
    assert Verdict("q", 0.5, ">=", 0.0, "y", "n", inconclusive="unfinished", ci=(0.4, 0.6)).reason == "unfinished"


def test_degenerate_or_unfinished_gate_runs_are_inconclusive():
    from moe.experiments.dual_tower import inconclusive_reason
    from moe.experiments.gates import GateRun

    y = np.linspace(1, 5, 200)

    def run(pred, best, ran, most=5, history=(0.5, 0.6, 0.62, 0.6205, 0.6207)):
        return GateRun(
            "x",
            "concat",
            "phys",
            0,
            pred,
            np.ones(200),
            np.ones((200, 1)),
            np.zeros(200),
            0.5,
            best,
            ran,
            most,
            None,
            history,
        )

    good = {"Dual-tower concat": [run(y + 0.1, 3, 5)], "Global Ridge": [run(y + 0.5, 0, 0)]}
    assert inconclusive_reason(good, 0.8, y) == ""
    bad = {"Dual-tower concat": [run(y[::-1], 3, 5)]}
    assert "Dual-tower concat below the global expert" in inconclusive_reason(bad, 0.8, y)
    assert inconclusive_reason({"Dual-tower concat": [run(y + 0.1, 5, 5)]}, 0.8, y) == ""  # creeping: converged
    still = {"Dual-tower concat": [run(y + 0.1, 5, 5, history=(0.5, 0.55, 0.58, 0.6, 0.62))]}
    assert "still improving at the last epoch" in inconclusive_reason(still, 0.8, y)
    stopped = {"Dual-tower concat": [run(y + 0.1, 2, 4, most=8, history=(0.5, 0.62, 0.61, 0.6))]}
    assert inconclusive_reason(stopped, 0.8, y) == ""  # early stopping ended it
    useless = inconclusive_reason(good, -0.05, y)  # gates "beat" experts that learned nothing
    assert "global expert has test R^2 -0.0500 <= 0" in useless and "raise --n-train" in useless


def test_bootstrap_ci_brackets_the_difference():
    rng = np.random.default_rng(0)
    y = rng.normal(size=2000)
    good, bad = y + rng.normal(0, 0.5, 2000), y + rng.normal(0, 0.7, 2000)
    lo, hi = bootstrap_delta_r2(y, [good], [bad], n_boot=300)
    delta = (1 - ((good - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()) - (
        1 - ((bad - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    )
    assert lo < delta < hi and lo > 0


def _assert_png_has_data(path):
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] >= 300 and img.shape[1] >= 300, path
    rgb = img[..., :3]
    assert rgb.std() > 0.05, f"{path} looks blank"
    assert (np.abs(rgb - rgb[0, 0]).sum(-1) > 0.1).mean() > 0.02, f"{path} has almost nothing drawn"


def _module(name: str):
    return importlib.import_module(f"moe.experiments.{name.replace('-', '_')}")


SEEDS = (1, 2)


def _settings(data: str, out) -> ExperimentSettings:
    """The settings the CLI arguments of ``test_experiment_writes_every_file`` make."""
    return ExperimentSettings(
        data=data, seeds=SEEDS, out=str(out), epochs=3, cnn_epochs=2, max_memory_rows=2400, progress=False
    )


@pytest.fixture(scope="module")
def computed(exp_dir, tmp_path_factory):
    """``computed(name)``: the experiment's results on the tiny data, computed once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            quiet_lightning()  # pytest resets warning filters around each test
            out = tmp_path_factory.mktemp("unwritten") / name
            cache[name] = _module(name).compute(_settings(exp_dir, out))
            # compute writes no report; the dual tower only records its gate runs as each one ends
            written = sorted(p.name for p in out.iterdir()) if out.exists() else []
            assert written == (["runs.csv"] if name == "dual-tower" else []), "compute wrote the report folder"
            if written:
                assert len(pd.read_csv(out / "runs.csv")) == len(cache[name].runs)
        return cache[name]

    return get


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_compute_returns_results_and_verdicts(computed, name):
    results = computed(name)
    assert isinstance(results, Results) and type(results).__module__ == _module(name).__name__
    assert results.data.fingerprint["train"] and results.compute_s > 0
    judged = _module(name).verdicts(results)
    assert judged and all(isinstance(v, Verdict) for v in judged)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_writes_every_file(computed, exp_dir, tmp_path, monkeypatch, name):
    results = computed(name)
    monkeypatch.setattr(_module(name).EXPERIMENT, "compute", lambda settings: results)
    out = tmp_path / name
    args = [name, "--data", exp_dir, "--out", str(out), "--seeds", *map(str, SEEDS), "--epochs", "3"]
    rc = experiments_main([*args, "--cnn-epochs", "2", "--max-memory-rows", "2400"])
    assert rc == 0
    report = (out / "report.md").read_text()
    for fig in FIGURES[name]:
        assert (out / fig).is_file(), fig
        assert f"]({fig})" in report, f"{fig} not embedded"
        _assert_png_has_data(out / fig)
    for table in TABLES[name] + ["verdicts.csv"]:
        assert (out / table).is_file(), table
    assert "## Verdicts (computed from the numbers below)" in report and any(
        r in report for r in ("PASS", "FAIL", "INCONCLUSIVE")
    )
    config = json.loads((out / "config.json").read_text())
    assert config["data_fingerprint"]["train"] and config["settings"]["seeds"] == [1, 2]
    assert config["settings"]["min_samples"] == 50 and config["settings"]["fallback"] is None
    # the dataset as it is: generated with its own settings (2400 training rows), not the default synth request
    assert config["data"]["source"] == "synthetic" and config["data"]["synth"]["n_train"] == 2400
    head = report.split("**Seeds:**")[0]
    assert f"**Data:** `{exp_dir}` (synthetic; 2400 train / 600 val / 600 test" in head
    assert f"fingerprint `{config['data_fingerprint_hash']}`" in head and "data_fingerprint_hash" in report
    again = tmp_path / "again"
    returned = _module(name).EXPERIMENT.write_report(results, _settings(exp_dir, again))
    assert returned.report == again and len(returned.headline) and returned.verdicts
    assert sorted(file for file, _ in returned.figures) == sorted(FIGURES[name])
    for table in TABLES[name] + ["verdicts.csv"]:
        assert (again / table).read_text() == (out / table).read_text(), f"{table} differs when written again"


def test_settings_defaults():
    s = ExperimentSettings()
    assert s.data == "data/synth" and s.seeds == (42,)


def test_every_flag_of_experiments_and_experts_has_help():
    import argparse

    from moe.experiments.__main__ import _parser
    from moe.experts.__main__ import _parser as experts_parser

    parsers = [_parser()]
    for action in experts_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    missing = [a.option_strings or a.dest for p in parsers for a in p._actions if not a.help]
    assert not missing, f"no help text: {missing}"


class _Stop(Exception):
    pass


@pytest.mark.parametrize(
    ("name", "entry"), [("ceiling", "load_or_fit"), ("snr-oracle", "load_or_fit"), ("dual-tower", "prepare_families")]
)
def test_min_samples_and_fallback_reach_every_expert_fit(exp_dir, tmp_path, monkeypatch, name, entry):
    """``--min-samples`` / ``--fallback`` set the FitConfig each experiment fits its experts with."""
    seen = []

    def capture(*args, **kwargs):
        seen.extend(a for a in args if isinstance(a, FitConfig))
        raise _Stop

    monkeypatch.setattr(_module(name), entry, capture)
    with pytest.raises(_Stop):
        experiments_main(
            [name, "--data", exp_dir, "--out", str(tmp_path), "--min-samples", "7", "--fallback", "global"]
        )
    assert seen and seen[0].min_samples == 7 and seen[0].fallback == "global"
    # only the families an experiment's questions use must meet the minimum (dual-tower: all, its gates mix each)
    uses = {"ceiling": ("global", "phys"), "snr-oracle": ("global", "snr"), "dual-tower": None}
    assert seen[0].required == uses[name]
    assert ExperimentSettings().fit_config(("global", "phys")).min_samples == 50  # the default of moe experts


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["leakage", "--n-train", "0"],
            r"^moe: error: argument --n-train: must be at least 1, got 0 \(moe experiments",
        ),
        (["ceiling", "--min-samples", "0"], r"^moe: error: argument --min-samples: must be at least 1, got 0"),
        (
            ["dual-tower", "--n-train", "1", "--min-samples", "1"],
            r"^moe: error: argument --n-train: dual-tower needs at least 2 training spectra \(the gate features are "
            r"standardised on them\); it would get 1: raise --n-train",
        ),
        (
            ["leakage", "--max-memory-rows", "1"],
            r"^moe: error: argument --max-memory-rows: leakage needs at least 2 training spectra",
        ),
        (
            ["dual-tower", "--n-train", "100"],
            r"^moe: error: \d+ expert group\(s\) have fewer than 50 training rows: phys/.*--min-samples N / --fallback global",
        ),
        (  # the physical groups are as short, but this experiment routes the SNR experts only
            ["snr-oracle", "--n-train", "100"],
            r"^moe: error: \d expert group\(s\) have fewer than 50 training rows: (snr/SNR-\w \(\d+\)(, )?)+; use ",
        ),
        (  # and this one the physical experts only
            ["ceiling", "--n-train", "100"],
            r"^moe: error: \d expert group\(s\) have fewer than 50 training rows: (phys/\w+-\w+ \(\d+\)(, )?)+; use ",
        ),
        (
            ["dual-tower", "--n-train", "10", "--fallback", "global"],
            r"^moe: error: the global expert has 10 training rows, fewer than 50; .*--min-samples N\)$",
        ),
    ],
)
def test_too_few_training_spectra_end_in_one_error_line(exp_dir, tmp_path, capsys, monkeypatch, args, message):
    """A training set too small for an experiment (or a value out of range) stops it before any model is
    fitted, with one line naming the flag to change; nothing is written."""
    from moe.main import main as moe_main

    assert moe_main(["experiments", *args, "--data", exp_dir, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("moe: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(message, errors[0]), errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"n_train": 0}, "argument --n-train: must be at least 1, got 0"),
        ({"n_train": 2.5}, "argument --n-train: '2.5' is not an integer"),
        ({"noise_level": -1.0}, "argument --noise-level: must be at least 0, got -1.0"),
        ({"noise_level": float("nan")}, "argument --noise-level: must be at least 0, got nan"),
        ({"seeds": ()}, "argument --seeds: give at least one value"),
        ({"seeds": (1, "a")}, "argument --seeds: invalid int value: 'a'"),
        ({"epochs": 0}, "argument --epochs: must be at least 1, got 0"),
        ({"cnn_epochs": -1}, "argument --cnn-epochs: must be at least 0, got -1"),
        ({"max_memory_rows": 0}, "argument --max-memory-rows: must be at least 1, got 0"),
        ({"min_samples": 0}, "argument --min-samples: must be at least 1, got 0"),
        ({"fallback": "phys"}, "argument --fallback: invalid choice: 'phys' (choose from 'global')"),
    ],
)
def test_settings_out_of_range_are_settings_errors(kw, message):
    """A value set in code is checked against the type its option declares, in the parser's words."""
    import argparse

    from moe.experiments.common import SettingsError

    with pytest.raises(SettingsError) as info:
        ExperimentSettings(**kw)
    assert isinstance(info.value, argparse.ArgumentError) and isinstance(info.value, ValueError)
    assert str(info.value) == message


def test_experiments_options_are_the_settings_fields():
    """Every option field of ExperimentSettings is a flag of moe experiments with the field's type (range
    included) and, unless the sized defaults of all / --quick need None, its default."""
    from moe.experiments.__main__ import _parser
    from moe.shared.arguments import declared_options

    parser = _parser()
    for name, (flag, hint, default) in declared_options(ExperimentSettings).items():
        accepted = [hint, hint | None, *typing.get_args(hint)]  # X | None may be declared as X, tuple[int, ...] as int
        assert parser.declared[flag] in accepted, flag
        assert parser.get_defaults()[name] in (default, None), flag
    assert ExperimentSettings(fallback="global", n_train=None).fallback == "global"


def test_ceiling_bin_too_small_for_lightgbm_and_the_cnn_keeps_its_ridge_expert():
    from moe.experiments import ceiling
    from moe.experiments.common import Arrays

    rng = np.random.default_rng(0)

    def arrays(phys_bin):
        n = len(phys_bin)
        flux = rng.normal(size=(n, 8)).astype(np.float32)
        y = flux[:, 0].astype(np.float64)
        return Arrays(
            flux, np.ones_like(flux), flux, y, np.zeros(n), np.zeros(n), np.ones(n), phys_bin, np.zeros(n, int)
        )

    counts = [30, 30, 30, 1, 30, 30, 1, 30, 30]  # the CNN bins 3 and 6: one training spectrum each
    train = arrays(np.repeat(np.arange(9), counts))
    val, test = arrays(np.repeat(np.arange(9), 10)), arrays(np.repeat(np.arange(9), 10))
    rows = ceiling._bin_rows(train, val, test)
    settings = ExperimentSettings(seeds=(1,), cnn_epochs=1, progress=False)
    lgbm = ceiling._lgbm_per_bin(settings, train, val, test, rows)
    cnn = ceiling._cnn_per_bin(settings, 1.0, train, val, test, rows)
    small = np.isin(test.phys_bin, ceiling.CNN_BINS)
    assert set(lgbm.val_r2) == set(range(9)) - set(ceiling.CNN_BINS) and np.isnan(lgbm.test_pred[small]).all()
    assert np.isfinite(lgbm.test_pred[~small]).all() and not cnn.val_r2
    ridge = ceiling._PerBin(test.log_g + 0.1, {k: 0.5 for k in range(9)}, {k: [0.5] for k in range(9)})
    fitted = {"Ridge": ridge, "LightGBM": lgbm, "1D-CNN": cnn}
    table, chosen, hybrid = ceiling._per_bin_table(fitted, test, np.array(counts), np.ones(9))
    for k in ceiling.CNN_BINS:
        assert chosen[k] == "Ridge" and np.isnan(table.loc[k, "r2_lgbm"]) and table.loc[k, "lgbm_seeds"] == ""
    np.testing.assert_array_equal(hybrid[small], ridge.test_pred[small])


def test_report_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from matplotlib.figure import Figure

    from moe.experiments.common import Report
    from moe.plots import bar
    from moe.shared.errors import WriteError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    rep = Report(tmp_path / "rep", "X-01", "t", "q")
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(WriteError, match=r"rep/t1\.csv: cannot write a report table \(No space left on device"):
        rep.table("t1", pd.DataFrame({"a": [1.0]}), "T1")
    monkeypatch.undo()
    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(WriteError, match=r"rep/f\.png: cannot write the figure \(No space left on device"):
        rep.figure("f.png", bar(["a"], [0.1], "R2", "t"), "c")
    assert not list((tmp_path / "rep").iterdir())  # no table, no figure, no temporary file


def test_r2_helpers_match_sklearn():
    from sklearn.metrics import r2_score

    from moe.experts.scores import r2, r2_from_sums, regression_metrics

    rng = np.random.default_rng(1)
    y = rng.normal(size=500)
    pred = y + rng.normal(0, 0.6, 500)
    assert r2(y, pred) == pytest.approx(r2_score(y, pred), rel=1e-12)
    assert regression_metrics(y, pred)["r2"] == pytest.approx(r2_score(y, pred), rel=1e-12)
    sums = r2_from_sums([((pred - y) ** 2).sum(), 0.0], ((y - y.mean()) ** 2).sum(), y.size)
    assert sums[0] == pytest.approx(r2_score(y, pred), rel=1e-12) and sums[1] == 1.0
    assert np.isnan(r2(np.ones(5), np.zeros(5))) and np.isnan(r2(np.ones(1), np.ones(1))) and np.isnan(r2([], []))


def test_every_method_has_one_palette_colour():
    from moe.experiments import ceiling, dual_tower, snr_oracle
    from moe.plots import method_colour

    gates = [label for label, _, _ in dual_tower.METHODS]
    assert len({method_colour(m) for m in gates}) == len(gates), "methods sharing a figure need distinct colours"
    types = [*ceiling.TYPES, "OLS"]
    assert len({method_colour(m) for m in types}) == len(types)
    for label in (ceiling.GLOBAL, ceiling.RIDGE_ORACLE, ceiling.HYBRID, snr_oracle.GLOBAL, snr_oracle.ORACLE):
        method_colour(label)
    with pytest.raises(KeyError, match="no palette colour"):
        method_colour("an unknown method")


def test_figures_are_built_without_pyplot(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    code = """
import sys
import numpy as np
from moe import plots
rng = np.random.default_rng(0)
snr = 10 ** rng.uniform(0, 1.5, 300)
figs = [plots.entropy_vs_snr(snr, rng.uniform(0, 2, 300), 9),
        plots.bar(["a", "b"], [0.1, -0.2], "R2", "t", hline=0.05, hline_label="line"),
        plots.grouped_bar(["0", "1"], {"Ridge": [0.5, 0.6], "LightGBM": [0.4, np.nan]}, "R2", "t", star=["Ridge", None]),
        plots.pred_vs_true(snr, snr, 1.0, snr, "SNR", log_color=True),
        plots.heatmap(np.eye(2), ["a", "b"], ["c", "d"], "t", "v")]
for i, fig in enumerate(figs):
    plots.save(fig, f"{sys.argv[1]}/{i}.png")
assert "matplotlib.pyplot" not in sys.modules, "moe.plots imported pyplot"
"""
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert out.returncode == 0, out.stderr
    assert len(list(tmp_path.glob("*.png"))) == 5


def test_heatmap_text_contrasts_with_its_cell():
    from moe.plots import heatmap

    fig = heatmap(np.array([[-1.0], [0.0], [1.0]]), ["low", "mid", "high"], ["d"], "t", "v", cmap="RdBu", center=0.0)
    colours = [t.get_color() for t in fig.axes[0].texts]
    assert colours[0] == "white" and colours[2] == "white" and colours[1] != "white"


def test_many_trainers_print_their_hardware_once_and_no_temporary_restores(caplog):
    from moe.gates.quiet import HARDWARE_LOGGERS, quiet_repeated_trainers

    quiet_repeated_trainers()
    quiet_repeated_trainers()  # idempotent: one filter per logger
    rank_zero, cuda = (logging.getLogger(name) for name in HARDWARE_LOGGERS)
    assert sum(type(f).__name__ == "_OncePerProcess" for f in rank_zero.filters) == 1
    gpu = "GPU available: True (cuda), used: True"  # lines this CPU-only test run never logs elsewhere
    visible = "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [7]"
    with caplog.at_level(logging.INFO):
        for _ in range(3):  # three gates trained in one process
            rank_zero.info(gpu)
            cuda.info(visible)
            rank_zero.info("Restoring states from the checkpoint path at /tmp/tmpabc/epoch=2-step=9.ckpt")
            rank_zero.info("Loaded model weights from the checkpoint at /tmp/tmpabc/epoch=2-step=9.ckpt")
            rank_zero.info(  # the gate's trainer predicts after it fits (as Lightning words it)
                "The following callbacks returned in `LightningModule.configure_callbacks` will override existing "
                "callbacks passed to Trainer: ValidationFigures"
            )
        rank_zero.info("`Trainer.fit` stopped: `max_epochs=3` reached.")
    assert [r.getMessage() for r in caplog.records] == [gpu, visible, "`Trainer.fit` stopped: `max_epochs=3` reached."]


def test_bootstrap_intervals_against_direct_r2():
    from sklearn.metrics import r2_score

    from moe.experiments.common import bootstrap_min_group_delta_r2

    rng = np.random.default_rng(3)
    y = rng.normal(3, 1, 4000)
    group = rng.integers(0, 3, 4000)
    a = y + rng.normal(0, 0.5, 4000)
    b = y + rng.normal(0, 1.0, 4000) * np.where(group == 1, 0.6, 1.0)  # b is better in group 1 only
    lo, hi = bootstrap_delta_r2(y, [a])  # R^2 of a itself
    assert lo < r2_score(y, a) < hi and hi - lo < 0.05
    gains = {g: r2_score(y[group == g], a[group == g]) - r2_score(y[group == g], b[group == g]) for g in (0, 1, 2)}
    lo, hi = bootstrap_min_group_delta_r2(y, a, b, group, (0, 1))
    assert lo < min(gains[0], gains[1]) == gains[1] < hi < gains[0]  # the smaller gain: group 1's
    assert bootstrap_min_group_delta_r2(y, a, a, group, (0, 1)) == (0.0, 0.0)  # identical predictions


def test_ceiling_verdicts_carry_their_intervals(computed):
    from moe.experiments import ceiling

    results = computed("ceiling")
    judged = ceiling.verdicts(results)
    assert [v.ci for v in judged] == [results.hybrid_r2_ci, results.hybrid_ci, results.metal_poor_ci]
    assert all(np.isfinite(v.ci).all() and v.ci[0] <= v.ci[1] for v in judged)


def test_leakage_verdicts_carry_their_intervals(computed):
    from moe.experiments import leakage

    results = computed("leakage")
    judged = leakage.verdicts(results)
    assert [v.ci for v in judged] == [results.error_only_ci, results.aggregate_ci, results.shuffle_ci]
    assert all(np.isfinite(v.ci).all() and v.ci[0] <= v.ci[1] for v in judged)
    aggregates = results.sanity.set_index("check").loc[f"{leakage.AGGREGATES} -> log g"]
    assert (aggregates.r2_ci_low, aggregates.r2_ci_high) == results.aggregate_ci


def test_each_ceiling_fit_says_what_it_fitted(caplog):
    """The ceiling's LightGBM / CNN fits take minutes: each one is a line, not a silent stretch."""
    from types import SimpleNamespace

    from moe.experiments import ceiling

    y = np.linspace(1, 5, 40)
    split = SimpleNamespace(flux=np.c_[y], log_g=y)
    in_bin = ceiling._BinRows(y > 0, y > 0, y > 0)
    model = SimpleNamespace(predict=lambda x: x[:, 0])
    with caplog.at_level(logging.INFO, logger="moe.experiments.ceiling"):
        ceiling._fit_over_seeds(lambda seed: model, (1, 2), split, split, in_bin, ceiling._label("LightGBM", 3, in_bin))
    assert [r.getMessage() for r in caplog.records] == [
        f"ceiling: LightGBM in bin 3 ({ceiling.bins.PHYS_BIN_NAMES[3]}, 40 training spectra), seed {s}: val R2 1.0000 (0 s)"
        for s in (1, 2)
    ]


def test_seed_interval_is_the_t_interval_of_the_mean():
    from scipy import stats

    from moe.experiments.common import seed_interval

    values = [0.0061, 0.0042, 0.0075]
    expected = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    np.testing.assert_allclose(seed_interval(values), expected, rtol=1e-12)
    assert seed_interval([0.01]) is None


@pytest.mark.parametrize(
    ("seeds", "ci", "result", "why"),
    [
        ((0.010, 0.011, 0.012), (0.008, 0.013), "PASS", ""),  # both intervals clear 0.005
        ((0.001, 0.002, 0.0015), (-0.001, 0.004), "FAIL", ""),  # both wholly below
        ((0.002, 0.010, 0.018), (0.008, 0.012), "INCONCLUSIVE", "seed interval over 3 seeds"),  # seeds disagree
        ((0.010, 0.011, 0.012), (0.003, 0.018), "INCONCLUSIVE", "95% CI"),  # the test stars cannot tell
        ((0.010,), (0.008, 0.013), "INCONCLUSIVE", "one training seed"),  # no spread to read
    ],
)
def test_a_difference_between_gates_holds_only_against_both_intervals(seeds, ci, result, why):
    v = Verdict("gain >= 0.005?", float(np.mean(seeds)), ">=", 0.005, "yes", "no", ci=ci, seeds=seeds)
    assert v.result == result, v.reason
    assert why in v.reason and (v.reason == "") == (result != "INCONCLUSIVE")
    row = v.row()
    assert row["seeds"].endswith(f"({len(seeds)})") and (row["seed_ci95"] == "–") == (len(seeds) == 1)
    assert v.answer.startswith({"PASS": "Yes:", "FAIL": "No:", "INCONCLUSIVE": "Open:"}[result])


def test_a_gate_stops_on_convergence_not_at_its_epoch_cap(exp_dir):
    """Early stopping ends a converged gate's run well before a generous cap, after ``patience`` epochs without a
    gain of ``min_delta``; each ``decay_patience`` epochs without one cut the learning rate; the epoch with the best
    val R^2 is the one kept."""
    from moe.experiments.dual_tower import FAMILIES
    from moe.experiments.gates import GateTraining, prepare_families, train_gate

    quiet_lightning()
    settings = ExperimentSettings(data=exp_dir, progress=False)
    dm = settings.datamodule()
    # the dual tower's fit and caches of this folder: prepared once per module, not again here
    prepared = prepare_families(dm, FAMILIES, settings.fit_config(FAMILIES), progress=False)["phys"]
    training = GateTraining(batch_size=256, patience=4, decay_patience=2, decay_factor=0.5, max_epochs=200)
    run = train_gate(dm, prepared, "phys", "phys_only", seed=1, training=training)
    history, lrs = run.val_history, run.lr_history
    assert run.epochs_run == len(history) == len(lrs) < 200 and not run.still_improving
    assert run.ended == "converged (early stopping)"
    # the stop rule: the last 4 epochs gained less than min_delta over the best before them
    assert max(history[-4:]) < max(history[:-4]) + training.min_delta
    # every 2 stale epochs halve the rate: the last 4 epochs (stale 1..4) hold two cuts, at the 2nd and the 4th
    cuts = [i for i in range(1, len(lrs)) if lrs[i] < lrs[i - 1]]
    assert cuts[-2:] == [len(lrs) - 3, len(lrs) - 1] and max(lrs) == pytest.approx(training.lr)
    assert all(lrs[i] == pytest.approx(lrs[i - 1] * 0.5) for i in cuts)
    assert 1 <= run.best_epoch <= run.epochs_run and run.val_r2 == pytest.approx(max(history))


def test_quick_and_all_write_one_summary_page_with_a_row_per_question(computed, exp_dir, tmp_path, monkeypatch):
    """``all --quick`` runs the four experiments into one folder and writes README.md: a row per experiment and per
    verdict, every link pointing at a written file, and the smoke-run notice; no verdict of a smoke run decides."""
    from moe.experiments import experiment
    from moe.experiments.common import QUICK_NOTE, QUICK_REASON

    seen = {}
    for name in EXPERIMENTS:
        results = computed(name)

        def fake(settings, name=name, results=results):
            seen[name] = settings
            return results

        monkeypatch.setattr(experiment(name), "compute", fake)
    out = tmp_path / "reports"
    assert experiments_main(["all", "--quick", "--data", exp_dir, "--out", str(out)]) == 0
    assert seen["dual-tower"].quick and seen["dual-tower"].seeds == (1, 2) and seen["dual-tower"].n_train == 3000
    page = (out / "README.md").read_text()
    assert QUICK_NOTE in page
    for name in EXPERIMENTS:
        report = (out / name / "report.md").read_text()
        assert QUICK_NOTE in report and "| PASS |" not in report and "| FAIL |" not in report
        verdicts = pd.read_csv(out / name / "verdicts.csv")
        assert (verdicts.result == "INCONCLUSIVE").all() and verdicts.decision.str.contains(QUICK_REASON).all()
        exp = experiment(name)
        assert f"**{exp.experiment_id}: {exp.question}**" in page.replace("\\|", "|") and exp.hypothesis in page
        for question in verdicts.question:
            assert sum(line.startswith("| ") and f"| {question} |" in line for line in page.splitlines()) == 1
    for link in re.findall(r"\]\(([^)]+)\)", page):
        assert (out / link).is_file(), link
    rows = [line for line in page.splitlines() if re.match(r"^\| \**\d", line)]
    n_verdicts = sum(len(pd.read_csv(out / n / "verdicts.csv")) for n in EXPERIMENTS)
    assert len(rows) == len(EXPERIMENTS) + n_verdicts


def test_the_dual_tower_trains_three_seeds_unless_told(exp_dir, tmp_path, monkeypatch):
    from moe.experiments import experiment

    seen = []

    def capture(settings):
        seen.append(settings)
        raise _Stop

    monkeypatch.setattr(experiment("dual-tower"), "compute", capture)
    monkeypatch.setattr(experiment("leakage"), "compute", capture)
    for name in ("dual-tower", "leakage"):
        with pytest.raises(_Stop):
            experiments_main([name, "--data", exp_dir, "--out", str(tmp_path)])
    with pytest.raises(_Stop):
        experiments_main(["dual-tower", "--data", exp_dir, "--out", str(tmp_path), "--seeds", "7"])
    assert [s.seeds for s in seen] == [(42, 123, 456), (42,), (7,)]
    assert seen[0].epochs == 200 and not seen[0].quick


def test_every_compared_gate_trains_every_seed_and_the_rest_one(computed):
    """The verdicts' gates (fusions, phys-only, 36 experts) train with every seed; the global expert and the
    oracle (nothing to learn), the quality-only gate (no verdict reads it) and the ablations with the first."""
    from moe.experiments.dual_tower import ABLATIONS, COMPARISONS, DUAL, ONE_SEED

    runs = computed("dual-tower").runs
    seeds = runs.groupby("method").seed.apply(tuple)
    compared = {name for a, b, _ in COMPARISONS.values() for name in (a, b)}
    assert compared and all(seeds[m] == SEEDS for m in compared)
    assert all(seeds[m] == SEEDS[:1] for m in ONE_SEED)
    assert all(seeds[f"{DUAL} [{name}]"] == SEEDS[:1] for name in ABLATIONS)


def test_both_towers_of_the_logit_add_gate_give_its_own_prediction(computed):
    """The tower analysis recombines the logit-add gate's two towers: with both, it is the gate itself (seed 1)."""
    results = computed("dual-tower")
    towers = results.towers.set_index("quantity").value
    runs = results.runs.set_index(["method", "seed"]).test_r2
    assert towers["test R2, both towers"] == pytest.approx(runs["Dual-tower logit-add", SEEDS[0]], abs=1e-5)
    assert 0 <= towers["argmax agreement of the two towers"] <= 1


def test_the_experiments_fit_their_experts_for_log_g_only():
    """Their questions are about log g; each further label would multiply the expert solves of every fit."""
    fit = ExperimentSettings().fit_config(("global", "phys"))
    assert fit.labels == ("log_g",) and fit.families == ("global", "phys")


def test_the_dual_tower_fits_every_label_only_for_the_families_its_every_label_gate_uses():
    """The global and physical experts for log g, T_eff and [M/H] (the every-label gate's), the SNR and cell
    experts for log g alone (no solves, no alpha warnings for labels no question reads)."""
    from moe.experiments.dual_tower import EVERY_LABEL, expert_fit

    fit = expert_fit(ExperimentSettings())
    assert fit.families == ("global", "phys", "snr", "cells") and fit.labels == EVERY_LABEL
    assert {f: fit.labels_of(f) for f in fit.families} == {
        "global": EVERY_LABEL,
        "phys": EVERY_LABEL,
        "snr": ("log_g",),
        "cells": ("log_g",),
    }


def test_the_every_label_gate_reports_each_label_against_an_independent_computation(computed, exp_dir):
    """The dual tower's every-label concat gate: a table row per label and slice, its R^2 that of sklearn on the
    run's predictions against the test shard's own parameter table, its calibration that of z computed here."""
    from pathlib import Path

    from sklearn.metrics import r2_score

    from moe.data import bins
    from moe.experiments.dual_tower import CALIBRATION_TARGETS, EVERY_LABEL

    results = computed("dual-tower")
    assert results.fit["family_labels"] == (("snr", ("log_g",)), ("cells", ("log_g",)))  # what the run fitted
    every = results.every_label
    (shard,) = sorted(Path(exp_dir).glob("test*/dataset.h5"))
    truth = pd.read_hdf(shard)  # the shard's rows in file order, as the run's predictions are sorted
    table = every.table.set_index(["label", "slice"])
    assert EVERY_LABEL == ("log_g", "T_eff", "M_H") and list(every.table.label.unique()) == list(EVERY_LABEL)
    assert set(every.pred) == set(every.sigma) == set(EVERY_LABEL)
    slices = bins.snr_slices(results.snr_bin, high_first=True)
    assert [name for name, _ in slices] == ["all", "H", "M", "L", "X"]
    for label in EVERY_LABEL:
        y, pred, sigma = truth[label].to_numpy(np.float64), every.pred[label], every.sigma[label]
        assert pred.shape == y.shape and np.isfinite(pred).all() and (sigma > 0).all()
        np.testing.assert_allclose(every.true[label], y, rtol=1e-6)  # row for row the shard's stars
        z = (pred - y) / sigma
        for name, sel in slices:
            row = table.loc[(label, name)]
            assert row.n == sel.sum()
            if sel.sum() < 2:
                continue
            # the streams carry labels as float32, the shard's table float64
            assert row.r2 == pytest.approx(r2_score(y[sel], pred[sel]), rel=1e-6)
            assert row.z_std == pytest.approx(z[sel].std(), rel=1e-5)
            assert row.coverage_1sigma == pytest.approx((np.abs(z[sel]) <= 1).mean(), abs=1.5 / sel.sum())
            assert 0 <= row.coverage_1sigma <= row.coverage_2sigma <= 1 and row.z_std > 0
            inside = all(lo <= row[k] <= hi for k, (lo, hi) in CALIBRATION_TARGETS.items())
            assert bool(row.within_targets) == inside
    # every label is predicted better than by its mean (3 epochs on 2400 tiny spectra: no more than that)
    assert all(table.loc[(label, "all")].r2 > 0 for label in EVERY_LABEL), every.table.to_string()


def test_the_every_label_gate_compares_its_log_g_with_the_log_g_only_gate_of_its_seed(computed):
    """Its log g R^2 and the log-g-only concat gate's of the first seed are the runs table's; both are distinct gates,
    and the verdicts do not read it."""
    from dataclasses import replace

    from moe.experiments.dual_tower import DUAL, EVERY_LABEL_GATE, verdicts

    results = computed("dual-tower")
    every = results.every_label
    runs = results.runs.set_index(["method", "seed"]).test_r2
    assert every.seed == SEEDS[0] and list(results.runs.method).count(EVERY_LABEL_GATE) == 1
    assert every.log_g_only_r2 == pytest.approx(runs[DUAL, SEEDS[0]], abs=1e-12)
    assert every.log_g_r2 == pytest.approx(runs[EVERY_LABEL_GATE, SEEDS[0]], abs=1e-12)
    assert every.log_g_delta == pytest.approx(every.log_g_r2 - every.log_g_only_r2)
    assert every.log_g_delta != 0  # another gate, not the log-g-only one read twice
    other = replace(every, log_g_only_r2=-9.0, table=every.table.iloc[:0], pred={}, true={}, ended="epoch cap")
    assert [v.row() for v in verdicts(replace(results, every_label=other))] == [v.row() for v in verdicts(results)]


def test_the_every_label_section_is_in_the_report(computed, exp_dir, tmp_path):
    """The report's section "Every label (dual-tower concat gate)": a row per label and slice, its CSV beside it, and
    the log g comparison in words."""
    from moe.experiments.dual_tower import EVERY_LABEL, EXPERIMENT

    results = computed("dual-tower")
    EXPERIMENT.write_report(results, _settings(exp_dir, tmp_path))
    report = (tmp_path / "report.md").read_text()
    section = report.split("## Every label (dual-tower concat gate)\n")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == [label for label in EVERY_LABEL for _ in range(5)]
    assert (
        f"Log g: test R^2 {results.every_label.log_g_r2:.4f} against" in section
        and "(CSV: `every_label.csv`)" in section
    )
    assert pd.read_csv(tmp_path / "every_label.csv").shape[0] == 5 * len(EVERY_LABEL)


def _allocate(mb: int) -> tuple[int, int, dict[str, str | None]]:
    """In a child: touch ``mb`` MB, then hand back the pid, this process's peak RSS (kB) and its heap setting."""
    import os
    import resource

    from moe.shared.heap import HEAP_ENV

    block = np.ones(mb * 250_000, dtype=np.float32)  # 4 bytes each
    assert block.sum() > 0
    heap = {k: os.environ.get(k) for k in HEAP_ENV}
    return os.getpid(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, heap


def _refuse(flag: str) -> None:
    from moe.experiments.common import SettingsError

    raise SettingsError(flag, "must be at least 50")


def _die() -> None:
    import os

    os._exit(9)  # as a process the kernel killed for memory: no result, no exception


def test_a_child_that_dies_names_what_it_ran():
    from moe.experiments.__main__ import ChildDied, run_in_child

    with pytest.raises(ChildDied, match=r"^the process running experiment ceiling ended without a result \(killed"):
        run_in_child(_die, what="experiment ceiling")


def _touch_and_sleep(path: str) -> None:
    import pathlib
    import time

    pathlib.Path(path).write_text(str(__import__("os").getpid()))
    time.sleep(120)


def test_a_child_ends_with_its_parent(tmp_path):
    """A parent killed outright (SIGKILL: no handler of its own runs) takes its experiment's child with it, instead
    of leaving that experiment running to its end (Linux: the child asks the kernel for a signal at its parent's end)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    started = tmp_path / "child.pid"
    code = (
        "from moe.experiments.__main__ import run_in_child; from test_experiments import _touch_and_sleep; "
        f"run_in_child(_touch_and_sleep, {str(started)!r})"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    parent = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        for _ in range(600):
            if started.exists() and started.read_text():
                break
            time.sleep(0.1)
        child = int(started.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        for _ in range(100):
            if not Path(f"/proc/{child}").exists() or " Z " in Path(f"/proc/{child}/stat").read_text():
                break
            time.sleep(0.1)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the child went on after its parent was killed")
    finally:
        parent.kill()


def test_each_experiment_runs_in_a_child_whose_memory_is_not_the_parents():
    """``run_in_child`` runs a function in another process and hands back its value: the 400 MB touched there are
    that process's (another pid, its own peak) and count in the peak the run reports (``peak_rss_gb`` includes
    children); the child has the expert fit's heap setting, the parent's environment is left as it was; an error
    keeps its type, flag and message, so ``moe experiments`` still prints it as one line."""
    import os

    from moe.experiments.__main__ import peak_rss_gb, run_in_child
    from moe.experiments.common import SettingsError
    from moe.shared.heap import HEAP_ENV

    assert ISOLATED_BY_DEFAULT
    before = dict(os.environ)
    pid, child_kb, heap = run_in_child(_allocate, 400)
    assert pid != os.getpid() and child_kb > 400_000
    assert heap == HEAP_ENV and dict(os.environ) == before
    assert peak_rss_gb() >= child_kb / 1e6
    with pytest.raises(SettingsError, match="must be at least 50") as err:
        run_in_child(_refuse, "--n-train")
    assert err.value.argument_name == "--n-train"
