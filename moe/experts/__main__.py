"""``moe experts {fit,report,compare-noise} --data DIR``.

- ``fit``: fit (or load from the cache) the expert families of every label (``--labels``; a family named by
  ``--family-labels`` for those labels only) and print the alpha table (one row per label and expert).
- ``report``: oracle-routed R^2 of the families on the test split, per label and bin with counts,
  and the z-score spread of the per-star uncertainties.
- ``compare-noise``: noise-marginalised vs one draw vs K draws, R^2 on val and test.

This tool gates nothing: a physical or SNR group with fewer than ``--min-samples`` training rows
takes the global expert, said in one line and marked (``fallback`` column of the alpha table, a
line under the report). Only the global expert must have that many rows.

Started by torchrun (``torchrun --nproc-per-node N $(which moe) experts fit ...``; the environment
names the rank and world size), ``fit`` joins the ranks in a gloo process group and splits the fit over
them by rows (:mod:`moe.experts.fit`); rank 0 prints the table.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace

import pandas as pd
import torch
from jsonargparse import Namespace

from moe.data.folder import BAD_ROWS, SpectraFolder
from moe.data.ranks import PREPARE_TIMEOUT, rank_world
from moe.data.synth import SynthConfig
from moe.experts.bundle import default_path, wide_alpha_table
from moe.experts.cache import load_or_fit
from moe.experts.evaluate import compare_noise_modes, oracle_predictions, oracle_table, zscore_table
from moe.experts.fit import NOISE_MODES, FitConfig
from moe.experts.stats import PRODUCTS
from moe.shared.arguments import NonNegativeFloat, PositiveFloat, PositiveInt, ToolArgumentError, ToolParser, run_tool


def _parser() -> ToolParser:
    fit = FitConfig()
    commands = {}
    for name in ("fit", "report", "compare-noise"):
        s = ToolParser(f"moe experts {name}")
        s.add_argument(
            "--data",
            type=str,
            default="data/synth",
            help="dataset folder; a synthetic dataset is generated only where no folder exists yet "
            "(an existing folder is read, never written into except for caches)",
        )
        s.add_argument(
            "--bad-rows",
            choices=BAD_ROWS,
            default="error",
            help="rows with NaN/Inf flux, error <= 0 or NaN inside the spectrum, NaN or out-of-range labels: "
            "stop with an error naming them (error) or leave them out (drop)",
        )
        s.add_argument("--groups", type=str, default=",".join(fit.families), help="families: global,phys,snr,cells")
        s.add_argument(
            "--labels",
            type=str,
            nargs="+",
            default=list(fit.labels),
            help="the labels to fit, each with its own experts and alphas: numeric columns of the shards' "
            "parameter table (log_g T_eff M_H a_M ...)",
        )
        s.add_argument(
            "--family-labels",
            type=str,
            nargs="+",
            default=None,
            help="families fitted for only some of --labels, as FAMILY=LABEL[,LABEL...] (cells=log_g); the others "
            "for every label, the global family always",
        )
        s.add_argument(
            "--noise-level",
            type=NonNegativeFloat,
            default=1.0,
            help="multiplier of the 1-sigma error for the noise on every split (1: as observed)",
        )
        s.add_argument(
            "--noise-mode",
            choices=NOISE_MODES,
            default=fit.noise_mode,
            help="training noise: in closed form (marginal), one draw per spectrum (single) or several (augment)",
        )
        s.add_argument(
            "--alphas",
            type=PositiveFloat,
            nargs="+",
            default=list(fit.alphas),
            help="the Ridge alpha sweep; each expert keeps the alpha best on the validation split",
        )
        s.add_argument(
            "--products",
            choices=PRODUCTS,
            default=fit.products,
            help="precision of the per-block products of the statistics pass (summed in float64 either way)",
        )
        s.add_argument(
            "--min-samples",
            type=PositiveInt,
            default=fit.min_samples,
            help="fewest training rows a Ridge expert needs: a physical or SNR group with fewer takes the global "
            "expert (marked as a fallback); a global expert with fewer stops the fit before any solve",
        )
        s.add_argument(
            "--max-train-rows",
            type=PositiveInt | None,
            default=None,
            help="use only the first N training rows (default: all)",
        )
        s.add_argument("--out", type=str | None, default=None, help="experts file (default: cached under DATA/experts)")
        if name == "compare-noise":
            s.add_argument(
                "--draws",
                type=PositiveInt,
                default=fit.n_draws,
                help="noise draws per spectrum of the K-draws training",
            )
        commands[name] = s
    p = ToolParser("moe experts", description=__doc__.split("\n")[0])
    p.add_tool_subcommands(commands)
    return p


def join_ranks() -> bool:
    """Join the process group torchrun's environment describes (``WORLD_SIZE`` > 1); False when there is none
    to join or one exists already."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group("gloo", timeout=PREPARE_TIMEOUT)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parsed = _parser().parse_args(argv)
    joined = join_ranks() if parsed.cmd == "fit" else False
    try:
        return _main(parsed.cmd, parsed[parsed.cmd])
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def with_family_labels(cfg: FitConfig, values: list[str], prog: str) -> FitConfig:
    """``cfg`` with the families of ``--family-labels`` (``FAMILY=LABEL[,LABEL...]`` each) fitted for those labels
    only; a value that does not fit is one :class:`ToolArgumentError` naming the flag."""
    pairs = []
    for value in values:
        family, sep, names = value.partition("=")
        if not sep or not family or not names:
            raise ToolArgumentError(
                f"--family-labels {value!r}: expected FAMILY=LABEL[,LABEL...], e.g. cells=log_g", prog
            )
        pairs.append((family, tuple(names.split(","))))
    try:
        return replace(cfg, family_labels=tuple(pairs))
    except ValueError as exc:
        raise ToolArgumentError(f"--family-labels: {exc}", prog) from None


