"""Realism check of a dataset folder: does it carry the physics the experiments probe?

``moe data check DIR [--n-train 50000] [--n-test 5000]`` prints one line per
check with its value, bound and PASS/FAIL, writes ``spectra_by_logg.png`` and exits
non-zero if a check fails. At noise_level 1:

- every SNR bin (X/L/M/H) holds >= 3% of spectra, and most have SNR <= 7;
- global Ridge (scikit-learn, standardised, alpha chosen on val) log g R^2 in [0.3, 0.8];
- 9-bin oracle Ridge R^2 >= global + 0.05;
- error-only Ridge R^2 >= 0.5 while Ridge on the 10 aggregate statistics gives <= 0.2.

This is a verification tool: it loads ``--n-train`` rows into memory (about 3.5 GB at
50k x 4096 in float64); training never does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from moe.data import bins
from moe.data.error_stats import quality_stats
from moe.data.noise import add_noise_np
from moe.data.noise import snr as snr_of
from moe.data.shards import find_split, inspect_shard, read_block, read_params
from moe.experts.scores import r2
from moe.experts.sklearn_ridge import fit_ridge_sweep
from moe.shared.arguments import NonNegativeFloat, PositiveInt, ToolParser, run_tool


@dataclass(frozen=True)
class Bounds:
    """Pass thresholds; the unit test uses looser ones at small N."""

    min_bin_share: float = 0.03
    global_r2: tuple[float, float] = (0.3, 0.8)
    oracle_gain: float = 0.05
    error_only_min: float = 0.5
    quality_max: float = 0.2


@dataclass(frozen=True)
class CheckLine:
    name: str
    value: float
    bound: str
    passed: bool

    def row(self) -> str:
        return f"{self.name:<42} {self.value:>9.4f}   {self.bound:<16} {'PASS' if self.passed else 'FAIL'}"


@dataclass
class Split:
    """Rows of one split held in memory: flux/error [N, D] float32, params DataFrame."""

    flux: np.ndarray
    error: np.ndarray
    params: pd.DataFrame


def load_rows(data_dir: str | os.PathLike, split: str, n: int | None) -> Split:
    """The first ``n`` rows of a split (all when None), concatenated across shards."""
    fluxes, errors, tables, have = [], [], [], 0
    for path in find_split(data_dir, split):
        info = inspect_shard(path)
        take = info.n_rows if n is None else min(info.n_rows, n - have)
        flux, error = read_block(path, 0, take)
        fluxes.append(flux)
        errors.append(error)
        tables.append(read_params(path, info.params_key).iloc[:take])
        have += take
        if n is not None and have >= n:
            break
    return Split(np.concatenate(fluxes), np.concatenate(errors), pd.concat(tables, ignore_index=True))


def run_checks(
    train: Split, val: Split, test: Split, noise_level: float = 1.0, seed: int = 0, bounds: Bounds = Bounds()
) -> list[CheckLine]:
    """All realism checks on in-memory splits (train noised once, val/test with fixed seeds)."""
    rng = np.random.default_rng(seed)
    x_tr = add_noise_np(train.flux, train.error, noise_level, rng)
    x_va = add_noise_np(val.flux, val.error, noise_level, rng)
    x_te = add_noise_np(test.flux, test.error, noise_level, rng)
    y_tr, y_va, y_te = (s.params["log_g"].to_numpy(np.float64) for s in (train, val, test))
    lines: list[CheckLine] = []

    snr_all = snr_of(np.concatenate([train.flux, test.flux]), np.concatenate([train.error, test.error]), noise_level)
    share = np.bincount(bins.snr_bin(snr_all), minlength=bins.N_SNR_BINS) / snr_all.size
    for name, s in zip(bins.SNR_BIN_NAMES, share):
        lines.append(
            CheckLine(f"share of SNR bin {name}", s, f">= {bounds.min_bin_share:.2f}", s >= bounds.min_bin_share)
        )
    low = float(np.mean(snr_all <= 7))
    lines.append(CheckLine("share with SNR <= 7", low, "> 0.50", low > 0.5))

    r2_global = r2(y_te, fit_ridge_sweep(x_tr, y_tr, x_va, y_va).predict(x_te))
    lo, hi = bounds.global_r2
    lines.append(CheckLine("global Ridge R2 (noisy flux)", r2_global, f"in [{lo}, {hi}]", lo <= r2_global <= hi))

    b_tr, b_va, b_te = (bins.phys_bin(s.params["T_eff"], s.params["M_H"]) for s in (train, val, test))
    pred = np.empty_like(y_te)
    for k in range(bins.N_PHYS_BINS):
        m_tr, m_va, m_te = b_tr == k, b_va == k, b_te == k
        if not m_te.any():
            continue
        if m_tr.sum() < 2 or m_va.sum() < 2:
            raise ValueError(
                f"physical bin {k} ({bins.PHYS_BIN_NAMES[k]}) has {m_tr.sum()} train / {m_va.sum()} val rows"
            )
        pred[m_te] = fit_ridge_sweep(x_tr[m_tr], y_tr[m_tr], x_va[m_va], y_va[m_va]).predict(x_te[m_te])
    r2_oracle = r2(y_te, pred)
    need = r2_global + bounds.oracle_gain
    lines.append(CheckLine("9-bin oracle Ridge R2", r2_oracle, f">= {need:.4f}", r2_oracle >= need))

    r2_err = r2(y_te, fit_ridge_sweep(train.error, y_tr, val.error, y_va).predict(test.error))
    lines.append(
        CheckLine("error-only Ridge R2", r2_err, f">= {bounds.error_only_min}", r2_err >= bounds.error_only_min)
    )

    q_tr, q_va, q_te = (quality_stats(s.error) for s in (train, val, test))
    r2_q = r2(y_te, fit_ridge_sweep(q_tr, y_tr, q_va, y_va).predict(q_te))
    lines.append(
        CheckLine(
            "10 aggregate error statistics Ridge R2", r2_q, f"<= {bounds.quality_max}", r2_q <= bounds.quality_max
        )
    )
    return lines


def spectra_figure(
    split: Split,
    wave: np.ndarray,
    path: str | os.PathLike,
    teff: float = 4300.0,
    mh: float = 0.0,
    loggs: Sequence[float] = (1.5, 3.0, 4.5),
) -> Path:
    """CaT and Na I regions of three stars near (teff, mh) with log g near each of ``loggs``."""
    from moe.plots import save, spectra_regions

    p = split.params
    rows, labels = [], []
    for g in loggs:
        dist = ((p["T_eff"] - teff) / 250.0) ** 2 + ((p["M_H"] - mh) / 0.25) ** 2 + ((p["log_g"] - g) / 0.3) ** 2
        i = int(np.argmin(dist.to_numpy()))
        rows.append(split.flux[i])
        labels.append(f"log g {p['log_g'][i]:.2f} (T_eff {p['T_eff'][i]:.0f} K, [M/H] {p['M_H'][i]:+.2f})")
    fig = spectra_regions(
        wave,
        np.asarray(rows),
        labels,
        [(8170.0, 8210.0, "Na I 8183/8195"), (8480.0, 8680.0, "Ca II triplet 8498/8542/8662")],
    )
    return save(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    ap = ToolParser("moe data check", description="Realism check of a dataset folder.")
    ap.add_argument("data_dir", type=str, help="dataset folder (train_*/, val*/, test*/ shards)")
    ap.add_argument("--n-train", type=PositiveInt, default=50_000, help="training spectra the Ridge checks use")
    ap.add_argument("--n-test", type=PositiveInt, default=5_000, help="test spectra the checks score")
    ap.add_argument(
        "--noise-level", type=NonNegativeFloat, default=1.0, help="multiplier of the 1-sigma error for the noise"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    ap.add_argument(
        "--figure",
        type=str | None,
        default=None,
        help="spectra-by-log-g figure path (default: DIR/spectra_by_logg.png)",
    )
    a = ap.parse_args(argv)
    from moe.data.shards import read_wave

    train = load_rows(a.data_dir, "train", a.n_train)
    val = load_rows(a.data_dir, "val", a.n_test)
    test = load_rows(a.data_dir, "test", a.n_test)
    print(
        f"{a.data_dir}: {len(train.params)} train / {len(val.params)} val / {len(test.params)} test, "
        f"{train.flux.shape[1]} px, noise_level {a.noise_level}"
    )
    lines = run_checks(train, val, test, a.noise_level, a.seed)
    print(f"{'check':<42} {'value':>9}   {'bound':<16} result")
    for line in lines:
        print(line.row())
    fig = spectra_figure(
        test, read_wave(find_split(a.data_dir, "test")[0]), a.figure or Path(a.data_dir) / "spectra_by_logg.png"
    )
    print(f"figure: {fig}")
    ok = all(line.passed for line in lines)
    print("all checks pass" if ok else "some checks FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(run_tool(main, "moe data check"))
