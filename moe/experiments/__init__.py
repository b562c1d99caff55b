"""The experiment series as commands: ``moe experiments {leakage,snr-oracle,dual-tower,ceiling,all}``.

Each writes a report folder: ``report.md`` with computed verdicts, CSV tables, the named PNG
figures, and the config and data fingerprint; ``all`` adds the summary page ``README.md``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moe.experiments.common import Experiment

EXPERIMENTS = ("leakage", "snr-oracle", "dual-tower", "ceiling")


def experiment(name: str) -> Experiment:
    """The experiment called ``name`` (one of ``EXPERIMENTS``), its module imported on first use."""
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; choose from {EXPERIMENTS}")
    return import_module(f"moe.experiments.{name.replace('-', '_')}").EXPERIMENT