def _main(cmd: str, a: Namespace) -> int:
    """Run subcommand ``cmd`` with its options ``a``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pd.set_option("display.width", 160)
    folder = SpectraFolder(
        a.data, noise_level=a.noise_level, max_train_rows=a.max_train_rows, synth=SynthConfig(), bad_rows=a.bad_rows
    )
    cfg = FitConfig(
        families=tuple(a.groups.split(",")),
        alphas=tuple(a.alphas),
        noise_mode=a.noise_mode,
        products=a.products,
        min_samples=a.min_samples,
        labels=tuple(a.labels),
        required=("global",),  # nothing is gated here: a short group is the global expert, marked
    )
    cfg = with_family_labels(cfg, a.family_labels or [], f"moe experts {cmd}")
    if cmd == "compare-noise":
        table = compare_noise_modes(folder, cfg, a.draws)
        wide = table.pivot_table(index=["training"], columns=["split", "experts"], values="r2", sort=False)
        print(wide.round(4).to_string())
        return 0
    bundle = load_or_fit(folder, cfg, a.out)
    path = a.out or default_path(folder, cfg)
    if cmd == "fit" and rank_world()[0] > 0:  # rank 0 prints for the group
        return 0
    if cmd == "fit":
        print(f"experts: {path}")
        print(wide_alpha_table(bundle.alpha_table()).to_string(float_format=lambda v: f"{v:.4g}"))
        if bundle.timings:
            print(
                "timings: "
                + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in bundle.timings.items())
            )
        return 0
    for label in bundle.labels:
        res = oracle_predictions(folder, bundle, "test", label=label)
        table = oracle_table(res)
        print(
            f"{label}: oracle-routed experts on the test split ({res.y.size} spectra, noise_level "
            f"{folder.noise_level}); experts: {path}"
        )
        wide = table.pivot_table(index="slice", columns="experts", values="r2", sort=False)
        wide.insert(0, "n", table[table.experts == table.experts.iloc[0]].set_index("slice")["n"])
        print(wide.round(4).to_string())
        print(
            f"\n{label}: per-star uncertainty, z = (pred - {label}) / sigma_k, "
            "sigma_k^2 = noise_level^2 sum_i (w_ki error_i)^2"
        )
        print(zscore_table(res).round(3).to_string(index=False) + "\n")
    for fam, name, n in bundle.stand_ins():
        print(
            f"fallback: {fam}/{name} has {n} training rows (< --min-samples {a.min_samples}): its rows use the global expert"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main, "moe experts"))
