"""``moe experiments NAME [--data DIR] [--n-train N] [--seeds 42 123 456] [--out reports/NAME]``.

``--min-samples N`` and ``--fallback global`` set how the Ridge experts of every experiment treat
small groups, as in ``moe experts``. A setting an experiment cannot work with (too few training
spectra, a value out of range) stops it with one line naming the flag (:class:`SettingsError`).

``all`` runs the four in order into ``--out`` (default ``reports/``), at a default size
that finishes in under 30 minutes on 2 CPU cores (20k training spectra, 1 seed, CNN up to
20 epochs); ``--n-train`` scales it from a few thousand (a smoke run) up to the full 1M
(the Ridge experts stream; in-memory models -- LightGBM, CNN, the leakage audit -- are
capped by ``--max-memory-rows``).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from moe.experiments import EXPERIMENTS
from moe.experiments.common import ExperimentSettings
from moe.gates.quiet import quiet_lightning, quiet_repeated_trainers
from moe.shared.arguments import ToolParser, run_tool

ALL_DEFAULTS = {"n_train": 20_000, "cnn_epochs": 20}


def _runner(name: str):
    from moe.experiments import ceiling, dual_tower, leakage, snr_oracle

    return {"leakage": leakage.run, "snr-oracle": snr_oracle.run, "dual-tower": dual_tower.run, "ceiling": ceiling.run}[
        name
    ]


def _parser() -> argparse.ArgumentParser:
    d = ExperimentSettings()
    p = ToolParser(prog="moe experiments", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=(*EXPERIMENTS, "all"), help="the experiment to run ('all': the four in order)")
    p.add_argument("--data", default=d.data, help="dataset folder (the default is generated on first use)")
    p.add_argument("--n-train", type=int, default=None, help="training spectra to use (default: all; 'all': 20000)")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(d.seeds),
        help="one run per seed (gate training, in-memory models, snr-oracle's test noise); results are averaged",
    )
    p.add_argument("--out", default=None, help="report folder (default reports/NAME; for 'all' the parent folder)")
    p.add_argument(
        "--noise-level",
        type=float,
        default=d.noise_level,
        help="multiplier of the 1-sigma error for the noise on every split (fresh train draws, pre-noised val/test)",
    )
    p.add_argument(
        "--max-memory-rows", type=int, default=d.max_memory_rows, help="cap for models that need rows in memory"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=d.epochs,
        help="most gate training epochs (dual-tower; each run stops early once val R^2 stalls)",
    )
    p.add_argument(
        "--cnn-epochs",
        type=int,
        default=None,
        help=f"1D-CNN epochs (ceiling; default {d.cnn_epochs}, 'all': {ALL_DEFAULTS['cnn_epochs']}; 0 skips)",
    )
    p.add_argument("--lgbm-device", default=d.lgbm_device, help="LightGBM device_type (cpu, gpu, cuda)")
    p.add_argument(
        "--min-samples",
        type=int,
        default=d.min_samples,
        help="fewest training rows a Ridge expert needs: fewer stop the expert fit before any solve, naming the "
        "short groups (a physical or SNR group may take the global expert instead: --fallback global)",
    )
    p.add_argument(
        "--fallback",
        choices=("global",),
        default=None,
        help="'global': a group with fewer than --min-samples training rows uses the global expert",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_lightning()
    quiet_repeated_trainers()
    pd.set_option("display.width", 160)
    base = ExperimentSettings(
        data=a.data,
        n_train=a.n_train,
        seeds=tuple(a.seeds),
        noise_level=a.noise_level,
        max_memory_rows=a.max_memory_rows,
        epochs=a.epochs,
        cnn_epochs=a.cnn_epochs if a.cnn_epochs is not None else ExperimentSettings.cnn_epochs,
        lgbm_device=a.lgbm_device,
        min_samples=a.min_samples,
        fallback=a.fallback,
    )
    names = EXPERIMENTS if a.name == "all" else (a.name,)
    if a.name == "all":
        base = replace(
            base,
            n_train=a.n_train or ALL_DEFAULTS["n_train"],
            cnn_epochs=a.cnn_epochs if a.cnn_epochs is not None else ALL_DEFAULTS["cnn_epochs"],
        )
    root = Path(a.out or "reports")
    for name in names:
        out = root / name if (a.name == "all" or a.out is None) else root
        t = time.time()
        result = _runner(name)(replace(base, out=str(out)))
        print(f"\n== {name}: {result['report']}/report.md ({time.time() - t:.0f} s)")
        print(result["headline"].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        for v in result["verdicts"]:
            print(f"  [{v.result}] {v.question} {v.value:+.4f} {v.op} {v.threshold:g} -> {v.decision}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main, "moe experiments"))
