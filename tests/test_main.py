"""The ``moe`` command: help, shipped configs by name, one-line errors without traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from moe.main import main, resolve_configs, shipped_configs

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_commands_and_configs(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("fit", "predict", "experiments", "data synth", "quickstart", "dual_tower", "--debug"):
        assert word in out


def test_shipped_configs_resolve_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = shipped_configs()
    assert {"quickstart", "dual_tower", "logit_add", "global"} <= set(shipped)
    assert resolve_configs(["--config", "quickstart"]) == ["--config", str(shipped["quickstart"])]
    assert resolve_configs(["--config=configs/dual_tower.yaml"]) == [f"--config={shipped['dual_tower']}"]
    own = tmp_path / "mine.yaml"
    own.write_text("model:\n  fusion: product\n")
    assert resolve_configs(["--config", str(own)]) == ["--config", str(own)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "--config", "nope"], r"--config nope: no such file and no shipped config of that name"),
        (["fit", "--model.fusion", "nonsense"], r"--model.fusion nonsense: expected one of concat, logit_add"),
        (["fit", "--data.noise_level", "-1"], r"--data.noise_level -1: must satisfy value>=0"),
        (["fit", "--data.batch_size", "0"], r"--data.batch_size 0: must satisfy value>0"),
        (["fit", "--model.expert_min_samples", "0"], r"--model.expert_min_samples 0: must satisfy value>0"),
        (["fit", "--model.expert_fallback", "phys"], r"--model.expert_fallback phys: expected one of global"),
        (["frobnicate"], r"unknown command 'frobnicate'"),
    ],
)
def test_user_errors_are_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moe: error: ")
    assert re.search(message, err[0]), err[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (  # moe experiments: one of each kind, as ExperimentSettings declares them
            ["experiments", "leakage", "--n-train", "abc"],
            r"argument --n-train: 'abc' is not an integer \(moe experiments --",
        ),
        (["experiments", "leakage", "--epochs", "0"], r"argument --epochs: must be at least 1, got 0 \(moe exp"),
        (["experiments", "ceiling", "--cnn-epochs", "-1"], r"argument --cnn-epochs: must be at least 0, got -1"),
        (["experiments", "leakage", "--noise-level", "-0.5"], r"argument --noise-level: must be at least 0, got -0.5"),
        (["experiments", "leakage", "--noise-level", "lots"], r"argument --noise-level: 'lots' is not a number"),
        (["experiments", "leakage", "--seeds", "1", "x"], r"argument --seeds: invalid int value: 'x'"),
        (
            ["experiments", "leakage", "--fallback", "phys"],
            r"argument --fallback: invalid choice: 'phys' \(choose from 'global'\) \(moe experiments --",
        ),
        (["experiments", "lekage"], r"argument name: invalid choice: 'lekage' \(choose from 'leakage', "),
        (
            ["experts", "fit", "--min-samples", "0"],
            r"argument --min-samples: must be at least 1, got 0 \(moe experts fit --help",
        ),
        (["experts", "report", "--noise-level", "-1"], r"argument --noise-level: must be at least 0, got -1"),
        (["experts", "fit", "--alphas", "1", "0"], r"argument --alphas: must be > 0, got 0"),
        (
            ["data", "synth", "--out", "x", "--train", "-5"],
            r"argument --train: must be at least 1, got -5 \(moe data synth --",
        ),
        (["data", "check"], r"the following arguments are required: data_dir \(moe data check --help lists"),
        (
            ["data", "validate", "--block-rows", "x1", "a.h5"],
            r"argument --block-rows: 'x1' is not an integer \(moe data validate --help",
        ),
    ],
)
def test_tool_mistakes_are_one_line_naming_the_flag(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moe: error: ") and re.search(message, err[0]), err


def test_a_tool_run_as_a_module_prints_the_same_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "moe.experts", "fit", "--min-samples", "0"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "moe: error: argument --min-samples: must be at least 1, got 0 (moe experts fit --help lists the options)"
    ]


def test_missing_data_names_the_folder_and_debug_shows_the_traceback(tmp_path, capsys):
    args = ["test", "--data.data_dir", str(tmp_path / "absent"), "--data.synth", "null"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "absent") in err[0]
    with pytest.raises(Exception, match="absent"):
        main([*args, "--debug"])


def test_console_script_and_train_py_alias_run(tmp_path):
    """The installed ``moe`` entry point and ``python train.py`` both reach the same command."""
    for cmd in ([sys.executable, "-m", "moe.main", "--help"], [sys.executable, str(ROOT / "train.py"), "--help"]):
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "usage: moe COMMAND" in out.stdout


@pytest.mark.parametrize(
    ("labels", "shown"),
    [("[]", r"\[\]"), ("[log_g, log_g]", r"\[log_g, log_g\]")],
)
def test_labels_empty_or_repeated_is_one_line(tiny_dir, labels, shown, capsys):
    """An empty or repeated --model.labels is the user's mistake: one line naming the flag (the data folder's INFO
    line may precede it), not the mixture's ValueError traceback."""
    assert main(["test", "--data.data_dir", tiny_dir, "--model.labels", labels]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if "error" in line.lower() or "Traceback" in line] == err[
        -1:
    ]  # one line, no traceback
    assert re.search(rf"--model\.labels {shown}: give at least one label, each once \(moe fit --help", err[-1]), err[-1]
