"""The ``moe`` command: one entry point for training, experts, experiments and data tools.

``moe fit|validate|test|predict`` is the LightningCLI (:mod:`moe.cli`); ``moe experts``,
``moe experiments`` and ``moe data synth|validate|check`` are the project's other tools. A
mistake a user can make (a bad value, a missing file, a too-small group) prints one line
naming the flag or file and exits with status 2; ``--debug`` (or ``MOE_DEBUG=1``) shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from moe.experts.bundle import ExpertsMismatchError
from moe.experts.fit import GroupTooSmallError
from moe.shared.arguments import ToolArgumentError, find_mistake
from moe.shared.errors import ShardError

TRAINING = ("fit", "validate", "test", "predict")
USAGE = """\
usage: moe COMMAND [options]        (moe COMMAND --help: the command's options)

moe estimates stellar surface gravity, log g +- sigma per star, from noisy Subaru PFS
medium-resolution spectra with a learned gate over frozen Ridge experts.

training (options: --config NAME|FILE, --model.*, --data.*, --trainer.*):
  fit          prepare the experts and caches (once per dataset), train a gate, save checkpoints;
               --ckpt_path last continues the newest run of the same gate where it stopped
  validate     validation metrics of a checkpoint
  test         the test table of a checkpoint (--ckpt_path best|last|FILE)
  predict      a catalogue, log g +- sigma per star, of any shards (--data.predict_path, labels optional)

experts and experiments:
  experts      fit | report | compare-noise: the frozen Ridge experts alone
  experiments  leakage | snr-oracle | dual-tower | ceiling | all: the research series as report folders

data:
  data synth     write a synthetic dataset in the pfsspec layout
  data validate  check shards against the data contract, one line per shard
  data check     realism check of a dataset folder (figures and a table)

shipped configs (moe fit --config NAME): {configs}
--debug (or MOE_DEBUG=1) shows the traceback of an error instead of its one-line message.
"""
# errors a user can cause and fix: printed as one line without a traceback
USER_ERRORS: tuple[type[BaseException], ...] = (
    ShardError,
    ExpertsMismatchError,
    GroupTooSmallError,
    FileNotFoundError,
)


class ConfigError(ValueError):
    """A ``--config`` that is neither a file nor a shipped config name."""


def shipped_configs() -> dict[str, Path]:
    """The configs packaged with ``moe``, by name (``quickstart``, ``dual_tower``, ...)."""
    folder = resources.files("moe") / "configs"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def resolve_configs(args: Sequence[str]) -> list[str]:
    """``--config NAME`` (or ``configs/NAME.yaml`` from another directory) -> the shipped file; files as given."""
    out, shipped = list(args), shipped_configs()
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = _config_path(out[i + 1], shipped)
        elif arg.startswith("--config="):
            out[i] = "--config=" + _config_path(arg.split("=", 1)[1], shipped)
    return out


def _config_path(value: str, shipped: dict[str, Path]) -> str:
    if Path(value).is_file():
        return value
    name = Path(value).name.removesuffix(".yaml")
    if name in shipped:
        return str(shipped[name])
    raise ConfigError(
        f"--config {value}: no such file and no shipped config of that name (shipped: {', '.join(sorted(shipped))})"
    )


def training_options() -> dict[str, object]:
    """The declared type of every ``--model.*`` and ``--data.*`` flag of the training commands: the signatures of
    the LightningModule and the DataModule that LightningCLI builds its options from."""
    from moe.data.datamodule import SpectraDataModule
    from moe.gates.module import GatedMoE

    return {
        f"--{section}.{name}": hint
        for section, cls in (("model", GatedMoE), ("data", SpectraDataModule))
        for name, hint in typing.get_type_hints(cls.__init__).items()
        if name != "return"
    }


def argument_error_line(exc: argparse.ArgumentError, argv: Sequence[str]) -> str:
    """A training command's refused command line as one line naming the flag, the value and what it takes: the
    first value of ``argv`` that does not fit its flag's declared type (:func:`moe.shared.arguments.find_mistake`);
    a mistake elsewhere (a config file, a flag of the trainer) is the parser's own text on one line."""
    mistake = find_mistake(argv, training_options())
    return mistake.training_line() if mistake is not None else " ".join(str(exc).split())


def _tools() -> dict[str, Callable[[list[str]], int]]:
    from moe.data import shards, synth
    from moe.experiments import realism
    from moe.experiments.__main__ import main as experiments
    from moe.experts.__main__ import main as experts

    return {
        "experts": experts,
        "experiments": experiments,
        "data synth": synth.main,
        "data validate": lambda argv: shards.main(["validate", *argv]),
        "data check": realism.main,
    }


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged (not the stream of the first call)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def show_project_log() -> None:
    """The project's INFO lines (what a long step is doing) on stderr, once."""
    log = logging.getLogger("moe")
    if not any(isinstance(h, _CurrentStderr) for h in log.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def run(argv: Sequence[str]) -> int:
    """Run one ``moe`` command line (without the program name); errors propagate."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(configs=", ".join(sorted(shipped_configs()))))
        return 0
    show_project_log()
    command, rest = argv[0], list(argv[1:])
    if command in TRAINING:
        from moe.cli import cli_main

        cli_main([command, *resolve_configs(rest)])
        return 0
    if command == "data":
        sub = rest[0] if rest else ""
        command, rest = f"data {sub}", rest[1:]
    tools = _tools()
    if command not in tools:
        raise ConfigError(
            f"unknown command {' '.join(argv[:2]) if command.startswith('data') else argv[0]!r}; see `moe --help`"
        )
    return int(tools[command](rest) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: ``moe ...`` (``argv`` without the program name; default sys.argv)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("MOE_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        return run(args)
    except (*USER_ERRORS, ConfigError, ToolArgumentError, argparse.ArgumentError) as exc:
        if debug:
            raise
        if isinstance(exc, ToolArgumentError):  # a tool's own parser names its command
            print(f"moe: error: {exc} ({exc.prog} --help lists the options)", file=sys.stderr)
        elif isinstance(exc, argparse.ArgumentError):
            line = argument_error_line(exc, args[1:])
            print(f"moe: error: {line} (moe {args[0]} --help lists the options)", file=sys.stderr)
        else:
            print(f"moe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
